"""`tfgan-ct pacs`: find CT series in a PACS, upscale them, store the derived series beside them.

One pass (`poll_once`): search CT series over QIDO-RS, leave out derived series
and sources that already have a whole derived series (`catalog`), wait for
each remaining source to settle, then per series: read its headers (WADO-RS
metadata), decide its modality as `convert --modality auto` does, retrieve it,
upscale it with that modality's model (`deploy.upscale`, the same derived DICOM
with trust figures in ImageComments, and with `uncertainty` a flip-spread
series), and store the result with STOW-RS into the same study. The derived
UIDs are a hash of the source's and the model's, so storing a series again
(after a failure, or by a second instance) gives the same instances and the
PACS keeps one copy.

Faults: every request is retried with bounded backoff (`dicomweb`); a series
that still fails is reported with one line and the others go on. A store that
fails half-way is taken back (deleted) where the server allows it, else the
next pass completes it. The retrieved images live only in a staging folder
under the work folder, removed when the series is done (and, after a kill, by
the next run). Series are named in logs and in the report by the salted hash
that `convert` uses, never by UID or patient.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom

from tfgan_ct.config import Config
from tfgan_ct.data import dicom_io, modality, splits
from tfgan_ct.data.conversion import salt_of
from tfgan_ct.deploy import upscale
from tfgan_ct.deploy.pacs.catalog import Catalog, Settle, count_text
from tfgan_ct.deploy.pacs.dicomweb import DicomWebPacs, PacsAuthError, PacsError, SeriesRef
from tfgan_ct.deploy.pacs.models import Models
from tfgan_ct.fileio import make_staging, remove_stale_staging
from tfgan_ct.stages import CT_MODALITIES

log = logging.getLogger(__name__)

REPORT = "pacs_report.json"
LOG = "pacs.log"


@dataclass(frozen=True)
class PacsOptions:
    """How `tfgan-ct pacs` runs. Times in seconds."""

    modality: str = "auto"          # auto (from the headers) or one of CT_MODALITIES for every series
    since: dt.date | None = None    # only studies dated on or after
    settle: float = 30.0            # a series is processed once its instance count is this old
    interval: float = 30.0          # --watch: time between searches
    uncertainty: bool = False       # also store the flip-spread series
    dry_run: bool = False           # list what would be done, change nothing
    tile: int | None = None         # LR tile size of inference (0: whole image, None: auto)
    tile_pad: int = 16
    outside: str = "bicubic"        # pixels outside the model's window (see UpscaleOptions)
    chunk: int = 16                 # instances per STOW-RS request
    max_wait: float = 3600.0        # --once: longest wait for series still arriving


class PacsWorker:
    """Processes the CT series of one PACS; `out` holds the log, the report and the staging."""

    def __init__(self, pacs: DicomWebPacs, models: Models, cfg: Config, options: PacsOptions, out: Path,
                 clock: Callable[[], float] | None = None) -> None:
        if options.modality not in ("auto", *CT_MODALITIES):
            raise PacsError(f"--modality must be auto or one of {', '.join(CT_MODALITIES)}")
        self.pacs, self.models, self.cfg, self.options, self.out = pacs, models, cfg, options, Path(out)
        self.catalog = Catalog(pacs)
        self.settle = Settle(options.settle, **({"clock": clock} if clock else {}))
        self.stop = threading.Event()
        self.failed: dict[str, int | None] = {}   # series UID -> instance count when it failed
        self.report: dict[str, dict] = upscale.read_report(self.out / REPORT)
        self._salt = salt_of(cfg)

    # ---- the loops -------------------------------------------------------------------------------

    def run(self, watch: bool) -> dict[str, int]:
        """Process until nothing is left (`watch` False: waits for series still arriving, up to
        `max_wait`) or, with `watch`, until SIGINT/SIGTERM (`stop`). Returns counts by outcome."""
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.out)  # images a killed run retrieved
        counts = {"stored": 0, "failed": 0, "dry-run": 0}
        waited = 0.0
        with _signals_stop(self.stop):
            while not self.stop.is_set():
                wait = self.poll_once(counts)
                if self.stop.is_set():
                    break
                if not watch:
                    if wait is None or waited >= self.options.max_wait:
                        if wait is not None:
                            log.warning("series still arriving after %.0f s were left for the next run", waited)
                        break
                    wait = min(wait, self.options.max_wait - waited)
                else:
                    wait = self.options.interval if wait is None else min(wait, self.options.interval)
                waited += wait
                self.stop.wait(max(wait, 0.05))
        if self.stop.is_set():
            log.info("stopped on request, between series")
        return counts

    def poll_once(self, counts: dict[str, int]) -> float | None:
        """Search, then process every settled pending series; the seconds until the next one that
        is still arriving settles (None when none is)."""
        refs = self.pacs.search_ct_series(self.options.since)
        pending = self.catalog.pending(refs)
        next_wait = None
        for ref in pending:
            if self.stop.is_set():
                break
            count = ref.instance_count if ref.instance_count is not None else \
                len(self.pacs.instances(ref.study_uid, ref.series_uid))
            if ref.series_uid in self.failed and self.failed[ref.series_uid] == count:
                continue  # failed with these instances already; tried again when they change
            left = self.settle.update(ref.series_uid, count)
            if left > 0:
                log.info("%s: %d instance(s), still arriving? processed once unchanged for %.0f s",
                         self.name(ref.series_uid), count, self.options.settle)
                next_wait = left if next_wait is None else min(next_wait, left)
                continue
            outcome = self.process(ref, count)
            counts[outcome] += 1
        return next_wait

    # ---- one series ------------------------------------------------------------------------------

    def name(self, series_uid: str) -> str:
        """How logs and the report name a series: the salted hash `convert` uses."""
        return "series " + splits.salted_hash("series:" + series_uid, self._salt)

    def process(self, ref: SeriesRef, count: int) -> str:
        """Upscale and store one source series; 'stored', 'failed' or 'dry-run'. Faults of this
        series are logged and reported, never raised (except a refused login, which stops the run)."""
        name = self.name(ref.series_uid)
        entry = {"series": name, "instances": count, "time": _now()}
        try:
            entry.update(self._process(ref, name))
        except PacsAuthError:
            raise
        except (PacsError, upscale.UpscaleError) as exc:
            log.error("%s: %s; the other series go on", name, exc)
            entry.update(status="failed", error=str(exc))
            self.failed[ref.series_uid] = count
        else:
            self.failed.pop(ref.series_uid, None)
            self.settle.forget(ref.series_uid)
        if entry["status"] != "dry-run":
            self.report[name] = entry
            upscale.write_report(self.out / REPORT, self.report)
        return entry["status"]

    def _process(self, ref: SeriesRef, name: str) -> dict:
        headers = self.pacs.series_metadata(ref.study_uid, ref.series_uid)
        kind, why = self._modality(headers, name)
        method = self.models.for_modality(kind)
        if self.options.dry_run:
            log.info("%s: would upscale %d image(s) as %s (%s) with %s", name, len(headers), kind, why,
                     method.description)
            return {"status": "dry-run", "modality": kind}
        log.info("%s: %d image(s), %s (%s), model %s", name, len(headers), kind, why, method.description)
        stage = make_staging(self.out, name.replace(" ", "-"))
        try:
            not_written = self._retrieve(ref, stage / "source", name)
            summary = upscale.upscale([stage / "source"], stage / "derived", method, self.cfg, "dicom", None,
                                      self.options.outside, self.options.tile, self.options.tile_pad,
                                      progress=False, uncertainty=self.options.uncertainty,
                                      uid_seed=Models.uid_seed(method), folder_name=name.replace(" ", "-"))
            [folder] = summary.series
            stored = self._store(ref, [*summary.spread, folder], name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        trust = summary.trust[folder.name]
        log.info("%s: stored %d derived image(s)%s; %s", name, stored[-1],
                 f" and {stored[0]} flip-spread image(s)" if summary.spread else "", trust["summary"])
        return {"status": "stored", "modality": kind, "modality_reason": why, "model": method.description,
                "model_card_sha256": method.metadata.get("card_sha256"), "derived_images": stored[-1],
                "spread_images": stored[0] if summary.spread else 0,
                "skipped": [*not_written, *(_skip_record(item) for item in summary.skipped)],
                "lr_consistency": trust["lr_consistency"], "summary": trust["summary"],
                "per_image": trust["per_image"]}

    def _modality(self, headers: list[pydicom.Dataset], name: str) -> tuple[str, str]:
        """(modality, why): the one given, or decided from the headers like `convert --modality auto`."""
        if self.options.modality != "auto":
            return self.options.modality, "given with --modality"
        frames = []
        for index, header in enumerate(headers):
            try:
                frames.extend(dicom_io.frames_of_header(header, f"{name} image {index + 1}"))
            except dicom_io.HEADER_ERRORS:
                continue  # the image's own read says what is wrong with it
        if not frames:
            raise PacsError("no image of the series has a usable CT header")
        return modality.classify(frames, self.cfg.convert.rules)

    def _retrieve(self, ref: SeriesRef, folder: Path, name: str) -> list[dict]:
        """WADO-RS: the series' instances as files in `folder`, named IN<order>_<InstanceNumber>.dcm
        (no UID); returns skip records of the instances that cannot be written as a file."""
        folder.mkdir()
        skipped = []
        for index, ds in enumerate(self.pacs.retrieve_series(ref.study_uid, ref.series_uid), start=1):
            path = folder / f"IN{index:05d}_{_int(ds.get('InstanceNumber')):05d}.dcm"
            try:
                ds.save_as(path, enforce_file_format=True)
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - pydicom's many ways to refuse a dataset
                log.warning("%s: skipped %s: [unreadable] cannot be written as a DICOM file (%s: %s)",
                            name, path.stem, type(exc).__name__, exc)
                path.unlink(missing_ok=True)
                skipped.append({"image": path.stem, "code": "unreadable",
                                "reason": f"cannot be written as a DICOM file ({type(exc).__name__})"})
        return skipped

    def _store(self, ref: SeriesRef, folders: list[Path], name: str) -> list[int]:
        """STOW-RS each derived folder (spread first, SR last: a whole SR series means done), in
        chunks; check the PACS holds them all. On failure, take back what was stored and raise."""
        counts = []
        for folder in folders:
            files = sorted(folder.glob("IM*.dcm"))
            series_uid = None
            try:
                for start in range(0, len(files), self.options.chunk):
                    chunk = [pydicom.dcmread(path) for path in files[start:start + self.options.chunk]]
                    for ds in chunk:
                        ds.DerivationDescription = (str(ds.DerivationDescription) + count_text(len(files)))[:1024]
                    series_uid = chunk[0].SeriesInstanceUID
                    self.pacs.store(chunk)
                held = len(self.pacs.instances(ref.study_uid, series_uid))
                if held < len(files):
                    raise PacsError(f"the PACS holds {held} of the {len(files)} derived images stored")
            except PacsError as exc:
                self._take_back(ref, series_uid, name)
                raise PacsError(f"storing the derived series failed: {exc}") from None
            counts.append(len(files))
        return counts

    def _take_back(self, ref: SeriesRef, series_uid: str | None, name: str) -> None:
        """Delete a partly stored derived series; where the server cannot, say the next run completes it."""
        if series_uid is None:
            return
        try:
            self.pacs.delete_series(ref.study_uid, series_uid)
            log.warning("%s: the partly stored derived series was deleted", name)
        except PacsError as exc:
            log.warning("%s: the partly stored derived series could not be deleted (%s); the next run "
                        "stores it again whole, with the same UIDs", name, exc)


def _skip_record(item: dicom_io.Skipped) -> dict:
    """A skipped source image in the report: its file name in staging (index and InstanceNumber)."""
    return {"image": Path(item.path).stem, "code": item.code, "reason": item.reason}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _int(value) -> int:
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


@contextlib.contextmanager
def _signals_stop(stop: threading.Event) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM set `stop` (the loop ends between series); a
    second signal interrupts at once. Only in the main thread (signals cannot be caught elsewhere)."""
    def handle(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.warning("%s received: stopping after the current series (send it again to stop now)",
                    signal.Signals(signum).name)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
