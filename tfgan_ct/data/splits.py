"""Patient-level train/validation/test splits.

A patient never appears in two splits. Patients are ordered by a salted hash
(so the order is reproducible for a seed but unrelated to names or IDs) and
apportioned to the splits by the ratio `train:validation:test`; or a CSV file
maps each patient ID to a split.
"""
from __future__ import annotations

import csv
import hashlib
import hmac
from fractions import Fraction
from pathlib import Path

from tfgan_ct.config_checks import parse_ratio  # also splits.parse_ratio: the ratio `convert.split` reads

SPLITS = ("train", "validation", "test")
_ALIASES = {"train": "train", "training": "train", "validation": "validation", "val": "validation",
            "valid": "validation", "test": "test", "testing": "test"}


def salted_hash(value: str, salt: str) -> str:
    """16 hex digits of HMAC-SHA256(salt, value): a stable pseudonym for `value`.

    Text that came from file names which are not valid UTF-8 (Python keeps their
    bytes as surrogates) is hashed by those bytes.
    """
    return hmac.new(salt.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape"),
                    hashlib.sha256).hexdigest()[:16]


def apportion(n: int, ratio: tuple[Fraction, ...]) -> list[int]:
    """Split `n` patients by `ratio` (largest remainder); each non-zero share gets one if it can."""
    exact = [r * n for r in ratio]
    counts = [int(e) for e in exact]
    order = sorted(range(len(ratio)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    # Give an empty but wanted split one patient, taken from the largest split.
    for i, r in enumerate(ratio):
        if r > 0 and counts[i] == 0 and n >= sum(1 for x in ratio if x > 0):
            donor = max(range(len(counts)), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] += 1
    return counts


def assign_by_ratio(patients: list[str], ratio_text: str, salt: str) -> dict[str, str]:
    """Map each patient to a split by salted-hash order and the ratio."""
    ordered = sorted(set(patients), key=lambda p: salted_hash("split:" + p, salt))
    counts = apportion(len(ordered), parse_ratio(ratio_text))
    out: dict[str, str] = {}
    start = 0
    for split, count in zip(SPLITS, counts):
        for patient in ordered[start:start + count]:
            out[patient] = split
        start += count
    return out


def read_split_csv(path: str | Path) -> dict[str, str]:
    """Read a CSV with columns `patient,split` (header row required) into a mapping."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
    if not rows or not {"patient", "split"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a header row with columns 'patient' and 'split'")
    out: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        split = _ALIASES.get(str(row["split"]).strip().lower())
        if split is None:
            raise ValueError(f"{path}, line {line}: unknown split {row['split']!r} "
                             f"(use train, validation or test)")
        patient = str(row["patient"]).strip()
        if out.get(patient, split) != split:
            raise ValueError(f"{path}, line {line}: a patient is listed in two splits")
        out[patient] = split
    return out
