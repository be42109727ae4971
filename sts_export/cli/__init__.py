"""The command line: `sts` and its subcommands (main.py), one module per command, the option groups they share
(options.py). `python export.py`, `python bench.py` and `python -m sts_export.run` are the same commands."""
