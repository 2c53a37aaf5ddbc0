"""The tidy results table: one row per run, appended whole and atomically.

Several `bench run` processes may share a results folder, so each append takes an exclusive
lock, reads the table, and replaces it with a complete new file (written beside it, then
renamed): a reader never sees a half-written table, even after a SIGKILL mid-write.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TABLE_NAME = "results.csv"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path`.lock, held for the block."""
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def append_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append `rows` to the CSV table at `path`, widening the header if new columns appear."""
    if not rows:
        return
    with locked(path):
        existing = read_rows(path)
        columns: list[str] = list(existing[0].keys()) if existing else []
        for row in rows:
            columns += [c for c in row if c not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(existing)
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
        atomic_write_text(path, buffer.getvalue())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)
