"""TensorRT: static parser check (check.py), engine build (build.py, engines.py), runtime (runtime.py); importable without TensorRT."""
