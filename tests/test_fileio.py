"""Atomic writes: nothing under the final name until complete, and normal permissions."""
import os
import stat

import pytest

from tfgan_ct.fileio import atomic_write_text, staged_directory


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_gives_the_permissions_open_would(tmp_path, umask_022):
    path = tmp_path / "manifest.json"
    atomic_write_text(path, "{}\n")
    assert path.read_text() == "{}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644     # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_staged_directory_gives_the_permissions_mkdir_would(tmp_path, umask_022):
    final = tmp_path / "dataset"
    with staged_directory(final) as stage:
        (stage / "a").write_text("x")
        assert not final.exists()
    assert stat.S_IMODE(final.stat().st_mode) == 0o755     # not mkdtemp's 0700
    assert (final / "a").read_text() == "x"


def test_staged_directory_leaves_nothing_on_error(tmp_path):
    final = tmp_path / "dataset"
    with pytest.raises(RuntimeError):
        with staged_directory(final) as stage:
            (stage / "a").write_text("x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_staged_directory_refuses_an_existing_folder_unless_overwrite(tmp_path):
    final = tmp_path / "dataset"
    final.mkdir()
    (final / "old").write_text("keep")
    with pytest.raises(FileExistsError):
        with staged_directory(final) as stage:
            (stage / "new").write_text("x")
    assert (final / "old").read_text() == "keep"
    with staged_directory(final, overwrite=True) as stage:
        (stage / "new").write_text("x")
    assert sorted(p.name for p in final.iterdir()) == ["new"]
