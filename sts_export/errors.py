"""User-facing errors: one line that says what is wrong and what to do."""
from __future__ import annotations


class StsError(Exception):
    """An error caused by the user's input or environment (never a bug).

    The CLIs print ``str(err)`` as a single line and exit non-zero, without a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
