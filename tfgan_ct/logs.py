"""A log file beside a command's output (`convert.log`, `train.log`)."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Copy the package's log records to `path` while the block runs."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("tfgan_ct")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
