"""Result files: atomic writes, no silent overwrite."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import stat
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path


def finite(obj):
    """`obj` with every NaN or infinite float replaced by None (strict JSON has no such numbers: an undefined metric,
    say a ROC-AUC over one class, is written as null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as strict JSON (non-finite floats as null) to a temp file beside `path`, then rename it over
    `path` (a crash leaves no half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (json.dumps(finite(obj), indent=2, allow_nan=False) + "\n").encode())
    return path


LOCK_NAME = ".rsd-bench.lock"


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on `directory` (an flock on `directory/.rsd-bench.lock`, created if needed) while the
    block runs; a second holder is refused at once with a SystemExit naming the directory.

    The lock file stays in place afterwards (deleting it while another process waits on it would let two runs hold
    "the" lock on different files); the lock itself ends with the process that holds it, even after a crash.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            raise SystemExit(
                f"error: {directory} is in use by another rsd-bench run"
                f"{f' (process {holder})' if holder else ''}: it holds the lock {path}; wait for it to finish or "
                "choose another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.close(fd)  # releases the lock


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The command that reproduces a run of `rsd_generation.benchmarks.<module>` with `argv` (None: this process's
    arguments)."""
    return " ".join([f"python -m rsd_generation.benchmarks.{module}", *(sys.argv[1:] if argv is None else argv)])


def refuse_overwrite(path: str | os.PathLike, force: bool) -> None:
    """Raise unless `path` is free or `force` is set."""
    if Path(path).exists() and not force:
        raise SystemExit(f"error: {path} exists; pass --force to overwrite it")


class RecordStore:
    """Per-question results as JSON lines, appended and flushed to disk as they come, so a crash loses nothing.

    Lines are keyed by (`setting`, `id`). Opening an existing file without `resume` is refused unless `force`
    (which starts it afresh). With `resume` every valid record is loaded; lines that are not (undecodable JSON, not
    an object, no string `setting` / `id`, a repeated key, a torn last line without its newline from a crash
    mid-write) are moved to a new `records.jsonl.bad-<time>` beside the file, which is rewritten atomically with the
    valid lines only, and a warning says how many were set aside and where.
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
        """Read every valid record; set the other lines aside (see the class docstring)."""
        keep: list[bytes] = []
        bad: list[tuple[int, str, bytes]] = []  # (line number, why, the line as read)
        seen: set[tuple[str, str]] = set()
        lines = self.path.read_bytes().splitlines(keepends=True)
        for lineno, line in enumerate(lines, start=1):
            rec, why = _parse_record(line)
            if why is None and (rec["setting"], rec["id"]) in seen:
                why = f"repeats setting {rec['setting']!r} id {rec['id']!r} (the first is kept)"
            if why is None:
                seen.add((rec["setting"], rec["id"]))
                self.records.append(rec)
                keep.append(line)
            elif why != "blank":
                bad.append((lineno, why, line))
        if not bad and len(keep) == len(lines):
            return
        aside = None
        if bad:
            aside = _create_new(self.path.with_name(f"{self.path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}"))
            with open(aside, "wb") as f:
                f.writelines(line if line.endswith(b"\n") else line + b"\n" for _, _, line in bad)
                f.flush()
                os.fsync(f.fileno())
        write_bytes_atomic(self.path, b"".join(keep))
        if bad:
            shown = "; ".join(f"line {n}: {why}" for n, why, _ in bad[:5]) + ("; ..." if len(bad) > 5 else "")
            warnings.warn(
                f"{self.path}: set aside {len(bad)} bad line(s) in {aside} ({shown}); kept {len(keep)} valid "
                "record(s); the questions of the bad lines will be run again",
                stacklevel=3,
            )

    def add(self, records: list[dict]) -> None:
        """Append records and force them to disk."""
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records += records
        self.done |= {(r["setting"], r["id"]) for r in records}


def _parse_record(line: bytes) -> tuple[dict | None, str | None]:
    """One line of records.jsonl as (record, None), or (None, why it is not a record); why is "blank" for an empty
    line."""
    if not line.strip():
        return None, "blank"
    if not line.endswith(b"\n"):
        return None, "torn last line (no newline: a crash mid-write)"
    try:
        rec = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        return None, f"not valid JSON ({e.__class__.__name__})"
    if not isinstance(rec, dict):
        return None, f"a JSON {type(rec).__name__}, not an object"
    missing = [k for k in ("setting", "id") if not isinstance(rec.get(k), str)]
    if missing:
        return None, f"no string {' or '.join(repr(k) for k in missing)}"
    return rec, None


def _create_new(path: Path) -> Path:
    """Create `path` empty, or `path-1`, `path-2`, ... when taken (never an existing file); returns the one made."""
    for k in range(10_000):
        candidate = path if k == 0 else path.with_name(f"{path.name}-{k}")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free name like {path}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data`: a temp file beside it, fsynced, renamed over it, and the folder fsynced."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:  # the file's own mode, or a plain file's for a new one (not mkstemp's 0600)
        os.fchmod(fd, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
