"""Building what the backends run: the graphs to ONNX (onnx.py, io.py), their ONNX Runtime form (ort_form.py),
validation against torch (validate.py, precision.py, compare.py), int8/int4 weights (weights.py, quantize.py),
sibling reuse (reuse.py), AOTInductor packages (aoti.py), TensorRT engines and the static check (tensorrt/).

Nothing is imported here, so building engines on a Jetson never imports torch."""
