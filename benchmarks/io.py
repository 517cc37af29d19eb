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
