"""The DICOMweb client against a real Orthanc: STOW, QIDO, WADO, credentials, retries."""
from __future__ import annotations

import datetime as dt
import http.server
import logging
import threading
import time

import numpy as np
import pydicom
import pytest

from tfgan_ct.deploy.pacs.dicomweb import (
    Credentials,
    DicomWebPacs,
    PacsAuthError,
    PacsError,
    RetryPolicy,
)

import orthanc_server

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


def test_unknown_series_is_an_error_without_retries(orthanc, creds):
    waits = []
    pacs = DicomWebPacs(orthanc.dicomweb, creds, retry=FAST, sleep=waits.append)
    with pytest.raises(PacsError, match=r"retrieving a series failed: HTTP 404$"):
        pacs.retrieve_series("1.2.3", "4.5.6")
    assert waits == []


def test_dicomweb_delete_not_allowed_says_so(orthanc, creds):
    pacs = DicomWebPacs(orthanc.dicomweb, creds, retry=FAST)
    with pytest.raises(PacsError, match="does not allow DELETE over DICOMweb"):
        pacs.delete_series("1.2.3", "4.5.6")


def test_delete_series_through_orthanc_rest(orthanc, creds, phantom_series):
    pacs = DicomWebPacs(orthanc.dicomweb, creds, retry=FAST, orthanc_rest=orthanc.url)
    cta = phantom_series["cta"]
    copy = [pydicom.Dataset(ds) for ds in cta]
    series_uid = pydicom.uid.generate_uid()
    for ds in copy:
        ds.file_meta = cta[0].file_meta
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
    pacs.store(copy)
    assert len(pacs.instances(cta[0].StudyInstanceUID, series_uid)) == len(copy)
    assert pacs.delete_series(cta[0].StudyInstanceUID, series_uid) is True
    assert pacs.instances(cta[0].StudyInstanceUID, series_uid) == []
    assert pacs.delete_series(cta[0].StudyInstanceUID, series_uid) is False


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first `failures` requests, then an empty QIDO result."""

    failures = 0
    seen = 0

    def do_GET(self):  # noqa: N802 (the http.server name)
        type(self).seen += 1
        if type(self).seen <= type(self).failures:
            self.send_response(503)
            self.end_headers()
            return
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server():
    """A local HTTP server that fails with 503 a set number of times: (URL, handler class)."""
    handler = type("Flaky", (_Flaky,), {"failures": 0, "seen": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", handler
    finally:
        server.shutdown()
        server.server_close()


def test_5xx_is_retried_then_succeeds(flaky_server, caplog):
    url, handler = flaky_server
    handler.failures = 2
    waits = []
    pacs = DicomWebPacs(url, retry=FAST, sleep=waits.append)
    with caplog.at_level(logging.WARNING):
        assert pacs.search_ct_series() == []
    assert handler.seen == 3 and len(waits) == 2
    assert "HTTP 503" in caplog.text


def test_5xx_every_time_gives_pacs_error(flaky_server):
    url, handler = flaky_server
    handler.failures = 100
    pacs = DicomWebPacs(url, retry=FAST, sleep=lambda s: None)
    with pytest.raises(PacsError, match=r"searching CT series failed after 3 attempts: HTTP 503$"):
        pacs.search_ct_series()
    assert handler.seen == 3


def test_orthanc_restarting_mid_run_is_ridden_out(tmp_path, monkeypatch):
    if orthanc_server.executable() is None:
        pytest.skip(orthanc_server.INSTALL_HINT)
    monkeypatch.setenv("PACS_USER", orthanc_server.USER)
    monkeypatch.setenv("PACS_PASSWORD", orthanc_server.PASSWORD)
    creds = Credentials(user_env="PACS_USER", password_env="PACS_PASSWORD")
    with orthanc_server.running_orthanc(tmp_path / "o") as first:
        pacs = DicomWebPacs(first.dicomweb, creds, retry=RetryPolicy(attempts=10, first_delay=0.1, max_delay=0.5))
        assert pacs.search_ct_series() == []
        port = int(first.url.rsplit(":", 1)[1])
        first.process.kill()  # killed, as by a crash or the OOM killer
        first.process.wait()
    # The server is down now; it comes back on the same port while the client is retrying.
    results = []
    thread = threading.Thread(target=lambda: results.append(pacs.search_ct_series()))
    thread.start()
    time.sleep(0.3)
    with orthanc_server.running_orthanc(tmp_path / "o", port=port):
        thread.join(timeout=15)
    assert results == [[]]
