"""`tfgan-ct upscale`: DICOM series in, x4 super-resolved DICOM series (or PNG / npy / NIfTI) out.

The driver: find the CT series of the inputs, choose the model's window, and
write each series in its own folder, `<SeriesNumber>_<description>_<hash>_x4`
(the hash: the first 8 hex digits of SHA-256 of the source patient and
SeriesInstanceUID, so a rerun finds its folder and no identifier is in
clear). Each series is written in a hidden staging folder and renamed when
complete (`series_output`); the images are derived DICOM (`derived_dicom`).
NIfTI volumes (`data.nifti`) are series too, written as `<name>_x4.nii.gz` by
default (`nifti_output`, which also writes DICOM series with --format nifti).
Staging left by an interrupted run is removed first; a full disk stops the
run with one line, the series written before it kept.

`--overwrite` replaces only series folders this command wrote (every file in
them one that upscale writes), never a folder that holds an input, and a run
whose `--out` holds an input replaces nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import pydicom
from tqdm import tqdm

from tfgan_ct.config import Config, Window
from tfgan_ct.data import dicom_io, nifti
from tfgan_ct.deploy import inference, nifti_output
from tfgan_ct.deploy.derived_dicom import SeriesUids, is_our_derivation
from tfgan_ct.deploy.series_output import (
    FORMATS,
    Run,
    SeriesFailed,
    Summary,
    UpscaleOptions,
    fill_series,
    is_our_series,
    skip,
    spread_folder,
    super_resolve_hu,
)
from tfgan_ct.errors import TfganError
from tfgan_ct.fileio import OutputError, atomic_write_text, check_replaceable, is_disk_full, remove_stale_staging
from tfgan_ct.stages import CT_MODALITIES
from tfgan_ct.version import __version__

__all__ = ["FORMATS", "Summary", "UpscaleError", "UpscaleOptions", "model_window", "super_resolve_hu", "upscale"]

log = logging.getLogger(__name__)

TRUST_REPORT = "trust_report.json"
TRUST_FIGURES = ("lr_consistency: |bicubic_downscale_x4(derived) - source| in HU inside the source's brain "
                 "mask, both clipped to the model's window; per_image: the same per source image")


class UpscaleError(TfganError, RuntimeError):
    """Nothing usable in the input, or an output that cannot be written."""


def model_window(method: inference.Method, cfg: Config, override: Window | None = None) -> Window:
    """The HU window the model was trained on (its export's metadata), or `override`.

    A natural-image model has no CT window; it is run on the NCCT window of
    the config, with a warning.
    """
    if override is not None:
        return override
    stage = method.metadata.get("stage")
    if stage not in CT_MODALITIES:
        window = cfg.modalities.ncct.window
        level = logging.INFO if method.name == inference.BICUBIC else logging.WARNING
        log.log(level, "%s: no CT window of its own; using the NCCT window (center %g, width %g); "
                "set another with --window C,W", method.description, window.center, window.width)
        return window
    saved = method.metadata.get("window")
    return Window.from_dict(saved) if saved else cfg.modalities.get(stage).window


def upscale(inputs, out: str | Path, method: inference.Method, cfg: Config, fmt: str = "auto",
            window: Window | None = None, outside: str = "bicubic", tile: int = 0, tile_pad: int = 16,
            overwrite: bool = False, progress: bool = True, uncertainty: bool = False,
            uid_seed: str | None = None, folder_name: str | None = None) -> Summary:
    """Super-resolve every CT series found in `inputs` into `out`, one folder per series.

    `fmt`: one of FORMATS, or `auto` (DICOM for DICOM series, NIfTI for NIfTI volumes).
    `window` overrides the model's HU window; `outside`, `tile`, `tile_pad`, `uncertainty` (a
    second, flip-spread series per DICOM series), `uid_seed`: see UpscaleOptions. `folder_name`
    names the series folders instead of their descriptions and hashes (`tfgan-ct pacs`: the salted
    hash of its logs; `_2`, `_3`... for further series). The trust figures of the series written
    go to `out/trust_report.json` (and `Summary.trust`).
    Stale staging of interrupted runs in `out` is removed first. Unusable images are skipped by
    name (`Summary.skipped`); series folders that exist are left out, or with `overwrite` replaced
    when `upscale` made them (others are refused, `Summary.refused`). Raises UpscaleError when
    nothing was written, when `overwrite` would replace folders in an `out` that holds an input,
    and when the disk fills up (the incomplete series removed).
    """
    inputs = list(inputs)
    if fmt not in (*FORMATS, "auto"):
        raise UpscaleError(f"format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    if uncertainty and fmt not in ("dicom", "auto"):
        raise UpscaleError("the flip-spread series (--uncertainty) is written as DICOM only: use --format dicom")
    options = UpscaleOptions(method, model_window(method, cfg, window), outside, tile, tile_pad, fmt, overwrite,
                             cfg.convert.out_of_field_hu, _mask_hu(method, cfg), cfg.convert.mask, uncertainty,
                             uid_seed)
    out = Path(out)
    remove_stale_staging(out)  # before reading: a killed run's images must not become inputs; logs each
    summary = Summary()
    series, files = _find_series(inputs, summary, cfg.convert.require_hu)
    if not series:
        raise UpscaleError("no usable CT images in the input" +
                           (f" ({len(summary.skipped)} file(s) skipped)" if summary.skipped else ""))
    formats = {key: nifti_output.series_format(frames, fmt) for key, frames in series.items()}
    names = _folder_names(series) if folder_name is None else \
        {key: folder_name + (f"_{i + 1}" if i else "") for i, key in enumerate(series)}
    names = {key: nifti_output.output_name(name, formats[key]) for key, name in names.items()}
    resolved = [Path(p).resolve() for p in [*inputs, *files]]
    if overwrite:
        _check_out_holds_no_input(out, [out / name for name in names.values()], resolved)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UpscaleError(f"cannot make the output folder {out}: {exc.strerror or exc}") from None
    with tqdm(total=sum(len(f) for f in series.values()), desc="upscaling", unit="slice",
              disable=not progress) as bar:
        run = Run(options, summary, bar, inputs=resolved)
        for key, frames in series.items():
            if not formats[key]:
                nifti_output.refuse(frames, names[key], run)
                continue
            series_run = run if formats[key] == fmt else dataclasses.replace(run, options=dataclasses.replace(
                options, fmt=formats[key], uncertainty=options.uncertainty and formats[key] == "dicom"))
            write = nifti_output.write_series if formats[key] == "nifti" else _write_series
            folder = write(frames, out / names[key], series_run)
            if folder is not None:
                summary.series.append(folder)
    if not summary.series:
        raise UpscaleError(_nothing_written(summary, out))
    _update_trust_report(out / TRUST_REPORT, summary, options)
    return summary


def series_trust(summary: Summary, options: UpscaleOptions) -> dict:
    """Trust entries of the series a run wrote: {folder name: figures (HU), model, window, spread}."""
    method = options.method
    spread = {folder.name for folder in summary.spread}
    return {folder.name: {**summary.trust.get(folder.name, {}), "model": method.description,
                          "model_card_sha256": method.metadata.get("card_sha256"),
                          "window": options.window.as_dict(),
                          "spread_series": name if (name := spread_folder(folder).name) in spread else None}
            for folder in summary.series}


def read_report(path: Path) -> dict[str, dict]:
    """The series entries of an earlier trust report (`write_report`); {} when there is none or
    it is damaged (it is then replaced)."""
    try:
        series = json.loads(path.read_text()).get("series", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return series if isinstance(series, dict) else {}


def write_report(path: Path, series: dict[str, dict]) -> None:
    """Write a trust report (`trust_report.json` of upscale, `pacs_report.json` of pacs) atomically:
    the tool, what the figures mean, and `series` {name: entry}."""
    atomic_write_text(path, json.dumps({"tool": f"tfgan-ct {__version__}", "figures": TRUST_FIGURES,
                                        "series": series}, indent=1) + "\n")


def _update_trust_report(path: Path, summary: Summary, options: UpscaleOptions) -> None:
    """Write `out/trust_report.json`: the entries of this run's series over those of earlier runs
    whose folders still exist."""
    entries = {name: entry for name, entry in read_report(path).items() if (path.parent / name).is_dir()}
    entries.update(series_trust(summary, options))
    write_report(path, dict(sorted(entries.items())))


def _mask_hu(method: inference.Method, cfg: Config) -> tuple[float, float]:
    """Brain-mask HU range for the trust figures: the model's stage's, NCCT's for other models."""
    stage = method.metadata.get("stage")
    return tuple(cfg.modalities.get(stage if stage in CT_MODALITIES else "ncct").mask_hu)


def _nothing_written(summary: Summary, out: Path) -> str:
    """Why no series was written, for the final error."""
    if summary.refused and not summary.failed and not summary.existing:
        return "nothing written: " + "\n  ".join(summary.refused)
    if summary.existing and not summary.failed:
        names = ", ".join(p.name for p in summary.existing[:5]) + (" ..." if len(summary.existing) > 5 else "")
        return (f"nothing written: the output of every series already exists in {out} ({names}); "
                f"use --overwrite to replace it")
    parts = [f"{len(summary.skipped)} file(s) skipped"]
    if summary.existing:
        parts.append(f"{len(summary.existing)} series already in {out} (use --overwrite to replace them)")
    if summary.refused:
        parts.append(f"{len(summary.refused)} series folder(s) not replaced")
    message = f"no series could be upscaled ({'; '.join(parts)})"
    return message + "".join(f"\n  {line}" for line in [*summary.failed, *summary.refused])


def _check_out_holds_no_input(out: Path, finals: list[Path], inputs: list[Path]) -> None:
    """With --overwrite: refuse an `--out` that holds an input (resolved `inputs`) when a series
    folder in it exists and would be replaced (e.g. an earlier output read again as input)."""
    if not any(final.exists() for final in finals):
        return
    real = out.resolve()
    for item in inputs:
        if item == real or real in item.parents:
            raise UpscaleError(f"{out} holds the input {item}; --overwrite would replace series folders in "
                               f"it: choose an output folder outside the input (nothing was written)")


def _find_series(inputs, summary: Summary,
                 require_hu: bool = True) -> tuple[dict[tuple[str, str], list[dicom_io.Frame]], list[Path]]:
    """CT frames of `inputs` grouped by (patient, series) and sorted, and every input file found
    (NIfTI sidecars aside). `require_hu`: see `nifti.frames_of`."""
    walk: list[dicom_io.Skipped] = []
    try:
        paths = list(dicom_io.iter_files(inputs, walk))
    except FileNotFoundError as exc:
        raise UpscaleError(str(exc)) from None
    for item in walk:  # unreadable folders, dangling links, broken DICOMDIRs
        skip(summary, item)
    others, volumes = nifti.split_inputs(paths)
    frames = []
    for path in others + volumes:
        if Path(path).name == TRUST_REPORT:  # an earlier output given as input
            skip(summary, dicom_io.Skipped(str(path), "the trust report of an earlier upscale", "own-output"))
            continue
        result = nifti.read_frames(path, require_hu)
        if isinstance(result, dicom_io.Skipped):
            skip(summary, result)
        elif is_our_derivation(result[0].derivation):
            skip(summary, dicom_io.Skipped(str(path), "made by tfgan-ct upscale; a derived series is never "
                                           "upscaled again", "own-output"))
        else:
            frames.extend(result)
    groups: dict[tuple[str, str], list[dicom_io.Frame]] = defaultdict(list)
    for frame in dicom_io.merge_duplicates(frames):
        groups[(frame.patient, frame.series)].append(frame)
    for members in groups.values():
        members.sort(key=lambda f: (f.instance, dicom_io.position_key(f.position), f.time, f.path, f.frame))
    return dict(sorted(groups.items())), paths


def _write_series(frames: list[dicom_io.Frame], final: Path, run: Run) -> Path | None:
    """Write one series in a staging folder and rename it to `final`; None if nothing could be written.

    `run.inputs` (resolved files and folders) are never replaced. A full disk or another write
    error raises UpscaleError after the staging folder is removed.
    """
    summary, bar = run.summary, run.bar
    if final.exists() and not run.options.overwrite:
        log.error("%s already exists (use --overwrite to replace it); series left out", final)
        summary.existing.append(final)
        bar.update(len(frames))
        return None
    try:
        for folder in [final, *([spread_folder(final)] if run.options.uncertainty else [])]:
            check_replaceable(folder, _inputs_under(folder, run.inputs), is_our_series, "a series folder of upscale")
    except OutputError as exc:
        log.error("%s; series left out", exc)
        summary.refused.append(str(exc))
        bar.update(len(frames))
        return None
    try:
        if nifti.is_nifti_frame(frames[0]):  # png or npy of a NIfTI volume: no DICOM header, no UIDs
            uids = SeriesUids("", "", "")
        else:
            header = dicom_io.read_dataset(frames[0].path, pixels=False)
            uids = SeriesUids.new(frames[0], header, run.study_uids, run.options.uid_seed)
        written = fill_series(frames, final, run, uids)
    except (SeriesFailed, ValueError) as exc:  # ValueError: the first header no longer reads
        reason = str(exc.args[0])
        log.error("%s: %s; series left out", final.name, reason)
        summary.failed.append(f"{final.name}: {reason}")
        return None
    except OSError as exc:
        raise UpscaleError(_write_error(exc, final, summary)) from None
    summary.images += written
    log.info("%s: %d image(s)", final, written)
    return final


def _inputs_under(final: Path, inputs: list[Path]) -> list[Path]:
    """The resolved `inputs` that lie in `final` (what check_replaceable must protect), cheaply."""
    real = final.resolve()
    return [item for item in inputs if item == real or real in item.parents]


def _write_error(exc: OSError, final: Path, summary: Summary) -> str:
    """One line for a series that could not be written (disk full or another OS error)."""
    done = (f"; the {len(summary.series)} series written before it are complete" if summary.series
            else "")
    if is_disk_full(exc):
        return (f"no space left on the device while writing {final}: the incomplete series was removed"
                f"{done}; free some space and run again")
    return f"cannot write {final} ({exc.strerror or exc}): the incomplete series was removed{done}"


def _folder_names(series: dict[tuple[str, str], list[dicom_io.Frame]]) -> dict[tuple[str, str], str]:
    """Output folder of each series, derived from its source series only (stable across runs);
    a NIfTI volume's is `<file name>_x4` (`nifti_output.volume_names`)."""
    volumes = nifti_output.volume_names(series)
    return {key: volumes.get(key) or _folder_name(dicom_io.read_dataset(frames[0].path, pixels=False), key)
            for key, frames in series.items()}


def _folder_name(header: pydicom.Dataset, key: tuple[str, str]) -> str:
    """`<SeriesNumber>_<description>_<hash>_x4`; the hash is of the source series' grouping key
    (patient and SeriesInstanceUID), so the same UID under two patients gets two folders, whichever
    of them a run holds. No identifier appears in clear."""
    description = str(header.get("SeriesDescription", "") or "series")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", description).strip("_")[:40] or "series"
    digest = hashlib.sha256("\0".join(key).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    try:
        number = f"{int(float(str(header.get('SeriesNumber', '')).strip())):03d}_"
    except (TypeError, ValueError):
        number = ""  # no series number: the hash alone keeps the name unique
    return f"{number}{slug}_{digest}_x4"
