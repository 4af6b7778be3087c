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


def test_quickstart_config_is_found_and_installed_with_the_package(tmp_path):
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    import pytest

    from tfgan_ct.cli import bundled_config

    assert bundled_config("quickstart.yaml").is_file()
    # A wheel (non-editable install) must carry configs/*.yaml as tfgan_ct/configs/.
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(repo / name, source)
    for name in ("tfgan_ct", "configs"):
        shutil.copytree(repo / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("tfgan_ct-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"tfgan_ct/configs/{p.name}" for p in (repo / "configs").glob("*.yaml")} <= names
