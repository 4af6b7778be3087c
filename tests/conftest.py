"""Shared fixtures: the sample data folder, the small config, a converted phantom dataset."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Outputs get the permissions open()/mkdir() would give (umask applied); the tests
# that check them expect the common umask 022, whatever the machine's is.
os.umask(0o022)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SMALL_CONFIG = REPO / "configs" / "small.yaml"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the repository (real CT samples, broken files, Set5)."""
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


@pytest.fixture(scope="session")
def converted(tmp_path_factory, phantom_dir, shared_data):
    """The phantom plus the real samples (good and broken) converted with the small config.

    Returns (output folder, CLI result).
    """
    from click.testing import CliRunner

    from tfgan_ct.cli import main

    out = tmp_path_factory.mktemp("converted") / "dataset"
    result = CliRunner().invoke(main, ["convert", str(phantom_dir), str(shared_data / "dicom"),
                                       "--out", str(out), "--config", str(SMALL_CONFIG),
                                       "--workers", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    return out, result


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """`saved_models`-style folder with an untrained tiny `ncct` export (1 RRDB block, 8 features).

    Returns the models folder; the export is `<folder>/ncct/1`.
    """
    from tfgan_ct.config import Window
    from tfgan_ct.model.discriminator import build_discriminator
    from tfgan_ct.deploy.export import export_stage
    from tfgan_ct.model.generator import build_generator

    models = tmp_path_factory.mktemp("models")
    export_stage(build_generator(num_blocks=1, features=8, growth=4), build_discriminator(32, features=8),
                 models, "ncct", Window(40, 80), 4, {"parent": None})
    return models
