#!/usr/bin/env python
"""`python bench.py ...` (= `sts bench ...`): the bench command, `sts_export/cli/bench.py`."""
from sts_export.cli.bench import main

if __name__ == "__main__":
    main()
