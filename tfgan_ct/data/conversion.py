"""The conversion driver shared by `tfgan-ct convert` (DICOM) and `convert-images`.

`run_conversion` runs a `Source` (what is read and how it becomes records):
header pass (in a process pool) -> plan (split, order) -> records made in the
pool and written in plan order -> manifest. The same inputs and seed always
give byte-identical shards. Everything is written into a hidden staging folder
renamed to the output folder only at the end, so an interrupted run leaves
nothing that looks like a finished dataset.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

from tfgan_ct.config import REDACTED_SALT, Config, ConfigError
from tfgan_ct.data import splits
from tfgan_ct.data.dicom_files import Skipped
from tfgan_ct.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, RecordMeta, ShardWriter, encode, framed
from tfgan_ct.errors import TfganError
from tfgan_ct.fileio import OutputError, atomic_write_text, check_replaceable, staged_directory
from tfgan_ct.logs import log_to_file
from tfgan_ct.stages import STAGES
from tfgan_ct.version import __version__

log = logging.getLogger("tfgan_ct.data.conversion")


class ConvertError(TfganError, RuntimeError):
    """Conversion cannot produce a dataset (nothing usable, output exists, bad settings)."""


@dataclass
class Summary:
    """What a conversion did (also the core of the manifest)."""

    out: Path
    records: Counter = field(default_factory=Counter)       # (split, modality) -> records
    slices: Counter = field(default_factory=Counter)        # (split, modality) -> slices (or images)
    skipped: list[Skipped] = field(default_factory=list)
    empty_slices: int = 0
    seconds: float = 0.0


@dataclass
class SliceResult:
    """A converted slice: HR (int16, H x W), LR (float32, H/scale x W/scale), mask (bool, H x W)."""

    slice_index: int
    hr: np.ndarray
    lr: np.ndarray
    mask: np.ndarray
    pixel_spacing: tuple[float, float]


@dataclass
class SliceRecords:
    """What a worker returns for one slice: its serialised records (none if no brain).

    From a worker process the records come back through a spool file instead, in
    TFRecord framing: `records` then holds their framed sizes in bytes until `unspool`
    puts back views of the framed bytes and sets `framed`.
    """

    slice_index: int
    records: list[bytes] | list[int]
    has_brain: bool
    framed: bool = False


class Source(Protocol):
    """One kind of input (DICOM, image files) as `run_conversion` drives it."""

    unit: str           # what one converted item is called in logs: "slice", "image"
    nothing_found: str  # error text when nothing usable is found, e.g. "no usable CT images found"

    def scan(self, inputs: list, pool, progress: bool) -> tuple[list, list[Skipped]]:
        """Header pass over `inputs` in `pool`: what was found, and the files skipped."""

    def plan(self, found: list, skipped: list[Skipped], salt: str) -> list:
        """Split and order what was found (logged); [] when nothing is usable."""

    def write(self, plans: list, stage: Path, pool, summary: Summary, progress: bool) -> dict[str, list[dict]]:
        """Make and write the records of `plans` into `stage`; the shards of each split."""

    def nothing_written(self, summary: Summary, where: str) -> str:
        """Error text when no record was written."""

    def manifest(self, plans: list, shards: dict[str, list[dict]], summary: Summary) -> dict:
        """The dataset's manifest.json."""


def run_conversion(source: Source, inputs: Iterable[str | Path], out: str | Path, cfg: Config,
                   workers: int | None = None, overwrite: bool = False, progress: bool = True) -> Summary:
    """Convert `inputs` read by `source` into a shard dataset at `out` (see the module docstring).

    Raises ConfigError for bad settings, ConvertError when `out` cannot be written or
    nothing usable is found.
    """
    start = time.perf_counter()
    check_settings(cfg)
    inputs = list(inputs)
    out = check_output(out, overwrite, inputs, "a dataset")
    where = ", ".join(map(str, inputs))
    summary = Summary(out=out)
    with worker_pool(workers or os.cpu_count() or 1, type(source).__module__) as pool, \
            staged_directory(out, overwrite=overwrite) as stage, log_to_file(stage / "convert.log"):
        found, skipped = source.scan(inputs, pool, progress)
        summary.skipped.extend(skipped)
        plans = source.plan(found, skipped, salt_of(cfg))
        if not plans:
            raise ConvertError(f"{source.nothing_found} in {where}{skipped_text(summary.skipped)}")
        shards = source.write(plans, stage, pool, summary, progress)
        if not sum(summary.records.values()):
            raise ConvertError(source.nothing_written(summary, where) + skipped_text(summary.skipped))
        summary.seconds = time.perf_counter() - start
        manifest = source.manifest(plans, shards, summary)
        atomic_write_text(stage / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        cfg.save(stage / "config.yaml")
        log_summary(summary, source.unit)
    return summary


def salt_of(cfg: Config) -> str:
    """The salt of every hash written (patients, series, order): convert.salt, else from the seed."""
    return cfg.convert.salt or f"tfgan-ct:{cfg.convert.seed}"


def check_settings(cfg: Config) -> None:
    """Reject settings that cannot work (before any file is read): every setting as on
    loading (it may have been changed since), and a salt saved as a placeholder."""
    cfg.validate()
    if cfg.convert.salt == REDACTED_SALT:
        raise ConfigError("convert.salt: this configuration was saved without its secret salt; "
                          "pass the salt again with --set convert.salt=... (or leave it empty)")


def is_dataset(folder: Path) -> bool:
    """Whether `folder` holds a dataset written by tfgan-ct (its manifest names our format)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def check_output(out: str | Path, overwrite: bool, inputs: Iterable[str | Path] = (),
                 what: str = "a dataset") -> Path:
    """The output folder as a Path; refuses a file, a non-empty folder without `overwrite`,
    and with `overwrite` anything but a dataset of ours that holds none of `inputs`.

    An existing empty folder is removed so that the staged output can take its place.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConvertError(f"{out} already exists and is not empty (use --overwrite to replace it)")
        try:
            check_replaceable(out, inputs, is_dataset, what)
        except OutputError as exc:
            raise ConvertError(str(exc)) from None
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    return out


def skipped_text(skipped: list[Skipped]) -> str:
    """'; 3 file(s) skipped (truncated: 2, not-dicom: 1)', or '; no file was skipped'."""
    if not skipped:
        return "; no file was skipped"
    counts = Counter(item.code for item in skipped)
    return f"; {len(skipped)} file(s) skipped ({', '.join(f'{c}: {n}' for c, n in sorted(counts.items()))})"


# ---------------------------------------------------------------- worker pool


class InProcess:
    """Stand-in for a process pool when `--workers 1` (easier to debug)."""

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# One BLAS/OpenMP thread per worker: the pool already uses every core, and
# oversubscribed BLAS threads slow conversion down (see docs/benchmarks.md).
_WORKER_ENV = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
# glibc malloc: keep freed memory in the heap for the next slice's arrays instead of
# returning it to the system and faulting fresh zeroed pages in again.
_WORKER_ENV.update(MALLOC_MMAP_THRESHOLD_=str(64 << 20), MALLOC_TRIM_THRESHOLD_=str(256 << 20))


def worker_pool(workers: int, preload: str = __name__):
    """A process pool of `workers` (an `InProcess` for one); `preload`: the module whose
    imports the fork server loads once for all workers (the source's worker functions)."""
    if workers <= 1:
        return InProcess()
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not Path(main_file).is_file():
        # Spawned workers re-import the main module; from `python - < script` they
        # cannot, and a pool of workers that die at start would wait forever.
        log.warning("running in one process: the main script %s cannot be re-imported by "
                    "worker processes", main_file)
        return InProcess()
    saved = {name: os.environ.get(name) for name in _WORKER_ENV}
    os.environ.update(_WORKER_ENV)
    try:
        return _context(preload).Pool(workers)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _context(preload: str):
    """Where worker processes come from: a fork server where there is one, else spawn.

    Workers must not inherit TensorFlow's threads from the parent, so plain fork
    is out. With spawn every worker imports NumPy, SciPy and pydicom itself; the
    fork server imports them once and forks the workers from itself, and stays up
    for later conversions in the same process.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([preload])
        return context
    return multiprocessing.get_context("spawn")


def header_pass(pool, fn: Callable, items: list, chunksize: int, desc: str, unit: str,
                progress: bool) -> Iterator:
    """`pool.imap(fn, items)` under a progress bar (`desc`, one `unit` per item)."""
    from tqdm import tqdm  # here: worker processes import this module and never need it

    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress)
    for result in pool.imap(fn, items, chunksize=chunksize):
        bar.update()
        yield result
    bar.close()


# ---------------------------------------------------------------- records and shards


def slice_records(result: SliceResult, meta: RecordMeta, cfg: Config) -> list[bytes]:
    """Serialised records of one slice: patches for train, the whole slice otherwise.

    Training patches (HR `patch_size`, `patch_stride` apart) are kept when more
    than `min_mask_fraction` of them is brain; their LR is the matching window
    of the whole slice's LR. Slices without brain give no records.
    """
    if not result.mask.any():
        return []
    meta = dataclasses.replace(meta, slice_index=result.slice_index, pixel_spacing=result.pixel_spacing)
    s = cfg.convert.scale
    if meta.split != "train":
        return [encode(result.hr, result.lr, result.mask, meta, s)]
    size, stride = cfg.convert.patch_size, cfg.convert.patch_stride
    height, width = result.hr.shape
    records = []
    for y in range(0, height - size + 1, stride):
        for x in range(0, width - size + 1, stride):
            mask = result.mask[y:y + size, x:x + size]
            if mask.mean() <= cfg.convert.min_mask_fraction:
                continue
            lr = result.lr[y // s:(y + size) // s, x // s:(x + size) // s]
            records.append(encode(result.hr[y:y + size, x:x + size], lr, mask,
                                  dataclasses.replace(meta, patch_y=y, patch_x=x), s))
    return records


class ShardSet:
    """The shard writers of one dataset, one per (split, modality), and the counts in `summary`."""

    def __init__(self, stage: Path, shard_size: int, summary: Summary):
        self.stage, self.shard_size, self.summary = stage, shard_size, summary
        self.writers: dict[tuple[str, str], ShardWriter] = {}

    def add(self, split: str, modality: str, result: SliceRecords) -> None:
        """Write the records of one slice (counted as a slice without brain when it has none)."""
        key = (split, modality)
        if key not in self.writers:
            self.writers[key] = ShardWriter(self.stage, split, modality, self.shard_size)
        if not result.has_brain:
            self.summary.empty_slices += 1
            return
        self.summary.slices[key] += 1
        write = self.writers[key].write_framed if result.framed else self.writers[key].write
        for record in result.records:
            write(record)
        self.summary.records[key] += len(result.records)

    def close(self) -> dict[str, list[dict]]:
        """Finish every shard; the shard entries of each split (every split present)."""
        shards: dict[str, list[dict]] = {split: [] for split in splits.SPLITS}
        for (split, _), writer in sorted(self.writers.items()):
            shards[split].extend(writer.close())
        return shards


def spool_records(results: list[SliceRecords], path: str) -> None:
    """Worker: write the records of `results` to spool file `path` in TFRecord framing
    (CRCs made here, in parallel), leaving their framed sizes in `records`.

    Megabytes of records sent back through the pool's pipe (pickled, then read in
    small chunks) cost the main process more CPU than the whole record writing;
    through a file (read back and deleted at once, so usually never on disk) it is
    one write here and one read there.
    """
    with open(path, "wb") as f:
        for result in results:
            sizes = []
            for record in result.records:
                pieces = framed(record)
                f.writelines(pieces)
                sizes.append(sum(map(len, pieces)))
            result.records = sizes


def unspool(results: list[SliceRecords], path: Path) -> None:
    """Put back the framed records that a worker wrote to spool file `path` (views of
    its bytes, no copies) and delete the file."""
    data = memoryview(path.read_bytes())
    path.unlink()
    offset = 0
    for result in results:
        records = []
        for size in result.records:
            records.append(data[offset:offset + size])
            offset += size
        result.records, result.framed = records, True


# ---------------------------------------------------------------- manifest and log


def settings_entry(cfg: Config, modality: str, split_csv) -> dict:
    """The manifest's `settings`: how the dataset was made (the salt itself is never written)."""
    return {"modality": modality, "split": "csv" if split_csv else cfg.convert.split,
            "seed": cfg.convert.seed, "salt": "custom" if cfg.convert.salt else "from seed",
            "convert": {k: v for k, v in cfg.to_dict()["convert"].items() if k != "salt"}}


def manifest_dict(series: list[dict], shards: dict[str, list[dict]], summary: Summary, cfg: Config,
                  settings: dict) -> dict:
    """Manifest (deterministic: no times, no paths, no identifiers) from its series entries
    ({series, patient, modality, modality_reason, split, images}), the shard lists, the run
    summary and the `settings` entry."""
    counts: dict = {}
    for split in splits.SPLITS:
        split_series = [x for x in series if x["split"] == split]
        counts[split] = {
            "records": sum(n for (s, _), n in summary.records.items() if s == split),
            "slices": sum(n for (s, _), n in summary.slices.items() if s == split),
            "patients": len({x["patient"] for x in split_series}),
            "series": len(split_series),
            "by_modality": {m: {"records": summary.records[(split, m)], "slices": summary.slices[(split, m)]}
                            for m in STAGES if summary.slices[(split, m)]},
        }
    reasons = Counter(s.code for s in summary.skipped)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tfgan_ct_version": __version__,
        "scale": cfg.convert.scale,
        "patch_size": cfg.convert.patch_size,
        "patch_stride": cfg.convert.patch_stride,
        "counts": counts,
        "shards": shards,
        "series": series,
        "skipped": {"files": len(summary.skipped), "by_reason": dict(sorted(reasons.items()))},
        "slices_without_brain": summary.empty_slices,
        "windows": {m: cfg.modalities.get(m).window.as_dict() for m in STAGES},
        "settings": settings,
    }


def log_summary(summary: Summary, unit: str) -> None:
    """Records per split and modality, the rate in `unit`s per second and the skipped files by reason."""
    done = sum(summary.slices.values())
    for (split, kind), n in sorted(summary.records.items()):
        log.info("%s %s: %d record(s) from %d %s(s)", split, kind.upper(), n, summary.slices[(split, kind)], unit)
    if summary.empty_slices:
        log.info("%d slice(s) without brain tissue were left out", summary.empty_slices)
    log.info("%d %s(s) in %.1f s (%.1f %ss/s); %d file(s) skipped", done, unit, summary.seconds,
             done / max(summary.seconds, 1e-9), unit, len(summary.skipped))
    if summary.skipped:
        reasons = Counter(s.code for s in summary.skipped)
        log.info("skipped files by reason: %s", "; ".join(f"{code}: {n}" for code, n in sorted(reasons.items())))
