"""Atomic file writes: a crash mid-write leaves the previous version intact.

Write to a temporary file in the same directory, fsync it, then rename over the target
(rename is atomic within a filesystem on POSIX).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

from sdrun.errors import UserError
from sdrun.rundir import read_jsonl

_UMASK = os.umask(0)
os.umask(_UMASK)


class OutputError(UserError, OSError):
    """An output could not be written (full disk, permissions); the previous version is intact."""


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    try:
        _atomic_write(path, write)
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"could not write {path}: {e.strerror or e}; "
                          f"its previous version, if any, is intact") from e


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_json(path: str | Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def append_jsonl(path: str | Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rewrite_jsonl(path: str | Path, keep: Callable[[dict], bool]) -> None:
    """Atomically keep only the records for which keep(record) is true (no-op if absent). A torn
    last line (a process killed while appending it) goes too, as sdrun.rundir.read_jsonl drops it."""
    path = Path(path)
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [record for record in read_jsonl(path) if keep(record)]
    if len(kept) != len(lines):  # written as append_jsonl writes them
        atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
