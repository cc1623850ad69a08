"""Output files: atomic, readable by others like any file the user writes, clear errors."""

from __future__ import annotations

import os
import stat

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
