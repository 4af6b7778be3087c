"""export_stage version numbering next to non-exports, and warm start refusing extra variables."""
from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from tfgan_ct import export
from tfgan_ct.config import Window
from tfgan_ct.discriminator import build_discriminator
from tfgan_ct.generator import build_generator


def export_tiny(models_dir: Path, num_blocks: int = 1) -> Path:
    """Export an untrained `num_blocks`-block, 8-feature generator as the next version of `ncct`."""
    return export.export_stage(build_generator(num_blocks, 8, 4), build_discriminator(32, features=8),
                               models_dir, "ncct", Window(40.0, 80.0), 4, {"parent": None})


def hidden_entries(stage_dir: Path) -> list[str]:
    return [p.name for p in stage_dir.iterdir() if p.name.startswith(".")]


def test_incomplete_version_folder_is_skipped(tiny_export, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_export / "ncct/1", models / "ncct/1")
    (models / "ncct/1/saved_model.pb").unlink()         # a partial copy: not an export, but taken
    assert export.versions(models / "ncct") == []
    out = export_tiny(models)
    assert out == models / "ncct/2"
    assert (out / "saved_model.pb").is_file()
    assert export.read_metadata(out)["version"] == 2
    assert export.versions(models / "ncct") == [2]
    assert export.resolve("ncct", models) == out
    assert not hidden_entries(models / "ncct")


def test_integer_named_file_is_skipped(tmp_path):
    stage_dir = tmp_path / "models/ncct"
    stage_dir.mkdir(parents=True)
    (stage_dir / "1").write_text("not an export\n")
    out = export_tiny(tmp_path / "models")
    assert out == stage_dir / "2"
    assert (stage_dir / "1").read_text() == "not an export\n"
    assert export.versions(stage_dir) == [2]
    assert not hidden_entries(stage_dir)


def test_export_gives_up_on_a_version_it_cannot_take(tmp_path, monkeypatch):
    # A version picker that ignores the blocking `1/` (as before the fix) must not loop forever.
    stage_dir = tmp_path / "models/ncct"
    (stage_dir / "1").mkdir(parents=True)
    (stage_dir / "1/leftover").write_text("x")
    monkeypatch.setattr(export, "_next_version", lambda stage_dir: 1)
    with pytest.raises(export.ExportError, match=r"ncct/1 already exists .*move away"):
        export_tiny(tmp_path / "models")
    assert sorted(p.name for p in stage_dir.iterdir()) == ["1"]     # staging folder removed
    assert (stage_dir / "1/leftover").read_text() == "x"


def test_warm_start_refuses_an_export_with_extra_variables(tmp_path):
    models = tmp_path / "models"
    two = export_tiny(models, num_blocks=2)
    one = build_generator(1, 8, 4)
    before = [v.numpy() for v in one.variables]
    with pytest.raises(export.ExportError,
                       match=r"variable 'rrdb01/[^']+' of the export is not in this generator"):
        export.warm_start(one, build_discriminator(32, features=8), two)
    for variable, value in zip(one.variables, before):      # nothing half-copied
        np.testing.assert_array_equal(variable.numpy(), value)


def test_warm_start_copies_an_exact_match(tmp_path):
    models = tmp_path / "models"
    keras.utils.set_random_seed(1)
    g, d = build_generator(2, 8, 4), build_discriminator(32, features=8)
    path = export.export_stage(g, d, models, "ncct", Window(40.0, 80.0), 4, {"parent": None})
    keras.utils.set_random_seed(2)
    g2, d2 = build_generator(2, 8, 4), build_discriminator(32, features=8)
    count = export.warm_start(g2, d2, path)
    assert count == len(g.variables) + len(d.variables)
    for a, b in zip(g.variables + d.variables, g2.variables + d2.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
