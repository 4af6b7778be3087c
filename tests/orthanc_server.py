"""A real Orthanc (with its DICOMweb plugin) for the tests, on a free loopback port.

Debian/Ubuntu: `apt-get install orthanc orthanc-dicomweb`. The package's own service is
not used: each test run starts its own `Orthanc` process with its storage in a temporary
folder, and stops it at the end.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL_HINT = "Orthanc not installed (apt-get install -y orthanc orthanc-dicomweb)"
USER, PASSWORD = "tfgan", "secret"


@dataclass(frozen=True)
class Orthanc:
    """A running Orthanc: its REST root, DICOMweb root and the test user's credentials."""

    url: str
    dicomweb: str
    user: str
    password: str
    process: subprocess.Popen


def executable() -> str | None:
    """The Orthanc program with its DICOMweb plugin, or None where either is missing."""
    found = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if os.access(p, os.X_OK)), None)
    return found if found and PLUGIN.is_file() else None


def free_port() -> int:
    """A TCP port nothing listens on at the moment (loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(folder: Path, port: int, lua: str | None) -> dict:
    scripts = []
    if lua:
        script = folder / "filter.lua"
        script.write_text(lua)
        scripts.append(str(script))
    return {
        "LuaScripts": scripts,
        "Name": "tfgan-ct-tests", "HttpPort": port, "DicomServerEnabled": False, "DicomPort": free_port(),
        "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "storage"),
        "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}, "RemoteAccessAllowed": False,
    }


def _wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with code {process.returncode}; log: {log.read_text()[-2000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/system", auth=(USER, PASSWORD), timeout=1).ok:
                return
        time.sleep(0.1)
    raise RuntimeError(f"Orthanc did not answer on {url} within {timeout:.0f} s; log: {log.read_text()[-2000:]}")


def stop(process: subprocess.Popen) -> None:
    """Terminate the process, then kill it if it does not exit within 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_orthanc(folder: Path, port: int | None = None, timeout: float = 20.0, lua: str | None = None):
    """Start Orthanc with its files under `folder`, yield an `Orthanc`, stop it afterwards.

    `port` reuses a port (to restart a server on the same URL with the same storage); `lua` is a
    Lua script for Orthanc (e.g. a `ReceivedInstanceFilter` that refuses some instances).
    """
    program = executable()
    if program is None:
        raise FileNotFoundError(INSTALL_HINT)
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = folder / "orthanc.json"
    config.write_text(json.dumps(_config(folder, port, lua), indent=2))
    log = folder / "orthanc.log"
    with open(log, "ab") as out:
        process = subprocess.Popen([program, str(config)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, process, log, timeout)
        yield Orthanc(url=url, dicomweb=f"{url}/dicom-web", user=USER, password=PASSWORD, process=process)
    finally:
        stop(process)
