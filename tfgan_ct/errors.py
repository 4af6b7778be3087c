"""The one error type of tfgan-ct."""
from __future__ import annotations


class TfganError(Exception):
    """Base of every error the package raises on purpose (bad input, settings, outputs,
    models): its message says what is wrong and, where it helps, what to do. The
    command line prints it as one line, without a traceback."""
