import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from tfgan_ct.cli import main


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "convert" in result.output


def test_bad_override_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["convert", str(tmp_path), "--out", str(tmp_path / "o"),
                                       "--set", "convert.patch_sise=64"])
    assert result.exit_code == 2 or result.exit_code == 1
    assert "convert.patch_sise: unknown key (did you mean 'patch_size'?)" in result.output
    assert "Traceback" not in result.output


def test_bad_patch_settings(tmp_path):
    result = CliRunner().invoke(main, ["convert", str(tmp_path), "--out", str(tmp_path / "o"),
                                       "--set", "convert.patch_size=30"])
    assert result.exit_code == 1 and "must be a positive multiple of scale 4" in result.output


def test_quickstart_config_is_found():
    from tfgan_ct.config import bundled_config

    assert bundled_config("quickstart").is_file()


@pytest.mark.slow
def test_wheel_carries_the_configs_and_the_command(tmp_path):
    from tfgan_ct.config import bundled_names

    # A wheel (non-editable install) must carry tfgan_ct/configs/*.yaml. Built without build
    # isolation (no download), so with the setuptools of this environment.
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} is older than pyproject.toml's build requirement")
    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, source)
    shutil.copytree(repo / "tfgan_ct", source / "tfgan_ct", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("tfgan_ct-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"tfgan_ct/configs/{name}.yaml" for name in bundled_names()} <= names
    assert "tfgan_ct/errors.py" in names and "tfgan_ct/deploy/__init__.py" in names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Name: tfgan-ct" in text and "Provides-Extra: test" in text and "# tfgan-ct" in text.lower()
    entry_points = zipfile.ZipFile(wheel).read(metadata.replace("METADATA", "entry_points.txt")).decode()
    assert "tfgan-ct = tfgan_ct.cli:main" in entry_points
