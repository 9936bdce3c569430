"""Where a fleet's results live: a folder every node writes to, or object storage by URI.

A location without a scheme is a folder on a shared file system, used as it is. One with a
scheme (``s3://bucket/prefix``, ``gs://...``, ``file:///...``) is opened with fsspec (the
``cluster`` extra; S3 and GCS need their own fsspec packages, ``s3fs``, ``gcsfs``): each
unit works in a local folder of its node, which it fills first with the unit's finished
points from the location, and sends each point there as soon as it ends, written under a
temporary name and moved into place, so that a reader never sees half a file.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from sdbayes.traces import write_traces


class Results:
    """A results location (:mod:`sdbayes.results`); units are named by their folder in it
    (``"<sweep>/k<k>"``)."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        self.remote = "://" in self.location
        if self.remote:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(self.location)
        else:
            self.root = self.location

    def __repr__(self) -> str:
        return f"Results({self.location!r})"

    def where(self, name: str) -> str:
        """The location of ``name`` (a unit's folder, a file) as a user would give it."""
        return f"{self.location.rstrip('/')}/{name}"

    @contextmanager
    def working(self, unit: str) -> Iterator[Path]:
        """A local folder holding what the unit has in the location (its finished points,
        vLLM's results, the attempts log; not the servers' logs): on a shared file system
        its folder in the location itself; else a temporary one, filled from it."""
        if not self.remote:
            folder = Path(self.root) / unit
            folder.mkdir(parents=True, exist_ok=True)
            yield folder
            return
        with tempfile.TemporaryDirectory(prefix="sdbayes-unit-") as temporary:
            folder, top = Path(temporary), self._path(unit)
            for path in (self.fs.find(top) if self.fs.isdir(top) else []):
                relative = path[len(top):].lstrip("/")
                if relative.startswith("logs/") or relative.endswith(".partial"):
                    continue  # the servers' logs are for people; a .partial never finished
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(path, str(folder / relative))
            yield folder

    def send(self, unit: str, folder: Path, file: Path) -> None:
        """Put ``file`` of a unit's working ``folder`` at the same place under the unit in
        the location (nothing to do on a shared file system, where it already is)."""
        if not self.remote:
            return
        target = self._path(unit, file.relative_to(folder).as_posix())
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(str(file), target + ".partial")
        self.fs.mv(target + ".partial", target)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *filter(None, parts)])

    def write_traces(self, table: pd.DataFrame, name: str) -> None:
        """A trace table written as ``name`` (CSV) at the top of the location."""
        if not self.remote:
            write_traces(table, Path(self.root) / name)
            return
        with tempfile.TemporaryDirectory(prefix="sdbayes-table-") as temporary:
            write_traces(table, Path(temporary) / name)
            self.send("", Path(temporary), Path(temporary) / name)
