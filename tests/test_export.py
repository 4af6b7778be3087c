"""export_stage version numbering, staging and disk full; warm start refusing extra variables and damaged exports."""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfgan_ct.config import Window
from tfgan_ct.deploy import export
from tfgan_ct.model.discriminator import build_discriminator
from tfgan_ct.model.generator import build_generator


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
    monkeypatch.setattr(export, "next_version", lambda stage_dir: 1)
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


DAMAGES = ("truncated-variables", "binary-metadata", "metadata-array")


def damaged_copy(export_dir: Path, dest: Path, damage: str) -> Path:
    """Copy the export `export_dir` to `dest` and damage the copy as a bad disk or transfer would.

    truncated-variables: the variables data file cut to half its length;
    binary-metadata: tfgan_ct.json overwritten with bytes that are not UTF-8;
    metadata-array: tfgan_ct.json holding the JSON `[]`.
    """
    shutil.copytree(export_dir, dest)
    if damage == "truncated-variables":
        data = dest / "variables/variables.data-00000-of-00001"
        data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    elif damage == "binary-metadata":
        (dest / export.METADATA).write_bytes(b"\xff\xfe\x00\x80 not text \x81\x9f")
    elif damage == "metadata-array":
        (dest / export.METADATA).write_text("[]\n")
    else:
        raise ValueError(damage)
    return dest


DAMAGE_MESSAGES = {"truncated-variables": r"cannot load the SavedModel, the export is damaged .*truncated",
                   "binary-metadata": r"damaged export, its tfgan_ct.json is not UTF-8",
                   "metadata-array": r"damaged export, its tfgan_ct.json holds an array instead of a JSON object"}


@pytest.mark.parametrize("damage", DAMAGES)
def test_warm_start_from_a_damaged_export_names_it(tiny_export, tmp_path, damage):
    bad = damaged_copy(tiny_export / "ncct/1", tmp_path / "bad", damage)
    g, d = build_generator(1, 8, 4), build_discriminator(32, features=8)
    before = [v.numpy() for v in g.variables]
    with pytest.raises(export.ExportError, match=re.escape(str(bad)) + ": " + DAMAGE_MESSAGES[damage]):
        export.warm_start(g, d, bad)
    for variable, value in zip(g.variables, before):
        np.testing.assert_array_equal(variable.numpy(), value)


def archive_class() -> type:
    """The class of the archive that keras.export.ExportArchive() makes for this backend."""
    return type(keras.export.ExportArchive())


def _dead_pid() -> int:
    """The id of a process that has ended (a child reaped here)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_export_stages_in_a_named_folder_and_removes_stale_staging(tmp_path, monkeypatch):
    stage_dir = tmp_path / "models/ncct"
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
    stale = stage_dir / f".export.partial-{host}-{_dead_pid()}-abc123"
    (stale / "model/variables").mkdir(parents=True)
    legacy_old, legacy_new = stage_dir / ".partial-k2j4h1", stage_dir / ".partial-x9y8z7"
    for folder in (legacy_old, legacy_new):
        folder.mkdir()
        (folder / "saved_model.pb").write_bytes(b"half")
    hours_ago = time.time() - 2 * 3600
    os.utime(legacy_old, (hours_ago, hours_ago))
    seen = []
    real = archive_class().write_out

    def write_out(archive, path, **kwargs):  # records where the SavedModel is written; writes it
        seen.append(Path(path))
        return real(archive, path, **kwargs)

    monkeypatch.setattr(archive_class(), "write_out", write_out)
    out = export_tiny(tmp_path / "models")
    assert out == stage_dir / "1" and export.versions(stage_dir) == [1]
    assert re.fullmatch(rf"\.export\.partial-{host}-{os.getpid()}-\w+", seen[0].parent.name), seen
    assert seen[0].parent.parent == stage_dir and not seen[0].parent.exists()
    # The dead process's staging and the hour-old 0.1 staging are gone; a recent 0.1 staging
    # (perhaps an export still running) is left alone.
    assert hidden_entries(stage_dir) == [legacy_new.name]


@pytest.mark.parametrize("error", ["ENOSPC", "tensorflow"])
def test_disk_full_during_export_is_one_error_and_keeps_nothing(tmp_path, monkeypatch, error):
    # A full disk cannot be made safely in a test: the archive's write fills part of the
    # SavedModel, then fails as the file system (OSError ENOSPC) or TensorFlow's writer would.
    def write_out(archive, path, **kwargs):
        Path(path, "variables").mkdir(parents=True)
        Path(path, "variables/variables.data-00000-of-00001").write_bytes(b"\0" * 1000)
        if error == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        raise tf.errors.ResourceExhaustedError(None, None, f"{path}/variables; No space left on device")

    monkeypatch.setattr(archive_class(), "write_out", write_out)
    stage_dir = tmp_path / "models/ncct"
    with pytest.raises(export.ExportError) as caught:
        export_tiny(tmp_path / "models")
    message = str(caught.value)
    assert message.startswith(f"cannot export ncct to {stage_dir}: no space left on the disk")
    assert "\n" not in message and "nothing was kept" in message
    assert list(stage_dir.iterdir()) == []           # no staging, no version folder


def test_other_export_errors_are_not_called_disk_full(tmp_path, monkeypatch):
    def write_out(archive, path, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(archive_class(), "write_out", write_out)
    with pytest.raises(PermissionError):
        export_tiny(tmp_path / "models")
    assert list((tmp_path / "models/ncct").iterdir()) == []


def test_float32_copy_of_a_mixed_precision_generator():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(3)
        mixed = build_generator(1, 8, 4)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    copy = export.float32_copy(mixed)
    assert copy is not mixed and {layer.compute_dtype for layer in export._layers(copy)} == {"float32"}
    assert [v.path for v in copy.variables] == [v.path for v in mixed.variables]
    for a, b in zip(copy.variables, mixed.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x = np.random.default_rng(0).random((1, 6, 5, 1)).astype("float32")
    np.testing.assert_allclose(copy(x).numpy(), mixed(x).numpy().astype("float32"), atol=2e-3)
    plain = build_generator(1, 8, 4)
    assert export.float32_copy(plain) is plain
