#!/usr/bin/env python
"""The design card's command: `python export.py --model llava-1.5-7b --budget 64 --target trt` (= `sts export ...`).
The command itself is `sts_export/cli/export.py`."""
from sts_export.cli.export import main

if __name__ == "__main__":
    main()
