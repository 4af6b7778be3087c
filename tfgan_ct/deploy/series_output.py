"""One series of `tfgan-ct upscale`: source HU in, images or an array out, in a staging folder.

The model sees the [0, 1] image of its window and has nothing to say outside
it: pixels whose bicubic upscale lies below the window floor or above its
ceiling take the bicubic HU (`outside="bicubic"`), or the model's output is
kept everywhere, clipped to the window (`"clip"`). HU images are float32
[h, w] in, [4h, 4w] out.

Every image gets its trust figures (`trust.lr_consistency` inside the brain
mask of the source, in HU): in its ImageComments for DICOM, per series in
`Summary.trust`. With `uncertainty` a second series holds the flip spread of
the model's output (`trust.flip_spread`, HU), seven more inferences per image.

`--format dicom` writes IM00001.dcm ... (`derived_dicom`), `png` windowed
8-bit PNGs, `npy` one float32 HU array sr_hu.npy [slices, 4h, 4w] with
slices.json naming the source of each index and the images left out. A
source with non-finite HU, a non-finite model output or a DICOM that does
not read back is skipped with its reason.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tfgan_ct.config import ConvertSettings, MaskSettings, Window
from tfgan_ct.data import dicom_io, masking, nifti, resize
from tfgan_ct.deploy import inference, trust
from tfgan_ct.deploy.derived_dicom import SeriesUids, derived_by_us, write_dicom
from tfgan_ct.fileio import atomic_write_bytes, atomic_write_text, staged_directory

log = logging.getLogger("tfgan_ct.deploy.upscale")  # one logger for the whole command

FORMATS = ("dicom", "png", "npy", "nifti")  # nifti: `nifti_output`
_OUR_FILES = re.compile(r"IM\d{5}\.(?:dcm|png)|sr_hu\.npy|slices\.json")

# Reason codes of images skipped by upscale itself (beside dicom_io.REASONS of the reading).
REASONS = {
    "non-finite-hu": "the source image has NaN or infinite HU",
    "empty-image": "the source image or the model output is empty or of the wrong size",
    "model-output": "the model's output is not finite (NaN or infinite)",
    "multi-frame-output": "a multi-frame image cannot be written back as DICOM yet",
    "write-failed": "the derived DICOM cannot be written or does not read back",
    "own-output": "an image tfgan-ct upscale made (derived series are never sources)",
}


@dataclass
class Summary:
    """What an upscale run did."""

    series: list[Path] = field(default_factory=list)
    images: int = 0
    skipped: list[dicom_io.Skipped] = field(default_factory=list)
    existing: list[Path] = field(default_factory=list)  # series left out: output exists, no --overwrite
    failed: list[str] = field(default_factory=list)     # series left out for another reason (one line each)
    refused: list[str] = field(default_factory=list)    # --overwrite would replace what is not ours (why)
    trust: dict[str, dict] = field(default_factory=dict)  # series folder name -> trust figures (JSON-ready)
    spread: list[Path] = field(default_factory=list)     # flip-spread series written (--uncertainty)


@dataclass(frozen=True)
class UpscaleOptions:
    """How every image of a run is super-resolved and written."""

    method: inference.Method
    window: Window                  # HU window the model works in
    outside: str = "bicubic"        # pixels outside the window: "bicubic" HU or "clip" (the model's)
    tile: int | None = 0            # LR tile size (0: whole image, None: inference.auto_tile)
    tile_pad: int = 16              # LR pixels of context around each tile
    fmt: str = "dicom"              # one of FORMATS
    overwrite: bool = False         # replace series folders upscale wrote
    out_of_field_hu: float = ConvertSettings.out_of_field_hu    # stored values at or below: outside the scan
    mask_hu: tuple[float, float] = (0.0, 100.0)   # brain-mask HU range of the modality (trust figures)
    mask: MaskSettings = field(default_factory=MaskSettings)
    uncertainty: bool = False       # also write the flip-spread series (DICOM only)
    uid_seed: str | None = None     # derived UIDs from the source's and this seed (see SeriesUids.new)


@dataclass
class Run:
    """What the series of one run share."""

    options: UpscaleOptions
    summary: Summary
    bar: object                                          # tqdm progress bar, one step per source image
    study_uids: dict = field(default_factory=dict)       # source study -> generated StudyInstanceUID
    inputs: list[Path] = field(default_factory=list)     # resolved input files and folders: never replaced


def skip(summary: Summary, item: dicom_io.Skipped) -> None:
    """Report a file left out, once (one line naming it and the reason), and count it."""
    if any(s.path == item.path for s in summary.skipped):
        return  # a multi-frame file is reported once, not per frame
    log.warning("skipped %s: [%s] %s", dicom_io.relpath(item.path), item.code, item.reason)
    summary.skipped.append(item)


def super_resolve_hu(method: inference.Method, hu: np.ndarray, window: Window, outside: str = "bicubic",
                     tile: int | None = 0, tile_pad: int = 16) -> np.ndarray:
    """HU image [h, w] -> float32 HU [4h, 4w] through the model's [0, 1] window.

    Raises ValueError when the model's output is not finite (a diverged model), before clipping
    could hide an infinity.
    """
    return output_hu(model_output(method, hu, window, tile, tile_pad), hu, window, outside, method.scale)


def model_output(method: inference.Method, hu: np.ndarray, window: Window, tile: int | None = 0,
                 tile_pad: int = 16) -> np.ndarray:
    """The model's own output for HU image [h, w]: float32 [4h, 4w] in [0, 1] units of `window`,
    not clipped. ValueError when it is not finite (a diverged model)."""
    unit = window.to_unit(hu.astype(np.float32))
    return _checked(inference.upscale_image(method, unit, tile, tile_pad), "model output")


def output_hu(sr_unit: np.ndarray, hu: np.ndarray, window: Window, outside: str, scale: int) -> np.ndarray:
    """`model_output` [4h, 4w] of source `hu` [h, w] as float32 HU: clipped to the window, and
    outside it (`outside` "bicubic") the bicubic upscale of the source, or ("clip") the window's edge."""
    sr_hu = window.from_unit(np.clip(sr_unit, 0.0, 1.0))
    if outside == "bicubic":
        bicubic = resize.upscale(hu, scale).astype(np.float32)
        sr_hu = np.where(window.contains(bicubic), sr_hu, bicubic)
    elif outside != "clip":
        raise ValueError(f"outside must be 'bicubic' or 'clip', got {outside!r}")
    return sr_hu.astype(np.float32)


def fill_series(frames: list[dicom_io.Frame], final: Path, run: Run, uids: SeriesUids) -> int:
    """Write the series' images into a staging folder that becomes `final`; the count written.

    With `uncertainty` the flip-spread series goes to `spread_folder(final)` the same way, and
    both are renamed into place together. The trust figures land in `run.summary.trust`.
    Raises SeriesFailed (nothing kept) when no image could be upscaled or, for npy, sizes differ;
    an OSError (e.g. a full disk) after the staging folders are removed.
    """
    fmt = run.options.fmt
    if fmt == "npy":
        _check_one_size(frames)
    stack, slices, left_out, figures = [], [], [], []
    with contextlib.ExitStack() as stages:
        stage = stages.enter_context(staged_directory(final, overwrite=True))
        spread = (stages.enter_context(staged_directory(spread_folder(final), overwrite=True))
                  if run.options.uncertainty else None)
        for index, frame in enumerate(frames, start=1):
            run.bar.update()
            done = _upscale_frame(index, frame, _Stages(stage, spread), run, uids)
            if isinstance(done, str):
                left_out.append(_slice_record(index, frame, reason=done))
                continue
            sr_hu, consistency = done
            figures.append((index, consistency))
            if fmt == "png":
                atomic_write_bytes(stage / f"IM{index:05d}.png", _png(sr_hu, run.options.window))
            elif fmt == "npy":
                if stack and sr_hu.shape != stack[0].shape:
                    raise SeriesFailed(_sizes_message([*(a.shape for a in stack), sr_hu.shape], scaled=True))
                slices.append({"index": len(stack), **_slice_record(index, frame)})
                stack.append(sr_hu)
        for note in sorted(uids.notes):
            log.warning("%s: %s", final.name, note)
        if not figures:
            raise SeriesFailed("no image of this series could be upscaled")
        if fmt == "npy":
            _save_npy(stage / "sr_hu.npy", np.stack(stack))
            atomic_write_text(stage / "slices.json", json.dumps(
                {"array": "sr_hu.npy", "shape": [len(stack), *stack[0].shape], "slices": slices,
                 "left_out": left_out}, indent=1) + "\n")
    run.summary.trust[final.name] = _series_trust(figures, left_out)
    if spread is not None:
        run.summary.spread.append(spread_folder(final))
    return len(figures)


def spread_folder(final: Path) -> Path:
    """Where the flip-spread series of series folder `final` goes: `<final>_spread`."""
    return final.with_name(f"{final.name}_spread")


@dataclass(frozen=True)
class _Stages:
    """The staging folders of one series: its images, and the flip spread's (or None)."""

    images: Path
    spread: Path | None


def _series_trust(figures: list[tuple[int, trust.LrConsistency]], left_out: list[dict]) -> dict:
    """The JSON-ready trust figures of a series (source image number, its LR consistency): combined
    and per image (HU)."""
    combined = trust.combine(consistency for _, consistency in figures)
    return {"images": len(figures), "left_out": len(left_out), "lr_consistency": combined.as_dict(),
            "summary": trust.summary_text(combined),
            "per_image": [{"image": index, **consistency.as_dict()} for index, consistency in figures]}


def _upscale_frame(index: int, frame: dicom_io.Frame, stages: _Stages, run: Run,
                   uids: SeriesUids) -> tuple[np.ndarray, trust.LrConsistency] | str:
    """(HU [4h, 4w], its LR consistency) for the source image number `index` of the series (its
    DICOM, and with uncertainty its flip spread, written to the staging folders for --format
    dicom), or why it is skipped (reported in `run.summary`)."""
    options = run.options
    try:
        hu, path = _read_frame(frame, options.out_of_field_hu)
    except _Unreadable as exc:
        for item in exc.args[0]:
            skip(run.summary, item)
        return exc.args[0][0].reason
    try:
        sr_unit, sr_hu = checked_output(hu, options)
        consistency = image_consistency(hu, sr_hu, options)
        if options.fmt == "dicom":
            name = f"IM{index:05d}.dcm"
            write_dicom(path, sr_hu, stages.images / name, uids, options.method, options.window,
                        comments=trust.summary_text(consistency))
            if stages.spread is not None:
                write_dicom(path, flip_spread_hu(hu, options, sr_unit), stages.spread / name, uids.spread(),
                            options.method, options.window, comments="flip spread, HU (8 flips/rotations)")
    except ValueError as exc:
        skip(run.summary, dicom_io.skipped(path, exc))
        return str(exc)
    return sr_hu, consistency


def image_consistency(hu: np.ndarray, sr_hu: np.ndarray, options: UpscaleOptions) -> trust.LrConsistency:
    """LR consistency (HU) of derived image `sr_hu` [4h, 4w] against its source `hu` [h, w],
    inside the source's brain mask, both clipped to the model's window."""
    mask = masking.brain_mask(hu, options.mask_hu, options.mask)
    return trust.lr_consistency(sr_hu, hu, mask, options.method.scale, options.window)


def flip_spread_hu(hu: np.ndarray, options: UpscaleOptions, sr_unit: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel spread (HU, float32 [4h, 4w]) of the model's output over the 8 flips/rotations;
    `sr_unit`: the `model_output` of `hu` when already made (then 7 more inferences, not 8)."""
    def predict(unit: np.ndarray) -> np.ndarray:
        return inference.upscale_image(options.method, unit, options.tile, options.tile_pad)

    spread = trust.flip_spread(predict, options.window.to_unit(hu.astype(np.float32)), identity=sr_unit)
    return trust.spread_hu(spread, options.window)


def checked_super_resolve(hu: np.ndarray, options: UpscaleOptions) -> np.ndarray:
    """super_resolve_hu of a checked source image (HU [h, w]), its output checked too: float32 HU
    [4h, 4w], finite. ValueError (the skip reason) for non-finite or empty input or output."""
    return checked_output(hu, options)[1]


def checked_output(hu: np.ndarray, options: UpscaleOptions) -> tuple[np.ndarray, np.ndarray]:
    """(`model_output`, HU image) of a checked source image (HU [h, w]), as `checked_super_resolve`."""
    _checked(hu, "source image")
    method = options.method
    sr_unit = model_output(method, hu, options.window, options.tile, options.tile_pad)
    sr_hu = output_hu(sr_unit, hu, options.window, options.outside, method.scale)
    return sr_unit, _checked(sr_hu, "model output", (method.scale * hu.shape[0], method.scale * hu.shape[1]))


def _slice_record(index: int, frame: dicom_io.Frame, reason: str | None = None) -> dict:
    """Where an npy slice came from: its place in the sorted source series, InstanceNumber, position."""
    record = {"source_index": index, "instance_number": frame.instance,
              "position_mm": None if frame.position is None else round(frame.position, 4)}
    if reason is not None:
        record.update(file=Path(frame.path).name, frame=frame.frame, reason=reason)
    return record


def _check_one_size(frames) -> None:
    """--format npy stacks the series: every image must have the same size."""
    sizes = [(f.rows, f.columns) for f in frames]
    if len(set(sizes)) > 1:
        raise SeriesFailed(_sizes_message(sizes, scaled=False))


def _sizes_message(shapes, scaled: bool) -> str:
    counts: dict[tuple, int] = defaultdict(int)
    for shape in shapes:
        counts[tuple(shape)] += 1
    listed = ", ".join(f"{r}x{c}: {n}" for (r, c), n in sorted(counts.items()))
    what = "upscaled images" if scaled else "images"
    return (f"{what} of different sizes ({listed} image(s)); --format npy stacks one series into one "
            f"array and needs a single size: use --format dicom or png for this series")


class SeriesFailed(Exception):
    """Raised inside the staging block to discard a series; args[0] says why."""


def _read_frame(frame: dicom_io.Frame, out_of_field_hu: float) -> tuple[np.ndarray, str]:
    """HU [h, w] of a frame and the file it came from (a duplicate when the first cannot be read)."""
    errors = []
    for path in [frame.path, *frame.duplicates]:
        try:
            if isinstance(frame.layout, nifti.Volume):  # a slice of a NIfTI volume
                return nifti.read_hu(path, [frame.frame], out_of_field_hu, frame.layout)[0], path
            return dicom_io.read_hu(path, [frame.frame], out_of_field_hu)[0], path
        except ValueError as exc:
            errors.append(dicom_io.skipped(path, exc))
        except dicom_io.HEADER_ERRORS as exc:  # a malformed header value (e.g. a two-valued padding)
            errors.append(dicom_io.Skipped(path, f"unusable header ({type(exc).__name__}: {exc})", "bad-header"))
    raise _Unreadable(errors)


def _checked(image: np.ndarray, what: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """`image` ([h, w], HU or [0, 1]) if it is a non-empty, finite 2-D image (of `shape` when given);
    else dicom_io.Unusable (a ValueError with a REASONS code) saying what is wrong with the `what`."""
    if image.ndim != 2 or image.size == 0:
        raise dicom_io.Unusable("empty-image", f"{what} is empty or not 2-D "
                                               f"(shape {'x'.join(map(str, image.shape))})")
    if shape is not None and image.shape != tuple(shape):
        raise dicom_io.Unusable("empty-image", f"{what} is {image.shape[0]}x{image.shape[1]}, "
                                               f"expected {shape[0]}x{shape[1]}")
    bad = int(image.size - np.count_nonzero(np.isfinite(image)))
    if bad:
        source = what == "source image"
        hint = " (RescaleSlope/RescaleIntercept not finite?)" if source else ""
        raise dicom_io.Unusable("non-finite-hu" if source else "model-output",
                                f"{what} has {bad} non-finite (NaN or infinite) value(s){hint}; not upscaled")
    return image


class _Unreadable(Exception):
    """No copy of a frame could be decoded; args[0] lists (path, reason) per copy."""


def is_our_series(folder: Path) -> bool:
    """Whether every entry of `folder` is a file `upscale` writes: IM*.dcm derived by tfgan-ct
    (its DerivationDescription), IM*.png, sr_hu.npy or slices.json. Recognised from the files
    themselves, so no marker file lands in a folder a PACS may import."""
    for entry in folder.iterdir():
        if entry.is_symlink() or not entry.is_file() or not _OUR_FILES.fullmatch(entry.name):
            return False
        if entry.suffix == ".dcm" and not derived_by_us(entry):
            return False
    return True


def _png(sr_hu: np.ndarray, window: Window) -> bytes:
    from PIL import Image

    unit = window.to_unit(sr_hu.astype(np.float32))
    buffer = io.BytesIO()
    Image.fromarray(np.round(unit * 255).astype(np.uint8), "L").save(buffer, "PNG")
    return buffer.getvalue()


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    atomic_write_bytes(path, buffer.getvalue())
