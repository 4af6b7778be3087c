"""Atomic file and directory writes, and the staging folders they go through.

Outputs are written under a hidden temporary name and renamed into place, so
an interrupted run never leaves a half-written shard, manifest or model under
the name that readers look for. Staging folders carry the host and process id
of their writer (`.<name>.partial-<host>-<pid>-<random>`): the next run of any
command that writes there removes the ones whose process is gone, so a killed
run leaves no (possibly identified) images behind for long.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tfgan_ct.errors import TfganError

log = logging.getLogger("tfgan_ct.fileio")

# Staging folders of tfgan-ct 0.1 had no process id; they count as stale after this long.
LEGACY_STALE_SECONDS = 3600


class OutputError(TfganError, RuntimeError):
    """An output location that must not be written or replaced."""


def default_mode(base: int) -> int:
    """Permission bits that open() (`base` 0o666) or mkdir() (0o777) would give here: `base`
    less the process umask. `tempfile` creates owner-only files and folders; outputs that
    other users (a TF Serving account, colleagues) must read get these bits instead."""
    mask = os.umask(0o022)
    os.umask(mask)
    return base & ~mask


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _host() -> str:
    """This machine's name, reduced to characters safe in a file name."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def make_staging(parent: Path, name: str) -> Path:
    """A new, empty staging folder `.<name>.partial-<host>-<pid>-<random>` in `parent`."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{_host()}-{os.getpid()}-", dir=parent))
    os.chmod(stage, default_mode(0o777))
    return stage


# `.<name>.partial-<host>-<pid>-*`, `.<name>.old-<host>-<pid>-*`, and 0.1's `.<name>.partial-*`
# and `.partial-*` (exports), which recorded no owner.
_STAGING = re.compile(r"\.(?:(?P<name>.*)\.)?(?P<kind>partial|old)-(?:(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-)?")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale(match: re.Match, path: Path) -> bool:
    if match["pid"] is None:  # tfgan-ct 0.1: no owner recorded
        try:
            return time.time() - path.lstat().st_mtime > LEGACY_STALE_SECONDS
        except OSError:
            return False
    return match["host"] == _host() and not _alive(int(match["pid"]))


def remove_stale_staging(parent: Path, name: str | None = None) -> list[Path]:
    """Remove staging left in `parent` by runs on this machine whose process is gone.

    `name` limits the clean-up to the staging of one output (`.<name>.partial-*`);
    None takes every staging folder in `parent`. A `.<name>.old-*` folder (an
    output being replaced when the run died) is put back when `<name>` is missing,
    removed otherwise. Returns the folders removed (each is also logged).
    """
    parent = Path(parent)
    removed = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _STAGING.match(path.name)
        if match is None or (name is not None and match["name"] != name) or not _stale(match, path) \
                or (match["name"] is None and match["kind"] == "old"):
            continue
        if match["kind"] == "old" and not os.path.lexists(parent / match["name"]):
            os.replace(path, parent / match["name"])
            log.warning("put back %s: a run that was replacing it was interrupted", parent / match["name"])
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            removed.append(path)
            log.warning("removed %s, left by an interrupted run", path)
    return removed


@contextmanager
def staged_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder that becomes `final` only when the block succeeds.

    The staging folder sits beside `final` (same file system) under a hidden
    name; stale staging of earlier, interrupted runs for `final` is removed
    first. On success an existing `final` is replaced (only when `overwrite`);
    on error the staging folder is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final.parent, final.name)
    stage = make_staging(final.parent, final.name)
    try:
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
        old = final.with_name(f".{final.name}.old-{_host()}-{os.getpid()}-0")
        os.replace(final, old)
        os.replace(src, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, final)


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies under it (both resolved)."""
    return path == folder or folder in path.parents


def check_replaceable(final: Path, inputs: Iterable[str | Path], is_ours: Callable[[Path], bool],
                      what: str) -> None:
    """Refuse to replace `final` unless this tool made it and it holds none of `inputs`.

    `is_ours(final)` recognises an output of the command (e.g. a dataset with
    our manifest); `what` names that kind of output in the message. Raises
    OutputError saying why nothing was replaced.
    """
    final = Path(final)
    if not final.exists():
        return
    real = final.resolve()
    for item in inputs:
        item = Path(item).resolve()
        if _inside(item, real):
            raise OutputError(f"{final}: refusing to replace it, it holds the input {item} "
                              f"(choose another output folder)")
    if not final.is_dir():
        raise OutputError(f"{final} exists and is not a folder")
    if any(final.iterdir()) and not is_ours(final):
        raise OutputError(f"{final} is not {what} made by tfgan-ct; --overwrite only replaces "
                          f"those (move it away or choose another output folder)")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk or quota is full (OSError or a TensorFlow error)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text
