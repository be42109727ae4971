"""User-facing errors: one line that says what is wrong and what to do."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class StsError(Exception):
    """An error caused by the user's input or environment (never a bug).

    The CLIs print ``str(err)`` as a single line and exit non-zero, without a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


@contextmanager
def cli_errors(interrupted: str = "interrupted") -> Iterator[None]:
    """The CLIs' boundary: an StsError becomes one `error: ...` line on stderr and exit 2; Ctrl-C exits 130."""
    try:
        yield
    except StsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
