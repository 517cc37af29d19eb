"""Result files: atomic writes, no silent overwrite."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as JSON to a temp file beside `path`, then rename it over `path` (a crash leaves no half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def refuse_overwrite(path: str | os.PathLike, force: bool) -> None:
    """Raise unless `path` is free or `force` is set."""
    if Path(path).exists() and not force:
        raise SystemExit(f"error: {path} exists; pass --force to overwrite it")


class RecordStore:
    """Per-question results as JSON lines, appended and flushed to disk as they come, so a crash loses nothing.

    Lines are keyed by (`setting`, `id`). Opening an existing file without `resume` is refused unless `force`
    (which starts it afresh); with `resume`, finished keys are loaded and a torn last line (a crash mid-write) is
    cut off.
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False, force: bool = False):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists() and self.path.stat().st_size and not resume:
            if not force:
                raise SystemExit(
                    f"error: {self.path} holds results; pass --resume to continue it or --force to restart"
                )
            self.path.unlink()
        if resume and self.path.exists():
            self._load()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = {(r["setting"], r["id"]) for r in self.records}

    def _load(self) -> None:
        """Read complete lines; cut a torn last line off the file."""
        good = 0
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break
                if not line.endswith(b"\n"):
                    break
                self.records.append(rec)
                good += len(line)
        if good != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def add(self, records: list[dict]) -> None:
        """Append records and force them to disk."""
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records += records
        self.done |= {(r["setting"], r["id"]) for r in records}
