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


def test_quickstart_config_is_found_and_installed_with_the_package():
    from pathlib import Path

    from tfgan_ct.cli import bundled_config

    assert bundled_config("quickstart.yaml").is_file()
    # A wheel (non-editable install) carries configs/*.yaml as tfgan_ct/configs/ data.
    setup_py = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert 'package_dir={"tfgan_ct.configs": "configs"}' in setup_py
    assert 'package_data={"tfgan_ct.configs": ["*.yaml"]}' in setup_py
