"""`tfgan-ct upscale --format nifti`: one x4 NIfTI volume per series, `<name>_x4.nii.gz`.

The format NIfTI input gets by default, and what `--format nifti` makes of a DICOM
series, for NIfTI tools. Each volume is

- int16 HU (rounded, clipped; scl_slope 1, scl_inter 0), every time point of a 4-D
  input kept (4-D out);
- in the storage order of its NIfTI source, or for DICOM: columns, rows, slices
  (ascending along the slice normal), time;
- placed where the anatomy is: in-plane voxel size / 4 and the first voxel's centre
  moved by -3/8 of an input voxel along each in-plane axis (pixel centres, as the
  derived DICOM's ImagePositionPatient); qform and sform both hold that affine, with the
  source's codes (DICOM: scanner), units and time step;
- labelled: the model's window as cal_min/cal_max, and `descrip` naming the model
  (what tells upscale its own files: they are never sources, and `--overwrite`
  replaces no other file);
- gzip-compressed byte for byte the same for the same input and model, written in a
  staging folder and read back (header, affine, a hash of the voxels) before it takes
  its name.

`<name>` is the NIfTI file's name (with a hash when two inputs share it), or for DICOM
the series folder name. A DICOM series becomes a volume only on a regular grid: one
size, spacing and orientation, equally spaced positions and the same number of images
(time points) at each; otherwise it is left out with the reason (use --format dicom).
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfgan_ct.data import dicom_io, nifti
from tfgan_ct.data.dicom_files import HEADER_ERRORS, first_item, lookup
from tfgan_ct.data.nifti_geometry import LPS, Orientation, upscaled_affine
from tfgan_ct.deploy.derived_dicom import DERIVATION, is_our_derivation
from tfgan_ct.deploy.series_output import Run, SeriesFailed, checked_super_resolve, skip
from tfgan_ct.errors import TfganError
from tfgan_ct.fileio import is_disk_full, make_staging
from tfgan_ct.version import __version__

log = logging.getLogger("tfgan_ct.deploy.upscale")  # one logger for the whole command

SUFFIX = ".nii.gz"
_SAME_MM = 0.01  # positions and spacings agree to this (mm, or 1 % of the spacing)
_SCANNER = 1     # NIfTI xform code of DICOM patient coordinates
_MM_SEC = 2 | 8  # xyzt_units: mm and seconds


class OutputFailed(TfganError, RuntimeError):
    """A volume that cannot be written (disk full, another OS error): the run stops."""


@dataclass
class Grid:
    """A series as a regular volume: where each source image goes, and the geometry."""

    shape: tuple[int, int, int]          # spatial storage shape of the source volume
    time_points: int
    orientation: Orientation
    affine: np.ndarray                   # RAS+ voxel -> mm of the source volume
    frames: dict[tuple[int, int], dicom_io.Frame]  # (time point, storage slice) -> image
    codes: tuple[int, int] = (_SCANNER, _SCANNER)
    xyzt_units: int = _MM_SEC
    time_step: float = 0.0


def series_format(frames: list[dicom_io.Frame], fmt: str) -> str:
    """The format one series is written in: `auto` is NIfTI for NIfTI input and DICOM for
    DICOM; "" when it cannot be (DICOM output needs a DICOM source's header)."""
    source = "nifti" if nifti.is_nifti_frame(frames[0]) else "dicom"
    if fmt == "auto":
        return source
    return "" if fmt == "dicom" and source == "nifti" else fmt


def volume_names(series: dict) -> dict:
    """`<file name>_x4` for each NIfTI series of `series` ((patient, series) -> frames); a
    hash of the source is added where two series share a file name."""
    bases = {key: nifti.stem(frames[0].path) for key, frames in series.items() if nifti.is_nifti_frame(frames[0])}
    counts = Counter(bases.values())
    return {key: f"{base}_x4" if counts[base] == 1 else f"{base}_{_digest(key)}_x4" for key, base in bases.items()}


def output_name(name: str, fmt: str) -> str:
    """The entry a series of `fmt` gets in --out: a folder `name`, or the file `name.nii.gz`."""
    return name + SUFFIX if fmt == "nifti" else name


def _digest(key: tuple[str, str]) -> str:
    return hashlib.sha256("\0".join(key).encode("utf-8", "surrogateescape")).hexdigest()[:8]


def refuse(frames: list[dicom_io.Frame], name: str, run: Run) -> None:
    """Leave out a NIfTI series asked for as DICOM (one line, counted as failed)."""
    reason = "DICOM output needs DICOM input (its headers); use --format nifti, png or npy for NIfTI input"
    log.error("%s: %s; series left out", name, reason)
    run.summary.failed.append(f"{name}: {reason}")
    run.bar.update(len(frames))


def is_our_volume(path: Path) -> bool:
    """Whether `path` is a NIfTI file upscale wrote (its `descrip`)."""
    import nibabel

    try:
        text = nibabel.load(path).header["descrip"].item().decode("latin-1")
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    return is_our_derivation(text.strip())


def write_series(frames: list[dicom_io.Frame], final: Path, run: Run) -> Path | None:
    """Write one series as the NIfTI file `final`; None (and the reason counted in
    `run.summary`) when it is left out. A full disk or another write error raises OutputFailed."""
    summary, options = run.summary, run.options
    if os.path.lexists(final) and not options.overwrite:
        log.error("%s already exists (use --overwrite to replace it); series left out", final)
        summary.existing.append(final)
        run.bar.update(len(frames))
        return None
    problem = _not_replaceable(final, run.inputs)
    if problem:
        log.error("%s; series left out", problem)
        summary.refused.append(problem)
        run.bar.update(len(frames))
        return None
    try:
        grid = grid_of(frames)
    except SeriesFailed as exc:
        run.bar.update(len(frames))
        return _failed(final, exc, summary)
    stage = make_staging(final.parent, final.name)
    try:
        tmp = stage / final.name
        expected = _write_volume(tmp, grid, run)
        _check_reads_back(tmp, *expected)
        os.replace(tmp, final)
    except SeriesFailed as exc:
        return _failed(final, exc, summary)
    except OSError as exc:
        done = f"; the {len(summary.series)} series written before it are complete" if summary.series else ""
        if is_disk_full(exc):
            raise OutputFailed(f"no space left on the device while writing {final}: the incomplete volume "
                               f"was removed{done}; free some space and run again") from None
        raise OutputFailed(f"cannot write {final} ({exc.strerror or exc}): the incomplete volume was "
                           f"removed{done}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    summary.images += len(grid.frames)
    log.info("%s: %d image(s)", final, len(grid.frames))
    return final


def _failed(final: Path, exc: SeriesFailed, summary) -> None:
    reason = str(exc.args[0])
    log.error("%s: %s; series left out", final.name, reason)
    summary.failed.append(f"{final.name}: {reason}")
    return None


def _not_replaceable(final: Path, inputs: list[Path]) -> str | None:
    """Why an existing `final` must not be replaced (an input, or not a volume of ours), or None."""
    if not os.path.lexists(final):
        return None
    if final.is_symlink() or not final.is_file():
        return f"{final} exists and is not a file; --overwrite only replaces volumes upscale wrote"
    if final.resolve() in inputs:
        return f"{final}: refusing to replace it, it is an input (choose another output folder)"
    if not is_our_volume(final):
        return (f"{final} is not a volume made by tfgan-ct upscale; --overwrite only replaces those "
                f"(move it away or choose another output folder)")
    return None


# ---------------------------------------------------------------- geometry


def grid_of(frames: list[dicom_io.Frame]) -> Grid:
    """The Grid of a series (NIfTI: its file's; DICOM: from the headers). SeriesFailed when
    the images do not make a regular volume."""
    if nifti.is_nifti_frame(frames[0]):
        volume: nifti.Volume = frames[0].layout
        placed = {divmod(f.frame, volume.slices): f for f in frames}
        if len(placed) != volume.slices * volume.time_points:
            raise SeriesFailed(f"{len(placed)} of the volume's {volume.slices * volume.time_points} slices found")
        return Grid(volume.shape, volume.time_points, volume.orientation, np.array(volume.affine), placed,
                    volume.codes if any(volume.codes) else (_SCANNER, _SCANNER), volume.xyzt_units,
                    volume.time_step)
    return _dicom_grid(frames)


def _dicom_grid(frames: list[dicom_io.Frame]) -> Grid:
    if any(f.position is None for f in frames):
        raise _irregular("an image has no position")
    if len({(f.rows, f.columns) for f in frames}) > 1:
        raise _irregular("images of different sizes")
    if any(f.pixel_spacing is None for f in frames) or len({f.pixel_spacing for f in frames}) > 1:
        raise _irregular("PixelSpacing missing or not the same for every image")
    stacks: dict[float, list[dicom_io.Frame]] = {}
    for frame in sorted(frames, key=lambda f: (f.position, f.time, f.instance, f.path, f.frame)):
        key = next((p for p in stacks if abs(p - frame.position) <= _SAME_MM), frame.position)
        stacks.setdefault(key, []).append(frame)
    positions = sorted(stacks)
    time_points = len(stacks[positions[0]])
    if any(len(stacks[p]) != time_points for p in positions):
        raise _irregular(f"{sorted(Counter(len(s) for s in stacks.values()).items())} (images per position, "
                         "positions) differ")
    steps = np.diff(positions)
    if steps.size and np.ptp(steps) > max(_SAME_MM, 0.01 * float(steps.mean())):
        raise _irregular(f"slices not equally spaced ({steps.min():g} to {steps.max():g} mm apart)")
    first, last = stacks[positions[0]][0], stacks[positions[-1]][0]
    (ipp0, iop), (ipp1, iop1) = _plane(first), _plane(last)
    if not np.allclose(iop, iop1, atol=1e-4):
        raise _irregular("ImageOrientationPatient differs between slices")
    row_mm, col_mm = first.pixel_spacing
    along_row, along_col = iop[:3], iop[3:]
    normal = np.cross(along_row, along_col)
    if len(positions) > 1:
        step = (ipp1 - ipp0) / (len(positions) - 1)
    else:
        step = normal * (first.slice_thickness or 1.0)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = along_row * col_mm, along_col * row_mm, step, ipp0
    affine = lps.copy()
    affine[:3] = LPS @ lps[:3]
    spacing = float(abs(step @ normal))
    orient = Orientation(slice_axis=2, row_axis=1, col_axis=0, flip_rows=False, flip_cols=False,
                         row_spacing=row_mm, col_spacing=col_mm, slice_spacing=spacing,
                         first=float(positions[0]), step=float(step @ normal))
    placed = {(t, k): stacks[p][t] for k, p in enumerate(positions) for t in range(time_points)}
    return Grid((first.columns, first.rows, len(positions)), time_points, orient, affine, placed)


def _plane(frame: dicom_io.Frame) -> tuple[np.ndarray, np.ndarray]:
    """ImagePositionPatient and ImageOrientationPatient (LPS) of a DICOM frame."""
    try:
        ds = dicom_io.read_dataset(frame.path, pixels=False)
        shared = first_item(ds, "SharedFunctionalGroupsSequence")
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        group = per_frame[frame.frame] if per_frame is not None and frame.frame < len(per_frame) else None
        position = lookup(ds, group, shared, "PlanePositionSequence", "ImagePositionPatient")
        orientation = lookup(ds, group, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        ipp, iop = np.array([float(v) for v in position]), np.array([float(v) for v in orientation])
    except (*HEADER_ERRORS, TypeError) as exc:
        raise _irregular(f"no usable ImagePositionPatient/ImageOrientationPatient ({exc})") from None
    if ipp.shape != (3,) or iop.shape != (6,) or not (np.isfinite(ipp).all() and np.isfinite(iop).all()):
        raise _irregular("no usable ImagePositionPatient/ImageOrientationPatient")
    return ipp, iop


def _irregular(why: str) -> SeriesFailed:
    return SeriesFailed(f"not a regular volume ({why}): NIfTI needs one; use --format dicom, png or npy")


# ---------------------------------------------------------------- writing


def _write_volume(path: Path, grid: Grid, run: Run) -> tuple:
    """Write the x4 volume of `grid` to `path`; what the file must read back as
    (header class, shape, affine, bytes of voxels, their SHA-256)."""
    import nibabel

    options = run.options
    scale, orient = options.method.scale, grid.orientation
    shape = list(grid.shape)
    shape[orient.row_axis] *= scale
    shape[orient.col_axis] *= scale
    full = shape + ([grid.time_points] if grid.time_points > 1 else [])
    cls = nibabel.Nifti1Header if max(full) <= 32767 else nibabel.Nifti2Header
    header = cls()
    header.set_data_shape(full)
    header.set_data_dtype(np.int16)
    affine = upscaled_affine(grid.affine, orient, scale)
    header.set_qform(affine, code=grid.codes[0] or grid.codes[1])
    header.set_sform(affine, code=grid.codes[1] or grid.codes[0])
    header["xyzt_units"] = grid.xyzt_units
    if grid.time_points > 1:
        header["pixdim"][4] = grid.time_step
    header.set_slope_inter(1.0, 0.0)
    window = options.window
    header["cal_min"], header["cal_max"] = window.floor, window.floor + window.width
    header["descrip"] = (f"{DERIVATION}{scale} by tfgan-ct {__version__} {options.method.description}"
                         .encode("ascii", "replace")[:79])
    digest, size = hashlib.sha256(), 0
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as out:
            header.write_to(out)  # the header, the (empty) extension flag, padding to vox_offset
            for block in _planes(grid, shape, run):
                data = np.ascontiguousarray(block.T, dtype="<i2").tobytes()  # Fortran order
                out.write(data)
                digest.update(data)
                size += len(data)
        raw.flush()
        os.fsync(raw.fileno())
    return cls, tuple(full), affine, size, digest.hexdigest()


def _planes(grid: Grid, shape: list[int], run: Run):
    """The output's x-y planes (int16 [x, y]) in file order: per time point, per storage z."""
    orient = grid.orientation
    n = grid.shape[orient.slice_axis]
    for t in range(grid.time_points):
        if orient.slice_axis == 2:
            for k in range(n):
                yield _upscaled(grid, t, k, run)
            continue
        volume = np.empty(shape, np.int16)
        for k in range(n):
            index = [slice(None)] * 3
            index[orient.slice_axis] = k
            volume[tuple(index)] = _upscaled(grid, t, k, run)
        for z in range(shape[2]):
            yield volume[:, :, z]


def _upscaled(grid: Grid, t: int, k: int, run: Run) -> np.ndarray:
    """The x4 int16 HU of source slice k at time point t, as a storage plane; SeriesFailed
    (the reason reported as a skip) when it cannot be read or upscaled."""
    frame = grid.frames[(t, k)]
    run.bar.update()
    where = f"slice {k + 1}" + (f" of time point {t + 1}" if grid.time_points > 1 else "")
    hu, path = _read(frame, run)
    try:
        sr_hu = checked_super_resolve(hu, run.options)
    except ValueError as exc:
        skip(run.summary, dicom_io.skipped(path, exc))
        raise SeriesFailed(f"{where}: {exc}; a volume needs every slice") from None
    pixels = np.clip(np.rint(sr_hu), -32768, 32767).astype(np.int16)
    return grid.orientation.to_storage(pixels)


def _read(frame: dicom_io.Frame, run: Run) -> tuple[np.ndarray, str]:
    """HU of one source image and the file it came from (DICOM: a duplicate when the first fails)."""
    oof = run.options.out_of_field_hu
    if nifti.is_nifti_frame(frame):
        candidates = [frame.path]
    else:
        candidates = [frame.path, *frame.duplicates]
    errors = []
    for path in candidates:
        try:
            if nifti.is_nifti_frame(frame):
                return nifti.read_hu(path, [frame.frame], oof, frame.layout)[0], path
            return dicom_io.read_hu(path, [frame.frame], oof)[0], path
        except ValueError as exc:
            errors.append(dicom_io.skipped(path, exc))
        except HEADER_ERRORS as exc:
            errors.append(dicom_io.Skipped(path, f"unusable header ({type(exc).__name__}: {exc})", "bad-header"))
    for item in errors:
        skip(run.summary, item)
    raise SeriesFailed(f"an image cannot be read ({errors[0].reason}); a volume needs every image")


def _check_reads_back(path: Path, cls, shape: tuple, affine: np.ndarray, size: int, sha: str) -> None:
    """SeriesFailed unless the file at `path` reads back with nibabel as written."""
    import nibabel

    try:
        image = nibabel.load(path)
        ok = (type(image.header) is cls and tuple(image.shape) == shape and np.allclose(image.affine, affine,
              atol=1e-4) and np.dtype(image.get_data_dtype()) == np.int16 and is_our_volume(path))
        digest, done = hashlib.sha256(), 0
        with gzip.open(path, "rb") as f:
            f.seek(int(image.dataobj.offset))
            while chunk := f.read(1 << 24):
                digest.update(chunk)
                done += len(chunk)
    except Exception as exc:  # noqa: BLE001 - whatever fails, the file is not usable
        raise SeriesFailed(f"the NIfTI written does not read back ({type(exc).__name__}: {exc})") from None
    if not ok or done != size or digest.hexdigest() != sha:
        raise SeriesFailed("the NIfTI written does not read back as written (header, affine or voxels differ)")
