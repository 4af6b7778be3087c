"""`tfgan-ct convert --runner beam`: the same dataset as a local run, made by an Apache Beam pipeline
(the DirectRunner with two worker processes)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tfgan_ct.cli import main
from tfgan_ct.data.shards import write_shard

from helpers import SMALL_CONFIG

pytest.importorskip("apache_beam", reason="Apache Beam is not installed (pip install 'tfgan-ct[beam]')")
pytest.importorskip("google_crc32c", reason="google-crc32c is not installed (pip install 'tfgan-ct[beam]')")

TWO_WORKERS = "--direct_num_workers=2 --direct_running_mode=multi_processing"


def run(inputs: list[Path], out: Path, *extra: str):
    """`tfgan-ct convert` with the small config and shards of 5 records (so several per split)."""
    args = ["convert", *map(str, inputs), "--out", str(out), "--config", str(SMALL_CONFIG),
            "--set", "convert.shard_size=5", "--no-progress", *extra]
    return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def messy_input(phantom_dir, tmp_path_factory) -> Path:
    """The phantom plus bad input: a file not DICOM, a truncated slice, one image stored twice."""
    folder = tmp_path_factory.mktemp("messy") / "in"
    shutil.copytree(phantom_dir, folder)
    files = sorted(folder.rglob("*.dcm"))
    (folder / "notes.txt").write_text("not an image\n")
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) - 3000])
    shutil.copy(files[5], files[5].with_name("copy-of-" + files[5].name))
    return folder


@pytest.fixture(scope="module")
def both_runs(messy_input, tmp_path_factory):
    """(local dataset, beam dataset, beam CLI result) of the messy input."""
    base = tmp_path_factory.mktemp("runs")
    local = run([messy_input], base / "local", "--workers", "2")
    assert local.exit_code == 0, local.output
    beam = run([messy_input], base / "beam", "--runner", "beam", "--beam-options", TWO_WORKERS)
    assert beam.exit_code == 0, beam.output
    return base / "local", base / "beam", beam


def records_by_split(out: Path) -> dict[str, list[bytes]]:
    """The serialised records of each split, sorted (shard boundaries do not matter)."""
    import tensorflow as tf

    manifest = json.loads((out / "manifest.json").read_text())
    return {split: sorted(r.numpy() for s in shards for r in tf.data.TFRecordDataset(str(out / s["file"])))
            for split, shards in manifest["shards"].items()}


def without_shard_files(manifest: dict) -> dict:
    """The manifest less the shards' names and hashes."""
    manifest = dict(manifest)
    manifest["shards"] = {split: [{k: v for k, v in s.items() if k not in ("file", "sha256")} for s in shards]
                          for split, shards in manifest["shards"].items()}
    return manifest


def test_beam_run_has_the_local_records_and_manifest(both_runs):
    local, beam, _ = both_runs
    assert records_by_split(beam) == records_by_split(local)
    local_manifest = json.loads((local / "manifest.json").read_text())
    beam_manifest = json.loads((beam / "manifest.json").read_text())
    assert without_shard_files(beam_manifest) == without_shard_files(local_manifest)
    assert beam_manifest["skipped"]["by_reason"] == {"duplicate": 1, "not-dicom": 1, "truncated": 1}
    assert sum(len(shards) for shards in beam_manifest["shards"].values()) > 9  # several shards per split
    # Records take their local places, so even the shards are the same files.
    assert beam_manifest == local_manifest
    for split in beam_manifest["shards"].values():
        for shard in split:
            assert (beam / shard["file"]).read_bytes() == (local / shard["file"]).read_bytes()


def test_beam_run_leaves_only_the_dataset(both_runs, messy_input):
    local, beam, result = both_runs
    assert sorted(p.name for p in beam.iterdir()) == sorted(p.name for p in local.iterdir())
    assert [p.name for p in beam.parent.iterdir() if p.name.startswith(".")] == []
    log = (beam / "convert.log").read_text()
    assert "Apache Beam" in log
    for path in messy_input.rglob("*"):  # no input file or folder name in the log
        assert path.name not in log
    assert "skipped" in result.output and "[truncated]" in result.output  # named on the terminal only


def test_failed_beam_job_leaves_nothing(phantom_dir, small_disk):
    result = run([phantom_dir], small_disk / "dataset", "--runner", "beam", "--beam-options", TWO_WORKERS)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: disk full") and "nothing half-written was kept" in last, result.output
    assert "Traceback" not in result.output
    assert list(small_disk.iterdir()) == []


def test_bad_beam_options_are_one_line(phantom_dir, tmp_path):
    result = run([phantom_dir], tmp_path / "o", "--runner", "beam", "--beam-options", "--no_such_option=1")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == "Error: --beam-options: unknown Beam option(s) no_such_option"
    result = run([phantom_dir], tmp_path / "o", "--beam-options", TWO_WORKERS)
    assert result.exit_code == 2 and "--beam-options needs --runner beam" in result.output
    assert not (tmp_path / "o").exists()


def test_shard_without_tensorflow_is_what_tensorflow_writes(tmp_path):
    import tensorflow as tf

    records = [b"", b"x", bytes(range(256)) * 40]
    entry = write_shard(tmp_path / "a.tfrecord", "ncct", iter(records))
    with tf.io.TFRecordWriter(str(tmp_path / "b.tfrecord")) as writer:
        for record in records:
            writer.write(record)
    assert (tmp_path / "a.tfrecord").read_bytes() == (tmp_path / "b.tfrecord").read_bytes()
    assert entry["records"] == 3 and entry["file"] == "a.tfrecord"
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "a.tfrecord"))] == records
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_workers_get_paths_and_plan_but_no_identifiers_or_salt(phantom_dir, small_cfg, tmp_path):
    import base64
    import copy
    import pickle

    import pydicom

    from tfgan_ct.data.beam_conversion import write_plan
    from tfgan_ct.data.conversion import InProcess
    from tfgan_ct.data.convert import DicomSource

    cfg = copy.deepcopy(small_cfg)
    cfg.convert.salt = "s3cret-salt"
    source = DicomSource(cfg)
    frames, skipped = source.scan([phantom_dir], InProcess(), False)
    plans = source.plan(frames, skipped, cfg.convert.salt)
    lines = write_plan(plans, cfg, tmp_path / "series.txt").read_text().splitlines()
    assert len(lines) == len(plans) == 9
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(phantom_dir.rglob("*.dcm"))]
    identifiers = {str(h.get(k)) for h in headers for k in ("PatientID", "PatientName", "SeriesInstanceUID",
                                                             "StudyInstanceUID", "SOPInstanceUID")}
    for index, line in enumerate(lines):
        raw = base64.b64decode(line)
        plan_index, tasks = pickle.loads(raw)
        assert plan_index == index and sum(len(t.items) for t in tasks) == len(plans[index].frames)
        assert b"s3cret-salt" not in raw and tasks[0].meta.series == plans[index].series_hash
        for identifier in identifiers:
            pickled_paths = {p for t in tasks for item in t.items for p in item[1]}
            if not any(identifier in p for p in pickled_paths):  # file names are the archive's own
                assert identifier.encode() not in raw, identifier
