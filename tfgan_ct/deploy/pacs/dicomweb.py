"""A small DICOMweb client for a PACS: find CT series, fetch them, store derived series.

Built on the `dicomweb-client` library (its own retrying is switched off: this module
retries connection errors and 5xx answers with bounded exponential backoff, and turns
what still fails into one `PacsError` line). Credentials come only from environment
variables named by the caller; their values never appear in logs or messages, which
name the server by its URL (credentials in the URL itself are refused). TLS
certificates are verified unless the caller says otherwise.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from tfgan_ct.errors import TfganError

log = logging.getLogger(__name__)
T = TypeVar("T")

# DICOM JSON tags (QIDO-RS answers are keyed by tag, not keyword).
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_MODALITY, _DESCRIPTION, _COUNT, _NUMBER = "00080060", "0008103E", "00201209", "00200013"
_FAILED_SOP = "FailedSOPSequence"


class PacsError(TfganError, RuntimeError):
    """A DICOMweb request that failed (after the retries, where retrying makes sense)."""


class PacsAuthError(PacsError):
    """The server refused the credentials (HTTP 401 or 403); never retried."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: `attempts` tries in all, waits of `first_delay` seconds
    doubling up to `max_delay` seconds between them."""

    attempts: int = 5
    first_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        return min(self.max_delay, self.first_delay * 2 ** (retry - 1))


@dataclass(frozen=True)
class Credentials:
    """Where the credentials are: names of environment variables, never the values.

    `token_env` for a bearer token, or `user_env` and `password_env` for HTTP basic
    authentication; all None for a server without authentication.
    """

    token_env: str | None = None
    user_env: str | None = None
    password_env: str | None = None

    def names(self) -> list[str]:
        """The variable names given, for messages."""
        return [n for n in (self.token_env, self.user_env, self.password_env) if n]

    def apply(self, session: requests.Session) -> None:
        """Set the session's authentication from the environment; PacsError when a variable is unset."""
        if self.token_env and (self.user_env or self.password_env):
            raise PacsError("give either a token variable or a user and password variable, not both")
        if bool(self.user_env) != bool(self.password_env):
            raise PacsError("basic authentication needs both a user variable and a password variable")
        if self.token_env:
            session.headers["Authorization"] = f"Bearer {_env(self.token_env)}"
        elif self.user_env:
            session.auth = (_env(self.user_env), _env(self.password_env))


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise PacsError(f"environment variable {name} is not set (it should hold a PACS credential)")
    return value


@dataclass(frozen=True)
class SeriesRef:
    """One series found by QIDO-RS: its UIDs, modality, description and instance count
    (None when the server did not say)."""

    study_uid: str
    series_uid: str
    modality: str
    description: str
    instance_count: int | None


@dataclass(frozen=True)
class InstanceRef:
    """One instance found by QIDO-RS: its SOP Instance UID and Instance Number (None if absent)."""

    sop_uid: str
    number: int | None


def _value(record: dict, tag: str, default=None):
    """First value of a DICOM JSON attribute, or `default`."""
    values = record.get(tag, {}).get("Value") or []
    return values[0] if values else default


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _retriable(exc: BaseException) -> bool:
    """Connection trouble and 5xx answers are worth retrying; everything else is final."""
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)):
        return True
    status = _status(exc)
    return status is not None and status >= 500


def _reason(exc: BaseException) -> str:
    """A short, credential-free reason: the HTTP status, or the kind of connection failure."""
    status = _status(exc)
    if status is not None:
        return f"HTTP {status}"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "could not connect"
    return type(exc).__name__


class DicomWebPacs:
    """A PACS reached over DICOMweb at `url` (the DICOMweb root, e.g. ``http://host:8042/dicom-web``).

    `credentials` names the environment variables to read; `verify` is the TLS check
    (True, False or a CA bundle path); `retry` bounds the retries; `timeout` is per
    request, in seconds. `orthanc_rest` is the server's Orthanc REST root, for
    `delete_series` on an Orthanc (its DICOMweb plugin does not implement DELETE).
    """

    def __init__(self, url: str, credentials: Credentials | None = None, *, verify: bool | str = True,
                 retry: RetryPolicy | None = None, timeout: float = 30.0, orthanc_rest: str | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsError("the DICOMweb URL must start with http:// or https:// and name a host")
        if parts.username or parts.password:
            raise PacsError("the DICOMweb URL must not hold credentials: pass them through environment variables")
        self.url = url.rstrip("/")
        self.orthanc_rest = orthanc_rest.rstrip("/") if orthanc_rest else None
        self._timeout = timeout
        self.credentials = credentials or Credentials()
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._session = session = requests.Session()
        session.verify = verify
        self.credentials.apply(session)
        self._client = DICOMwebClient(self.url, session=session, timeout=timeout)
        self._client.set_http_retry_params(retry=False)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one request with the retry policy; PacsError (one line) when it finally fails."""
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn()
            except requests.RequestException as exc:
                status = _status(exc)
                if status in (401, 403):
                    names = ", ".join(self.credentials.names())
                    hint = f"check the variables {names}" if names else "no credentials were given"
                    raise PacsAuthError(f"PACS {self.url}: {what}: authentication failed, HTTP {status} "
                                        f"({hint})") from None
                if not _retriable(exc) or attempt == self.retry.attempts:
                    tries = f" after {attempt} attempts" if attempt > 1 else ""
                    raise PacsError(f"PACS {self.url}: {what} failed{tries}: {_reason(exc)}") from None
                delay = self.retry.delay(attempt)
                log.warning("PACS %s: %s failed (%s), retry %d/%d in %.1f s", self.url, what, _reason(exc),
                            attempt, self.retry.attempts - 1, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")

    def search_ct_series(self, since: dt.date | None = None) -> list[SeriesRef]:
        """QIDO-RS: every CT series (of studies dated `since` or later, when given), in the server's order."""
        filters = {"Modality": "CT"}
        if since is not None:
            filters["StudyDate"] = f"{since:%Y%m%d}-"
        fields = ["StudyInstanceUID", "SeriesDescription", "NumberOfSeriesRelatedInstances"]
        records = self._call("searching CT series", lambda: self._client.search_for_series(
            search_filters=filters, fields=fields, get_remaining=True))
        return [SeriesRef(study_uid=_value(r, _STUDY_UID, ""), series_uid=_value(r, _SERIES_UID, ""),
                          modality=_value(r, _MODALITY, "CT"), description=_value(r, _DESCRIPTION, ""),
                          instance_count=_int(_value(r, _COUNT))) for r in records]

    def instances(self, study: str, series: str) -> list[InstanceRef]:
        """QIDO-RS: the instances of one series (their count is what a settle check watches)."""
        records = self._call("listing the instances of a series", lambda: self._client.search_for_instances(
            study_instance_uid=study, series_instance_uid=series, fields=["InstanceNumber"], get_remaining=True))
        return [InstanceRef(sop_uid=_value(r, _SOP_UID, ""), number=_int(_value(r, _NUMBER))) for r in records]

    def series_metadata(self, study: str, series: str) -> list[pydicom.Dataset]:
        """WADO-RS metadata: the headers of every instance of one series (no pixel data)."""
        records = self._call("reading the headers of a series",
                             lambda: self._client.retrieve_series_metadata(study, series))
        return [_header(record) for record in records]

    def instance_metadata(self, study: str, series: str, sop: str) -> pydicom.Dataset:
        """WADO-RS metadata: the header of one instance (no pixel data)."""
        return _header(self._call("reading the header of an instance",
                                  lambda: self._client.retrieve_instance_metadata(study, series, sop)))

    def retrieve_series(self, study: str, series: str) -> list[pydicom.Dataset]:
        """WADO-RS: every instance of one series, as pydicom datasets (server order, not sorted)."""
        return self._call("retrieving a series", lambda: self._client.retrieve_series(study, series))

    def store(self, datasets: Sequence[pydicom.Dataset]) -> int:
        """STOW-RS: store the datasets in one request; returns how many were stored.

        PacsError when the server refuses any of them (the caller decides whether to
        retry or to delete what was stored).
        """
        datasets = list(datasets)
        if not datasets:
            return 0
        for ds in datasets:  # a PS3.10 file each, as WADO-RS gives them back (a dataset copy has none)
            if getattr(ds, "preamble", None) is None:
                ds.preamble = b"\x00" * 128
        answer = self._call("storing a series", lambda: self._client.store_instances(datasets))
        failed = len(getattr(answer, _FAILED_SOP, None) or []) if answer is not None else 0
        if failed:
            raise PacsError(f"PACS {self.url}: storing a series: the server refused {failed} "
                            f"of {len(datasets)} instances")
        return len(datasets)

    def delete_series(self, study: str, series: str) -> bool:
        """Delete one series (to take back a partly stored one); returns False when it was not there.

        Uses DICOMweb DELETE, or Orthanc's REST API when `orthanc_rest` is set.
        """
        if self.orthanc_rest is None:
            def delete_dicomweb() -> bool:
                try:
                    self._client.delete_series(study, series)
                except requests.HTTPError as exc:
                    if _status(exc) == 404:
                        return False
                    if _status(exc) in (405, 501):
                        raise PacsError(f"PACS {self.url}: deleting a series: the server does not allow "
                                        f"DELETE over DICOMweb (for Orthanc, give its REST URL)") from None
                    raise
                return True
            return self._call("deleting a series", delete_dicomweb)
        return self._call("deleting a series", lambda: self._delete_orthanc(series))

    def _delete_orthanc(self, series: str) -> bool:
        """Orthanc REST: look the series UID up, then DELETE /series/{id}."""
        found = self._session.post(f"{self.orthanc_rest}/tools/lookup", data=series, timeout=self._timeout)
        found.raise_for_status()
        paths = [hit["Path"] for hit in found.json() if hit.get("Type") == "Series"]
        for path in paths:
            self._session.delete(f"{self.orthanc_rest}{path}", timeout=self._timeout).raise_for_status()
        return bool(paths)


def _header(record: dict) -> pydicom.Dataset:
    """A DICOM JSON record as a pydicom Dataset; bulk data (the pixels) left out."""
    return pydicom.Dataset.from_json(record, bulk_data_uri_handler=lambda *args: b"")


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
