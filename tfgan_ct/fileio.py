"""Atomic file and directory writes: a temporary name first, then a rename.

An interrupted run therefore never leaves a half-written shard, manifest or
model under the name that readers look for.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def default_mode(base: int) -> int:
    """Permission bits that open() (`base` 0o666) or mkdir() (0o777) would give here: `base`
    less the process umask. `tempfile` creates owner-only files and folders; outputs that
    other users (a TF Serving account, colleagues) must read get these bits instead."""
    mask = os.umask(0o022)
    os.umask(mask)
    return base & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_mode(0o666))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def staged_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder that becomes `final` only when the block succeeds.

    The staging folder sits beside `final` (same file system) under a hidden
    name. On success an existing `final` is replaced (only when `overwrite`);
    on error the staging folder is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        os.chmod(stage, default_mode(0o777))
        yield stage
        replace_directory(stage, final, overwrite)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def replace_directory(src: Path, final: Path, overwrite: bool) -> None:
    """Move folder `src` to `final`, swapping out an old `final` when `overwrite`."""
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{final} already exists (use --overwrite to replace it)")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(src, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, final)
