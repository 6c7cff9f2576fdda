"""User-facing errors and the exit codes the CLI returns for them (README "Exit codes" lists the same table).

Every expected failure is one of these: the CLI prints its one-line message to stderr, never a traceback.
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected runtime failure (the message says what; --debug shows the traceback)
EXIT_USAGE = 2  # bad options, unknown effect, malformed preset (Click uses 2 for usage errors too)
EXIT_INPUT = 3  # the input image is missing, unreadable, truncated, empty or too large
EXIT_WEIGHTS = 4  # weights missing (and not downloadable now), unsafe, or not fitting the model
EXIT_NUMERIC = 5  # generation produced NaN/Inf (e.g. a quantization recipe too aggressive)
EXIT_OUTPUT = 6  # the output exists (no --overwrite), or cannot be written
EXIT_DEVICE = 7  # the requested device is not available, or ran out of memory
EXIT_INTERRUPTED = 130  # Ctrl-C; temp files are removed
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away (`cine info x.mp4 | head -1`), as for SIGPIPE


class CineError(Exception):
    """Base class: a clear, one-line message and an exit code."""

    exit_code = EXIT_FAILURE


class UsageError(CineError):
    exit_code = EXIT_USAGE


class InputError(CineError):
    exit_code = EXIT_INPUT


class WeightsError(CineError):
    """A weight file is missing, unreadable, unsafe, or does not fit the model it is loaded into."""

    exit_code = EXIT_WEIGHTS


class NumericError(CineError):
    exit_code = EXIT_NUMERIC


class OutputError(CineError):
    exit_code = EXIT_OUTPUT


class DeviceError(CineError):
    exit_code = EXIT_DEVICE


class DiskFullError(OutputError):
    """No space left on the device (or the quota is used up): a batch stops instead of failing every later item."""


def output_error(exc: OSError, path: object) -> OutputError:
    """An OSError met while writing ``path`` → the one-line error the user sees (disk full said as such)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"disk full: cannot write {path} ({exc.strerror or exc}); free some space and rerun")
    return OutputError(f"cannot write {path}: {exc.strerror or exc}")
