"""`tfgan-ct convert --runner beam`: the heavy part of a conversion as an Apache Beam pipeline.

The driver does what a local run does up to the plan (`conversion.run_conversion` with
`convert.DicomSource`): header pass in the local process pool, series, modalities, the
patient split and the pseudonyms. The pipeline then gets one element per series (its
files and plan entry: paths, frame numbers, pixel layout, modality, split and hashes;
no patient or series identifier) and runs on any Beam runner:

    series --decode, HU, mask, resize, encode (`convert.process_task`)--> records
           \\-> counts and skipped files per series --> place of each series' records
    records + places --> shard (`convert.shard_size` records) --> shard files, entries

A record takes the place it has in a local run (plan order, then slice, then patch),
so the shards are the local run's, byte for byte; only the order of the work differs.
Counts, skipped files and shard entries come back to the driver through small files,
and the driver writes the manifest. Everything goes into the staging folder of
`run_conversion`, renamed into place only after the pipeline has succeeded; on a
cluster the inputs and the output's parent folder must be on a file system that every
worker sees.

Apache Beam (the `beam` extra) is imported only here, and only when a pipeline runs.
"""
from __future__ import annotations

import base64
import copy
import errno
import json
import logging
import os
import pickle
import shlex
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tfgan_ct.config import REDACTED_SALT, Config
from tfgan_ct.data import splits
from tfgan_ct.data.conversion import ConvertError, Summary, run_conversion
from tfgan_ct.data.convert import DicomSource, SeriesPlan, check_modality, log_skipped, process_task, slice_tasks
from tfgan_ct.data.dicom_files import Skipped
from tfgan_ct.data.shards import shard_name, write_shard
from tfgan_ct.fileio import is_disk_full

log = logging.getLogger("tfgan_ct.data.beam_conversion")

INSTALL_HINT = "pip install 'tfgan-ct[beam]'"
WORK = ".beam"    # folder inside the staging folder for the pipeline's own files
STATS = "stats"   # tag of the per-series counts


def convert_with_beam(inputs: Iterable[str | Path], out: str | Path, cfg: Config, modality: str = "auto",
                      split_csv: str | Path | None = None, beam_options: Sequence[str] | str = (),
                      workers: int | None = None, overwrite: bool = False, progress: bool = True) -> Summary:
    """`convert.convert` with the records made and written by an Apache Beam pipeline.

    `beam_options`: standard Beam pipeline options (a list, or one string split like a
    shell would), e.g. "--runner=FlinkRunner --flink_master=host:8081". Without a
    runner: the DirectRunner in multi-process mode with `workers` processes (default:
    all cores). `workers` also sizes the local pool of the header pass.
    """
    check_modality(modality)
    options = pipeline_options(beam_options, workers)
    source = BeamSource(cfg, modality, split_csv, options=options)
    return run_conversion(source, inputs, out, cfg, workers, overwrite, progress)


def pipeline_options(args: Sequence[str] | str, workers: int | None):
    """Beam `PipelineOptions` from command-line style `args`; the DirectRunner defaults to
    multi-process mode with `workers` processes, and workers log warnings only, unless
    `args` say otherwise. Raises ConvertError for an option Beam does not know."""
    _import_beam()
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

    args = shlex.split(args) if isinstance(args, str) else list(args)
    if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
        args.append("--default_sdk_harness_log_level=WARNING")  # not a line per worker start and stop
    options = PipelineOptions(args)
    unknown = [a for a in options.get_all_options(retain_unknown_options=True) if a not in
               options.get_all_options(retain_unknown_options=False)]
    if unknown:
        raise ConvertError(f"--beam-options: unknown Beam option(s) {', '.join(sorted(unknown))}")
    if options.view_as(StandardOptions).runner in (None, "DirectRunner", "direct"):
        direct = options.view_as(DirectOptions)
        if not any(a.startswith("--direct_num_workers") for a in args):
            direct.direct_num_workers = workers or os.cpu_count() or 1
        if not any(a.startswith("--direct_running_mode") for a in args):
            direct.direct_running_mode = "multi_processing"
    return options


def _import_beam():
    """The `apache_beam` module, or a ConvertError that says how to install it."""
    logging.disable(logging.WARNING)  # Beam's import warns about cloud clients it does not need here
    try:
        import apache_beam
    except ImportError as exc:
        raise ConvertError(f"--runner beam needs Apache Beam ({exc.name} is not installed): {INSTALL_HINT}") \
            from None
    finally:
        logging.disable(logging.NOTSET)
    return apache_beam


@dataclass
class BeamSource(DicomSource):
    """DICOM and NIfTI input whose records are made and written by a Beam pipeline."""

    options: object = field(default=None, repr=False)  # apache_beam PipelineOptions

    def write(self, plans, stage: Path, pool, summary: Summary, progress: bool) -> dict[str, list[dict]]:
        return run_pipeline(plans, self.cfg, stage, summary, self.options)


def run_pipeline(plans: list[SeriesPlan], cfg: Config, stage: Path, summary: Summary,
                 options) -> dict[str, list[dict]]:
    """Make and write the records of `plans` into `stage` with Beam; counts and skipped
    files go into `summary`. Returns the shard entries of each split (every split present).

    Raises ConvertError when the pipeline fails (the caller's staging folder then goes).
    """
    beam = _import_beam()
    from apache_beam.options.pipeline_options import StandardOptions

    work = stage / WORK
    work.mkdir()
    plan_file = write_plan(plans, cfg, work / "series.txt")
    keys = [(plan.split, plan.modality) for plan in plans]
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    log.info("converting %d slice(s) of %d series with Apache Beam (%s)",
             sum(len(p.frames) for p in plans), len(plans), runner)
    try:
        with beam.Pipeline(options=options) as pipeline:
            build(pipeline, str(plan_file), keys, cfg.convert.shard_size, str(stage), str(work))
    except (KeyboardInterrupt, ConvertError):
        raise
    except Exception as exc:  # noqa: BLE001 - any runner failure: no dataset, one line
        if is_disk_full(exc):  # in a worker, where the error reaches us as text
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise ConvertError(f"the Beam pipeline failed, no dataset was written: {lines[-1][:500]}") from None
    shards = collect(plans, work, summary)
    shutil.rmtree(work)
    return shards


def write_plan(plans: list[SeriesPlan], cfg: Config, path: Path) -> Path:
    """One line per series for the workers (base64 pickle of its plan index and slice tasks).

    The workers get the settings without the salt: the pseudonyms are made already,
    and a secret salt stays on the driver.
    """
    cfg = copy.deepcopy(cfg)
    cfg.convert.salt = REDACTED_SALT
    with open(path, "w", encoding="ascii") as f:
        for index, plan in enumerate(plans):
            tasks = list(slice_tasks([plan], cfg, None))
            f.write(base64.b64encode(pickle.dumps((index, tasks), protocol=pickle.HIGHEST_PROTOCOL)).decode())
            f.write("\n")
    return path


def build(pipeline, plan_file: str, keys: list[tuple[str, str]], shard_size: int, stage: str, work: str) -> None:
    """The conversion pipeline (see the module docstring); outputs go into `stage` and `work`."""
    import apache_beam as beam

    series = (pipeline | "read plan" >> beam.io.ReadFromText(plan_file)
              | "spread series" >> beam.Reshuffle())
    made = series | "convert series" >> beam.FlatMap(convert_series).with_outputs(STATS, main="records")
    places = (made[STATS] | "records per series" >> beam.Map(lambda s: (s["plan"], s["records"]))
              | "all series" >> beam.combiners.ToList()
              | "places" >> beam.Map(record_places, keys))
    entries = (made.records
               | "place records" >> beam.Map(place, beam.pvalue.AsSingleton(places), shard_size)
               | "group shards" >> beam.GroupByKey()
               | "write shards" >> beam.Map(write_group, stage))
    for name, pcoll in (("series", made[STATS]), ("shards", entries)):
        (pcoll | f"{name} as json" >> beam.Map(json.dumps, sort_keys=True)
         | f"save {name}" >> beam.io.WriteToText(os.path.join(work, name), file_name_suffix=".jsonl"))


# ---------------------------------------------------------------- worker side


def convert_series(line: str) -> Iterator:
    """Worker: the records of one series as (plan index, index in the series, record), then
    (tagged STATS) {plan, records, slices (with brain), empty (without), skipped [[path, reason, code]]}."""
    from apache_beam import pvalue

    plan_index, tasks = pickle.loads(base64.b64decode(line))
    n, slices, empty, skipped = 0, 0, 0, []
    for task in tasks:
        _, results, task_skipped, _ = process_task(task)
        skipped.extend([item.path, item.reason, item.code] for item in task_skipped)
        for result in results:
            if not result.has_brain:
                empty += 1
                continue
            slices += 1
            for record in result.records:
                yield plan_index, n, record
                n += 1
    yield pvalue.TaggedOutput(STATS, {"plan": plan_index, "records": n, "slices": slices, "empty": empty,
                                      "skipped": skipped})


def record_places(counts: list[tuple[int, int]], keys: list[tuple[str, str]]) -> list[tuple[str, str, int]]:
    """(split, modality, index of its first record there) of each series, from the records
    per series: the place its records have in a local run (plan order)."""
    records = dict(counts)
    before: Counter = Counter()
    places = []
    for index, key in enumerate(keys):
        places.append((*key, before[key]))
        before[key] += records.get(index, 0)
    return places


def place(element: tuple[int, int, bytes], places: list, shard_size: int) -> tuple:
    """((split, modality, shard number), (index in split and modality, record)) of one record."""
    plan_index, n, record = element
    split, modality, first = places[plan_index]
    index = first + n
    return (split, modality, index // shard_size), (index, record)


def write_group(group: tuple[tuple[str, str, int], Iterable[tuple[int, bytes]]], stage: str) -> dict:
    """Worker: write one shard ((split, modality, number), [(index, record)]) into `stage`,
    its records in index order; its manifest entry plus `split`."""
    (split, modality, number), items = group
    ordered = sorted(items, key=lambda item: item[0])
    entry = write_shard(Path(stage) / shard_name(split, modality, number), modality, (r for _, r in ordered))
    return {"split": split, **entry}


# ---------------------------------------------------------------- back on the driver


def collect(plans: list[SeriesPlan], work: Path, summary: Summary) -> dict[str, list[dict]]:
    """Read the pipeline's counts, skipped files and shard entries back into `summary`;
    the shard entries of each split, ordered as a local run orders them."""
    stats = {s["plan"]: s for s in _read_lines(work, "series")}
    missing = [i for i in range(len(plans)) if i not in stats]
    if missing:
        raise ConvertError(f"the Beam pipeline lost the results of {len(missing)} series; no dataset was written")
    reported: set[str] = set()
    for index, plan in enumerate(plans):
        s = stats[index]
        for path, reason, code in s["skipped"]:
            if path not in reported:
                reported.add(path)
                item = Skipped(path, reason, code)
                log_skipped(item)
                summary.skipped.append(item)
        summary.empty_slices += s["empty"]
        if s["slices"]:
            summary.slices[(plan.split, plan.modality)] += s["slices"]
            summary.records[(plan.split, plan.modality)] += s["records"]
    entries = sorted(_read_lines(work, "shards"), key=lambda e: (e["split"], e["modality"], e["file"]))
    if sum(e["records"] for e in entries) != sum(summary.records.values()):
        raise ConvertError("the Beam pipeline's shards do not hold every record; no dataset was written")
    shards: dict[str, list[dict]] = {split: [] for split in splits.SPLITS}
    for entry in entries:
        shards[entry.pop("split")].append(entry)
    return shards


def _read_lines(work: Path, name: str) -> list[dict]:
    """The JSON lines of the pipeline's text output `name` (all its files)."""
    return [json.loads(line) for path in sorted(work.glob(f"{name}*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines() if line]
