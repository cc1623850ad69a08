"""Output files: atomic, readable by others like any file the user writes, clear errors."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from streamlens.files import OutputError, prepare_out_dir, write_atomic


def test_write_atomic_replaces_and_uses_normal_permissions(tmp_path):
    target = write_atomic(tmp_path / "a.txt", "one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left behind


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_atomic(tmp_path / "b.txt", 12345)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_prepare_out_dir_names_the_folder(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(OutputError, match=f"--out {afile} is a file, not a folder"):
        prepare_out_dir(afile)
    assert prepare_out_dir(tmp_path / "new" / "deeper").is_dir()


def test_check_out_dir_creates_nothing(tmp_path):
    from streamlens.files import check_out_dir

    assert check_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(OutputError, match="cannot be created: .* is a file, not a folder"):
        check_out_dir(afile / "sub")


def test_write_outputs_replaces_the_whole_previous_set(tmp_path):
    from streamlens.files import OUTPUTS_MANIFEST, write_outputs

    out = tmp_path / "out"
    write_outputs(out, {"a.csv": "1", "extra.csv": "old"})
    (out / "notes.txt").write_text("mine")  # not ours: never touched
    write_outputs(out, {"a.csv": "2"})
    assert sorted(p.name for p in out.iterdir()) == [OUTPUTS_MANIFEST, "a.csv", "notes.txt"]
    assert (out / "a.csv").read_text() == "2"


def test_write_outputs_failure_leaves_the_earlier_set(tmp_path, monkeypatch):
    import streamlens.files as files

    out = tmp_path / "out"
    files.write_outputs(out, {"a.csv": "1", "b.html": "1"})
    real = files.write_atomic

    def full_disk(path, content):
        if Path(path).name == "b.html":
            raise OSError(28, "No space left on device")
        return real(path, content)

    monkeypatch.setattr(files, "write_atomic", full_disk)
    with pytest.raises(OSError):
        files.write_outputs(out, {"a.csv": "2", "b.html": "2"})
    assert (out / "a.csv").read_text() == "1" and (out / "b.html").read_text() == "1"
    assert not [p for p in out.iterdir() if p.name.startswith(".streamlens-staging")]


@pytest.mark.parametrize("name", ["", "../x.csv", "sub/x.csv", ".hidden"])
def test_write_outputs_refuses_names_that_are_not_plain_files(tmp_path, name):
    from streamlens.files import OutputError, write_outputs

    with pytest.raises(OutputError, match="plain file name"):
        write_outputs(tmp_path / "out", {name: "x"})
    assert not (tmp_path / "out").exists()
