"""Export: the graphs to ONNX (onnx.py), the manifest (manifest.py), validation against torch (validate.py).

Nothing is imported here, so reading a manifest on a Jetson never imports torch."""
