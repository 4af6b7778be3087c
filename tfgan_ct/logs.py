"""A log file beside a command's output (`convert.log`, `train.log`).

Lines that name input files (`extra=TERMINAL_ONLY`) go to the terminal but
not into these files: hospital archives often name files and folders by
DICOM UID or patient ID, and the log file travels with the dataset.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TERMINAL_ONLY = {"terminal_only": True}  # `extra=` of a log call whose line names an input file


def _not_terminal_only(record: logging.LogRecord) -> bool:
    return not getattr(record, "terminal_only", False)


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Copy the package's log records, except TERMINAL_ONLY ones, to `path` while the block runs."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(_not_terminal_only)
    logger = logging.getLogger("tfgan_ct")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
