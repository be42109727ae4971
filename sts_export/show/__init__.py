"""What was kept: pictures of kept tokens (pictures.py), method comparisons and the KNN consistency
diagnostic (compare.py, diagnostics.py). `python -m sts_export.show` is its CLI."""
