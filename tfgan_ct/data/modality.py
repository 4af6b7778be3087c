"""Decide whether a series is NCCT, CT perfusion (CTP) or CT angiography (CTA).

Rules (thresholds and words in `convert.rules` of the config):
- CTP: repeated acquisitions over time at the same table positions
  (at least `ctp_min_timepoints` different acquisition times at one position;
  slices without a known position, and copies with the same time, never count).
- CTA: an angiography keyword in the descriptions, or a contrast agent named,
  together with thin slices (at most `cta_max_slice_thickness_mm`).
- NCCT: everything else.
"""
from __future__ import annotations

import re
from collections import defaultdict

from tfgan_ct.config import ModalityRules
from tfgan_ct.data.dicom_io import Frame
from tfgan_ct.stages import CT_MODALITIES

MODALITIES = CT_MODALITIES  # what `classify` decides between


def classify(frames: list[Frame], rules: ModalityRules) -> tuple[str, str]:
    """(modality, reason) for the frames of one series."""
    times = _times_per_position(frames)
    per_position = {position: len(set(t)) for position, t in times.items()}  # distinct times
    repeats = max(per_position.values(), default=0)
    if repeats >= rules.ctp_min_timepoints:
        return "ctp", (f"{repeats} acquisitions at the same table position "
                       f"(>= {rules.ctp_min_timepoints}) over {len(per_position)} position(s)")
    first = frames[0]
    keyword = next((k for k in rules.cta_keywords
                    if re.search(rf"\b{re.escape(k.upper())}\b", first.description)), None)
    no_contrast = {v.upper() for v in rules.no_contrast_values}
    contrast = first.contrast_agent not in no_contrast
    thickness = first.slice_thickness
    thin = thickness is not None and thickness <= rules.cta_max_slice_thickness_mm
    if (keyword or contrast) and thin:
        why = f"keyword {keyword!r} in description" if keyword else "contrast agent named"
        return "cta", f"{why}, {thickness:g} mm slices"
    if keyword or contrast:
        return "ncct", (f"contrast/angio hint but slices {thickness if thickness is not None else '?'}"
                        f" mm thick (CTA needs <= {rules.cta_max_slice_thickness_mm:g} mm)")
    images = max((len(t) for t in times.values()), default=0)
    if images >= rules.ctp_min_timepoints:
        return "ncct", (f"{images} images at one table position but without distinct "
                        f"acquisition times (anonymised?): not taken as CTP; use --modality ctp if it is")
    return "ncct", "no repeated positions, no contrast or angiography hints"


def _times_per_position(frames: list[Frame]) -> dict[float, list[float]]:
    """Acquisition times of the images at each known table position (0.1 mm)."""
    times: dict[float, list[float]] = defaultdict(list)
    for f in frames:
        if f.position is not None:
            times[round(f.position, 1)].append(round(f.time, 3))
    return times
