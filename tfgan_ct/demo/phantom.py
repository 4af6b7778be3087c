"""Synthetic multimodal head CT phantom, written as real DICOM files.

The phantom is an analytic 3-D head, so adjacent slices, thick and thin
reconstructions and the three series of one study all agree with each other:

- air (-1000 HU) outside an egg-shaped head with skin, a thin fat layer and
  galea/temporalis muscle (~40 HU);
- a skull with cortical outer and inner tables (1300-1500 HU) and textured
  diploe (~300-800 HU), thinner at the temporal squama;
- extra-axial and sulcal CSF (~5 HU), a folded cortical ribbon of grey matter
  (37-42 HU) over white matter (26-30 HU), with smooth band-limited texture;
- deep grey nuclei, the insula, the Sylvian and interhemispheric fissures with
  the falx, and two lateral ventricles (plus the third) whose shape changes
  with z;
- arteries (a circle-of-Willis-like ring with ICA, basilar, ACA, MCA and PCA
  branches) and veins (superior sagittal and straight sinus, internal
  cerebral veins), ~40 HU without contrast;
- in every third patient (``patient_index % 3 == 1``) an MCA-territory stroke:
  a hyperdense clot (~68 HU) in the distal M1, a hypodense core on NCCT
  (grey-white differentiation lost, 6-10 HU below white matter, ~20 HU), a
  delayed, reduced perfusion territory on CTP and poorly filled distal MCA
  branches on CTA.

Series (``SERIES``): NCCT 5 mm, 120 kVp, noise ~5 HU; CTP 5 mm at fixed table
positions, one time point every 2 s, 80 kVp, 80-140 mAs, noise 13-18 HU,
gamma-variate bolus (arteries +250-380 HU first, grey matter +25-38 HU, white
matter about half of that, veins 3-4.5 s after the arteries); CTA 0.625 mm,
120 kVp, noise ~8 HU, arteries +320-430 HU, veins +60-110 HU. Noise sigma
follows ``noise_sigma_hu`` (proportional to 1/sqrt(mAs)) and has a slightly
blurred, CT-like grain.

Patients differ in head size and in-plane rotation, skull and scalp thickness,
ventricle size (atrophy), vessel calibre and course, tissue values, bolus
timing and tube current (hence noise).

Coordinates follow DICOM LPS: +x is the patient's left (image right), +y
posterior (image down), +z superior. Anatomy is described in a *phantom frame*
whose z = 0 mm is the plane of the circle of Willis; ``ImagePositionPatient``
z is that value plus a per-patient table offset. All lengths are mm, all image
values HU unless stated otherwise, and all images are ``(size, size)`` arrays
indexed ``[row, column]`` = ``[y, x]``.

Field of view: each patient has a reconstruction diameter of 222-250 mm, so
the pixel spacing is FOV/size (0.43-0.49 mm at ``size=512``) and the head fills
about 70 % of the FOV at any ``size``. Only the inscribed circle is
reconstructed; pixels outside it hold the padding value.

Stored pixel conventions (both with RescaleSlope 1, RescaleIntercept -1024,
so stored = HU + 1024):

- even ``patient_index``: unsigned 12-bit (PixelRepresentation 0, BitsStored 12,
  HighBit 11). In-field values are clipped to 1..4095 (-1023..3071 HU); the
  out-of-field corners hold stored 0 and PixelPaddingValue is 0.
- odd ``patient_index``: signed 16-bit (PixelRepresentation 1, BitsStored 16,
  HighBit 15). In-field values are clipped to 0..4095 (-1024..3071 HU); the
  out-of-field corners hold stored -2000 (-3024 HU) and PixelPaddingValue is
  -2000.

Output layout::

    out_dir/patientNN/01_ncct/IM00001.dcm ...
    out_dir/patientNN/02_ctp/IM00001.dcm ...   (time-major: all slices of t0, then t1, ...)
    out_dir/patientNN/03_cta/IM00001.dcm ...

Everything (pixels, UIDs, dates) is a deterministic function of ``seed``,
``patient_index``, ``size`` and the slice counts, so two runs with the same
arguments write byte-identical files (also with ``make_dataset(workers=2)``).
UIDs are name-based UUIDs under the 2.25 root. The slices cover the supratentorial
head around the circle of Willis and basal ganglia; the skull base and
posterior fossa are not modelled.
"""
from __future__ import annotations

import datetime as _dt
import math
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

__all__ = [
    "SERIES",
    "PatientParams",
    "SeriesSpec",
    "SliceComponents",
    "bolus_curves",
    "cta_hu",
    "ctp_hu",
    "make_dataset",
    "make_study",
    "ncct_hu",
    "noise_sigma_hu",
    "patient_params",
    "render_slice",
]

PHANTOM_VERSION = "1"        # bump when the output of a given seed changes
MANUFACTURER = "TFGAN-CT PHANTOM"
_SEED_SALT = 0x7FC7C7        # keeps the phantom's streams apart from user seeds

# Tissue values without contrast (HU).
AIR_HU = -1000.0
CSF_HU = 5.0
BLOOD_HU = 40.0
VENOUS_BLOOD_HU = 45.0
CLOT_HU = 68.0
FALX_HU = 75.0
SKIN_HU = 50.0
FAT_HU = -90.0
MUSCLE_HU = 42.0

# Nominal head (mm) that the anatomy tables below are drawn for.
_A0, _B0 = 72.0, 88.0        # lateral and antero-posterior semi-axes
_Z_CENTER, _Z_SEMI = 15.0, 95.0  # vertical centre and semi-axis of the head

# Noise: sigma (HU) at 100 mAs for a standard head kernel; sigma ∝ 1/sqrt(mAs).
SIGMA_AT_100_MAS = {80: 16.0, 100: 11.0, 120: 8.7, 140: 7.3}
CTP_INTERVAL_S = 2.0         # time between CTP time points (s)
_CHARSET = ["latin_1"]       # Python codec of SpecificCharacterSet "ISO_IR 100"


@dataclass(frozen=True)
class SeriesSpec:
    """Acquisition and header settings of one series of the study.

    ``z_center_mm`` is the centre of the slab in the phantom frame; slices are
    ``spacing_mm`` apart and ``thickness_mm`` thick.
    """

    key: str
    number: int
    description: str
    thickness_mm: float
    spacing_mm: float
    z_center_mm: float
    kvp: int
    rotation_s: float
    window: tuple[float, float]          # (centre, width) in HU
    contrast_agent: str | None
    contrast_volume_ml: float | None
    scan_options: str
    kernel: str
    ctdi_per_mas: float                  # CTDIvol (mGy) per mAs, 16 cm phantom
    start_offset_s: float                # series start after the study start


SERIES: dict[str, SeriesSpec] = {
    "ncct": SeriesSpec("ncct", 1, "HEAD W/O CONTRAST 5mm", 5.0, 5.0, 15.0, 120, 1.0,
                       (40.0, 80.0), None, None, "AXIAL", "STANDARD", 0.19, 60.0),
    "ctp": SeriesSpec("ctp", 2, "CT PERFUSION HEAD", 5.0, 5.0, 10.0, 80, 1.0,
                      (40.0, 80.0), "IOPAMIDOL 370", 40.0, "AXIAL CINE", "STANDARD", 0.075, 300.0),
    "cta": SeriesSpec("cta", 3, "CTA HEAD ANGIO", 0.625, 0.625, 3.0, 120, 0.5,
                      (300.0, 600.0), "IOPAMIDOL 370", 60.0, "HELICAL MODE", "STANDARD", 0.19, 540.0),
}


# --------------------------------------------------------------------------
# Random smooth fields
# --------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _WaveField:
    """Band-limited random field: a sum of plane waves (zero mean, unit variance).

    Evaluated on an image grid as two outer-product sums (cos(a+b) expanded),
    so a 512 x 512 plane costs a few milliseconds.
    """

    k: np.ndarray        # (n, 3) angular wave vectors, rad/mm
    phase: np.ndarray    # (n,)

    @classmethod
    def random(cls, rng: np.random.Generator, n: int, wavelength_mm: tuple[float, float]) -> "_WaveField":
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        lo, hi = np.log(wavelength_mm[0]), np.log(wavelength_mm[1])
        wavelength = np.exp(rng.uniform(lo, hi, size=n))
        k = direction * (2 * np.pi / wavelength)[:, None]
        return cls(k=k, phase=rng.uniform(0, 2 * np.pi, size=n))

    def at(self, points: np.ndarray) -> np.ndarray:
        """Field at scattered points (n, 3) mm: (n,) float64."""
        amp = np.sqrt(2.0 / len(self.phase))
        return np.cos(points @ self.k.T + self.phase).sum(axis=1) * amp

    def plane(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        """Field on the grid ``x`` (columns, mm) by ``y`` (rows, mm) at height z: (ny, nx) float32."""
        amp = np.float32(np.sqrt(2.0 / len(self.phase)))
        ax = np.outer(self.k[:, 0], x).astype(np.float32)
        by = (np.outer(self.k[:, 1], y) + (self.k[:, 2] * z + self.phase)[:, None]).astype(np.float32)
        cy, sy = np.cos(by) * amp, np.sin(by) * amp
        # einsum rather than BLAS: these products are small, and a threaded
        # BLAS on a busy machine makes them slower, not faster.
        return np.einsum("ky,kx->yx", cy, np.cos(ax)) - np.einsum("ky,kx->yx", sy, np.sin(ax))


# --------------------------------------------------------------------------
# Anatomy tables (nominal head, phantom frame, mm)
# --------------------------------------------------------------------------

# Swept structures: control points (x, y, z, rx, ry, rz) on the patient's right
# (negative x), mirrored to the left; the structure is the union of
# ellipsoids sampled every 1.5 mm along the polyline, radii interpolated.
_LATERAL_VENTRICLE = [
    (-11.0, -36.0, 20.0, 2.0, 2.0, 3.0),    # frontal horn tip
    (-9.0, -28.0, 22.0, 4.0, 2.5, 6.0),     # frontal horn
    (-6.5, -18.0, 25.0, 4.5, 2.5, 6.5),
    (-6.0, -6.0, 28.0, 4.0, 2.5, 5.5),      # body
    (-7.0, 6.0, 30.0, 3.8, 2.5, 5.0),
    (-9.0, 16.0, 29.0, 4.2, 2.5, 5.0),
    (-15.0, 26.0, 25.0, 6.0, 3.0, 6.0),     # atrium
    (-16.0, 36.0, 23.0, 3.5, 2.5, 3.5),     # occipital horn
    (-14.0, 46.0, 22.0, 1.5, 1.5, 2.0),
]
_TEMPORAL_HORN = [
    (-15.0, 26.0, 25.0, 4.0, 3.0, 4.0),
    (-20.0, 24.0, 18.0, 3.5, 2.5, 4.0),
    (-25.0, 16.0, 11.0, 2.5, 2.5, 3.0),
    (-28.0, 4.0, 5.0, 2.0, 2.0, 2.5),
    (-29.0, -6.0, 2.0, 1.2, 1.5, 1.5),
]
_THIRD_VENTRICLE = [(0.0, -4.0, 12.0, 1.5, 2.0, 7.0), (0.0, 12.0, 10.0, 1.5, 2.0, 6.0)]
_SYLVIAN = [(-33.0, -2.0, 5.0, 1.5, 1.2, 5.0), (-44.0, -4.0, 7.0, 1.5, 1.0, 6.0),
            (-58.0, -7.0, 9.0, 1.5, 1.0, 6.0)]
_SYLVIAN_POSTERIOR = [(-42.0, -4.0, 7.0, 1.0, 1.0, 4.0), (-50.0, 12.0, 16.0, 1.0, 1.0, 4.0)]
_AMBIENT = [(-6.0, 2.0, -2.0, 1.5, 2.0, 3.0), (-11.0, 14.0, 0.0, 1.5, 2.0, 3.0),
            (-7.0, 26.0, 3.0, 2.0, 2.0, 3.0)]
# Single ellipsoids (x, y, z, rx, ry, rz), mirrored unless on the midline.
_CISTERNS = [(0.0, -6.0, -2.0, 12.0, 9.0, 4.0), (0.0, 30.0, 6.0, 6.0, 4.0, 5.0)]
_DEEP_GREY = [  # caudate head, lentiform nucleus, thalamus, insular cortex
    (-13.5, -18.0, 19.0, 4.5, 7.0, 8.0),
    (-22.0, -2.0, 8.0, 5.0, 13.0, 8.0),
    (-10.0, 12.0, 10.0, 7.0, 9.5, 8.0),
    (-32.0, -2.0, 10.0, 2.2, 15.0, 11.0),
]

# Vessel polylines: (points [(x, y, z), ...], radius mm, group, mirrored).
# Groups: "art" arteries, "mca_m1d" distal M1, "mca" MCA branches
# (occluded on the stroke side), "vein" veins.
_VESSELS = [
    ([(-14, -4, -40), (-14, -4, -6), (-13, -3, 0)], 2.0, "art", True),                 # ICA
    ([(0, 16, -40), (0, 14, -3), (0, 12, 0)], 1.6, "art", False),                      # basilar
    ([(0, 12, 0), (-8, 12, 0.5)], 1.2, "art", True),                                  # P1
    ([(-13, -3, 0), (-9, 6, 0.5), (-8, 12, 0.5)], 0.8, "art", True),                   # PComm
    ([(-8, 12, 0.5), (-18, 22, 1.5), (-22, 38, 4), (-18, 56, 7), (-12, 68, 9)], 1.2, "art", True),  # PCA
    ([(-13, -3, 0), (-7, -13, 1.5), (-2, -17, 2)], 1.2, "art", True),                  # A1
    ([(-2, -17, 2), (2, -17, 2)], 0.8, "art", False),                                  # AComm
    ([(-2, -17, 2), (-2.5, -28, 8), (-2.5, -36, 20), (-2.5, -32, 34), (-2.5, -16, 43),
      (-2.5, 6, 47), (-2.5, 26, 44)], 1.1, "art", True),                               # ACA / pericallosal
    ([(-13, -3, 0), (-24, -2, 0.5)], 1.6, "art", True),                                # M1 proximal
    ([(-24, -2, 0.5), (-34, -1, 2)], 1.5, "mca_m1d", True),                            # M1 distal
    ([(-34, -1, 2), (-38, -8, 10), (-41, -10, 22), (-47, -4, 36), (-52, 6, 48)], 1.1, "mca", True),
    ([(-34, -1, 2), (-38, 6, 7), (-42, 14, 18), (-47, 24, 30), (-50, 34, 42)], 1.0, "mca", True),
    ([(-41, -10, 22), (-55, -14, 26)], 0.8, "mca", True),
    ([(-42, 14, 18), (-56, 18, 20)], 0.8, "mca", True),
    ([(-38, -8, 10), (-50, -20, 12)], 0.8, "mca", True),
    ([(0, 45, 18), (0, 60, 8), (0, 72, -2)], 2.2, "vein", False),                      # straight sinus
    ([(0, 30, 18), (0, 45, 18)], 2.0, "vein", False),                                  # vein of Galen
    ([(-2, 0, 20), (-2, 28, 19), (0, 30, 18)], 1.0, "vein", True),                     # internal cerebral
    ([(-28, -2, 4), (-26, 8, 12), (-24, 20, 16)], 1.0, "vein", True),                  # basal vein
]


# --------------------------------------------------------------------------
# Patient parameters
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Bolus:
    """Gamma-variate bolus parameters of one patient (times in s, peaks in HU)."""

    arrival_s: float          # arterial arrival after the first CTP time point
    beta_s: float             # arterial gamma-variate scale
    artery_peak: float        # CTP arterial enhancement at peak
    vein_delay_s: float
    vein_peak: float
    gm_peak: float            # CTP grey-matter enhancement at peak
    wm_ratio: float           # white/grey enhancement ratio
    hypo_delay_s: float       # extra delay in the hypoperfused territory
    hypo_core_amp: float      # fraction of normal enhancement left in the core
    cta_artery: float         # CTA arterial enhancement
    cta_vein: float           # CTA venous enhancement


@dataclass(frozen=True)
class Infarct:
    """MCA-territory stroke: side (+1 patient left, -1 right), wedge centre and
    half-width (rad, 0 = lateral, + = posterior) and z range (mm)."""

    side: int
    angle: float
    half_width: float
    z_range: tuple[float, float]


@dataclass(frozen=True, eq=False)
class PatientParams:
    """Everything random about one phantom patient (lengths mm, values HU)."""

    index: int
    seed: int
    fov_mm: float
    a_mm: float                # lateral semi-axis of the head
    b_mm: float                # antero-posterior semi-axis
    height_scale: float
    post_widen: float          # how much wider the head is posteriorly
    shape: tuple[tuple[int, float, float], ...]   # (harmonic, amplitude, phase)
    angle_rad: float
    center_mm: tuple[float, float]
    table_z0_mm: float
    skin_mm: float
    fat_mm: float
    scalp_mm: float
    temporalis_mm: float
    skull_mm: float
    skull_h3: tuple[float, float]
    cortical_hu: float
    diploe_hu: float
    csf_gap_mm: float
    cortex_mm: float
    sulcus_depth_mm: float
    sulcus_width_mm: float
    gm_hu: float
    wm_hu: float
    infarct_drop_hu: float     # extra hypodensity of the infarct core below white matter
    ventricle_scale: float
    vessel_scale: float
    infarct: Infarct | None
    bolus: Bolus
    mas: dict[str, float]
    sex: str
    age: int
    study_datetime: _dt.datetime
    texture: _WaveField = field(repr=False)
    wiggle: _WaveField = field(repr=False)
    slow: _WaveField = field(repr=False)
    sulci: np.ndarray = field(repr=False)        # (n, 4): angular freq, rad/mm in z, phase, amplitude
    vessels: "_Segments" = field(repr=False)     # vessel tube segments, scanner mm
    csf_spaces: np.ndarray = field(repr=False)   # (n, 6) nominal ellipsoids: ventricles, cisterns
    deep_grey: np.ndarray = field(repr=False)    # (n, 6) nominal ellipsoids

    @property
    def signed(self) -> bool:
        """True when pixels are stored as signed int16 (odd patient index)."""
        return self.index % 2 == 1

    @property
    def patient_id(self) -> str:
        return f"TFGANPHANTOM{self.index:04d}"

    @property
    def patient_name(self) -> str:
        return f"PHANTOM^PATIENT{self.index:02d}"

    def to_head(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scanner (x, y) mm -> head frame (lateral, antero-posterior) mm."""
        c, s = math.cos(self.angle_rad), math.sin(self.angle_rad)
        dx, dy = x - self.center_mm[0], y - self.center_mm[1]
        return c * dx + s * dy, -s * dx + c * dy

    def nominal_to_scanner(self, pts: np.ndarray) -> np.ndarray:
        """Nominal-head points (n, 3) mm -> scanner (n, 3) mm (z unchanged)."""
        c, s = math.cos(self.angle_rad), math.sin(self.angle_rad)
        xr, yr = pts[:, 0] * self.a_mm / _A0, pts[:, 1] * self.b_mm / _B0
        x = self.center_mm[0] + c * xr - s * yr
        y = self.center_mm[1] + s * xr + c * yr
        return np.stack([x, y, pts[:, 2]], axis=1)


def _both_sides(points, mirrored: bool) -> list:
    """A polyline, plus its mirror image (-x) when ``mirrored``."""
    return [points, [(-x, y, z) for x, y, z in points]] if mirrored else [points]


def _vessel_segments(rng: np.random.Generator, to_scanner, vessel_scale: float,
                     infarct: Infarct | None) -> list:
    """Vessel polylines -> gently tortuous 3-D segments in scanner mm with their groups.

    Each polyline is resampled every ~3 mm and displaced by smooth random
    fields (so branches that share a point stay connected): a slow one
    (40-120 mm wavelength, ~2 mm) for the course and a faster one
    (10-25 mm, ~0.8 mm) for tortuosity.
    """
    course = [_WaveField.random(rng, 6, (40.0, 120.0)) for _ in range(3)]
    tortuosity = [_WaveField.random(rng, 8, (10.0, 25.0)) for _ in range(3)]
    segs: list = []
    for points, radius, group, mirrored in _VESSELS:
        for side_pts in _both_sides(points, mirrored):
            pts = _resample(np.array(side_pts, dtype=float), 3.0)
            side = int(np.sign(pts[-1, 0])) if abs(pts[-1, 0]) > 1 else 0
            shift = np.stack([2.0 * c.at(pts) + 0.8 * t.at(pts) for c, t in zip(course, tortuosity)], axis=1)
            pts = pts + shift * [1.0, 1.0, 0.5]
            g = group
            if group in ("mca", "mca_m1d"):
                stroke_side = infarct is not None and side == infarct.side
                g = ("occ" if group == "mca" else "clot") if stroke_side else "art"
            scanner = to_scanner(pts)
            r = radius * vessel_scale
            segs.extend((scanner[i], scanner[i + 1], r, g) for i in range(len(pts) - 1))
    a, b, r, g = zip(*segs)
    return _Segments(np.array(a), np.array(b), np.array(r), tuple(g))


@dataclass(frozen=True, eq=False)
class _Segments:
    """Straight tube pieces: ends ``a``, ``b`` (n, 3) mm, radii ``r`` (n,) mm, group names."""

    a: np.ndarray
    b: np.ndarray
    r: np.ndarray
    group: tuple[str, ...]


def _resample(pts: np.ndarray, step_mm: float) -> np.ndarray:
    """Insert points along a polyline (n, k) so that no piece is longer than ``step_mm``."""
    out = [pts[:1]]
    for a, b in zip(pts[:-1], pts[1:]):
        n = max(1, math.ceil(np.linalg.norm(b[:3] - a[:3]) / step_mm))
        t = (np.arange(1, n + 1) / n)[:, None]
        out.append(a + t * (b - a))
    return np.vstack(out)


def _mirrored(rows) -> list[tuple]:
    """Rows (x, ...) plus their mirror images (-x, ...) unless they lie on the midline."""
    out = list(rows)
    out += [(-r[0], *r[1:]) for r in rows if abs(r[0]) > 1e-6]
    return out


def _sweep(points, step_mm: float = 1.5) -> np.ndarray:
    """Ellipsoids (n, 6) sampled every ``step_mm`` along a polyline of (x, y, z, rx, ry, rz)."""
    return _resample(np.asarray(points, dtype=float), step_mm)


def _csf_spaces(ventricle_scale: float) -> np.ndarray:
    """Ventricles, Sylvian fissures and basal cisterns as nominal ellipsoids (n, 6).

    Ventricle widths and heights grow with ``ventricle_scale`` (atrophy); the
    medial walls of the frontal horns and bodies stay ~1 mm off the midline
    so the septum pellucidum keeps its thickness.
    """
    vs = ventricle_scale
    lateral = []
    for x, y, z, rx, ry, rz in _LATERAL_VENTRICLE:
        rx, ry, rz = rx * vs, ry * (0.5 + 0.5 * vs), rz * math.sqrt(vs)
        x = -max(abs(x) * (0.85 + 0.15 * vs), rx + 1.0)
        lateral.append((x, y, z, rx, ry, rz))
    temporal = [(x * (0.9 + 0.1 * vs), y, z, rx * vs, ry, rz * math.sqrt(vs))
                for x, y, z, rx, ry, rz in _TEMPORAL_HORN]
    third = [(x, y, z, rx * vs, ry, rz) for x, y, z, rx, ry, rz in _THIRD_VENTRICLE]
    parts = [_sweep(third)]
    for chain in (lateral, temporal, _SYLVIAN, _SYLVIAN_POSTERIOR, _AMBIENT):
        parts += [_sweep(chain), _sweep([(-r[0], *r[1:]) for r in chain])]
    parts.append(np.array(_mirrored(_CISTERNS), dtype=float))
    return np.vstack(parts)


def patient_params(patient_index: int, seed: int = 0) -> PatientParams:
    """Draw the anatomy, bolus and acquisition parameters of one patient.

    Deterministic in ``(patient_index, seed)`` and independent of image size.
    """
    if patient_index < 0 or seed < 0:
        raise ValueError("patient_index and seed must be >= 0")
    rng = np.random.default_rng([_SEED_SALT, seed, patient_index])
    u = rng.uniform
    fov = float(round(u(222.0, 250.0)))
    b = u(0.34, 0.365) * fov
    a = b * u(0.79, 0.86)
    angle = math.radians(u(-7.0, 7.0))
    center = (u(-4.0, 4.0), u(-2.0, 7.0))
    shape = tuple((k, u(0.005, 0.02), u(0, 2 * np.pi)) for k in (3, 4, 5))
    ventricle_scale = u(0.75, 1.45)
    infarct = None
    if patient_index % 3 == 1:
        infarct = Infarct(side=int(rng.choice([-1, 1])), angle=u(-0.35, 0.35),
                          half_width=u(0.35, 0.6), z_range=(u(0.0, 6.0), u(30.0, 45.0)))
    arrival = u(4.5, 8.0)
    artery_peak = u(250.0, 380.0)
    bolus = Bolus(
        arrival_s=arrival, beta_s=u(1.2, 1.7), artery_peak=artery_peak,
        vein_delay_s=u(3.0, 4.5), vein_peak=artery_peak * u(0.8, 1.0),
        gm_peak=u(25.0, 38.0), wm_ratio=u(0.4, 0.5), hypo_delay_s=u(3.0, 6.0),
        hypo_core_amp=u(0.2, 0.35), cta_artery=u(320.0, 430.0), cta_vein=u(60.0, 110.0))
    mas = {"ncct": float(round(u(260, 340))), "ctp": float(round(u(80, 140))),
           "cta": float(round(u(110, 140)))}
    sex = "F" if rng.random() < 0.5 else "M"
    age = int(rng.integers(45, 91))
    start = _dt.datetime(2024, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 365)),
                                                      seconds=int(rng.integers(0, 86400 - 1800)))
    n_sulci = 10
    sulci = np.stack([rng.integers(12, 25, n_sulci).astype(float),
                      rng.normal(0, 2 * np.pi / 30.0, n_sulci),
                      rng.uniform(0, 2 * np.pi, n_sulci),
                      np.full(n_sulci, math.sqrt(2.0 / n_sulci))], axis=1)
    texture = _WaveField.random(rng, 48, (2.0, 10.0))
    wiggle = _WaveField.random(rng, 16, (12.0, 30.0))
    slow = _WaveField.random(rng, 12, (30.0, 80.0))
    vessel_scale = u(0.85, 1.25)
    c, s = math.cos(angle), math.sin(angle)

    def to_scanner(pts):
        xr, yr = pts[:, 0] * a / _A0, pts[:, 1] * b / _B0
        return np.stack([center[0] + c * xr - s * yr, center[1] + s * xr + c * yr, pts[:, 2]], axis=1)

    vessels = _vessel_segments(rng, to_scanner, vessel_scale, infarct)
    return PatientParams(
        index=patient_index, seed=seed, fov_mm=fov, a_mm=a, b_mm=b,
        height_scale=u(0.95, 1.05), post_widen=u(0.03, 0.08), shape=shape,
        angle_rad=angle, center_mm=center,
        table_z0_mm=round(u(-140.0, -100.0) * 8) / 8,
        skin_mm=u(1.2, 1.8), fat_mm=u(0.8, 2.2), scalp_mm=u(4.0, 6.0),
        temporalis_mm=u(3.0, 6.0), skull_mm=u(5.5, 7.5), skull_h3=(u(0.0, 0.1), u(0, 2 * np.pi)),
        cortical_hu=u(1300.0, 1480.0), diploe_hu=u(450.0, 650.0),
        csf_gap_mm=u(0.8, 1.5) + 0.02 * (age - 45), cortex_mm=u(2.3, 3.0),
        sulcus_depth_mm=u(9.0, 14.0), sulcus_width_mm=u(0.6, 1.0) + 0.02 * (age - 45),
        gm_hu=u(37.0, 42.0), wm_hu=u(26.0, 30.0), infarct_drop_hu=u(6.0, 10.0),
        ventricle_scale=ventricle_scale,
        vessel_scale=vessel_scale, infarct=infarct, bolus=bolus, mas=mas, sex=sex, age=age,
        study_datetime=start, texture=texture, wiggle=wiggle, slow=slow, sulci=sulci,
        vessels=vessels, csf_spaces=_csf_spaces(ventricle_scale),
        deep_grey=np.array(_mirrored(_DEEP_GREY), dtype=float))


# --------------------------------------------------------------------------
# Anatomy rendering
# --------------------------------------------------------------------------

_COMPONENTS = ("base_hu", "gm", "wm", "art", "occ", "clot", "vein", "hypo")


@dataclass
class SliceComponents:
    """One reconstructed slice, split into what contrast does to it.

    All arrays are float32 ``(size, size)``. ``base_hu`` is the non-contrast
    image in HU (no noise). The others are volume fractions (0..1) of tissue
    classes that enhance: grey matter ``gm``, white matter ``wm``, patent
    arteries ``art``, poorly filled (occluded-territory) arteries ``occ``,
    clot ``clot`` (never enhances) and veins ``vein``. ``hypo`` is 0 in
    normally perfused tissue and up to 1 in an infarct core (0.6 in the
    penumbra): it delays and reduces tissue enhancement. Outside ``window``
    (rows, cols) the slice is air and every fraction is 0.
    """

    base_hu: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    art: np.ndarray
    occ: np.ndarray
    clot: np.ndarray
    vein: np.ndarray
    hypo: np.ndarray
    window: tuple[slice, slice] = (slice(None), slice(None))

    @cached_property
    def hypo_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of the hypoperfused pixels (``hypo > 0.01``)."""
        rows, cols = np.nonzero(self.hypo[self.window] > 0.01)
        return rows + (self.window[0].start or 0), cols + (self.window[1].start or 0)


def _grid(p: PatientParams, size: int) -> tuple[np.ndarray, float]:
    """Pixel-centre coordinates (mm) along x (columns) or y (rows), and the spacing."""
    px = p.fov_mm / size
    coords = ((np.arange(size) + 0.5) * px - p.fov_mm / 2).astype(np.float32)
    return coords, px


def _above(value: np.ndarray, edge, px: float) -> np.ndarray:
    """Anti-aliased indicator of ``value > edge`` (value and edge in mm)."""
    return np.clip((value - edge) * np.float32(1.0 / px) + np.float32(0.5), 0.0, 1.0)


def _lerp(a: np.ndarray, b, w: np.ndarray) -> np.ndarray:
    return a + (b - a) * w


def _window(lo: float, px: float, n: int, a: float, b: float) -> slice:
    """Index range of pixel centres (first at ``lo + px/2``) within [a, b] mm."""
    i0 = int(max(0, math.floor((a - lo) / px)))
    i1 = int(min(n, math.ceil((b - lo) / px) + 1))
    return slice(i0, max(i0, i1))


def _blob_union(p: PatientParams, ells: np.ndarray, z: float, xn: np.ndarray, yn: np.ndarray,
                xc: np.ndarray, yc: np.ndarray, px: float, edge_mm: float = 0.0) -> np.ndarray:
    """Union of nominal-frame ellipsoids (n, 6) cut at height z: fraction map (0..1).

    The signed distance of each ellipsoid is taken along the ray from its
    centre, ``|d| (1/sqrt(q) - 1)`` mm; edges are one pixel or ``edge_mm``
    wide, whichever is larger.
    """
    edge = max(px, edge_mm)
    sd = np.full(xn.shape, -1e3, np.float32)
    sx, sy = p.a_mm / _A0, p.b_mm / _B0
    dz = (z - ells[:, 2]) / ells[:, 5]
    keep = np.abs(dz) < 1.0
    if not keep.any():
        return np.zeros_like(xn)
    ells, dz = ells[keep], dz[keep]
    centres = p.nominal_to_scanner(ells[:, :3])
    lo_x, lo_y = xc[0] - px / 2, yc[0] - px / 2
    for (cx, cy, cz, rx, ry, _rz), (mx, my, _), dzi in zip(ells, centres, dz):
        reach = max(rx * sx, ry * sy) + 2 * edge
        win = (_window(lo_y, px, len(yc), my - reach, my + reach),
               _window(lo_x, px, len(xc), mx - reach, mx + reach))
        if win[0].start >= win[0].stop or win[1].start >= win[1].stop:
            continue
        ux, uy = xn[win] - np.float32(cx), yn[win] - np.float32(cy)
        q = (ux / np.float32(rx)) ** 2 + (uy / np.float32(ry)) ** 2 + np.float32(dzi * dzi)
        dist = np.sqrt((ux * np.float32(sx)) ** 2 + (uy * np.float32(sy)) ** 2
                       + np.float32((z - cz) ** 2))
        local = dist * (1.0 / np.sqrt(np.maximum(q, 1e-6)) - 1.0)
        np.maximum(sd[win], local, out=sd[win])
    return _above(sd, 0.0, edge)


def _tubes(p: PatientParams, z: float, xc: np.ndarray, yc: np.ndarray, px: float) -> dict[str, np.ndarray]:
    """Vessel fractions at height z, per group, from the 3-D segments (scanner mm)."""
    shape = (len(yc), len(xc))
    out = {g: np.zeros(shape, np.float32) for g in ("art", "occ", "clot", "vein")}
    lo_x, lo_y = xc[0] - px / 2, yc[0] - px / 2
    v = p.vessels
    z_lo = np.minimum(v.a[:, 2], v.b[:, 2]) - v.r
    z_hi = np.maximum(v.a[:, 2], v.b[:, 2]) + v.r
    for i in np.nonzero((z >= z_lo) & (z <= z_hi))[0]:
        a, b, r, group = v.a[i], v.b[i], float(v.r[i]), v.group[i]
        ab = b - a
        if abs(ab[2]) > 1e-6:
            t0, t1 = sorted(((z - r - a[2]) / ab[2], (z + r - a[2]) / ab[2]))
            t0, t1 = max(t0, 0.0), min(t1, 1.0)
        else:
            t0, t1 = 0.0, 1.0
        xs = (a[0] + t0 * ab[0], a[0] + t1 * ab[0])
        ys = (a[1] + t0 * ab[1], a[1] + t1 * ab[1])
        rows = _window(lo_y, px, shape[0], min(ys) - r - px, max(ys) + r + px)
        cols = _window(lo_x, px, shape[1], min(xs) - r - px, max(xs) + r + px)
        if rows.start >= rows.stop or cols.start >= cols.stop:
            continue
        gx = xc[cols][None, :] - np.float32(a[0])
        gy = yc[rows][:, None] - np.float32(a[1])
        gz = np.float32(z - a[2])
        t = np.clip((gx * ab[0] + gy * ab[1] + gz * ab[2]) / float(ab @ ab), 0.0, 1.0)
        dist = np.sqrt((gx - t * ab[0]) ** 2 + (gy - t * ab[1]) ** 2 + (gz - t * ab[2]) ** 2)
        frac = np.clip((r - dist) / px + 0.5, 0.0, 1.0).astype(np.float32)
        view = out[group][rows, cols]
        np.maximum(view, frac, out=view)
    return out


_SULCUS_TABLE = 4096


def _sulcal_distance(p: PatientParams, phi: np.ndarray, radius: np.ndarray, wiggle: np.ndarray,
                     z: float) -> np.ndarray:
    """Approximate in-plane distance (mm) to the nearest sulcus.

    Sulci are the zero crossings of a random angular function f(phi, z), so
    they run roughly radially inward; ``wiggle`` (mm) bends them.
    """
    grid = np.arange(_SULCUS_TABLE) * (2 * np.pi / _SULCUS_TABLE)
    n, kz, ph, amp = p.sulci.T
    arg = np.outer(grid, n) + (kz * z + ph)
    f = (np.cos(arg) @ amp).astype(np.float32)
    df = np.abs(np.sin(arg) * n @ amp).astype(np.float32) + np.float32(1e-3)
    phi_w = phi + wiggle / np.maximum(radius, 5.0)
    idx = (phi_w * np.float32(_SULCUS_TABLE / (2 * np.pi)) + 0.5).astype(np.int32) % _SULCUS_TABLE
    return np.abs(f[idx]) / df[idx] * np.maximum(radius, 1.0)


def _infarct_shape(p: PatientParams, xn: np.ndarray, yn: np.ndarray,
                   slow: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """In-plane (penumbra, core) weights (0..1) of the stroke territory, or None.

    The territory is a wedge of the lateral hemisphere (MCA-like) with
    irregular edges (soft over ~6 mm for the penumbra, ~2.5 mm for the core).
    """
    inf = p.infarct
    if inf is None:
        return None
    f32 = np.float32
    xl = xn * f32(inf.side)
    rad = np.sqrt(xl * xl + yn * yn)
    off = np.abs(np.arctan2(yn, xl) - f32(inf.angle))
    pen_edge = (f32(inf.half_width) - off) * rad + 5.0 * slow
    pen = np.clip(pen_edge / 6.0 + 0.5, 0, 1) * np.clip((rad - 18.0) / 8.0 + 0.5, 0, 1)
    core_edge = (f32(inf.half_width * 0.55) - off) * rad + 4.0 * slow
    core = np.clip(core_edge / 2.5 + 0.5, 0, 1) * np.clip((rad - 30.0) / 4.0 + 0.5, 0, 1)
    return pen.astype(f32), core.astype(f32)


def _infarct_maps(p: PatientParams, shape: tuple[np.ndarray, np.ndarray] | None, z: float,
                  like: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hypo, core) at height z: ``hypo`` is 0.6 in the penumbra and 1 in the core."""
    zero = np.zeros_like(like)
    if shape is None:
        return zero, zero
    z_lo, z_hi = p.infarct.z_range
    zw = float(np.clip(min(z - z_lo, z_hi - z) / 6.0 + 0.5, 0.0, 1.0))
    zc = float(np.clip(min(z - z_lo - 6.0, z_hi - 8.0 - z) / 4.0 + 0.5, 0.0, 1.0))
    if zw <= 0:
        return zero, zero
    pen, core = shape
    core = core * np.float32(zc)
    return np.maximum(pen * np.float32(0.6 * zw), core), core


def _vertical_scale(p: PatientParams, z: float) -> float:
    """Cross-section scale of the head at phantom height z (1 at the widest level)."""
    return math.sqrt(max(0.0, 1.0 - ((z - _Z_CENTER) / (_Z_SEMI * p.height_scale)) ** 2))


def _head_window(p: PatientParams, s_z: float, coords: np.ndarray, px: float) -> tuple[slice, slice]:
    """(rows, cols) of the image that can contain the head at cross-section scale s_z."""
    ext_a = p.a_mm * (1.0 + 1.2 * p.post_widen) * 1.08 * s_z
    ext_b = p.b_mm * 1.08 * s_z
    c, s = abs(math.cos(p.angle_rad)), abs(math.sin(p.angle_rad))
    half_x, half_y = math.hypot(ext_a * c, ext_b * s), math.hypot(ext_a * s, ext_b * c)
    lo, n = coords[0] - px / 2, len(coords)
    return (_window(lo, px, n, p.center_mm[1] - half_y, p.center_mm[1] + half_y),
            _window(lo, px, n, p.center_mm[0] - half_x, p.center_mm[0] + half_x))


def _temporalis_weight(z: float) -> float:
    """How much of the temporalis muscle thickness is present at height z (0..1)."""
    return float(np.clip((45.0 - z) / 15.0, 0.0, 1.0))


def _layers(p: PatientParams, z: float, xc: np.ndarray, yc: np.ndarray, px: float,
            s_z: float) -> dict[str, np.ndarray]:
    """The slowly varying part of a plane on the grid ``xc`` x ``yc`` (mm) at height z.

    Head-frame coordinates, the scalp and skull image (``hu``, HU), the
    intracranial fraction ``inside``, depth below the brain surface ``db``
    (mm) and the smooth random fields.
    """
    f32 = np.float32
    xr, yr = p.to_head(xc[None, :], yc[:, None])
    xr, yr = xr.astype(f32), yr.astype(f32)

    # Outer surface: egg-shaped ellipse with a few smooth harmonics.
    v = yr / f32(p.b_mm)
    u = xr / (f32(p.a_mm) * (1.0 + f32(p.post_widen) * np.clip(v, -1.2, 1.2)))
    rho = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    m = np.ones_like(rho)
    for k, amp, ph in p.shape:
        m += f32(amp) * np.cos(k * phi + f32(ph))
    radius = np.sqrt(xr * xr + yr * yr)
    depth = radius * (f32(s_z) * m / np.maximum(rho, 1e-4) - 1.0)   # mm below the skin
    cos2 = np.cos(2 * phi)
    lateral = np.clip(cos2, 0.0, 1.0) ** 2
    texture = p.texture.plane(xc, yc, z)
    slow = p.slow.plane(xc, yc, z)

    # Scalp and skull layers (depths in mm from the skin surface).
    scalp = f32(p.scalp_mm) + f32(p.temporalis_mm * _temporalis_weight(z)) * lateral
    h3a, h3p = p.skull_h3
    skull = f32(p.skull_mm) * (1.0 - 0.3 * cos2 + f32(h3a) * np.cos(3 * phi + f32(h3p)))
    inner = scalp + skull
    hu = np.full(xr.shape, AIR_HU, f32)
    hu = _lerp(hu, SKIN_HU, _above(depth, 0.0, px))
    hu = _lerp(hu, FAT_HU, _above(depth, p.skin_mm, px))
    hu = _lerp(hu, MUSCLE_HU, _above(depth, p.skin_mm + p.fat_mm, px))
    hu = _lerp(hu, p.cortical_hu + 40.0 * texture, _above(depth, scalp, px))
    diploe = np.clip(p.diploe_hu + 170.0 * texture, 250.0, 900.0)
    in_diploe = _above(depth, scalp + 0.35 * skull, px) * _above(inner - 0.3 * skull, depth, px)
    hu = _lerp(hu, diploe, in_diploe)
    db = depth - inner - f32(p.csf_gap_mm)
    return {"xr": xr, "yr": yr, "xn": xr * f32(_A0 / p.a_mm), "yn": yr * f32(_B0 / p.b_mm),
            "phi": phi, "radius": radius, "hu": hu, "inside": _above(depth, inner, px),
            "db": db, "brain": _above(db, 0.0, px), "texture": texture, "slow": slow, "s_z": s_z,
            "infarct": _infarct_shape(p, xr * f32(_A0 / p.a_mm), yr * f32(_B0 / p.b_mm), slow)}


def _contents(p: PatientParams, z: float, lay: dict, xc: np.ndarray, yc: np.ndarray,
              px: float) -> dict[str, np.ndarray]:
    """Intracranial volume fractions at height z (sum to 1 inside the skull).

    Cortex and sulci, fissures and falx, deep grey matter, ventricles and
    cisterns, vessels and the infarct territory; ``gm_core`` / ``wm_core``
    are the grey / white fractions inside the infarct core.
    """
    f32 = np.float32
    xr, xn, yn, db, slow = lay["xr"], lay["xn"], lay["yn"], lay["db"], lay["slow"]

    # Cortex ribbon along the surface and along sulci, white matter below.
    wiggle = 1.5 * p.wiggle.plane(xc, yc, z)
    dist_s = _sulcal_distance(p, lay["phi"], lay["radius"], wiggle, z)
    cortex = f32(p.cortex_mm) * (1.0 + 0.2 * slow)
    sdepth = f32(p.sulcus_depth_mm) * (1.0 + 0.35 * slow)
    half_w = f32(p.sulcus_width_mm / 2)
    gm_region = np.maximum(_above(cortex, db, px),
                           _above(half_w + cortex, dist_s, px) * _above(sdepth + cortex, db, px))
    sulcus = _above(half_w, dist_s, px) * _above(sdepth, db, px)

    # Interhemispheric fissure (interrupted by the corpus callosum) with the falx.
    if z < 12.0:
        ant, post = -22.0, 60.0
    elif z < 42.0:
        ant, post = -38.0, 45.0
    else:
        ant, post = 0.0, 0.0
    along = np.maximum(_above(f32(ant), yn, px), _above(yn, f32(post), px)) if ant < post else 1.0
    ax = np.abs(xr)
    fissure = _above(f32(1.0), ax, px) * along
    gm_region = np.maximum(gm_region, _above(1.0 + cortex, ax, px) * along)
    falx = _above(f32(0.4), ax, px) * along

    brain = lay["brain"] * (1.0 - fissure)
    gm = brain * gm_region * (1.0 - sulcus)
    wm = brain * (1.0 - gm_region)

    # Deep grey matter, then ventricles, fissures and cisterns.
    deep = 0.6 * _blob_union(p, p.deep_grey, z, xn, yn, xc, yc, px, edge_mm=2.5) * lay["brain"]
    gm, wm = gm + wm * deep, wm * (1.0 - deep)
    csf_blob = _blob_union(p, p.csf_spaces, z, xn, yn, xc, yc, px)
    gm, wm = gm * (1.0 - csf_blob), wm * (1.0 - csf_blob)

    # Vessels replace whatever they run through; the superior sagittal sinus
    # sits on the inner table in the midline.
    out = _tubes(p, z, xc, yc, px)
    out["vein"] = np.maximum(out["vein"], _sagittal_sinus(p, z, xr, lay["yr"], lay["s_z"], px))
    total_vessel = np.clip(out["art"] + out["occ"] + out["clot"] + out["vein"], 0.0, 1.0)
    gm, wm = gm * (1.0 - total_vessel), wm * (1.0 - total_vessel)
    out["falx"] = falx * (1.0 - total_vessel) * (gm + wm < 0.99)
    out["csf"] = np.clip(1.0 - gm - wm - total_vessel - out["falx"], 0.0, 1.0)

    hypo, core = _infarct_maps(p, lay["infarct"], z, gm)
    out.update(gm=gm, wm=wm, hypo=hypo * (gm + wm > 0.01), gm_core=gm * core, wm_core=wm * core)
    return out


def _compose(p: PatientParams, lay: dict, frac: dict) -> dict[str, np.ndarray]:
    """Slice components (see :class:`SliceComponents`) from layers and fractions."""
    f32 = np.float32
    texture = 1.5 * lay["texture"]
    # Acute infarct core: grey-white differentiation lost, ~6-10 HU below white matter.
    lost = f32(p.infarct_drop_hu) if p.infarct is not None else f32(0.0)
    intra = (frac["gm"] * (p.gm_hu + texture) + frac["wm"] * (p.wm_hu + texture)
             - frac["gm_core"] * (f32(p.gm_hu - p.wm_hu) + lost) - frac["wm_core"] * lost
             + frac["csf"] * CSF_HU + frac["falx"] * FALX_HU
             + (frac["art"] + frac["occ"]) * BLOOD_HU + frac["clot"] * CLOT_HU
             + frac["vein"] * VENOUS_BLOOD_HU)
    inside = lay["inside"]
    out = {"base_hu": _lerp(lay["hu"], intra, inside)}
    for key in _COMPONENTS[1:]:
        out[key] = (frac[key] * inside).astype(f32)
    return out


def _render_window(p: PatientParams, z: float, xc: np.ndarray, yc: np.ndarray, px: float,
                   s_z: float) -> dict[str, np.ndarray]:
    """Components of an infinitely thin plane on the grid ``xc`` x ``yc`` (mm) at height z."""
    lay = _layers(p, z, xc, yc, px, s_z)
    return _compose(p, lay, _contents(p, z, lay, xc, yc, px))


def _sagittal_sinus(p: PatientParams, z: float, xr: np.ndarray, yr: np.ndarray, s_z: float,
                    px: float) -> np.ndarray:
    """Superior sagittal sinus fraction: a flattened tube under the inner table (midline)."""
    out = np.zeros_like(xr)
    for direction, z_start, radius in ((1.0, -5.0, 3.4), (-1.0, 20.0, 2.2)):
        w = float(np.clip((z - z_start) / 8.0, 0.0, 1.0))
        if w <= 0:
            continue
        r = radius * (0.6 + 0.4 * w)
        phi = direction * math.pi / 2
        m = 1.0 + sum(amp * math.cos(k * phi + ph) for k, amp, ph in p.shape)
        y_skin = direction * p.b_mm * s_z * m
        skull = p.skull_mm * (1.3 + p.skull_h3[0] * math.cos(3 * phi + p.skull_h3[1]))
        y_c = y_skin - direction * (p.scalp_mm + skull + 0.8 * r)
        near = (np.abs(yr - np.float32(y_c)) < 2 * r + 2 * px).any(axis=1)
        rows = np.nonzero(near)[0]
        if rows.size == 0:
            continue
        win = slice(rows[0], rows[-1] + 1)
        q = (xr[win] / (1.3 * r)) ** 2 + ((yr[win] - y_c) / r) ** 2
        sd = (1.0 - np.sqrt(q)) * r
        np.maximum(out[win], _above(sd, 0.0, px), out=out[win])
    return out


def render_slice(p: PatientParams, z_mm: float, size: int, thickness_mm: float = 0.0) -> SliceComponents:
    """Components of a reconstructed axial slice centred at phantom height ``z_mm``.

    Thick slices average ``ceil(thickness / 1.7 mm)`` planes across the slab,
    which gives vessels, sulci and ventricle edges their partial-volume look.
    Where the scalp and skull move by less than half a pixel across the slab
    (everywhere but near the vertex and the temporalis), they are computed
    once at the slab centre. Only the head's bounding box is computed; the
    rest of the image is air.
    """
    n_sub = max(1, math.ceil(thickness_mm / 1.7 - 1e-9))
    zs = [z_mm + ((k + 0.5) / n_sub - 0.5) * thickness_mm for k in range(n_sub)]
    coords, px = _grid(p, size)
    out = {k: np.zeros((size, size), np.float32) for k in _COMPONENTS}
    out["base_hu"][:] = AIR_HU
    scales = [_vertical_scale(p, z) for z in zs]
    planes = [(z, s) for z, s in zip(zs, scales) if s > 0.05]
    if not planes:
        return SliceComponents(**out)
    rows, cols = _head_window(p, max(scales), coords, px)
    xc, yc = coords[cols], coords[rows]
    s_mid = _vertical_scale(p, z_mm)
    shift = max(max(abs(s - s_mid) for s in scales) * p.b_mm * 1.1,
                max(abs(_temporalis_weight(z) - _temporalis_weight(z_mm)) for z in zs) * p.temporalis_mm)
    if len(planes) == n_sub and n_sub > 1 and shift < 0.5 * px and s_mid > 0.05:
        lay = _layers(p, z_mm, xc, yc, px, s_mid)
        frac = None
        for z, _ in planes:
            sub = _contents(p, z, lay, xc, yc, px)
            frac = sub if frac is None else {k: frac[k] + sub[k] for k in frac}
        total = _compose(p, lay, {k: v / np.float32(n_sub) for k, v in frac.items()})
    else:
        total = None
        for z, s_z in planes:
            sub = _render_window(p, z, xc, yc, px, s_z)
            total = sub if total is None else {k: total[k] + sub[k] for k in total}
        total["base_hu"] += np.float32(AIR_HU * (n_sub - len(planes)))
        total = {k: v / np.float32(n_sub) for k, v in total.items()}
    for key in _COMPONENTS:
        out[key][rows, cols] = total[key]
    return SliceComponents(**out, window=(rows, cols))


# --------------------------------------------------------------------------
# Contrast
# --------------------------------------------------------------------------

def _gamma_variate(t: np.ndarray, t0, alpha: float, beta) -> np.ndarray:
    """Gamma variate normalised to a peak of 1 at ``t0 + alpha * beta`` (t in s)."""
    tau = np.maximum(np.asarray(t, dtype=np.float64) - t0, 0.0)
    x = tau / (alpha * beta)
    return np.where(tau > 0, x ** alpha * np.exp(alpha * (1.0 - x)), 0.0)


def _with_recirculation(t, t0, beta, peak):
    return peak * (_gamma_variate(t, t0, 3.0, beta) + 0.1 * _gamma_variate(t, t0 + 10.0, 2.0, 5.0))


def bolus_curves(p: PatientParams, times_s: np.ndarray) -> dict[str, np.ndarray]:
    """CTP enhancement (HU above baseline) at ``times_s`` for each enhancing class.

    Returns arrays shaped like ``times_s`` for ``art`` (peak 250-380 HU),
    ``occ`` (collateral filling, later and lower), ``vein`` (later),
    ``gm`` (25-38 HU) and ``wm`` (40-50 % of grey).
    """
    bo = p.bolus
    t = np.asarray(times_s, dtype=np.float64)
    ta = bo.arrival_s
    gm = _with_recirculation(t, ta + 1.0, 1.6 * bo.beta_s, bo.gm_peak)
    return {
        "art": _with_recirculation(t, ta, bo.beta_s, bo.artery_peak),
        "occ": _with_recirculation(t, ta + 4.0, 1.6 * bo.beta_s, 0.45 * bo.artery_peak),
        "vein": _with_recirculation(t, ta + bo.vein_delay_s, 1.35 * bo.beta_s, bo.vein_peak),
        "gm": gm,
        "wm": _with_recirculation(t, ta + 1.5, 1.9 * bo.beta_s, bo.gm_peak * bo.wm_ratio),
    }


def _hypo_tissue(p: PatientParams, t: float, hypo: np.ndarray, white: bool) -> np.ndarray:
    """Tissue enhancement at time t for hypoperfusion weights ``hypo`` (1-D)."""
    bo = p.bolus
    amp = bo.gm_peak * (bo.wm_ratio if white else 1.0) * (1.0 - hypo * (1.0 - bo.hypo_core_amp))
    beta = (1.9 if white else 1.6) * bo.beta_s * (1.0 + 0.6 * hypo)
    t0 = bo.arrival_s + (1.5 if white else 1.0) + hypo * bo.hypo_delay_s
    return _with_recirculation(t, t0, beta, amp)


def ncct_hu(c: SliceComponents) -> np.ndarray:
    """Non-contrast image (HU, noise-free)."""
    return c.base_hu


def ctp_hu(c: SliceComponents, p: PatientParams, t_s: float,
           curves: dict[str, float] | None = None) -> np.ndarray:
    """CT perfusion image at time ``t_s`` (s after the first time point), HU, noise-free.

    ``curves`` are the :func:`bolus_curves` values at ``t_s`` (computed when omitted).
    """
    e = curves if curves is not None else {k: float(v) for k, v in bolus_curves(p, np.array(t_s)).items()}
    f32 = np.float32
    w = c.window
    hu = c.base_hu.copy()
    hu[w] += (c.art[w] * f32(e["art"]) + c.occ[w] * f32(e["occ"]) + c.vein[w] * f32(e["vein"])
              + c.gm[w] * f32(e["gm"]) + c.wm[w] * f32(e["wm"]))
    idx = c.hypo_index
    if idx[0].size:
        h = c.hypo[idx].astype(np.float64)
        gm_h = _hypo_tissue(p, t_s, h, white=False)
        wm_h = _hypo_tissue(p, t_s, h, white=True)
        hu[idx] += (c.gm[idx] * (gm_h - e["gm"]) + c.wm[idx] * (wm_h - e["wm"])).astype(f32)
    return hu


def cta_hu(c: SliceComponents, p: PatientParams) -> np.ndarray:
    """CT angiography image (HU, noise-free): arteries +320-430 HU, veins +60-110 HU."""
    bo = p.bolus
    f32 = np.float32
    w = c.window
    hu = c.base_hu.copy()
    tissue = 1.0 - 0.8 * c.hypo[w]
    hu[w] += (c.art[w] * f32(bo.cta_artery) + c.occ[w] * f32(0.15 * bo.cta_artery)
              + c.vein[w] * f32(bo.cta_vein) + (c.gm[w] * f32(5.0) + c.wm[w] * f32(2.0)) * tissue)
    return hu


# --------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------

def noise_sigma_hu(kvp: int, mas: float) -> float:
    """Quantum noise sigma (HU) of a head scan: ``SIGMA_AT_100_MAS[kvp] * sqrt(100 / mAs)``."""
    return SIGMA_AT_100_MAS[kvp] * math.sqrt(100.0 / mas)


def _smooth121(a: np.ndarray, axis: int) -> np.ndarray:
    """[1, 2, 1]/4 smoothing along ``axis`` (edge samples keep only their inner neighbour)."""
    out = a * np.float32(0.5)
    lo = [slice(None)] * a.ndim
    hi = [slice(None)] * a.ndim
    lo[axis], hi[axis] = slice(None, -1), slice(1, None)
    lo, hi = tuple(lo), tuple(hi)
    out[hi] += np.float32(0.25) * a[lo]
    out[lo] += np.float32(0.25) * a[hi]
    return out


def _add_noise(hu: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add correlated Gaussian noise of standard deviation ``sigma`` HU.

    White noise is smoothed with a separable [1, 2, 1]/4 kernel (a CT-like,
    slightly blurred grain). Each 1-D pass scales the variance by
    1/16 + 4/16 + 1/16 = 0.375, so both passes scale the standard deviation
    by 0.375, which is divided out.
    """
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise = _smooth121(_smooth121(noise, 0), 1)
    noise *= np.float32(sigma / 0.375)
    noise += hu
    return noise


# --------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------

_UID_NAMESPACE = uuid.UUID("3f1d6c2e-7a4b-5c1e-9d2f-0b8e4a6c1d57")


def _uid(p: PatientParams, config: str, *parts) -> str:
    """Deterministic UID under the 2.25 (UUID) root.

    The UUID is name-based (version 5, ISO/IEC 9834-8) on the phantom version,
    seed, patient, configuration and ``parts``. (``pydicom.uid.generate_uid``
    ignores ``entropy_srcs`` when ``prefix=None``, so it cannot be used for
    reproducible 2.25 UIDs.)
    """
    src = ["tfgan-ct-phantom", PHANTOM_VERSION, f"seed={p.seed}", f"patient={p.index}", config]
    name = "|".join(src + [str(x) for x in parts])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _tm(moment: _dt.datetime) -> str:
    return moment.strftime("%H%M%S.%f")


def _ds(value: float) -> str:
    """A decimal string (DS) of at most 16 characters, exact when it fits."""
    value = float(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    text = repr(value)
    digits = 15
    while len(text) > 16 or "e" in text:
        text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
        digits -= 1
    return text


def _fov_mask(size: int) -> np.ndarray:
    """Pixels whose centre is inside the inscribed reconstruction circle."""
    c = (np.arange(size) + 0.5) - size / 2
    return (c[None, :] ** 2 + c[:, None] ** 2) <= (size / 2) ** 2


def _to_stored(hu: np.ndarray, p: PatientParams, fov: np.ndarray) -> bytes:
    """HU -> stored little-endian pixel bytes (stored = HU + 1024, padding outside the FOV)."""
    stored = np.rint(hu) + 1024.0
    if p.signed:
        out = np.clip(stored, 0, 4095).astype("<i2")
        out[~fov] = -2000
    else:
        out = np.clip(stored, 1, 4095).astype("<u2")
        out[~fov] = 0
    return out.tobytes()


def _series_header(p: PatientParams, spec: SeriesSpec, size: int, config: str,
                   study_uid: str, frame_uid: str) -> Dataset:
    """Elements shared by every image of a series."""
    px = p.fov_mm / size
    start = p.study_datetime
    series_start = start + _dt.timedelta(seconds=spec.start_offset_s)
    birth = start.date().replace(year=start.year - p.age) - _dt.timedelta(days=(p.index * 37) % 300)
    mas = p.mas[spec.key]
    d = Dataset()
    d.SpecificCharacterSet = "ISO_IR 100"
    d.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    d.InstanceCreationDate = start.strftime("%Y%m%d")
    d.InstanceCreationTime = _tm(start)
    d.SOPClassUID = CTImageStorage
    d.StudyDate = d.SeriesDate = d.AcquisitionDate = d.ContentDate = start.strftime("%Y%m%d")
    d.StudyTime = _tm(start)
    d.SeriesTime = _tm(series_start)
    d.AccessionNumber = f"PH{p.seed:04d}{p.index:04d}"
    d.Modality = "CT"
    d.Manufacturer = MANUFACTURER
    d.InstitutionName = "TFGAN-CT SYNTHETIC DATA"
    d.ReferringPhysicianName = ""
    d.StationName = "PHANTOM"
    d.StudyDescription = "CT STROKE PROTOCOL HEAD"
    d.SeriesDescription = spec.description
    d.ManufacturerModelName = "ANALYTIC HEAD PHANTOM"
    d.PatientName = p.patient_name
    d.PatientID = p.patient_id
    d.PatientBirthDate = birth.strftime("%Y%m%d")
    d.PatientSex = p.sex
    d.PatientAge = f"{p.age:03d}Y"
    if spec.contrast_agent:
        d.ContrastBolusAgent = spec.contrast_agent
        d.ContrastBolusRoute = "IV"
        d.ContrastBolusVolume = _ds(spec.contrast_volume_ml)
        d.ContrastBolusIngredient = "IODINE"
        d.ContrastBolusIngredientConcentration = "370"
    d.BodyPartExamined = "HEAD"
    d.ScanOptions = spec.scan_options
    d.SliceThickness = _ds(spec.thickness_mm)
    d.KVP = str(spec.kvp)
    d.DataCollectionDiameter = "250"
    d.DeviceSerialNumber = "0000"
    d.SoftwareVersions = f"tfgan-ct phantom {PHANTOM_VERSION}"
    d.ProtocolName = "STROKE HEAD"
    d.ReconstructionDiameter = _ds(p.fov_mm)
    d.DistanceSourceToDetector = "949"
    d.DistanceSourceToPatient = "541"
    d.GantryDetectorTilt = "0"
    d.TableHeight = "150"
    d.RotationDirection = "CW"
    d.ExposureTime = str(int(round(spec.rotation_s * 1000)))
    d.XRayTubeCurrent = str(int(round(mas / spec.rotation_s)))
    d.Exposure = str(int(round(mas)))
    d.FilterType = "HEAD FILTER"
    d.ConvolutionKernel = spec.kernel
    d.PatientPosition = "HFS"
    d.RevolutionTime = float(spec.rotation_s)
    d.CTDIvol = round(spec.ctdi_per_mas * mas, 2)
    d.StudyInstanceUID = study_uid
    d.SeriesInstanceUID = _uid(p, config, "series", spec.key)
    d.StudyID = f"{p.index + 1}"
    d.SeriesNumber = spec.number
    d.FrameOfReferenceUID = frame_uid
    d.PositionReferenceIndicator = ""
    d.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    d.SamplesPerPixel = 1
    d.PhotometricInterpretation = "MONOCHROME2"
    d.Rows = d.Columns = size
    d.PixelSpacing = [_ds(px), _ds(px)]
    d.BitsAllocated = 16
    d.BitsStored = 16 if p.signed else 12
    d.HighBit = d.BitsStored - 1
    d.PixelRepresentation = 1 if p.signed else 0
    d.PixelPaddingValue = -2000 if p.signed else 0
    d.WindowCenter = _ds(spec.window[0])
    d.WindowWidth = _ds(spec.window[1])
    d.RescaleIntercept = "-1024"
    d.RescaleSlope = "1"
    d.RescaleType = "HU"
    d.LossyImageCompression = "00"
    d.ImageComments = "Synthetic analytic phantom image, not patient data"
    return d


def _encode_shared(common: Dataset) -> Dataset:
    """Encode the elements shared by a series once (explicit VR little endian).

    The result holds raw (already encoded) elements; datasets that copy them
    and declare the same original encoding are written without re-encoding,
    which makes writing several times faster. The bytes on disk are the same
    as when every image is encoded from scratch.
    """
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, common)
    return read_dataset(BytesIO(buffer.getvalue()), is_implicit_VR=False, is_little_endian=True)


def _write_image(path: Path, shared: Dataset, p: PatientParams, config: str, spec: SeriesSpec,
                 size: int, instance: int, z_dicom: float, acq_time: _dt.datetime, pixels: bytes,
                 temporal_index: int | None = None) -> None:
    """Write one CT image: the series' shared elements plus the per-instance ones."""
    sop_uid = _uid(p, config, "image", spec.key, instance)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.set_original_encoding(False, True, _CHARSET)
    ds.update(shared)
    ds.file_meta = meta
    ds.SOPInstanceUID = sop_uid
    ds.AcquisitionTime = ds.ContentTime = _tm(acq_time)
    ds.AcquisitionNumber = temporal_index if temporal_index is not None else 1
    ds.InstanceNumber = instance
    x0 = -p.fov_mm / 2 + p.fov_mm / size / 2
    ds.ImagePositionPatient = [_ds(x0), _ds(x0), _ds(z_dicom)]
    ds.SliceLocation = _ds(z_dicom)
    if temporal_index is not None:
        ds.TemporalPositionIndex = temporal_index
    ds.add_new(0x7FE00010, "OW", pixels)   # Pixel Data, 16-bit words
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------
# Study / dataset
# --------------------------------------------------------------------------

def _slab(spec: SeriesSpec, n: int) -> list[float]:
    """Slice centres (phantom frame, mm), inferior to superior."""
    return [spec.z_center_mm + (i - (n - 1) / 2) * spec.spacing_mm for i in range(n)]


def make_study(out_dir, patient_index: int, seed: int = 0, size: int = 512, ncct_slices: int = 8,
               ctp_slices: int = 4, ctp_timepoints: int = 24, cta_slices: int = 16) -> dict[str, list[Path]]:
    """Write one phantom patient's stroke study (NCCT, CTP, CTA) as DICOM.

    Files go to ``out_dir/patientNN/{01_ncct,02_ctp,03_cta}/IM00001.dcm...``.
    NCCT: ``ncct_slices`` x 5 mm, 120 kVp, noise ~5 HU. CTP: ``ctp_slices``
    table positions (5 mm) x ``ctp_timepoints`` time points 2 s apart, 80 kVp,
    noise 13-18 HU, written time-major. CTA: ``cta_slices`` x 0.625 mm,
    120 kVp, noise ~8 HU. Images are ``size`` x ``size``.

    Existing ``IM*.dcm`` files in those series folders are replaced. Returns
    the written paths per series (``"ncct"``, ``"ctp"``, ``"cta"``), in
    InstanceNumber order.
    """
    if size < 16:
        raise ValueError("size must be >= 16")
    if min(ncct_slices, ctp_slices, ctp_timepoints, cta_slices) < 1:
        raise ValueError("slice and time point counts must be >= 1")
    p = patient_params(patient_index, seed)
    config = f"size={size};slices={ncct_slices},{ctp_slices},{ctp_timepoints},{cta_slices}"
    study_uid = _uid(p, config, "study")
    frame_uid = _uid(p, config, "frame-of-reference")
    patient_dir = Path(out_dir) / f"patient{patient_index:02d}"
    fov = _fov_mask(size)
    cache: dict[tuple[float, float], SliceComponents] = {}

    def components(z: float, thickness: float) -> SliceComponents:
        key = (round(z, 4), thickness)
        if key not in cache:
            cache[key] = render_slice(p, z, size, thickness)
        return cache[key]

    def noise_rng(series: int, instance: int) -> np.random.Generator:
        return np.random.default_rng([_SEED_SALT, p.seed, p.index, series, instance, size])

    counts = {"ncct": ncct_slices, "ctp": ctp_slices, "cta": cta_slices}
    written: dict[str, list[Path]] = {}
    for key, spec in SERIES.items():
        folder = patient_dir / f"{spec.number:02d}_{key}"
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("IM*.dcm"):   # from an earlier run with other settings
            stale.unlink()
        shared = _encode_shared(_series_header(p, spec, size, config, study_uid, frame_uid))
        sigma = noise_sigma_hu(spec.kvp, p.mas[key])
        start = p.study_datetime + _dt.timedelta(seconds=spec.start_offset_s)
        zs = _slab(spec, counts[key])
        paths = []
        if key == "ctp":
            comps = [components(z, spec.thickness_mm) for z in zs]
            times = np.arange(ctp_timepoints) * CTP_INTERVAL_S
            curves = bolus_curves(p, times)
            for ti, t in enumerate(times):
                e = {k: float(v[ti]) for k, v in curves.items()}
                for si, (z, c) in enumerate(zip(zs, comps)):
                    inst = ti * len(zs) + si + 1
                    hu = _add_noise(ctp_hu(c, p, float(t), e), sigma, noise_rng(spec.number, inst))
                    path = folder / f"IM{inst:05d}.dcm"
                    acq = start + _dt.timedelta(seconds=float(t) + 0.1 * si)
                    _write_image(path, shared, p, config, spec, size, inst, p.table_z0_mm + z, acq,
                                 _to_stored(hu, p, fov), temporal_index=ti + 1)
                    paths.append(path)
            cache.clear()
        else:
            for i, z in enumerate(zs):
                inst = i + 1
                c = components(z, spec.thickness_mm)
                clean = ncct_hu(c) if key == "ncct" else cta_hu(c, p)
                hu = _add_noise(clean, sigma, noise_rng(spec.number, inst))
                path = folder / f"IM{inst:05d}.dcm"
                acq = start + _dt.timedelta(seconds=0.5 * i * spec.rotation_s)
                _write_image(path, shared, p, config, spec, size, inst, p.table_z0_mm + z, acq,
                             _to_stored(hu, p, fov))
                paths.append(path)
        written[key] = paths
    return written


def _study_job(args: tuple) -> dict[str, list[Path]]:
    out_dir, index, kwargs = args
    return make_study(out_dir, index, **kwargs)


def make_dataset(out_dir, n_patients: int = 9, seed: int = 0, size: int = 512, *,
                 workers: int = 1, **study_kwargs) -> list[dict]:
    """Write ``n_patients`` phantom studies (patient indices 0..n-1) under ``out_dir``.

    Each patient has one study, so splitting by patient is a real split.
    ``study_kwargs`` are passed to :func:`make_study` (slice and time point
    counts). ``workers > 1`` writes patients in that many processes; the files
    are identical either way. Returns one ``{"ncct": [...], "ctp": [...],
    "cta": [...]}`` dict of written paths per patient, in patient order.
    """
    kwargs = dict(study_kwargs, seed=seed, size=size)
    jobs = [(out_dir, i, kwargs) for i in range(n_patients)]
    if workers <= 1 or n_patients <= 1:
        return [_study_job(job) for job in jobs]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(workers, n_patients)) as pool:
        return list(pool.map(_study_job, jobs))
