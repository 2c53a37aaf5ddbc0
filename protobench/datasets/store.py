"""The raw folder on disk: checking what is there, and writing verified files into it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from protobench.datasets import idx
from protobench.datasets.catalog import RAW_FILES, RAW_PAIRS, RawSpec
from protobench.errors import DataError

logger = logging.getLogger(__name__)

STAMP_NAME = ".protobench-verified.json"
# A stamp is trusted only for files whose times lie this far in the past when it is written,
# so that a change made within one tick of the file system clock cannot hide behind it.
STAMP_MIN_AGE_NS = 2_000_000_000
_CHUNK = 1 << 20


@dataclass
class FolderState:
    """What the raw folder holds: verified files, missing ones, and damaged ones with reasons."""

    raw_dir: Path
    ok: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)


def md5_of_file(path: Path) -> str:
    """MD5 of a file's bytes, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def md5_of_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime is part of the key because nobody can set it back, unlike mtime.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_stamps(raw_dir: Path) -> dict[str, dict[str, object]]:
    try:
        loaded = json.loads((raw_dir / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _write_stamps(raw_dir: Path, stamps: dict[str, dict[str, object]]) -> None:
    try:
        write_atomic(raw_dir / STAMP_NAME, json.dumps(stamps, sort_keys=True).encode())
    except OSError as exc:
        # A read-only shared folder still works; it is only verified in full on every load.
        logger.debug("could not record verified files in %s: %s", raw_dir, exc)


def shell_quote(text: str) -> str:
    """Single-quote for a POSIX shell, always, so pasted commands read the same every time."""
    return "'" + text.replace("'", "'\"'\"'") + "'"


def unreadable(kind: str, path: Path, exc: OSError) -> DataError:
    """The error for a data folder or file (`kind`) that exists but cannot be read."""
    if isinstance(exc, PermissionError):
        mode = "u+rwx" if kind == "folder" else "u+rw"
        return DataError(
            f"cannot read data {kind} {path}: permission denied; "
            f"repair: chmod {mode} {shell_quote(str(path))} (or use another --data-dir)"
        )
    return DataError(f"cannot read data {kind} {path}: {exc.strerror or exc}")


def list_dir(path: Path) -> list[str]:
    """Names in a folder; one that exists but cannot be read is a DataError naming it."""
    try:
        return os.listdir(path)
    except FileNotFoundError:
        raise
    except NotADirectoryError:
        raise DataError(f"data folder {path} is not a folder") from None
    except OSError as exc:
        raise unreadable("folder", path, exc) from None


def _check_file(
    spec: RawSpec, path: Path, stamps: dict[str, dict[str, object]], now_ns: int
) -> idx.IdxHeader:
    """Check one raw file on disk; raise IdxFormatError with the reason if it is damaged."""
    name = path.name
    try:
        with path.open("rb") as handle:
            head = handle.read(idx.MAX_HEADER_SIZE)
            st = os.fstat(handle.fileno())
    except (FileNotFoundError, IsADirectoryError):
        raise  # missing, or damaged: inspect_folder sorts these
    except OSError as exc:
        raise unreadable("file", path, exc) from None
    header = idx.parse_header(head, idx.magic_for(name))
    idx.check_layout(header, st.st_size, spec.image_shape)
    expected = spec.md5[name]
    stamp = stamps.get(name)
    if stamp == {"key": _stat_key(st), "md5": expected}:
        return header
    try:
        found = md5_of_file(path)
    except OSError as exc:
        raise unreadable("file", path, exc) from None
    if found != expected:
        raise idx.IdxFormatError(f"md5 {found}, expected {expected}")
    if now_ns - max(st.st_mtime_ns, st.st_ctime_ns) > STAMP_MIN_AGE_NS:
        stamps[name] = {"key": _stat_key(st), "md5": expected}
    else:
        stamps.pop(name, None)
    return header


def inspect_folder(spec: RawSpec, raw_dir: Path) -> FolderState:
    """Sort the raw files into verified, missing and damaged."""
    state = FolderState(raw_dir)
    try:
        present = set(list_dir(raw_dir))
    except FileNotFoundError:
        state.missing = list(RAW_FILES)
        return state
    stamps = _read_stamps(raw_dir)
    before = json.dumps(stamps, sort_keys=True)
    now_ns = time.time_ns()
    headers: dict[str, idx.IdxHeader] = {}
    for name in RAW_FILES:
        if name not in present:
            state.missing.append(name)
            continue
        try:
            headers[name] = _check_file(spec, raw_dir / name, stamps, now_ns)
        except idx.IdxFormatError as exc:
            stamps.pop(name, None)
            state.damaged[name] = str(exc)
        except FileNotFoundError:
            state.missing.append(name)
        except IsADirectoryError:
            state.damaged[name] = "is a folder, not a file"
    for images, labels in RAW_PAIRS:
        if images in headers and labels in headers:
            n_images, n_labels = headers[images].count, headers[labels].count
            if n_images != n_labels:
                state.damaged[images] = f"{n_images} images, but {labels} holds {n_labels} labels"
                state.damaged[labels] = f"{n_labels} labels, but {images} holds {n_images} images"
    state.ok = [n for n in RAW_FILES if n in headers and n not in state.damaged]
    if json.dumps(stamps, sort_keys=True) != before:
        _write_stamps(raw_dir, {n: s for n, s in stamps.items() if n in state.ok})
    return state


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see either nothing or all of it."""
    tmp = path.with_name(f".{path.name}.{os.urandom(8).hex()}.part")
    # os.open with 0o666 lets the umask decide the mode, as for any other file the user makes.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
