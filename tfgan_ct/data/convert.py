"""`tfgan-ct convert`: DICOM files and folders -> masked TFRecord patch shards.

Pipeline: header pass over every file (parallel) -> group into series ->
modality per series -> patient-level split -> decode, mask and resize each
slice (parallel, in a process pool) -> records written in a fixed order, so
the same inputs and seed always give byte-identical shards.

Everything is written into a hidden staging folder that is renamed to the
output folder only at the end: an interrupted run leaves nothing that looks
like a finished dataset.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from tfgan_ct.data import dicom_io, modality as modality_rules, resize, splits
from tfgan_ct.config import REDACTED_SALT, Config, ConfigError
from tfgan_ct.fileio import OutputError, atomic_write_text, check_replaceable, staged_directory
from tfgan_ct.logs import TERMINAL_ONLY, log_to_file
from tfgan_ct.data.masking import brain_mask
from tfgan_ct.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, RecordMeta, ShardWriter, encode
from tfgan_ct.version import __version__
from tfgan_ct.errors import TfganError
from tfgan_ct.stages import STAGES

log = logging.getLogger("tfgan_ct.data.convert")

CHUNK = 16  # slices per worker task


class ConvertError(TfganError, RuntimeError):
    """Conversion cannot produce a dataset (nothing usable, output exists, bad settings)."""


@dataclass
class SeriesPlan:
    """One series to convert: its frames in slice order and where they go."""

    frames: list[dicom_io.Frame]
    modality: str
    reason: str
    split: str
    patient_hash: str
    series_hash: str


@dataclass
class SliceResult:
    """A converted slice: HR HU (int16), LR HU (float32), mask (bool)."""

    slice_index: int
    hr: np.ndarray
    lr: np.ndarray
    mask: np.ndarray
    pixel_spacing: tuple[float, float]


@dataclass
class SliceRecords:
    """What a worker returns for one slice: its serialised records (none if no brain).

    From a worker process the records come back through a spool file instead,
    and `records` holds their sizes in bytes (see `process_task`).
    """

    slice_index: int
    records: list[bytes] | list[int]
    has_brain: bool


@dataclass
class Summary:
    """What a conversion did (also the core of the manifest)."""

    out: Path
    records: Counter = field(default_factory=Counter)       # (split, modality) -> records
    slices: Counter = field(default_factory=Counter)        # (split, modality) -> slices
    skipped: list[dicom_io.Skipped] = field(default_factory=list)
    empty_slices: int = 0
    seconds: float = 0.0


def check_settings(cfg: Config) -> None:
    """Reject settings that cannot work (before any file is read): every setting as on
    loading (it may have been changed since), and a salt saved as a placeholder."""
    cfg.validate()
    if cfg.convert.salt == REDACTED_SALT:
        raise ConfigError("convert.salt: this configuration was saved without its secret salt; "
                          "pass the salt again with --set convert.salt=... (or leave it empty)")


def convert(inputs: Iterable[str | Path], out: str | Path, cfg: Config, modality: str = "auto",
            split_csv: str | Path | None = None, workers: int | None = None,
            overwrite: bool = False, progress: bool = True) -> Summary:
    """Convert DICOM `inputs` into a shard dataset at `out`; see the module docstring."""
    start = time.perf_counter()
    check_settings(cfg)
    inputs = list(inputs)
    out = check_output(out, overwrite, inputs, "a dataset")
    if modality != "auto" and modality not in modality_rules.MODALITIES:
        raise ConvertError(f"--modality {modality!r}: use auto, ncct, ctp or cta")
    workers = workers or os.cpu_count() or 1
    salt = cfg.convert.salt or f"tfgan-ct:{cfg.convert.seed}"

    summary = Summary(out=out)
    with _pool(workers) as pool, staged_directory(out, overwrite=overwrite) as stage, \
            log_to_file(stage / "convert.log"):
        frames, skipped = scan(inputs, pool, progress)
        frames = dicom_io.merge_duplicates(frames, cfg.convert.out_of_field_hu)
        summary.skipped.extend(skipped)
        plans = plan_series(frames, cfg, modality, salt, split_csv)
        if not plans:
            raise ConvertError(f"no usable CT images found in {', '.join(map(str, inputs))}"
                               f"{_skipped_text(summary.skipped)}")
        _log_plans(plans, skipped)
        shards = write_shards(plans, cfg, stage, pool, summary, progress)
        if not sum(summary.records.values()):
            converted = sum(summary.slices.values()) + summary.empty_slices
            raise ConvertError(f"nothing could be converted: {converted} slice(s) decoded, none with "
                               f"brain tissue (convert.mask, modalities.*.mask_hu)"
                               f"{_skipped_text(summary.skipped)}")
        summary.seconds = time.perf_counter() - start
        manifest = build_manifest(plans, shards, summary, cfg, modality, split_csv)
        atomic_write_text(stage / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        cfg.save(stage / "config.yaml")
        _log_summary(summary)
    return summary


def _skipped_text(skipped: list[dicom_io.Skipped]) -> str:
    """'; 3 file(s) skipped (truncated: 2, not-dicom: 1)', or '' when none were."""
    if not skipped:
        return "; no file was skipped"
    counts = Counter(item.code for item in skipped)
    return f"; {len(skipped)} file(s) skipped ({', '.join(f'{c}: {n}' for c, n in sorted(counts.items()))})"


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


class _InProcess:
    """Stand-in for a process pool when `--workers 1` (easier to debug)."""

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# One BLAS/OpenMP thread per worker: the pool already uses every core, and
# oversubscribed BLAS threads made conversion four times slower.
_WORKER_ENV = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
# glibc malloc: keep freed memory in the heap for the next slice's arrays instead of
# returning it to the system and faulting fresh zeroed pages in again (a slice
# allocates a few MB; page faults were a fifth of a worker's CPU time).
_WORKER_ENV.update(MALLOC_MMAP_THRESHOLD_=str(64 << 20), MALLOC_TRIM_THRESHOLD_=str(256 << 20))


def _pool(workers: int):
    if workers <= 1:
        return _InProcess()
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not Path(main_file).is_file():
        # Spawned workers re-import the main module; from `python - < script` they
        # cannot, and a pool of workers that die at start would wait forever.
        log.warning("running in one process: the main script %s cannot be re-imported by "
                    "worker processes", main_file)
        return _InProcess()
    saved = {name: os.environ.get(name) for name in _WORKER_ENV}
    os.environ.update(_WORKER_ENV)
    try:
        return _context().Pool(workers)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _context():
    """Where worker processes come from: a fork server where there is one, else spawn.

    Workers must not inherit TensorFlow's threads from the parent, so plain fork
    is out. With spawn every worker imports NumPy, SciPy and pydicom itself
    (about a second of CPU each); the fork server, a fresh process, imports them
    once and forks the workers from itself, and stays up for later conversions
    in the same process.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def scan(inputs, pool, progress: bool) -> tuple[list[dicom_io.Frame], list[dicom_io.Skipped]]:
    """Header pass over every input file (in `pool`); logs one line per skipped file."""
    skipped: list[dicom_io.Skipped] = []
    try:
        paths = list(dicom_io.iter_files(inputs, skipped))
    except FileNotFoundError as exc:
        raise ConvertError(str(exc)) from None
    for item in skipped:
        log_skipped(item)
    frames: list[dicom_io.Frame] = []
    from tqdm import tqdm  # here: worker processes import this module and never need it

    bar = tqdm(total=len(paths), desc="reading headers", unit="file", disable=not progress)
    for result in pool.imap(dicom_io.frames_of, paths, chunksize=32):
        bar.update()
        if isinstance(result, dicom_io.Skipped):
            log_skipped(result)
            skipped.append(result)
        else:
            frames.extend(result)
    bar.close()
    return frames, skipped


def log_skipped(item: dicom_io.Skipped) -> None:
    """One terminal line for a skipped file: its name, reason code and details."""
    log.warning("skipped %s: [%s] %s", dicom_io.relpath(item.path), item.code, item.reason, extra=TERMINAL_ONLY)


def plan_series(frames: list[dicom_io.Frame], cfg: Config, modality: str, salt: str,
                split_csv: str | Path | None) -> list[SeriesPlan]:
    """Group frames into series, order slices, choose modality and split."""
    groups: dict[tuple[str, str], list[dicom_io.Frame]] = defaultdict(list)
    for frame in frames:
        groups[(frame.patient, frame.series)].append(frame)
    patients = sorted({patient for patient, _ in groups})
    if split_csv is not None:
        try:
            split_of = splits.read_split_csv(split_csv)
        except ValueError as exc:
            raise ConvertError(str(exc)) from None
    else:
        try:
            split_of = splits.assign_by_ratio(patients, cfg.convert.split, salt)
        except ValueError as exc:
            raise ConfigError(f"convert.split: {exc}") from None
    plans = []
    for (patient, series), members in sorted(groups.items(), key=lambda kv: _series_order(kv[0], salt)):
        patient_hash = splits.salted_hash("patient:" + patient, salt)
        series_hash = splits.salted_hash("series:" + series, salt)
        if patient not in split_of:
            log.warning("series %s (patient %s): patient not in the split CSV; left out",
                        series_hash, patient_hash)
            continue
        if modality == "auto":
            kind, reason = modality_rules.classify(members, cfg.convert.rules)
        else:
            kind, reason = modality, "forced by --modality"
        members = sorted(members, key=_slice_key(kind))
        plans.append(SeriesPlan(members, kind, reason, split_of[patient], patient_hash, series_hash))
    return plans


def _series_order(key: tuple[str, str], salt: str) -> str:
    return splits.salted_hash("order:" + "\0".join(key), salt)


def _slice_key(kind: str):
    if kind == "ctp":
        return lambda f: (f.time, dicom_io.position_key(f.position), f.instance, f.path, f.frame)
    return lambda f: (dicom_io.position_key(f.position), f.instance, f.path, f.frame)


def _log_plans(plans: list[SeriesPlan], skipped: list[dicom_io.Skipped]) -> None:
    for plan in plans:
        log.info("series %s (patient %s): %s, %d image(s), %s split; %s", plan.series_hash,
                 plan.patient_hash, plan.modality.upper(), len(plan.frames), plan.split, plan.reason)
    log.info("%d series of %d patient(s); %d file(s) skipped", len(plans),
             len({p.patient_hash for p in plans}), len(skipped))


@dataclass
class _Task:
    """Slices of one series for one worker call."""

    plan_index: int
    # (slice index, candidate files (first, then duplicates), frame, pixel spacing,
    #  where the first file holds its pixels)
    items: list[tuple[int, tuple[str, ...], int, tuple[float, float] | None, dicom_io.PixelLayout | None]]
    meta: RecordMeta  # modality, split, patient and series of every record
    cfg: Config
    spool: str | None = None  # file for the records, when run in a worker process


def _tasks(plans: list[SeriesPlan], cfg: Config, spool: Path | None) -> Iterator[_Task]:
    n = 0
    for p, plan in enumerate(plans):
        items = [(i, (f.path, *f.duplicates), f.frame, f.pixel_spacing, f.layout)
                 for i, f in enumerate(plan.frames)]
        meta = RecordMeta(plan.modality, plan.split, plan.patient_hash, plan.series_hash, 0)
        for start in range(0, len(items), CHUNK):
            n += 1
            path = None if spool is None else str(spool / f"{n}.bin")
            yield _Task(p, items[start:start + CHUNK], meta, cfg, path)


def process_task(task: _Task) -> tuple[int, list[SliceRecords], list[dicom_io.Skipped], str | None]:
    """Worker: decode, mask, resize and serialise the slices of one task.

    Files are tried in order (an image stored twice has a second chance);
    every file that failed, or was not needed, comes back as a Skipped line.
    The last item is the spool file holding the records, if any (`_unspool`).
    """
    results, skipped = [], []
    by_files: dict[tuple[str, ...], list] = defaultdict(list)
    for item in task.items:
        by_files[item[1]].append(item)
    for candidates, items in by_files.items():
        frames = [frame for _, _, frame, _, _ in items]
        for n, path in enumerate(candidates):
            try:
                images = dicom_io.read_hu(path, frames, task.cfg.convert.out_of_field_hu,
                                          layout=items[0][4] if n == 0 else None)
            except ValueError as exc:
                skipped.append(dicom_io.skipped(path, exc))
                continue
            skipped.extend(dicom_io.Skipped(other, f"duplicate image (same SOP instance as {path})", "duplicate")
                           for other in candidates[n + 1:])
            for (index, _, _, spacing, _), hu in zip(items, images):
                result = prepare_slice(hu, index, spacing, task.meta.modality, task.cfg)
                results.append(SliceRecords(index, slice_records(result, task.meta, task.cfg),
                                            bool(result.mask.any())))
            break
    results.sort(key=lambda r: r.slice_index)
    spooled = task.spool is not None and any(result.records for result in results)
    if spooled:
        # Megabytes of records sent back through the pool's pipe (pickled, then read in
        # small chunks) cost the main process more CPU than the whole record writing;
        # through a file (read back and deleted at once, so usually never on disk) it is
        # one write here and one read there.
        with open(task.spool, "wb") as f:
            for result in results:
                f.writelines(result.records)
                result.records = [len(r) for r in result.records]
    return task.plan_index, results, skipped, task.spool if spooled else None


def prepare_slice(hu: np.ndarray, index: int, spacing, modality: str, cfg: Config) -> SliceResult:
    """Mask one HU slice, crop it to a multiple of the scale, and make its LR.

    hu: float32 HU (H, W). HR: int16 HU with the window floor outside the mask;
    LR: MATLAB-style bicubic 1/scale of that HR (float32 HU).
    """
    settings = cfg.modalities.get(modality)
    s = cfg.convert.scale
    hu = hu[: hu.shape[0] - hu.shape[0] % s, : hu.shape[1] - hu.shape[1] % s]
    mask = brain_mask(hu, settings.mask_hu, cfg.convert.mask)
    hr = _rounded_int16(hu)
    # The same as rounding apply_mask(hu, mask, floor), with one float temporary less.
    np.copyto(hr, _rounded_int16(np.float32(settings.window.floor)), where=~mask)
    lr = resize.downscale(hr, s).astype(np.float32)
    return SliceResult(index, hr, lr, mask, tuple(spacing) if spacing else (0.0, 0.0))


def _rounded_int16(hu: np.ndarray) -> np.ndarray:
    """HU rounded half to even and clipped to int16 (clipping skipped when not needed)."""
    rounded = np.rint(hu)
    if rounded.size and (rounded.min() < -32768 or rounded.max() > 32767):
        np.clip(rounded, -32768, 32767, out=rounded)
    return rounded.astype(np.int16)


def write_shards(plans: list[SeriesPlan], cfg: Config, stage: Path, pool, summary: Summary,
                 progress: bool) -> dict[str, list[dict]]:
    """Run the slice tasks in `pool` and write their records, in order, to per-split shards."""
    import tensorflow  # noqa: F401 - load it now rather than under the progress bar

    writers: dict[tuple[str, str], ShardWriter] = {}
    total = sum(len(p.frames) for p in plans)
    reported: set[str] = set()
    from tqdm import tqdm

    spool = None if isinstance(pool, _InProcess) else stage / ".spool"
    if spool is not None:
        spool.mkdir()
    bar = tqdm(total=total, desc="converting", unit="slice", disable=not progress)
    for plan_index, results, skipped, spooled in pool.imap(process_task, _tasks(plans, cfg, spool)):
        plan = plans[plan_index]
        for item in skipped:
            if item.path not in reported:  # a multi-frame file can span several tasks
                reported.add(item.path)
                log_skipped(item)
                summary.skipped.append(item)
        key = (plan.split, plan.modality)
        if key not in writers:
            writers[key] = ShardWriter(stage, plan.split, plan.modality, cfg.convert.shard_size)
        if spooled is not None:
            _unspool(results, Path(spooled))
        for result in results:
            _write_records(result, key, writers[key], summary)
        bar.update(len(results))
    bar.close()
    if spool is not None:
        spool.rmdir()
    shards: dict[str, list[dict]] = {split: [] for split in splits.SPLITS}
    for (split, _), writer in sorted(writers.items()):
        shards[split].extend(writer.close())
    return shards


def _unspool(results: list[SliceRecords], path: Path) -> None:
    """Put back the records that a worker wrote to spool file `path` (and delete the file)."""
    data = path.read_bytes()
    path.unlink()
    offset = 0
    for result in results:
        records = []
        for size in result.records:
            records.append(data[offset:offset + size])
            offset += size
        result.records = records


def _write_records(result: SliceRecords, key: tuple[str, str], writer: ShardWriter,
                   summary: Summary) -> None:
    if not result.has_brain:
        summary.empty_slices += 1
        return
    summary.slices[key] += 1
    for record in result.records:
        writer.write(record)
    summary.records[key] += len(result.records)


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


def build_manifest(plans: list[SeriesPlan], shards: dict[str, list[dict]], summary: Summary,
                   cfg: Config, modality: str, split_csv) -> dict:
    """The dataset's manifest.json (deterministic: no times, no paths, no identifiers)."""
    series = [{"series": p.series_hash, "patient": p.patient_hash, "modality": p.modality,
               "modality_reason": p.reason, "split": p.split, "images": len(p.frames)}
              for p in plans]
    return manifest_dict(series, shards, summary, cfg, settings_entry(cfg, modality, split_csv))


def settings_entry(cfg: Config, modality: str, split_csv) -> dict:
    """The manifest's `settings`: how the dataset was made (the salt itself is never written)."""
    return {"modality": modality, "split": "csv" if split_csv else cfg.convert.split,
            "seed": cfg.convert.seed, "salt": "custom" if cfg.convert.salt else "from seed",
            "convert": {k: v for k, v in cfg.to_dict()["convert"].items() if k != "salt"}}


def manifest_dict(series: list[dict], shards: dict[str, list[dict]], summary: Summary, cfg: Config,
                  settings: dict) -> dict:
    """Manifest from its series entries ({series, patient, modality, modality_reason, split,
    images}), the shard lists, the run summary and the `settings` entry (shared with
    `tfgan-ct convert-images`)."""
    counts: dict = {}
    kinds = STAGES  # every modality a dataset can hold
    for split in splits.SPLITS:
        split_series = [x for x in series if x["split"] == split]
        counts[split] = {
            "records": sum(n for (s, _), n in summary.records.items() if s == split),
            "slices": sum(n for (s, _), n in summary.slices.items() if s == split),
            "patients": len({x["patient"] for x in split_series}),
            "series": len(split_series),
            "by_modality": {m: {"records": summary.records[(split, m)], "slices": summary.slices[(split, m)]}
                            for m in kinds if summary.slices[(split, m)]},
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
        "windows": {m: cfg.modalities.get(m).window.as_dict()
                    for m in kinds},
        "settings": settings,
    }


def _log_summary(summary: Summary) -> None:
    n_slices = sum(summary.slices.values())
    for (split, kind), n in sorted(summary.records.items()):
        log.info("%s %s: %d record(s) from %d slice(s)", split, kind.upper(), n, summary.slices[(split, kind)])
    if summary.empty_slices:
        log.info("%d slice(s) without brain tissue were left out", summary.empty_slices)
    log.info("%d slice(s) in %.1f s (%.0f slices/s); %d file(s) skipped", n_slices, summary.seconds,
             n_slices / max(summary.seconds, 1e-9), len(summary.skipped))
    if summary.skipped:  # the per-file lines (with paths) went to the terminal only
        reasons = Counter(s.code for s in summary.skipped)
        log.info("skipped files by reason (their names are printed on the terminal, not logged here): %s",
                 "; ".join(f"{code}: {n}" for code, n in sorted(reasons.items())))
