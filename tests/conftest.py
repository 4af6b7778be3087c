"""Shared fixtures: the phantom, the small config, converted datasets, a tiny export.

The core fixtures come from the package's own phantom, so the tests stand alone; only
`shared_data` and `converted_samples` need the real sample files (`helpers.SHARED`).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import SHARED, SMALL_CONFIG

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Outputs get the permissions open()/mkdir() would give (umask applied); the tests
# that check them expect the common umask 022, whatever the machine's is.
os.umask(0o022)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample files: `../shared/data` beside the repository, or $TFGAN_CT_SAMPLES."""
    if not SHARED.is_dir():
        pytest.skip(f"sample data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def small_cfg():
    from tfgan_ct.config import load_config

    return load_config(SMALL_CONFIG)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Three synthetic patients (NCCT, CTP, CTA each), 128-pixel slices."""
    from tfgan_ct.demo.phantom import make_dataset

    out = tmp_path_factory.mktemp("phantom")
    make_dataset(out, n_patients=3, seed=0, size=128, ncct_slices=4, ctp_slices=2,
                 ctp_timepoints=6, cta_slices=4)
    return out


def _convert(tmp_path_factory, name: str, *inputs: Path):
    """`tfgan-ct convert INPUTS --config small.yaml --workers 2` into a fresh folder: (folder, CLI result)."""
    from click.testing import CliRunner

    from tfgan_ct.cli import main

    out = tmp_path_factory.mktemp(name) / "dataset"
    result = CliRunner().invoke(main, ["convert", *map(str, inputs), "--out", str(out), "--config", str(SMALL_CONFIG),
                                       "--workers", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    return out, result


@pytest.fixture(scope="session")
def converted(tmp_path_factory, phantom_dir):
    """The phantom converted with the small config: (output folder, CLI result)."""
    return _convert(tmp_path_factory, "converted", phantom_dir)


@pytest.fixture(scope="session")
def converted_samples(tmp_path_factory, phantom_dir, shared_data):
    """The phantom plus the real samples (good and broken) converted with the small config.

    For the tests about real files (skip reasons, identifiers); returns (output folder, CLI result).
    """
    return _convert(tmp_path_factory, "converted-samples", phantom_dir, shared_data / "dicom")


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """`saved_models`-style folder with an untrained tiny `ncct` export (1 RRDB block, 8 features).

    Returns the models folder; the export is `<folder>/ncct/1`.
    """
    from tfgan_ct.config import Window
    from tfgan_ct.deploy.export import export_stage
    from tfgan_ct.model.discriminator import build_discriminator
    from tfgan_ct.model.generator import build_generator

    models = tmp_path_factory.mktemp("models")
    export_stage(build_generator(num_blocks=1, features=8, growth=4), build_discriminator(32, features=8),
                 models, "ncct", Window(40, 80), 4, {"parent": None})
    return models


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KB file system (tmpfs), mounted for the test; skipped where mounting is not allowed."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small file system here (needs root)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def _needs_samples(item) -> bool:
    return "shared_data" in getattr(item, "fixturenames", ())


def pytest_report_header(config):
    found = "" if SHARED.is_dir() else " (not found: the tests of the real sample files are deselected)"
    return f"sample data: {SHARED}{found}"


_LEFT_OUT: list = []


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark the tests of the real sample files `samples`; without the files, deselect them.

    Without the files they cannot run at all: they are left out (counted as deselected, and
    the summary says why) rather than skipped, so that a skip always means something to look at.
    """
    for item in items:
        if _needs_samples(item):
            item.add_marker(pytest.mark.samples)
    if not SHARED.is_dir():
        _LEFT_OUT[:] = [item for item in items if _needs_samples(item)]
        if _LEFT_OUT:
            config.hook.pytest_deselected(items=list(_LEFT_OUT))
            items[:] = [item for item in items if not _needs_samples(item)]


def pytest_terminal_summary(terminalreporter):
    if _LEFT_OUT:
        terminalreporter.write_line(f"sample data not found at {SHARED}: {len(_LEFT_OUT)} test(s) of the real "
                                    f"sample files deselected (they run where ../shared/data is)")
