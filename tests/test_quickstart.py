"""`tfgan-ct quickstart` end to end, with step counts cut to a handful so it runs in the suite."""
from __future__ import annotations

import json

import pydicom
import pytest
from click.testing import CliRunner

from tfgan_ct.cli import main

FEW_STEPS = ["train.l1_phase.steps=3", "train.l1_phase.milestones=[]", "train.gan_phase.steps=2",
             "train.gan_phase.milestones=[]", "train.log_every=1"]


@pytest.mark.slow
def test_quickstart_makes_every_result(tmp_path):
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), "--patients", "3", "--no-progress"]
    for item in FEW_STEPS:
        args += ["--set", item]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for stage in ("natural", "ncct", "ctp", "cta"):
        assert (out / "saved_models" / stage / "1" / "saved_model.pb").is_file()
    for stage in ("ncct", "ctp", "cta"):
        assert (out / "scratch_models" / stage / "1" / "saved_model.pb").is_file()
        table = json.loads((out / "evaluation" / stage / "table.json").read_text())
        assert set(table["methods"]) == {"bicubic", "Scratch", "TL"} and table["baseline"] == "Scratch"
        assert (out / "figures" / f"{stage}.png").stat().st_size > 1000
        assert f"{stage.upper()} " in result.output
    # Warm starts follow the chain; Scratch has no parent.
    meta = lambda root, stage: json.loads((out / root / stage / "1" / "tfgan_ct.json").read_text())  # noqa: E731
    assert meta("saved_models", "ctp")["parent"] == "ncct"
    assert meta("saved_models", "ncct")["parent"] == "natural"
    assert meta("scratch_models", "cta")["parent"] is None
    table1 = (out / "table1.md").read_text()
    assert table1.count("| Method |") == 3
    upscaled = sorted((out / "upscaled").glob("*/*.dcm"))
    assert upscaled and pydicom.dcmread(upscaled[0]).Rows == 512
    assert "results in" in result.output and str(out / "table1.md") in result.output

    again = CliRunner().invoke(main, ["quickstart", "--out", str(out), "--no-progress"])
    assert again.exit_code != 0 and "--overwrite" in again.output


def test_overwrite_refuses_a_folder_that_is_not_a_quickstart(tmp_path):
    """--overwrite must not delete a folder of the user's that no quickstart wrote."""
    precious = tmp_path / "my-data"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["quickstart", "--out", str(precious), "--overwrite", "--no-progress"])
    assert result.exit_code != 0 and "holds no earlier quickstart" in result.output
    assert (precious / "notes.txt").read_text() == "keep me"
