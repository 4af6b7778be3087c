"""`tfgan-ct convert` end to end on the phantom and the real samples (good and broken)."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from tfgan_ct.cli import main
from tfgan_ct.config import load_config
from tfgan_ct.data import convert as convert_mod
from tfgan_ct.data import resize
from tfgan_ct.data.conversion import ShardSet
from tfgan_ct.data.masking import apply_mask, brain_mask
from tfgan_ct.data.shards import read_records
from tfgan_ct.data.splits import salted_hash

from helpers import SMALL_CONFIG


def all_records(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [r for split in manifest["shards"].values() for s in split for r in read_records(out / s["file"])]


def test_manifest_counts_and_shards(converted):
    out, _ = converted
    manifest = json.loads((out / "manifest.json").read_text())
    records = all_records(out)
    assert len(records) == sum(c["records"] for c in manifest["counts"].values())
    for split, shards in manifest["shards"].items():
        for shard in shards:
            assert shard["file"].startswith(f"{split}-{shard['modality']}-")
            assert len(read_records(out / shard["file"])) == shard["records"]
    assert (out / "config.yaml").is_file() and (out / "convert.log").is_file()
    assert load_config(out / "config.yaml").convert.patch_size == 32


def test_shapes_and_lr_is_resize_of_whole_slice(converted):
    out, _ = converted
    for r in all_records(out):
        assert r["hr"].shape == (r["lr"].shape[0] * 4, r["lr"].shape[1] * 4)
        if r["split"] == "train":
            assert r["hr"].shape == (32, 32) and r["mask"].mean() > 0.5
        else:
            assert (r["patch_y"], r["patch_x"]) == (0, 0)
            expected = resize.downscale(r["hr"].astype(np.float64), 4)
            np.testing.assert_allclose(r["lr"], expected, atol=1e-3)


def test_patient_disjoint_splits_and_modalities(converted):
    out, _ = converted
    manifest = json.loads((out / "manifest.json").read_text())
    patients = {s: {x["patient"] for x in manifest["series"] if x["split"] == s}
                for s in ("train", "validation", "test")}
    assert not (patients["train"] & patients["validation"])
    assert not (patients["train"] & patients["test"])
    assert not (patients["validation"] & patients["test"])
    by_patient = {}
    for r in all_records(out):
        by_patient.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())
    phantom_series = [x for x in manifest["series"] if x["images"] >= 4]
    kinds = sorted(x["modality"] for x in phantom_series)
    assert kinds.count("ctp") == 3 and kinds.count("cta") == 3 and kinds.count("ncct") >= 3


def test_hu_round_trip_and_mask(converted, phantom_dir):
    """Whole test/validation slices equal the masked HU computed here straight from pydicom."""
    out, _ = converted
    cfg = load_config(SMALL_CONFIG)
    records = {(r["series"], r["slice_index"]): r for r in all_records(out) if r["split"] != "train"}
    checked = 0
    for series_dir in sorted(phantom_dir.glob("*/*")):
        datasets = [pydicom.dcmread(p) for p in sorted(series_dir.glob("*.dcm"))]
        if datasets[0].SeriesDescription.startswith("CT PERFUSION"):
            continue  # same check, ordering by time; NCCT and CTA cover it
        datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
        key = salted_hash("series:" + datasets[0].SeriesInstanceUID, "tfgan-ct:0")
        kind = "cta" if "CTA" in datasets[0].SeriesDescription else "ncct"
        settings = cfg.modalities.get(kind)
        for index, ds in enumerate(datasets):
            if (key, index) not in records:
                continue
            hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            hu[ds.pixel_array == ds.get("PixelPaddingValue", -99999)] = -1000
            mask = brain_mask(hu, settings.mask_hu, cfg.convert.mask)
            expected = np.rint(apply_mask(hu, mask, settings.window.floor)).astype(np.int16)
            record = records[(key, index)]
            np.testing.assert_array_equal(record["mask"], mask)
            np.testing.assert_array_equal(record["hr"], expected)
            assert np.all(record["hr"][~mask] == settings.window.floor)
            checked += 1
    assert checked >= 4


def test_no_identifiers_in_output(converted_samples, phantom_dir, shared_data):
    out, _ = converted_samples
    secrets = set()
    for path in list(phantom_dir.rglob("*.dcm"))[:40] + [shared_data / "dicom/head-ncct/pydicom-data_693_UNCR.dcm"]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID",
                        "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 4:
                secrets.add(value.encode())
    assert b"PHANTOM^PATIENT00" in secrets and b"CQ500-CT-310" in secrets
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            leaked = [s for s in secrets if s in data]
            assert not leaked, f"{path.name} contains {leaked[:3]}"


def test_secret_salt_is_never_written(shared_data, tmp_path):
    """A secret convert.salt keys the hashes but appears in no output; a saved config cannot reuse it."""
    salt = "S3CRET-salt-4711"
    args = ["convert", str(shared_data / "dicom/head-ncct"), "--config", str(SMALL_CONFIG),
            "--set", f"convert.salt={salt}", "--set", "convert.split=1:0:0", "--workers", "1", "--no-progress"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    files = [p for p in (tmp_path / "o").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files)
    for path in files:
        assert salt.encode() not in path.read_bytes(), path.name
    again = CliRunner().invoke(main, ["convert", str(shared_data / "dicom/head-ncct"), "--out", str(tmp_path / "p"),
                                      "--config", str(tmp_path / "o/config.yaml"), "--no-progress"])
    assert again.exit_code != 0 and "saved without its secret salt" in again.output


def test_only_scale_4(shared_data, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(shared_data / "dicom/head-ncct"), "--out", str(tmp_path / "o"),
                                       "--config", str(SMALL_CONFIG), "--set", "convert.scale=2"])
    assert result.exit_code != 0 and "convert.scale=2: only 4 is supported" in result.output


def test_every_broken_file_reported(converted_samples, shared_data):
    out, result = converted_samples
    text = result.output
    expected = {
        "bad/not_dicom.dcm": "not a DICOM file",
        "bad/truncated_header.dcm": "pixel data truncated",
        "bad/truncated_pixeldata.dcm": "pixel data truncated",
    }
    for name, reason in expected.items():
        lines = [line for line in text.splitlines() if name in line]
        assert len(lines) == 1 and reason in lines[0], (name, lines)
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = manifest["skipped"]["by_reason"]
    assert reasons["not-dicom"] == 1 and reasons["truncated"] == 2
    # The log file travels with the dataset: reasons and counts, but no input file names
    # (archives name files by UID or patient ID); the names are on the terminal above.
    log = (out / "convert.log").read_text()
    assert not any(name.split("/")[1] in log for name in expected)
    assert "not-dicom: 1" in log and "truncated: 2" in log
    assert str(shared_data) not in log


def test_second_run_refuses_then_overwrites_identically(converted_samples, phantom_dir, shared_data, tmp_path):
    out, _ = converted_samples
    before = {p.name: p.read_bytes() for p in out.glob("*.tfrecord")}
    args = ["convert", str(phantom_dir), str(shared_data / "dicom"), "--out", str(out),
            "--config", str(SMALL_CONFIG), "--workers", "1", "--no-progress"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code != 0 and "--overwrite" in refused.output
    assert {p.name: p.read_bytes() for p in out.glob("*.tfrecord")} == before
    again = CliRunner().invoke(main, args + ["--overwrite"])
    assert again.exit_code == 0, again.output
    after = {p.name: p.read_bytes() for p in out.glob("*.tfrecord")}
    assert after == before  # deterministic, whatever the number of workers
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_nothing_usable_fails(shared_data, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(shared_data / "dicom/bad"), "--out",
                                       str(tmp_path / "o"), "--workers", "1", "--no-progress"])
    assert result.exit_code == 1
    assert "no usable CT images found" in result.output
    assert not (tmp_path / "o").exists()


def test_interrupted_run_leaves_nothing(phantom_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = ShardSet.add

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ShardSet, "add", failing)
    with pytest.raises(KeyboardInterrupt):
        convert_mod.convert([phantom_dir], tmp_path / "o", load_config(SMALL_CONFIG), workers=1,
                            progress=False)
    assert list(tmp_path.iterdir()) == []


def test_split_csv_and_forced_modality(phantom_dir, tmp_path):
    ids = sorted({str(pydicom.dcmread(p, stop_before_pixels=True).PatientID)
                  for p in phantom_dir.rglob("*.dcm")})
    csv = tmp_path / "splits.csv"
    csv.write_text("patient,split\n" + f"{ids[0]},test\n{ids[1]},train\n")  # third patient left out
    result = CliRunner().invoke(main, ["convert", str(phantom_dir), "--out", str(tmp_path / "o"),
                                       "--config", str(SMALL_CONFIG), "--split-csv", str(csv),
                                       "--modality", "ncct", "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "patient not in the split CSV" in result.output
    manifest = json.loads((tmp_path / "o/manifest.json").read_text())
    assert {x["modality"] for x in manifest["series"]} == {"ncct"}
    assert manifest["counts"]["validation"]["patients"] == 0
    assert manifest["counts"]["train"]["patients"] == 1 and manifest["counts"]["test"]["patients"] == 1


def test_overwrite_never_deletes_inputs_or_foreign_folders(phantom_dir, tmp_path):
    victim = tmp_path / "victim"
    shutil.copytree(phantom_dir / "patient00", victim / "dicom")
    (victim / "README.txt").write_text("my notes")
    before = sorted(p.relative_to(victim) for p in victim.rglob("*"))
    base = ["--config", str(SMALL_CONFIG), "--workers", "1", "--no-progress", "--overwrite"]
    holds_input = CliRunner().invoke(main, ["convert", str(victim / "dicom"), "--out", str(victim), *base])
    assert holds_input.exit_code == 1 and "holds the input" in holds_input.output
    foreign = CliRunner().invoke(main, ["convert", str(phantom_dir), "--out", str(victim), *base])
    assert foreign.exit_code == 1 and "not a dataset made by tfgan-ct" in foreign.output
    images = CliRunner().invoke(main, ["convert-images", str(victim / "dicom"), "--out", str(victim), *base])
    assert images.exit_code == 1 and "holds the input" in images.output
    assert sorted(p.relative_to(victim) for p in victim.rglob("*")) == before
    assert (victim / "README.txt").read_text() == "my notes"
    # a dataset of ours that holds an input is not replaced either
    ours = tmp_path / "ours"
    assert CliRunner().invoke(main, ["convert", str(victim / "dicom"), "--out", str(ours), *base]).exit_code == 0
    shutil.copytree(victim / "dicom", ours / "more")
    again = CliRunner().invoke(main, ["convert", str(ours / "more"), "--out", str(ours), *base])
    assert again.exit_code == 1 and "holds the input" in again.output and (ours / "more").is_dir()


def _staging(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.slow
def test_killed_convert_leaves_no_staging_after_the_next_run(phantom_dir, tmp_path):
    """SIGKILL mid-run leaves a staging folder (partial shards); the next run removes it,
    says so, and writes the same dataset as an uninterrupted run."""
    def command(out):
        return [sys.executable, "-m", "tfgan_ct.cli", "convert", str(phantom_dir), "--out", str(out),
                "--config", str(SMALL_CONFIG), "--workers", "1", "--no-progress"]

    reference = tmp_path / "reference"
    subprocess.run(command(reference), check=True, capture_output=True)
    out = tmp_path / "out"
    run = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not _staging(tmp_path) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert _staging(tmp_path) and not out.exists(), "the run ended before it could be killed"
    again = subprocess.run(command(out), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "left by an interrupted run" in again.stderr
    assert not _staging(tmp_path)
    files = sorted(p.name for p in reference.iterdir())
    assert files == sorted(p.name for p in out.iterdir())
    for name in files:
        if name != "convert.log":  # has times
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_disk_full_is_one_line_and_leaves_nothing(phantom_dir, small_disk):
    result = CliRunner().invoke(main, ["convert", str(phantom_dir), "--out", str(small_disk / "dataset"),
                                       "--config", str(SMALL_CONFIG), "--workers", "1", "--no-progress"])
    assert result.exit_code == 1 and result.exception is not None, result.output
    assert isinstance(result.exception, SystemExit)
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: disk full") and "nothing half-written was kept" in last, result.output
    assert "Traceback" not in result.output
    assert list(small_disk.iterdir()) == []
