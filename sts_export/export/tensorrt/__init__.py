"""TensorRT engines from an export's ONNX graphs: the static check that replays onnx-tensorrt's importer (`check.py`
and its `parser_*` parts) and the strongly typed build (`build.py`, per graph; `engines.py`, a whole export).
Running engines is `sts_export.backends.tensorrt`; the self-test users run on a device is `sts_export.show.selftest`.
"""
