"""What was kept, and reports for users: pictures of kept tokens (pictures.py), method comparisons and the KNN
consistency diagnostic (compare.py, diagnostics.py), the TensorRT self-test a user runs on a device (selftest.py).
`sts show` is the pictures' CLI."""
