"""`python -m sts_export.run EXPORT_DIR --image IMG --prompt TEXT` (= `sts run ...`; the command is
`sts_export/cli/run.py`)."""
from sts_export.cli.run import main

if __name__ == "__main__":
    main()
