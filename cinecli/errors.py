"""User-facing errors. Each carries the exit code the CLI returns for it; the message is one line."""

from __future__ import annotations


class CineError(Exception):
    """Base class: a clear, one-line message and an exit code. Never shown as a traceback."""

    exit_code = 1


class WeightsError(CineError):
    """A weight file is missing, unreadable, unsafe, or does not fit the model it is loaded into."""

    exit_code = 3
