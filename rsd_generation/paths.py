"""Checks on checkpoint paths, shared by the API and both CLIs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def looks_local(path: str | os.PathLike) -> bool:
    """Whether `path` is meant as a local path rather than a hub id (`org/name`)."""
    s = os.fspath(path)
    return (
        isinstance(path, os.PathLike)
        or s.startswith(("/", "./", "../", "~", "."))
        or s.count("/") > 1
        or (os.sep != "/" and os.sep in s)
        or os.path.exists(s)
    )


def check_checkpoint_path(path: str | os.PathLike, what: str = "checkpoint") -> None:
    """Refuse a local path that is not an existing directory, naming it (the hub's 'Repo id must be in the form'
    error says nothing useful there)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{what} must be a local directory or a hub id, got {type(path).__name__}")
    if not looks_local(path):
        return
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{what} {os.fspath(path)!r} does not exist (no such directory)")
    if not p.is_dir():
        raise ValueError(f"{what} {os.fspath(path)!r} is a file, not a checkpoint directory")


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` are the same directory or one contains the other (symlinks resolved)."""
    a, b = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    return a == b or a in b.parents or b in a.parents


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder `src` to `dst`; an existing `dst` is removed only once `src` is in place (a crash
    leaves the old folder or the new one, never half of one)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old)
