"""`python -m sts_export.serve EXPORT_DIR ...` = `sts serve EXPORT_DIR ...` (a command line: tests/test_house.py puts
every `__main__` in the command lines' layer)."""
from sts_export.cli.serve import main

main(prog_name="python -m sts_export.serve")
