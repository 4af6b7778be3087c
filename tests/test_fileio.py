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


def _dead_pid() -> int:
    """The id of a process that has ended (a child, reaped)."""
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_stale_staging_of_dead_runs_is_removed_live_and_foreign_kept(tmp_path, caplog):
    from tfgan_ct.fileio import _host, make_staging, remove_stale_staging

    dead = tmp_path / f".dataset.partial-{_host()}-{_dead_pid()}-abc"
    (dead / ".spool").mkdir(parents=True)
    (dead / "IM1.dcm").write_bytes(b"identified pixels")
    live = make_staging(tmp_path, "dataset")                       # this process: alive
    other_host = tmp_path / f".dataset.partial-elsewhere-{_dead_pid()}-abc"
    other_host.mkdir()                                              # maybe alive on another machine
    other_name = tmp_path / f".series.partial-{_host()}-{_dead_pid()}-abc"
    other_name.mkdir()
    removed = remove_stale_staging(tmp_path, "dataset")
    assert removed == [dead] and not dead.exists()
    assert live.is_dir() and other_host.is_dir() and other_name.is_dir()
    assert "interrupted run" in caplog.text
    assert remove_stale_staging(tmp_path) == [other_name]


def test_an_output_being_replaced_when_the_run_died_is_put_back(tmp_path):
    from tfgan_ct.fileio import _host, remove_stale_staging

    old = tmp_path / f".dataset.old-{_host()}-{_dead_pid()}-0"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    remove_stale_staging(tmp_path, "dataset")
    assert (tmp_path / "dataset/manifest.json").is_file() and not old.exists()


def test_staged_directory_cleans_stale_staging_of_its_output(tmp_path):
    from tfgan_ct.fileio import _host

    stale = tmp_path / f".dataset.partial-{_host()}-{_dead_pid()}-x"
    stale.mkdir()
    with staged_directory(tmp_path / "dataset") as stage:
        (stage / "a").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


def test_check_replaceable_refuses_inputs_and_foreign_folders(tmp_path):
    from tfgan_ct.fileio import OutputError, check_replaceable

    victim = tmp_path / "victim"
    (victim / "dicom").mkdir(parents=True)
    (victim / "README.txt").write_text("notes")
    with pytest.raises(OutputError, match="holds the input"):
        check_replaceable(victim, [victim / "dicom"], lambda p: True, "a dataset")
    with pytest.raises(OutputError, match="not a dataset made by tfgan-ct"):
        check_replaceable(victim, [tmp_path / "elsewhere"], lambda p: False, "a dataset")
    check_replaceable(victim, [tmp_path / "elsewhere"], lambda p: True, "a dataset")
    check_replaceable(tmp_path / "missing", [victim], lambda p: False, "a dataset")
