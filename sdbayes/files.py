"""Writing output files so that a failure never destroys what was there.

Every file sdbayes writes goes through :func:`replacing`: it is written beside its target
under a temporary name and renamed over it only once complete, so a full disk, a crash or
an interrupt leaves the previous file intact (a rename within a folder is atomic on POSIX
and Windows). :func:`check_writable` tests an output path before long work starts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_writable(path: str | Path, option: str = "--out") -> Path:
    """``path`` as a :class:`Path` if a file can be written there; else an ``OSError``
    naming ``option``, the path and why. Creates nothing."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path}: is a folder, give a file name")
    if not folder.is_dir():
        raise FileNotFoundError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path}: folder {folder} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{option} {path}: file is not writable")
    return path


def check_folder(path: str | Path, option: str = "--out") -> Path:
    """``path`` as a :class:`Path` if it is, or can be made, a writable folder; creates
    nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option} {path}: is a file, give a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path}: {existing} is not a writable folder")
    return path


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on leaving the block without an error
    it replaces ``path``, otherwise it is removed and ``path`` is left as it was.

    The temporary name keeps ``path``'s suffix, so writers that choose a format by suffix
    choose the same one.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix,
                                         dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())  # on disk before the rename makes it the file
        mode = path.stat().st_mode if path.exists() else 0o666 & ~_umask()
        os.chmod(temporary, mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
