"""The DICOMweb client against a real Orthanc: STOW, QIDO, WADO, credentials, retries."""
from __future__ import annotations

import datetime as dt
import logging
import time

import numpy as np
import orthanc_server
import pydicom
import pytest

from tfgan_ct.deploy.pacs.dicomweb import (
    Credentials,
    DicomWebPacs,
    PacsAuthError,
    PacsError,
    RetryPolicy,
)

FAST = RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.05)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A running Orthanc with DICOMweb; skips where it is not installed."""
    if orthanc_server.executable() is None:
        pytest.skip(orthanc_server.INSTALL_HINT)
    with orthanc_server.running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture
def creds(orthanc, monkeypatch):
    """The test user's credentials in environment variables; returns their names."""
    monkeypatch.setenv("PACS_USER", orthanc.user)
    monkeypatch.setenv("PACS_PASSWORD", orthanc.password)
    return Credentials(user_env="PACS_USER", password_env="PACS_PASSWORD")


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory):
    """One small phantom patient: {modality: [datasets]} (64-pixel slices, a few per series)."""
    from tfgan_ct.demo.phantom import make_dataset

    out = tmp_path_factory.mktemp("pacs-phantom")
    (paths,) = make_dataset(out, n_patients=1, seed=3, size=64, ncct_slices=3, ctp_slices=1, ctp_timepoints=2,
                            cta_slices=2)
    return {stage: [pydicom.dcmread(p) for p in files] for stage, files in paths.items()}


@pytest.fixture(scope="module")
def stored(orthanc, phantom_series):
    """The phantom stored once in the module's Orthanc (through STOW-RS)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PACS_USER", orthanc.user)
        mp.setenv("PACS_PASSWORD", orthanc.password)
        pacs = DicomWebPacs(orthanc.dicomweb, Credentials(user_env="PACS_USER", password_env="PACS_PASSWORD"),
                            retry=FAST)
    for datasets in phantom_series.values():
        assert pacs.store(datasets) == len(datasets)
    return phantom_series


def test_stow_then_qido_finds_the_ct_series(orthanc, creds, stored):
    pacs = DicomWebPacs(orthanc.dicomweb, creds, retry=FAST)
    found = {s.series_uid: s for s in pacs.search_ct_series()}
    for datasets in stored.values():
        first = datasets[0]
        ref = found[first.SeriesInstanceUID]
        assert ref.study_uid == first.StudyInstanceUID
        assert ref.modality == "CT"
        assert ref.description == first.get("SeriesDescription", "")
        assert ref.instance_count == len(datasets)
        instances = pacs.instances(ref.study_uid, ref.series_uid)
        assert sorted(i.sop_uid for i in instances) == sorted(d.SOPInstanceUID for d in datasets)


def test_qido_since_filters_by_study_date(orthanc, creds, stored):
    pacs = DicomWebPacs(orthanc.dicomweb, creds, retry=FAST)
    study_date = dt.datetime.strptime(stored["ncct"][0].StudyDate, "%Y%m%d").date()
    assert len(pacs.search_ct_series(since=study_date)) == len(stored)
    assert pacs.search_ct_series(since=study_date + dt.timedelta(days=1)) == []


def test_wado_returns_the_stored_pixels(orthanc, creds, stored):
    pacs = DicomWebPacs(orthanc.dicomweb, creds, retry=FAST)
    source = {d.SOPInstanceUID: d for d in stored["ncct"]}
    first = stored["ncct"][0]
    got = pacs.retrieve_series(first.StudyInstanceUID, first.SeriesInstanceUID)
    assert sorted(d.SOPInstanceUID for d in got) == sorted(source)
    for ds in got:
        np.testing.assert_array_equal(ds.pixel_array, source[ds.SOPInstanceUID].pixel_array)
        assert ds.RescaleSlope == source[ds.SOPInstanceUID].RescaleSlope


def test_bearer_token_is_read_from_its_variable(orthanc, monkeypatch):
    monkeypatch.setenv("PACS_TOKEN", "tok-123")
    pacs = DicomWebPacs(orthanc.dicomweb, Credentials(token_env="PACS_TOKEN"), retry=FAST)
    assert pacs._client._session.headers["Authorization"] == "Bearer tok-123"


def test_unset_variable_names_the_variable_not_a_value(orthanc, monkeypatch):
    monkeypatch.delenv("PACS_NOPE", raising=False)
    with pytest.raises(PacsError, match="PACS_NOPE is not set"):
        DicomWebPacs(orthanc.dicomweb, Credentials(token_env="PACS_NOPE"))


def test_credentials_in_the_url_are_refused(orthanc):
    with pytest.raises(PacsError, match="must not hold credentials") as err:
        DicomWebPacs(orthanc.dicomweb.replace("http://", "http://tfgan:secret@"))
    assert "secret" not in str(err.value)


def test_wrong_credentials_give_one_clear_line_without_the_secret(orthanc, monkeypatch, caplog):
    monkeypatch.setenv("PACS_USER", orthanc.user)
    monkeypatch.setenv("PACS_PASSWORD", "wrong-password-xyz")
    calls = []
    pacs = DicomWebPacs(orthanc.dicomweb, Credentials(user_env="PACS_USER", password_env="PACS_PASSWORD"),
                        retry=FAST, sleep=calls.append)
    with caplog.at_level(logging.DEBUG), pytest.raises(PacsAuthError) as err:
        pacs.search_ct_series()
    message = str(err.value)
    assert "\n" not in message
    assert "authentication failed" in message and "PACS_USER, PACS_PASSWORD" in message
    assert orthanc.dicomweb in message
    assert "wrong-password-xyz" not in message and "wrong-password-xyz" not in caplog.text
    assert calls == []  # not retried


def test_missing_credentials_say_so(orthanc):
    with pytest.raises(PacsAuthError, match="no credentials were given"):
        DicomWebPacs(orthanc.dicomweb, retry=FAST).search_ct_series()


def test_server_down_gives_pacs_error_after_bounded_retries(monkeypatch):
    monkeypatch.setenv("PACS_USER", "tfgan")
    monkeypatch.setenv("PACS_PASSWORD", "secret-down")
    url = f"http://127.0.0.1:{orthanc_server.free_port()}/dicom-web"
    waits = []
    pacs = DicomWebPacs(url, Credentials(user_env="PACS_USER", password_env="PACS_PASSWORD"),
                        retry=RetryPolicy(attempts=4, first_delay=0.01, max_delay=0.02), sleep=waits.append)
    start = time.monotonic()
    with pytest.raises(PacsError) as err:
        pacs.search_ct_series()
    assert time.monotonic() - start < 5
    assert waits == [0.01, 0.02, 0.02]
    message = str(err.value)
    assert message == f"PACS {url}: searching CT series failed after 4 attempts: could not connect"
    assert "secret-down" not in message


def test_retry_policy_backoff_is_bounded():
    policy = RetryPolicy(attempts=6, first_delay=0.5, max_delay=3.0)
    assert [policy.delay(i) for i in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
