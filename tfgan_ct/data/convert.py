"""`tfgan-ct convert`: DICOM and NIfTI files and folders -> masked TFRecord patch shards.

The CT source of `conversion.run_conversion`: header pass over every file
-> group into series -> modality per series -> patient-level split -> decode,
mask and resize each slice in the pool (HR int16 HU, LR float32 HU, brain mask).
A NIfTI volume (`nifti`) is one series whose slices are Frames like DICOM's.
"""
from __future__ import annotations

import functools
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from tfgan_ct.config import Config, ConfigError
from tfgan_ct.data import dicom_io, nifti, resize, splits
from tfgan_ct.data import modality as modality_rules
from tfgan_ct.data.conversion import (
    ConvertError,
    InProcess,
    ShardSet,
    SliceRecords,
    SliceResult,
    Summary,
    check_output,
    check_settings,
    header_pass,
    manifest_dict,
    run_conversion,
    settings_entry,
    slice_records,
    spool_records,
    unspool,
)
from tfgan_ct.data.masking import brain_mask
from tfgan_ct.data.shards import RecordMeta
from tfgan_ct.logs import TERMINAL_ONLY

# Also importable from here, as before the driver moved to `conversion`.
__all__ = ["ConvertError", "SliceRecords", "SliceResult", "Summary", "check_output", "check_settings",
           "convert", "slice_records"]

log = logging.getLogger("tfgan_ct.data.convert")

CHUNK = 16  # slices per worker task


@dataclass
class SeriesPlan:
    """One series to convert: its frames in slice order and where they go."""

    frames: list[dicom_io.Frame]
    modality: str
    reason: str
    split: str
    patient_hash: str
    series_hash: str


def convert(inputs: Iterable[str | Path], out: str | Path, cfg: Config, modality: str = "auto",
            split_csv: str | Path | None = None, workers: int | None = None,
            overwrite: bool = False, progress: bool = True) -> Summary:
    """Convert DICOM and NIfTI `inputs` into a shard dataset at `out`; `modality`: auto, ncct, ctp or cta.

    Raises ConvertError when nothing usable is found or `out` cannot be written,
    ConfigError for bad settings.
    """
    check_modality(modality)
    return run_conversion(DicomSource(cfg, modality, split_csv), inputs, out, cfg, workers, overwrite, progress)


def check_modality(modality: str) -> None:
    """Refuse a --modality other than auto, ncct, ctp or cta."""
    if modality != "auto" and modality not in modality_rules.MODALITIES:
        raise ConvertError(f"--modality {modality!r}: use auto, ncct, ctp or cta")


@dataclass
class DicomSource:
    """DICOM and NIfTI files as a `conversion.Source`: series of CT slices."""

    cfg: Config
    modality: str = "auto"
    split_csv: str | Path | None = None
    unit = "slice"
    nothing_found = "no usable CT images found"

    def scan(self, inputs, pool, progress: bool) -> tuple[list[dicom_io.Frame], list[dicom_io.Skipped]]:
        frames, skipped = scan(inputs, pool, progress, self.cfg.convert.require_hu)
        return dicom_io.merge_duplicates(frames, self.cfg.convert.out_of_field_hu), skipped

    def plan(self, frames, skipped, salt: str) -> list[SeriesPlan]:
        plans = plan_series(frames, self.cfg, self.modality, salt, self.split_csv)
        if plans:
            _log_plans(plans, skipped)
        return plans

    def write(self, plans, stage: Path, pool, summary: Summary, progress: bool) -> dict[str, list[dict]]:
        return write_shards(plans, self.cfg, stage, pool, summary, progress)

    def nothing_written(self, summary: Summary, where: str) -> str:
        decoded = sum(summary.slices.values()) + summary.empty_slices
        return (f"nothing could be converted: {decoded} slice(s) decoded, none with "
                f"brain tissue (convert.mask, modalities.*.mask_hu)")

    def manifest(self, plans, shards, summary: Summary) -> dict:
        return build_manifest(plans, shards, summary, self.cfg, self.modality, self.split_csv)


def scan(inputs, pool, progress: bool,
         require_hu: bool = True) -> tuple[list[dicom_io.Frame], list[dicom_io.Skipped]]:
    """Header pass over every input file (in `pool`); logs one line per skipped file.

    NIfTI files (by name) are read whole, one per task; their JSON sidecars are not
    inputs of their own. `require_hu`: see `nifti.frames_of`.
    """
    skipped: list[dicom_io.Skipped] = []
    try:
        paths = list(dicom_io.iter_files(inputs, skipped))
    except FileNotFoundError as exc:
        raise ConvertError(str(exc)) from None
    for item in skipped:
        log_skipped(item)
    paths, volumes = nifti.split_inputs(paths)
    passes = [(dicom_io.frames_of, paths, 32, "reading headers")]
    if volumes:
        passes.append((functools.partial(nifti.frames_of, require_hu=require_hu), volumes, 1, "reading NIfTI"))
    frames: list[dicom_io.Frame] = []
    for fn, items, chunk, desc in passes:
        for result in header_pass(pool, fn, items, chunk, desc, "file", progress):
            if isinstance(result, dicom_io.Skipped):
                log_skipped(result)
                skipped.append(result)
            else:
                frames.extend(result)
    nifti.assign_keys(frames)
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
            rules = nifti.classify if nifti.is_nifti_frame(members[0]) else modality_rules.classify
            kind, reason = rules(members, cfg.convert.rules)
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
    #  where the first file holds its pixels: a PixelLayout, or the nifti.Volume of a NIfTI file)
    items: list[tuple[int, tuple[str, ...], int, tuple[float, float] | None,
                      dicom_io.PixelLayout | nifti.Volume | None]]
    meta: RecordMeta  # modality, split, patient and series of every record
    cfg: Config
    spool: str | None = None  # file for the records, when run in a worker process


def slice_tasks(plans: list[SeriesPlan], cfg: Config, spool: Path | None) -> Iterator[_Task]:
    """The worker tasks of `plans`: up to CHUNK slices of one series each; `spool`: folder
    for their records when they run in worker processes (None: returned directly)."""
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
    The last item is the spool file holding the records, if any (`conversion.unspool`).
    """
    results, skipped = [], []
    by_files: dict[tuple[str, ...], list] = defaultdict(list)
    for item in task.items:
        by_files[item[1]].append(item)
    for candidates, items in by_files.items():
        frames = [frame for _, _, frame, _, _ in items]
        for n, path in enumerate(candidates):
            layout = items[0][4] if n == 0 else None
            if isinstance(layout, nifti.Volume):
                reader = nifti.read_hu
            else:
                reader = functools.partial(dicom_io.read_hu, whole=True)
            try:
                images = reader(path, frames, task.cfg.convert.out_of_field_hu, layout=layout)
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
        spool_records(results, task.spool)
    return task.plan_index, results, skipped, task.spool if spooled else None


def prepare_slice(hu: np.ndarray, index: int, spacing, modality: str, cfg: Config) -> SliceResult:
    """Mask one HU slice, crop it to a multiple of the scale, and make its LR.

    hu: HU (H, W), float32, or int16 when they are whole numbers (`read_hu(whole=True)`;
    the same result without the rounding). HR: int16 HU with the window floor outside
    the mask; LR: MATLAB-style bicubic 1/scale of that HR (float32 HU).
    """
    settings = cfg.modalities.get(modality)
    s = cfg.convert.scale
    hu = hu[: hu.shape[0] - hu.shape[0] % s, : hu.shape[1] - hu.shape[1] % s]
    mask = brain_mask(hu, settings.mask_hu, cfg.convert.mask)
    hr = np.array(hu) if hu.dtype == np.int16 else _rounded_int16(hu)
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
    from tqdm import tqdm

    shards = ShardSet(stage, cfg.convert.shard_size, summary)
    reported: set[str] = set()
    spool_dir = None if isinstance(pool, InProcess) else stage / ".spool"
    if spool_dir is not None:
        spool_dir.mkdir()
    bar = tqdm(total=sum(len(p.frames) for p in plans), desc="converting", unit="slice", disable=not progress)
    for plan_index, results, skipped, spooled in pool.imap(process_task, slice_tasks(plans, cfg, spool_dir)):
        plan = plans[plan_index]
        for item in skipped:
            if item.path not in reported:  # a multi-frame file can span several tasks
                reported.add(item.path)
                log_skipped(item)
                summary.skipped.append(item)
        if spooled is not None:
            unspool(results, Path(spooled))
        for result in results:
            shards.add(plan.split, plan.modality, result)
        bar.update(len(results))
    bar.close()
    if spool_dir is not None:
        spool_dir.rmdir()
    return shards.close()


def build_manifest(plans: list[SeriesPlan], shards: dict[str, list[dict]], summary: Summary,
                   cfg: Config, modality: str, split_csv) -> dict:
    """The dataset's manifest.json (deterministic: no times, no paths, no identifiers)."""
    series = [{"series": p.series_hash, "patient": p.patient_hash, "modality": p.modality,
               "modality_reason": p.reason, "split": p.split, "images": len(p.frames)}
              for p in plans]
    return manifest_dict(series, shards, summary, cfg, settings_entry(cfg, modality, split_csv))
