"""`python -m sts_export.cli COMMAND ...` = `sts COMMAND ...`."""
from sts_export.cli.main import main

main(prog_name="sts")
