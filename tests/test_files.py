"""Output files: replaced only once complete, and checked before long work starts."""

import os
import subprocess
import sys

import pytest

from sdbayes.files import check_folder, check_writable, replacing


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "points.csv"
    path.write_text("old contents\n")
    with pytest.raises(OSError, match="disk full"), replacing(path) as temporary:
        temporary.write_text("half of the new")
        raise OSError("disk full")
    assert path.read_text() == "old contents\n"
    assert os.listdir(tmp_path) == ["points.csv"]  # no temporary left behind


def test_a_complete_write_replaces_the_file_and_keeps_its_mode(tmp_path):
    path = tmp_path / "posterior.nc"
    path.write_text("old")
    path.chmod(0o640)
    with replacing(path) as temporary:
        assert temporary.suffix == ".nc" and temporary.parent == tmp_path
        temporary.write_text("new")
    assert path.read_text() == "new"
    assert path.stat().st_mode & 0o777 == 0o640


def test_outputs_are_checked_before_work(tmp_path):
    assert check_writable(tmp_path / "new.nc") == tmp_path / "new.nc"
    with pytest.raises(FileNotFoundError, match=r"--out .*missing/p.nc: folder .* does not"):
        check_writable(tmp_path / "missing" / "p.nc")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_writable(tmp_path)
    assert check_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_folder(tmp_path / "file")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="not writable"):
            check_writable(locked / "p.nc")


def test_the_command_line_starts_without_jax():
    code = "import sys, sdbayes.cli; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
