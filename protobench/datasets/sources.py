"""Places the raw files of MNIST and Fashion-MNIST can come from, each failing fast."""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from protobench.datasets.catalog import RawSpec

logger = logging.getLogger(__name__)

# Bounds on what one source may hand over, well above the largest real file (47 MB).
MAX_DOWNLOAD_BYTES = 64 << 20
MAX_RAW_BYTES = 64 << 20
CONNECT_READ_TIMEOUT_S = 10.0
DOWNLOAD_DEADLINE_S = 300.0

Opener = Callable[[str, float], bytes]
"""Fetch a URL with a per-operation timeout in seconds and return the body."""


class SourceError(Exception):
    """A source could not provide the files; the message is a one-line reason."""


class Source(Protocol):
    """Something that can hand over raw files (uncompressed bytes) by name."""

    label: str

    def provide(self, spec: RawSpec, names: Sequence[str], workdir: Path) -> dict[str, bytes]:
        """Return the bytes of each named raw file, unverified, or raise SourceError."""
        ...


def one_line(exc: BaseException) -> str:
    """A short single-line description of an exception."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, SourceError) else text


def gunzip(data: bytes, limit: int = MAX_RAW_BYTES) -> bytes:
    """Decompress gzip bytes, refusing output above `limit` and truncated or trailing input."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise SourceError(f"not valid gzip data ({exc})") from None
    if len(out) > limit:
        raise SourceError(f"decompresses to more than {limit} bytes")
    if not inflater.eof:
        raise SourceError("gzip data is truncated")
    if inflater.unused_data:
        raise SourceError("gzip data has bytes after its end")
    return out


class DebianSource:
    """The .gz files a Debian package installs under /usr/share/datasets."""

    label = "debian package"

    def __init__(self, folder: Path | None = None) -> None:
        self._folder = folder

    def provide(self, spec: RawSpec, names: Sequence[str], workdir: Path) -> dict[str, bytes]:
        folder = self._folder or spec.debian_dir
        if folder is None:
            raise SourceError(f"no Debian package ships {spec.name}")
        if not folder.is_dir():
            hint = f" (apt-get install {spec.debian_package})" if spec.debian_package else ""
            raise SourceError(f"{folder} not found{hint}")
        got: dict[str, bytes] = {}
        for name in names:
            path = folder / f"{name}.gz"
            try:
                packed = path.read_bytes()
            except OSError as exc:
                raise SourceError(f"{path}: {exc.strerror or exc}") from None
            try:
                got[name] = gunzip(packed)
            except SourceError as exc:
                raise SourceError(f"{path}: {exc}") from None
        return got


def urlopen_bytes(
    url: str,
    timeout: float,
    *,
    deadline: float = DOWNLOAD_DEADLINE_S,
    limit: int = MAX_DOWNLOAD_BYTES,
) -> bytes:
    """GET a http(s) URL; `timeout` bounds the connect and each read, `deadline` the whole.

    The request runs in a worker thread so that the deadline holds in every phase, also
    against a server that sends its headers or body a byte at a time (each read then returns
    within `timeout`, so no per-read timeout ever fires). A worker past the deadline is told
    to stop and exits at its next read.
    """
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"only http and https URLs are fetched, not {url!r}")
    done: list[bytes] = []
    failed: list[BaseException] = []
    cancel = threading.Event()

    def work() -> None:
        try:
            done.append(_download(url, timeout, limit, cancel))
        except BaseException as exc:  # handed to the caller's thread below
            failed.append(exc)

    worker = threading.Thread(target=work, name=f"protobench download {url}", daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        cancel.set()
        raise TimeoutError(f"download took longer than {deadline:g} s")
    if failed:
        raise failed[0]
    return done[0]


def _download(url: str, timeout: float, limit: int, cancel: threading.Event) -> bytes:
    import urllib.request

    chunks: list[bytes] = []
    total = 0
    # A fresh opener reads the proxy settings now; urlopen's shared one keeps its first ones.
    opener = urllib.request.build_opener()
    with opener.open(url, timeout=timeout) as response:
        # read1 returns after one read of the socket, so `cancel` is seen within `timeout`.
        while not cancel.is_set() and (chunk := response.read1(1 << 20)):
            total += len(chunk)
            if total > limit:
                raise ValueError(f"response is larger than {limit} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


class MirrorSource:
    """Download mirrors for the data set (the catalog's copy of torchvision's), in order."""

    label = "torchvision mirrors"

    def __init__(
        self,
        mirrors: Sequence[str] | None = None,
        opener: Opener | None = None,
        timeout: float = CONNECT_READ_TIMEOUT_S,
    ) -> None:
        self._mirrors = list(mirrors) if mirrors is not None else None
        self._opener = opener or urlopen_bytes
        self._timeout = timeout

    def provide(self, spec: RawSpec, names: Sequence[str], workdir: Path) -> dict[str, bytes]:
        import http.client

        mirrors = self._mirrors if self._mirrors is not None else list(spec.mirrors)
        if not mirrors:
            raise SourceError(f"no mirrors known for {spec.name}")
        failures: list[str] = []
        for mirror in mirrors:
            base = mirror if mirror.endswith("/") else f"{mirror}/"
            got: dict[str, bytes] = {}
            for name in names:
                url = f"{base}{name}.gz"
                started = time.monotonic()
                try:
                    got[name] = gunzip(self._opener(url, self._timeout))
                except (OSError, ValueError, EOFError, http.client.HTTPException) as exc:
                    failures.append(f"{url}: {one_line(exc)}")
                except SourceError as exc:
                    failures.append(f"{url}: {exc}")
                else:
                    logger.info("fetched %s in %.1f s", url, time.monotonic() - started)
                    continue
                # A mirror that failed one file is likely down, and asking it for the others
                # could cost the full timeout each time.
                break
            else:
                return got
        raise SourceError(", ".join(failures))
