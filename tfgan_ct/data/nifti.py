"""NIfTI volumes (.nii, .nii.gz) as CT input: 3-D NCCT/CTA and 4-D CT perfusion.

Research CT mostly reaches its users as NIfTI (ISLES, BIDS datasets, dcm2niix
archives). A NIfTI file becomes the same `Frame`s as a DICOM series, one per slice
and time point, so that `convert` and `upscale` group, order and classify it as
they do DICOM. `Frame.layout` holds the file's `Volume` (where its voxels lie and
how a slice is cut out of them).

- Slices are cut in the acquisition plane (`nifti_geometry.orientation`) and turned
  and flipped to the orientation a DICOM series of that plane has, in the order
  DICOM slices are (along the slice normal, then time for 4-D): a head-first supine
  series gives the same HU slices from its DICOM and from its NIfTI, whatever the
  storage order, flips or obliquity of the NIfTI.
- HU = stored x scl_slope + scl_inter; values at or below `convert.out_of_field_hu`
  become air, as for DICOM.
- A 4-D volume (time the 4th axis) is CT perfusion; a 3-D one goes through the
  DICOM rules with what its JSON sidecar (same name, `.json`, as dcm2niix and BIDS
  write it) says: SeriesDescription, StudyDescription, ProtocolName,
  ContrastBolusAgent, SliceThickness (else the slice spacing), Modality.
- Patient: the nearest BIDS `sub-<label>` folder; else the sidecar's PatientID;
  else, for a file in a folder of its own name (ISLES: `case_1/SMIR...CT.345562/
  SMIR...CT.345562.nii`), the folder above (the case); else the file name. Names
  that two different folders or files give are told apart by their parent folders
  (`TRAINING/case_1`, `TESTING/case_1`). Only salted hashes of them are written.

The header pass (`frames_of`) reads every voxel once, so that a truncated file, a
shape the data do not fill, NaN voxels or values that are not HU are a named skip
(`REASONS`) before any record is written; `read_hu` then reads the slices, one time
point of the file at a time (kept for the next call).
"""
from __future__ import annotations

import atexit
import gzip
import json
import logging
import math
import os
import warnings
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfgan_ct.data import dicom_io
from tfgan_ct.data import modality as modality_rules
from tfgan_ct.data.dicom_files import MAX_FRAMES, MAX_SIDE, MIN_SIZE, Skipped, Unusable, float_value, skipped
from tfgan_ct.data.nifti_geometry import Orientation, orientation
from tfgan_ct.logs import TERMINAL_ONLY

log = logging.getLogger("tfgan_ct.data.nifti")

SUFFIXES = (".nii", ".nii.gz")

# Reason codes of skipped NIfTI files, beside dicom_files.REASONS (whose `truncated`,
# `size-mismatch`, `non-finite-hu`, `not-ct`, `not-grey`, `bad-header`, `too-small`,
# `too-large`, `too-many-frames` and `unreadable` they share).
REASONS = {
    "not-nifti": "a .nii/.nii.gz file whose NIfTI header cannot be read",
    "bad-dimensions": "not a 3-D volume or a 4-D perfusion series (a 2-D image, a 5-D file)",
    "not-hu": "values that are not plausibly HU (no air, 8-bit data); convert.require_hu=false takes them",
    "bad-sidecar": "a JSON sidecar that cannot be read",
    "derived-map": "a perfusion map or a mask by its ISLES or BIDS name, not a CT image",
}

AIR_MAX_HU = -500.0       # a CT volume in HU holds air (or padding) at or below this
MAX_PLAUSIBLE_HU = 40000.0
_CHUNK = 32 << 20         # bytes read at a time by the header pass
_SIDECAR_MAX = 1 << 20

# Name tokens (ISLES modality field, BIDS suffix) of files that are not CT images.
_MAPS = {"CBF", "CBV", "MTT", "TMAX", "TTP", "OT", "MASK", "DSEG", "PROBSEG", "SEG", "LABEL", "LESION", "ROI"}
_MR = {"MR", "T1W", "T2W", "FLAIR", "DWI", "ADC", "BOLD", "T2STARW", "PDW", "SWI"}


@dataclass(frozen=True)
class Volume:
    """One NIfTI file as `Frame.layout`: where its voxels lie and how its slices are cut.

    Frame `f` of the file is time point `f // slices`, storage index `f % slices` along
    `orientation.slice_axis`.
    """

    shape: tuple[int, int, int]     # spatial storage shape
    time_points: int
    dtype: str                      # stored values, with byte order
    offset: int                     # byte offset of the voxels
    slope: float
    inter: float
    orientation: Orientation
    affine: tuple[tuple[float, ...], ...]  # voxel -> RAS+ mm, as nibabel gives it
    codes: tuple[int, int]          # qform_code, sform_code
    xyzt_units: int
    time_step: float                # pixdim[4]
    sidecar: bool
    unit: str                       # what the patient name stands for (folder or file), to tell names apart
    rel: str                        # the file relative to that folder (the series key)

    @property
    def slices(self) -> int:
        return self.shape[self.orientation.slice_axis]


def is_nifti_path(path) -> bool:
    """Whether `path` is named as a NIfTI file (.nii, .nii.gz, any case)."""
    return str(path).lower().endswith(SUFFIXES)


def is_nifti_frame(frame: dicom_io.Frame) -> bool:
    return isinstance(frame.layout, Volume)


def stem(path) -> str:
    """The file name without .nii / .nii.gz."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]


def sidecar_path(path) -> Path:
    """The JSON sidecar of NIfTI file `path` (same folder and name, .json)."""
    return Path(path).with_name(stem(path) + ".json")


def split_inputs(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(other files, NIfTI files) among `paths`; the JSON sidecars of those NIfTI files left out."""
    volumes = [p for p in paths if is_nifti_path(p)]
    sidecars = {sidecar_path(p) for p in volumes}
    return [p for p in paths if not is_nifti_path(p) and Path(p) not in sidecars], volumes


def read_frames(path, require_hu: bool = True) -> list[dicom_io.Frame] | Skipped:
    """Header pass of any input file: `frames_of` for NIfTI (by name), DICOM otherwise."""
    return frames_of(path, require_hu) if is_nifti_path(path) else dicom_io.frames_of(path)


# ---------------------------------------------------------------- header pass


def frames_of(path, require_hu: bool = True) -> list[dicom_io.Frame] | Skipped:
    """The Frames of NIfTI file `path` (time-major, then storage order), or why it is skipped.

    Reads every voxel (see the module docstring); never raises for a bad file.
    `require_hu`: skip values that are not plausibly HU (`convert.require_hu`).
    """
    path = Path(path)
    try:
        _check_name(path)
        image = _load_header(path)
        sidecar = _read_sidecar(path)
        volume = _volume(path, image, sidecar)
        _check_data(path, volume, require_hu)
    except Unusable as exc:
        return skipped(path, exc)
    except OSError as exc:
        return Skipped(str(path), f"unreadable ({exc.strerror or exc})", "unreadable")
    return _frames(path, volume, sidecar, str(image.header["descrip"].item().decode("latin-1")).strip())


def _check_name(path: Path) -> None:
    """Unusable for files whose ISLES or BIDS name says they are no CT image."""
    name = stem(path)
    parts = name.split(".")
    if name.upper().startswith("SMIR.") and len(parts) > 4:  # SMIR.Brain.XX.O.<modality>.<id>
        token = parts[4].upper()
        kind = token.split("_")[-1] if token.startswith("CT_") else token
    else:
        kind = name.rsplit("_", 1)[-1].upper()
    if kind in _MAPS:
        raise Unusable("derived-map", f"a perfusion map or mask by its name ({kind}), not a CT image")
    if kind in _MR or kind.startswith("MR_") or (name.upper().startswith("SMIR.") and kind.startswith("MR")):
        raise Unusable("not-ct", f"an MR image by its name ({kind})")


def _load_header(path: Path):
    """The nibabel image of `path` (header only; no voxel is read)."""
    import nibabel

    try:
        with warnings.catch_warnings():  # odd but readable headers (qfac, units) are judged below
            warnings.simplefilter("ignore")
            image = nibabel.load(path)
    except FileNotFoundError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise Unusable("truncated", f"NIfTI header cut short or not gzip data ({_short(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on a broken header
        raise Unusable("not-nifti", f"not a readable NIfTI file ({type(exc).__name__}: {_short(exc)})") from None
    if not isinstance(image, (nibabel.Nifti1Image, nibabel.Nifti2Image)):
        raise Unusable("not-nifti", f"not a NIfTI image ({type(image).__name__})")
    return image


def _read_sidecar(path: Path) -> dict:
    """The JSON sidecar beside `path` ({} when there is none); Unusable when it cannot be
    read or names another modality than CT."""
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        if side.stat().st_size > _SIDECAR_MAX:
            raise Unusable("bad-sidecar", "its JSON sidecar is larger than 1 MB")
        value = json.loads(side.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise Unusable("bad-sidecar", f"its JSON sidecar cannot be read ({_short(exc)})") from None
    if not isinstance(value, dict):
        raise Unusable("bad-sidecar", "its JSON sidecar is not an object")
    modality = str(value.get("Modality") or "").strip().upper()
    if modality and modality != "CT":
        raise Unusable("not-ct", f"not CT (sidecar Modality {modality})")
    return value


def _volume(path: Path, image, sidecar: dict) -> Volume:
    """The Volume of `image` (file `path`): dimensions, voxel type and orientation checked."""
    header = image.header
    shape = list(image.shape)
    if len(shape) > 3:  # (x, y, z, 1) is 3-D; (x, y, z, t, 1) and (x, y, z, 1, t) are 4-D
        extra = [n for n in shape[3:] if n != 1]
        if len(extra) == 1 and shape[3] == 1 and int(header.get("intent_code", 0)) != 0:
            extra.append(1)  # a 5th dimension of components (vectors, labels), not time: 5-D
        shape = shape[:3] + extra
    described = "x".join(map(str, image.shape))
    if len(shape) < 3:
        raise Unusable("bad-dimensions", f"a {len(shape)}-D image ({described}): NIfTI input must be a 3-D "
                                         "volume or a 4-D perfusion series")
    if len(shape) > 4:
        raise Unusable("bad-dimensions", f"a {len(shape)}-D file ({described}): NIfTI input must be a 3-D "
                                         "volume or a 4-D perfusion series (time the 4th axis)")
    dtype = np.dtype(image.dataobj.dtype)
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise Unusable("not-grey", f"voxels of type {dtype} (not grey-scale numbers)")
    slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
    if not (math.isfinite(slope) and math.isfinite(inter)):
        raise Unusable("non-finite-hu", f"scl_slope {slope} / scl_inter {inter}: HU would not be finite")
    spatial = tuple(int(n) for n in shape[:3])
    turn = orientation(image.affine, spatial)
    rows, columns = spatial[turn.row_axis], spatial[turn.col_axis]
    if min(rows, columns) < MIN_SIZE:
        raise Unusable("too-small", f"slices too small ({rows}x{columns}; at least {MIN_SIZE}x{MIN_SIZE})")
    if max(rows, columns) > MAX_SIDE:
        raise Unusable("too-large", f"slices too large ({rows}x{columns}; at most {MAX_SIDE} a side)")
    time_points = int(shape[3]) if len(shape) == 4 else 1
    if spatial[turn.slice_axis] * time_points > MAX_FRAMES:
        raise Unusable("too-many-frames", f"{spatial[turn.slice_axis] * time_points} slices (at most "
                                          f"{MAX_FRAMES} are read)")
    unit, rel = _patient_unit(path, sidecar)
    return Volume(
        shape=spatial, time_points=time_points, dtype=dtype.str, offset=int(image.dataobj.offset),
        slope=slope, inter=inter, orientation=turn,
        affine=tuple(tuple(float(v) for v in row) for row in np.asarray(image.affine, float)),
        codes=(int(header["qform_code"]), int(header["sform_code"])), xyzt_units=int(header["xyzt_units"]),
        time_step=float(header["pixdim"][4]), sidecar=bool(sidecar), unit=unit, rel=rel)


def _check_data(path: Path, volume: Volume, require_hu: bool) -> None:
    """Read every voxel once: Unusable when the data are cut short, hold more or less than
    the header's shape, are not finite or (with `require_hu`) not plausibly HU."""
    dtype = np.dtype(volume.dtype)
    plane = volume.shape[0] * volume.shape[1] * dtype.itemsize
    total = plane * volume.shape[2] * volume.time_points
    claim = (f"the header's shape {'x'.join(map(str, volume.shape))}"
             f"{f'x{volume.time_points}' if volume.time_points > 1 else ''} of {dtype.name} needs {total} bytes")
    compressed = str(path).lower().endswith(".gz")
    if not compressed:
        held = os.path.getsize(path) - volume.offset
        if held < total:
            raise Unusable("truncated", f"the file holds {max(held, 0)} bytes of voxels, {claim} (cut short, or "
                                        "a wrong shape)")
        if held - total >= plane:
            raise Unusable("size-mismatch", f"the file holds {held} bytes of voxels, {claim}")
    low, high, bad, done = math.inf, -math.inf, 0, 0
    try:
        with _open(path) as f:
            f.seek(volume.offset)
            while done < total:
                data = f.read(min(_CHUNK, total - done))
                if not data:
                    raise Unusable("size-mismatch", f"the data end after {done} bytes, {claim}")
                if len(data) % dtype.itemsize:
                    data = data[: len(data) - len(data) % dtype.itemsize]
                values = np.frombuffer(data, dtype)
                done += len(data)
                if dtype.kind == "f":
                    finite = np.isfinite(values)
                    if not finite.all():
                        bad += int(values.size - np.count_nonzero(finite))
                        values = values[finite]
                if values.size:
                    low, high = min(low, float(values.min())), max(high, float(values.max()))
            if compressed and len(f.read(plane)) >= plane:
                raise Unusable("size-mismatch", f"the data hold more than {claim}")
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise Unusable("truncated", f"compressed data cut short or corrupt ({_short(exc)})") from None
    if bad:
        raise Unusable("non-finite-hu", f"{bad} NaN or infinite voxel(s)")
    if not math.isfinite(low):  # every voxel NaN was caught above; nothing else is left
        raise Unusable("non-finite-hu", "no finite voxel")
    with np.errstate(over="ignore", invalid="ignore"):
        lo, hi = sorted(float(np.float64(v) * volume.slope + volume.inter) for v in (low, high))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise Unusable("non-finite-hu", f"scl_slope {volume.slope:g} makes HU overflow")
    problem = _not_hu(dtype, volume, lo, hi) if require_hu else None
    if problem:
        raise Unusable("not-hu", f"{problem}; --set convert.require_hu=false takes the values as HU")


def _not_hu(dtype: np.dtype, volume: Volume, lo: float, hi: float) -> str | None:
    """Why values `lo`..`hi` (after scaling) of a volume stored as `dtype` are not plausibly HU."""
    if dtype.itemsize == 1 and abs(volume.slope) * 255 < 1000:
        return (f"8-bit voxels ({dtype.name}, {lo:g}..{hi:g} after scl_slope/scl_inter) cannot hold CT's "
                "range of HU")
    if lo > AIR_MAX_HU:
        return (f"values {lo:g}..{hi:g}: nothing at or below {AIR_MAX_HU:g} (no air), so not plausibly HU "
                "(8-bit, normalised or unscaled data, a perfusion map or a mask?)")
    if hi < 0:
        return f"values {lo:g}..{hi:g}: nothing at or above 0 (no tissue), so not plausibly HU"
    if hi > MAX_PLAUSIBLE_HU:
        return f"values up to {hi:g}: not plausibly HU"
    return None


def _frames(path: Path, volume: Volume, sidecar: dict, descrip: str) -> list[dicom_io.Frame]:
    turn = volume.orientation
    n = volume.slices
    positions = [turn.first + k * turn.step for k in range(n)]
    rank = {k: r for r, k in enumerate(sorted(range(n), key=lambda k: positions[k]))}
    description = " ".join(str(sidecar.get(k) or "") for k in
                           ("SeriesDescription", "StudyDescription", "ProtocolName")).upper()
    thickness = float_value(sidecar.get("SliceThickness"))
    thickness = thickness if thickness and thickness > 0 else turn.slice_spacing
    patient = _unit_name(volume.unit)
    spacing = (turn.row_spacing, turn.col_spacing)
    contrast = str(sidecar.get("ContrastBolusAgent") or "").strip().upper()
    return [dicom_io.Frame(
        path=str(path), frame=t * n + k, instance_uid=f"nifti:{path}", patient=patient,
        series=f"nifti:{os.path.abspath(path)}", position=positions[k], time=float(t),
        instance=t * n + rank[k] + 1, rows=volume.shape[turn.row_axis], columns=volume.shape[turn.col_axis],
        pixel_spacing=spacing, slice_thickness=thickness, description=description, contrast_agent=contrast,
        layout=volume, derivation=descrip,
    ) for t in range(volume.time_points) for k in range(n)]


def _patient_unit(path: Path, sidecar: dict) -> tuple[str, str]:
    """(what the patient name comes from, the file relative to it): `bids:<sub- folder>`,
    `id:<sidecar PatientID>`, `case:<case folder>` or `file:<the file>`."""
    absolute = Path(os.path.abspath(path))
    for parent in absolute.parents:
        if parent.name.startswith("sub-") and len(parent.name) > 4:
            return f"bids:{parent}", absolute.relative_to(parent).as_posix()
    patient_id = str(sidecar.get("PatientID") or "").strip()
    if patient_id:
        return f"id:{patient_id}", absolute.name
    folder = absolute.parent
    if folder.name == stem(absolute) and folder.parent != folder:
        return f"case:{folder.parent}", absolute.relative_to(folder.parent).as_posix()
    return f"file:{folder / stem(absolute)}", absolute.name


def _unit_name(unit: str) -> str:
    """The patient name of a unit of `_patient_unit`: the folder's or file's name, or the PatientID."""
    kind, value = unit.split(":", 1)
    return value if kind == "id" else Path(value).name


def assign_keys(frames: list[dicom_io.Frame]) -> None:
    """Final patient and series keys of the NIfTI frames among `frames` (in place).

    A patient name that stands for several folders or files (`case_1` of TRAINING and of
    TESTING) gets the parent folders it needs to be unique (`TRAINING/case_1`); the
    series key is the patient and the file's path below the patient's folder (so both
    stay the same when the data move), or the whole path where that is not unique.
    """
    volumes: dict[str, list[dicom_io.Frame]] = defaultdict(list)
    for frame in frames:
        if is_nifti_frame(frame):
            volumes[frame.path].append(frame)
    units: dict[str, set[str]] = defaultdict(set)
    for members in volumes.values():
        units[members[0].patient].add(members[0].layout.unit)
    names: dict[tuple[str, str], str] = {}
    for name, group in units.items():
        if len(group) == 1:
            names[(name, next(iter(group)))] = name
            continue
        for depth in range(2, 64):
            keys = {unit: "/".join(Path(unit.split(":", 1)[1]).parts[-depth:]) for unit in group}
            if len(set(keys.values())) == len(group):
                break
        log.warning("patient name %r stands for %d different folders or files: told apart as %s", name,
                    len(group), ", ".join(sorted(keys.values())), extra=TERMINAL_ONLY)
        names.update({(name, unit): key for unit, key in keys.items()})
    series: dict[str, int] = defaultdict(int)
    keyed = {}
    for path, members in volumes.items():
        volume = members[0].layout
        patient = names[(members[0].patient, volume.unit)]
        keyed[path] = (patient, f"nifti:{patient}/{volume.rel}")
        series[keyed[path][1]] += 1
    for path, members in volumes.items():
        patient, key = keyed[path]
        if series[key] > 1:
            key = f"nifti:{os.path.abspath(path)}"
        for frame in members:
            frame.patient, frame.series = patient, key


def classify(frames: list[dicom_io.Frame], rules) -> tuple[str, str]:
    """(modality, reason) of one NIfTI volume's frames: 4-D is CTP; 3-D goes through the
    DICOM rules with what its sidecar says."""
    volume: Volume = frames[0].layout
    if volume.time_points > 1:
        return "ctp", f"4-D NIfTI volume ({volume.time_points} time points of {volume.slices} slice(s))"
    kind, reason = modality_rules.classify(frames, rules)
    return kind, f"3-D NIfTI volume{'' if volume.sidecar else ' without a JSON sidecar'}: {reason}"


# ---------------------------------------------------------------- pixels


def read_hu(path: str, frames: list[int], out_of_field_hu: float, layout: Volume) -> list[np.ndarray]:
    """HU slices (float32, rows x columns, DICOM orientation) of `frames` of NIfTI file `path`.

    Values at or below `out_of_field_hu` become air. Raises Unusable (a ValueError with a
    reason code) when the file no longer holds what the header pass found.
    """
    volume, turn = layout, layout.orientation
    out = []
    for index in frames:
        t, k = divmod(index, volume.slices)
        index = [slice(None)] * 3
        index[turn.slice_axis] = k
        plane = _time_volume(path, volume, t)[tuple(index)]  # a view (np.take copies, slowly)
        hu = turn.to_image(plane).astype(np.float32)
        if (volume.slope, volume.inter) != (1.0, 0.0):
            with np.errstate(over="ignore", invalid="ignore"):
                hu = hu * np.float32(volume.slope) + np.float32(volume.inter)
        if not np.isfinite(hu).all():
            raise Unusable("non-finite-hu", f"slice {k} of time point {t} has NaN or infinite HU")
        np.copyto(hu, np.float32(dicom_io.AIR_HU), where=hu <= out_of_field_hu)
        out.append(np.ascontiguousarray(hu))
    return out


# One time point of one file, and the open file it came from (read forward from there).
_CACHE: dict = {}


def _time_volume(path: str, volume: Volume, t: int) -> np.ndarray:
    """Stored values of time point `t` (storage order, x-y-z), read once per process."""
    stat = os.stat(path)
    stamp = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    if _CACHE.get("key") == (stamp, t):
        return _CACHE["array"]
    dtype = np.dtype(volume.dtype)
    size = int(np.prod(volume.shape)) * dtype.itemsize
    offset = volume.offset + t * size
    f = _CACHE.get("file")
    if f is None or _CACHE.get("stamp") != stamp or f.tell() > offset:
        _close()
        f = _CACHE["file"] = _open(path)
        _CACHE["stamp"] = stamp
    try:
        f.seek(offset)
        data = f.read(size)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        _close()
        raise Unusable("truncated", f"compressed data cut short or corrupt ({_short(exc)})") from None
    if len(data) < size:
        _close()
        raise Unusable("truncated", f"time point {t} is cut short ({len(data)} of {size} bytes)")
    array = np.frombuffer(data, dtype).reshape(volume.shape, order="F")
    _CACHE.update(key=(stamp, t), array=array)
    return array


def _close() -> None:
    f = _CACHE.pop("file", None)
    _CACHE.pop("key", None)
    _CACHE.pop("array", None)
    if f is not None:
        f.close()


atexit.register(_close)


def _open(path):
    """The file for reading its bytes: decompressed for .gz (by name, as nibabel goes)."""
    return gzip.open(path, "rb") if str(path).lower().endswith(".gz") else open(path, "rb")


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]
