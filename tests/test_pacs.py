"""`tfgan-ct pacs` against a real Orthanc with its DICOMweb plugin (skips where it is not installed).

The phantom study (NCCT, CTP, CTA; 64-pixel slices) is stored with STOW-RS; the
models are untrained tiny exports of the three CT stages, so the tests check the
plumbing (which series, which model, geometry, trust figures, idempotency, faults),
not image quality.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from copy import deepcopy

import pydicom
import pytest
from click.testing import CliRunner

from tfgan_ct.cli import main
from tfgan_ct.deploy.derived_dicom import SPREAD, SR, derivation_kind
from tfgan_ct.deploy.pacs.catalog import Derived, Settle, count_text, derived_info
from tfgan_ct.deploy.pacs.dicomweb import Credentials, DicomWebPacs, RetryPolicy

import orthanc_server
from helpers import SMALL_CONFIG

FAST = RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.05)
# Refuses the second image of any derived series: a STOW that fails half-way.
REFUSE_SECOND_DERIVED = """
function ReceivedInstanceFilter(dicom, origin, info)
  local description = dicom.SeriesDescription or ""
  if string.find(description, "tfgan%-ct", 1) == 1 and dicom.InstanceNumber == "2" then
    return false
  end
  return true
end
"""


def _needs_orthanc() -> None:
    if orthanc_server.executable() is None:
        pytest.skip(orthanc_server.INSTALL_HINT)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Untrained tiny exports of ncct, ctp and cta (1 RRDB block), each with its config window."""
    from tfgan_ct.config import load_config
    from tfgan_ct.deploy.export import export_stage
    from tfgan_ct.model.discriminator import build_discriminator
    from tfgan_ct.model.generator import build_generator

    cfg = load_config(SMALL_CONFIG)
    folder = tmp_path_factory.mktemp("models")
    for stage in ("ncct", "ctp", "cta"):
        export_stage(build_generator(num_blocks=1, features=8, growth=4), build_discriminator(32, features=8),
                     folder, stage, cfg.modalities.get(stage).window, 4, {"parent": None})
    return folder


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One phantom patient's study as datasets: {"ncct": [3], "ctp": [1 position x 3 times], "cta": [2]}."""
    from tfgan_ct.demo.phantom import make_study

    paths = make_study(tmp_path_factory.mktemp("study"), 0, seed=5, size=64, ncct_slices=3, ctp_slices=1,
                       ctp_timepoints=3, cta_slices=2)
    return {stage: [pydicom.dcmread(p) for p in files] for stage, files in paths.items()}


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("PACS_USER", orthanc_server.USER)
    monkeypatch.setenv("PACS_PASSWORD", orthanc_server.PASSWORD)
    return {**os.environ}


def _client(server) -> DicomWebPacs:
    return DicomWebPacs(server.dicomweb, Credentials(user_env="PACS_USER", password_env="PACS_PASSWORD"),
                        retry=FAST, orthanc_rest=server.url)


def _args(server, models, out, *extra) -> list[str]:
    return ["pacs", "--dicomweb", server.dicomweb, "--models-dir", str(models), "--user-env", "PACS_USER",
            "--password-env", "PACS_PASSWORD", "--out", str(out), "--settle", "0", "--tile", "0",
            "--config", str(SMALL_CONFIG), *extra]


def _derived(pacs: DicomWebPacs) -> dict[str, list[pydicom.Dataset]]:
    """Every derived series in the PACS by source series UID (and kind): headers of all instances."""
    found: dict[str, list[pydicom.Dataset]] = {}
    for ref in pacs.search_ct_series():
        headers = pacs.series_metadata(ref.study_uid, ref.series_uid)
        info = derived_info(headers[0])
        if info is not None:
            found.setdefault(f"{info.source_series}/{info.kind}", []).extend(headers)
    return found


def _store(pacs: DicomWebPacs, datasets) -> None:
    assert pacs.store([_copy(ds) for ds in datasets]) == len(datasets)


def _copy(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A deep copy (the module's study stays untouched) with its file meta."""
    copy = deepcopy(ds)
    copy.file_meta = deepcopy(ds.file_meta)
    return copy


def test_derived_info_and_settle_rules():
    header = pydicom.Dataset()
    header.DerivationDescription = "Super-resolved x4 by tfgan-ct 0.2.0, model ncct v1" + count_text(12)
    ref = pydicom.Dataset()
    ref.SeriesInstanceUID = "1.2.3"
    header.ReferencedSeriesSequence = [ref]
    assert derived_info(header) == Derived(SR, "1.2.3", 12)
    header.DerivationDescription = "Lossy compression"
    assert derived_info(header) is None
    assert derivation_kind("Super-resolved x4 by tfgan-ct 0.2, model m; flip spread (HU) over 8 "
                           "flips/rotations") == SPREAD
    now = [0.0]
    settle = Settle(10, clock=lambda: now[0])
    assert settle.update("s", 5) == 10
    now[0] = 6
    assert settle.update("s", 5) == 4
    assert settle.update("s", 7) == 10      # grew: the wait starts again
    now[0] = 17
    assert settle.update("s", 7) == -1      # unchanged for 11 s: settled


@pytest.mark.slow
def test_once_makes_one_derived_series_per_ct_series_then_none(tmp_path, models, study, env):
    _needs_orthanc()
    runner = CliRunner()
    with orthanc_server.running_orthanc(tmp_path / "orthanc") as server:
        pacs = _client(server)
        for datasets in study.values():
            _store(pacs, datasets)
        dry = runner.invoke(main, _args(server, models, tmp_path / "dry", "--dry-run"))
        assert dry.exit_code == 0, dry.output
        assert "3 dry-run" in dry.output and _derived(pacs) == {}

        first = runner.invoke(main, _args(server, models, tmp_path / "work"))
        assert first.exit_code == 0, first.output
        assert "3 stored" in first.output
        derived = _derived(pacs)
        assert sorted(derived) == sorted(f"{d[0].SeriesInstanceUID}/{SR}" for d in study.values())
        for stage, sources in study.items():
            images = derived[f"{sources[0].SeriesInstanceUID}/{SR}"]
            assert len(images) == len(sources)
            for ds in images:
                assert (ds.Rows, ds.Columns) == (4 * sources[0].Rows, 4 * sources[0].Columns)
                expected = [float(v) / 4 for v in sources[0].PixelSpacing]
                assert [float(v) for v in ds.PixelSpacing] == pytest.approx(expected, abs=1e-5)
                assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
                assert f"model {stage} v1 (card " in ds.DerivationDescription          # the modality's model
                assert ds.DerivationDescription.endswith(count_text(len(sources)))
                assert re.fullmatch(r"LR consistency mean [\d.]+ HU, max [\d.]+ HU \(brain\)|"
                                    r"LR consistency: no brain pixels", ds.ImageComments)
                assert not [e for e in ds if e.tag.is_private]

        report = json.loads((tmp_path / "work" / "pacs_report.json").read_text())
        assert sorted(e["modality"] for e in report["series"].values()) == ["cta", "ctp", "ncct"]
        assert all(e["status"] == "stored" and e["lr_consistency"]["pixels"] > 0 for e in report["series"].values())
        written = (tmp_path / "work" / "pacs.log").read_text() + json.dumps(report)
        for ds in [d for series in study.values() for d in series]:
            for secret in (ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.StudyInstanceUID, str(ds.PatientName),
                           ds.PatientID):
                assert secret not in written
        assert not [p for p in (tmp_path / "work").iterdir() if p.name.startswith(".")]  # no staging left

        again = runner.invoke(main, _args(server, models, tmp_path / "work"))
        assert again.exit_code == 0 and "nothing to do" in again.output, again.output
        assert _derived(pacs).keys() == derived.keys()
        assert len(pacs.search_ct_series()) == 6


@pytest.mark.slow
def test_uncertainty_series_and_a_bad_slice(tmp_path, models, study, env):
    """--uncertainty stores a flip-spread series too; a source image that cannot be read is
    skipped with its reason and the rest of the series goes through."""
    _needs_orthanc()
    ncct = [_copy(ds) for ds in study["ncct"]]
    ncct[1].PixelData = ncct[1].PixelData[:100]           # truncated pixel data in the PACS
    with orthanc_server.running_orthanc(tmp_path / "orthanc") as server:
        pacs = _client(server)
        _store(pacs, ncct)
        result = CliRunner().invoke(main, _args(server, models, tmp_path / "work", "--uncertainty"))
        assert result.exit_code == 0, result.output
        derived = _derived(pacs)
        source = ncct[0].SeriesInstanceUID
        assert len(derived[f"{source}/{SR}"]) == 2 and len(derived[f"{source}/{SPREAD}"]) == 2
        spread = derived[f"{source}/{SPREAD}"][0]
        assert spread.SeriesInstanceUID != derived[f"{source}/{SR}"][0].SeriesInstanceUID
        assert "flip spread" in spread.DerivationDescription
        [entry] = json.loads((tmp_path / "work" / "pacs_report.json").read_text())["series"].values()
        assert entry["derived_images"] == 2 and entry["spread_images"] == 2
        [skipped] = entry["skipped"]
        assert skipped["code"] in ("size-mismatch", "truncated") and skipped["image"].startswith("IN00002")
        assert "skipped" in result.output or skipped["reason"]


@pytest.mark.slow
def test_wrong_credentials_give_one_line(tmp_path, models, env, monkeypatch):
    _needs_orthanc()
    monkeypatch.setenv("PACS_PASSWORD", "not-the-password-42")
    with orthanc_server.running_orthanc(tmp_path / "orthanc") as server:
        result = CliRunner().invoke(main, _args(server, models, tmp_path / "work"))
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert lines == [f"Error: PACS {server.dicomweb}: searching CT series: authentication failed, HTTP 401 "
                     f"(check the variables PACS_USER, PACS_PASSWORD)"], result.output
    assert "not-the-password-42" not in result.output
    assert "not-the-password-42" not in (tmp_path / "work" / "pacs.log").read_text()


@pytest.mark.slow
def test_a_store_refused_half_way_is_taken_back_and_the_others_go_on(tmp_path, models, study, env):
    _needs_orthanc()
    with orthanc_server.running_orthanc(tmp_path / "orthanc", lua=REFUSE_SECOND_DERIVED) as server:
        pacs = _client(server)
        _store(pacs, study["ncct"])
        _store(pacs, study["cta"][:1])       # one image: its derived series has no second image
        result = CliRunner().invoke(main, _args(server, models, tmp_path / "work", "--orthanc-rest", server.url))
        assert result.exit_code == 1 and "1 series failed" in result.output, result.output
        assert "partly stored derived series was deleted" in result.output
        derived = _derived(pacs)
        assert list(derived) == [f"{study['cta'][0].SeriesInstanceUID}/{SR}"]   # the NCCT one taken back
        report = json.loads((tmp_path / "work" / "pacs_report.json").read_text())
        assert sorted(e["status"] for e in report["series"].values()) == ["failed", "stored"]


def _pacs_process(server, models, out, *extra) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, "-m", "tfgan_ct.cli", *_args(server, models, out, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _lines(process: subprocess.Popen, seen: list[str]) -> threading.Thread:
    """Collect the process's output lines in `seen` (a thread, so the test can wait for one)."""
    thread = threading.Thread(target=lambda: seen.extend(iter(process.stdout.readline, "")), daemon=True)
    thread.start()
    return thread


def _wait_for(seen: list[str], text: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in seen):
        assert process.poll() is None or any(text in line for line in seen), "".join(seen)[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} within {timeout:.0f} s:\n" + "".join(seen)[-3000:]
        time.sleep(0.05)


@pytest.mark.slow
def test_a_series_arriving_in_two_halves_is_processed_once_whole_then_sigterm(tmp_path, models, study, env):
    _needs_orthanc()
    cta = study["cta"] + [_copy_slice(study["cta"][-1], 3)]
    with orthanc_server.running_orthanc(tmp_path / "orthanc") as server:
        pacs = _client(server)
        _store(pacs, cta[:1])
        process = _pacs_process(server, models, tmp_path / "work", "--watch", "--interval", "1", "--settle", "4")
        seen: list[str] = []
        reader = _lines(process, seen)
        try:
            _wait_for(seen, "still arriving", process)
            _store(pacs, cta[1:])                       # the rest arrives while the first half waits
            _wait_for(seen, "stored 3 derived image(s)", process)
            time.sleep(2.5)                             # two more searches: nothing new
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0, "".join(seen)
        finally:
            process.kill()
        reader.join(timeout=10)
        output = "".join(seen)
        assert "SIGTERM received" in output and "stopped on request" in output
        assert output.count("stored ") == 1
        derived = _derived(pacs)
        assert list(derived) == [f"{cta[0].SeriesInstanceUID}/{SR}"]
        assert len(derived[f"{cta[0].SeriesInstanceUID}/{SR}"]) == 3


def _copy_slice(ds: pydicom.Dataset, number: int) -> pydicom.Dataset:
    """Another image of the same series: new SOP UID, next InstanceNumber and position."""
    copy = _copy(ds)
    copy.SOPInstanceUID = pydicom.uid.generate_uid()
    copy.InstanceNumber = number
    position = [float(v) for v in ds.ImagePositionPatient]
    copy.ImagePositionPatient = [position[0], position[1], position[2] + 0.625]
    return copy


@pytest.mark.slow
def test_orthanc_killed_and_restarted_mid_run(tmp_path, models, study, env):
    """The PACS dies while series are being stored and comes back on the same port: the run
    rides it out with its retries, and every series ends with exactly one whole derived series."""
    _needs_orthanc()
    storage = tmp_path / "orthanc"
    with orthanc_server.running_orthanc(storage) as server:
        pacs = _client(server)
        for datasets in study.values():
            _store(pacs, datasets)
        process = _pacs_process(server, models, tmp_path / "work")
        seen: list[str] = []
        reader = _lines(process, seen)
        _wait_for(seen, "model ", process)              # the first series is being processed
        server.process.kill()
        server.process.wait()
    port = int(server.url.rsplit(":", 1)[1])
    time.sleep(1.0)
    with orthanc_server.running_orthanc(storage, port=port) as again:
        try:
            assert process.wait(timeout=240) == 0, "".join(seen)[-3000:]
        finally:
            process.kill()
        reader.join(timeout=10)
        output = "".join(seen)
        assert "retry" in output, output[-3000:]
        derived = _derived(_client(again))
        assert sorted(derived) == sorted(f"{d[0].SeriesInstanceUID}/{SR}" for d in study.values())
        for datasets in study.values():
            assert len(derived[f"{datasets[0].SeriesInstanceUID}/{SR}"]) == len(datasets)


@pytest.mark.slow
def test_models_behind_tensorflow_serving(tmp_path, models, study, env):
    """`--server`: the stages are asked for by name from a serving endpoint (here the loopback
    stand-in for TensorFlow Serving, which runs the same SavedModels)."""
    _needs_orthanc()
    from tfgan_ct.deploy import serving

    standin = serving.start_standin(models)
    try:
        with orthanc_server.running_orthanc(tmp_path / "orthanc") as server:
            pacs = _client(server)
            _store(pacs, study["cta"])
            url = f"http://127.0.0.1:{standin.server_address[1]}"
            args = [a for a in _args(server, models, tmp_path / "work") if a != str(models)]
            args.remove("--models-dir")
            result = CliRunner().invoke(main, [*args, "--server", url])
            assert result.exit_code == 0, result.output
            [images] = _derived(pacs).values()
            assert len(images) == len(study["cta"]) and "model cta" in images[0].DerivationDescription
    finally:
        standin.shutdown()
        standin.server_close()
