"""What is in the PACS, from this tool's point of view: sources, derived series, and what is done.

Stateless on purpose: whether a source series has been processed is read from
the PACS itself, from the derived series' own attributes (their
DerivationDescription, which `derived_dicom` writes and `is_our_derivation`
recognises, and their ReferencedSeriesSequence naming the source series). A
restart, a second `--once` or two instances side by side therefore agree on
what is done. A derived series counts as complete when the PACS holds as many
of its instances as its DerivationDescription says it has ("series of N
images", added just before it is stored); an incomplete one (a store that
failed half-way and could not be taken back) is made again with the same UIDs,
so the PACS ends up with one whole series.

Derived series are never taken as sources. A source waits until its instance
count has not changed for the settle time (`Settle`), so a series still
arriving is processed once, whole.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import pydicom

from tfgan_ct.deploy.derived_dicom import SR, derivation_kind
from tfgan_ct.deploy.pacs.dicomweb import DicomWebPacs, SeriesRef

_COUNT = re.compile(r"; series of (\d+) images")


def count_text(images: int) -> str:
    """What a stored derived series adds to its DerivationDescription: its number of images."""
    return f"; series of {images} images"


@dataclass(frozen=True)
class Derived:
    """A derived series made by this tool: its kind (SR or SPREAD), the source series it was
    made from, and how many images it has when whole (None when not recorded)."""

    kind: str
    source_series: str
    images: int | None


def derived_info(header: pydicom.Dataset) -> Derived | None:
    """The Derived of an instance header, or None when the instance is not one this tool made."""
    text = str(header.get("DerivationDescription", "") or "")
    kind = derivation_kind(text)
    if kind is None:
        return None
    referenced = header.get("ReferencedSeriesSequence") or []
    source = str(referenced[0].get("SeriesInstanceUID", "") or "") if len(referenced) else ""
    found = _COUNT.search(text)
    return Derived(kind, source, int(found.group(1)) if found else None)


@dataclass
class Catalog:
    """The CT series of a PACS sorted into sources and derived series (cached per series UID:
    whether a series is derived never changes)."""

    pacs: DicomWebPacs
    _known: dict[str, Derived | None] = field(default_factory=dict)

    def describe(self, ref: SeriesRef) -> Derived | None:
        """Derived info of a series, from the header of one of its instances; None for a source
        (and for a series without instances, which is looked at again next time)."""
        if ref.series_uid in self._known:
            return self._known[ref.series_uid]
        instances = self.pacs.instances(ref.study_uid, ref.series_uid)
        if not instances:
            return None
        header = self.pacs.instance_metadata(ref.study_uid, ref.series_uid, instances[0].sop_uid)
        self._known[ref.series_uid] = info = derived_info(header)
        return info

    def pending(self, refs: list[SeriesRef]) -> list[SeriesRef]:
        """The source series among `refs` that have no complete derived SR series yet."""
        derived = {ref.series_uid: info for ref in refs if (info := self.describe(ref)) is not None}
        counts = {ref.series_uid: ref.instance_count for ref in refs}
        done = {info.source_series for uid, info in derived.items()
                if info.kind == SR and _complete(info, counts.get(uid))}
        return [ref for ref in refs if ref.series_uid not in derived and ref.series_uid not in done]


def _complete(info: Derived, stored: int | None) -> bool:
    """Whether the PACS holds the whole derived series (an unknown count is taken as whole)."""
    return info.images is None or stored is None or stored >= info.images


@dataclass
class Settle:
    """Instance counts over time: a series is settled when its count has not changed for
    `seconds` (times from `clock`, in seconds)."""

    seconds: float
    clock: object = time.monotonic
    _seen: dict[str, tuple[int | None, float]] = field(default_factory=dict)

    def update(self, series: str, count: int | None) -> float:
        """Record the current count of `series`; returns the seconds it still has to wait (<= 0: settled)."""
        now = self.clock()
        last = self._seen.get(series)
        if last is None or last[0] != count:
            self._seen[series] = (count, now)
            since = now
        else:
            since = last[1]
        return self.seconds - (now - since)

    def forget(self, series: str) -> None:
        """Drop a series (processed, or gone from the PACS)."""
        self._seen.pop(series, None)
