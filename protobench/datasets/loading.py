"""Turning verified raw files into the train, validation and test splits the harness uses."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from protobench.datasets.base import DatasetSplits, Split
from protobench.datasets.catalog import RAW_SPECS, RawSpec, check_name
from protobench.datasets.fetching import digits_folder, fetch_raw
from protobench.datasets.splits import check_seed, stratified_split
from protobench.datasets.store import shell_quote, unreadable
from protobench.errors import DataIntegrityError

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

# The official 60,000 training images give 55,000 train and 5,000 validation: one in twelve.
VAL_PER_TRAIN = (5_000, 60_000)
DIGITS_VAL_FRACTION = 0.15
DIGITS_TEST_FRACTION = 0.2
DIGITS_FILE = "digits.csv.gz"
DIGITS_ROWS = 1797


def val_size(n_train: int) -> int:
    """Validation size carved from an official training set of `n_train` images."""
    num, den = VAL_PER_TRAIN
    return (n_train * num + den // 2) // den


def _check_no_legacy_cache(spec: RawSpec, root: Path) -> None:
    # torchvision prefers an old processed/ cache over the raw files, which would bypass
    # the MD5 check, so such a cache is refused instead of silently used.
    processed = root / spec.folder / "processed"
    legacy = [processed / f for f in ("training.pt", "test.pt")]
    if all(p.exists() for p in legacy):
        raise DataIntegrityError(
            f"{spec.name}: {processed} holds an old torchvision cache that would be read instead "
            f"of the verified raw files; repair: rm -r {shell_quote(str(processed))}"
        )


def _split(images: np.ndarray, labels: np.ndarray, index: np.ndarray, scale: float) -> Split:
    import numpy as np
    import torch

    rows = images[index].reshape(index.shape[0], -1)
    # numpy divides uint8 into float32 in one pass, several times faster than torch's
    # convert-then-divide, with bit-identical results.
    x = np.divide(rows, np.float32(scale), dtype=np.float32)
    return Split(X=torch.from_numpy(x), y=torch.from_numpy(labels[index].astype(np.int64)))


def load_idx_splits(
    spec: RawSpec, data_dir: Path | str | None = None, split_seed: int = 0
) -> DatasetSplits:
    """Load an idx data set through torchvision and split its training set once."""
    import numpy as np
    from torchvision import datasets

    raw_dir = fetch_raw(spec, data_dir)
    root = raw_dir.parent.parent
    _check_no_legacy_cache(spec, root)
    started = time.monotonic()
    cls = getattr(datasets, spec.folder)
    train = cls(str(root), train=True, download=False)
    test = cls(str(root), train=False, download=False)
    train_x, train_y = train.data.numpy(), train.targets.numpy()
    test_x, test_y = test.data.numpy(), test.targets.numpy()
    rest, val = stratified_split(train_y, [val_size(train_y.shape[0])], split_seed)
    splits = DatasetSplits(
        name=spec.name,
        n_classes=spec.n_classes,
        image_shape=spec.image_shape,
        train=_split(train_x, train_y, rest, 255.0),
        val=_split(train_x, train_y, val, 255.0),
        _test=_split(test_x, test_y, np.arange(test_y.shape[0]), 255.0),
    )
    logger.info(
        "%s: loaded %d/%d/%d in %.2f s",
        spec.name, len(splits.train), len(splits.val), test_y.shape[0],
        time.monotonic() - started,
    )  # fmt: skip
    return splits


def _digits_damaged(path: Path, why: str) -> DataIntegrityError:
    import sklearn

    # The file belongs to the scikit-learn install, so the repair reinstalls that version.
    repair = (f"{shell_quote(sys.executable)} -m pip install --force-reinstall --no-deps "
              f"scikit-learn=={sklearn.__version__}")
    return DataIntegrityError(f"digits data file is damaged: {path} ({why}); repair: {repair}")


def read_digits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits file: pixels (1797, 64) in 0..16 and labels (1797,) in 0..9.

    Read here rather than by `sklearn.datasets.load_digits` so that a damaged file is one
    line naming it and the repair, like every other data file.
    """
    import gzip
    import zlib

    import numpy as np

    from protobench.datasets.sources import one_line

    try:
        with gzip.open(path, "rt", encoding="ascii") as handle:
            table = np.loadtxt(handle, delimiter=",", ndmin=2)
    except PermissionError as exc:
        raise unreadable("file", path, exc) from None
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise _digits_damaged(path, one_line(exc)) from None
    if table.shape != (DIGITS_ROWS, 65):
        rows, cols = table.shape
        raise _digits_damaged(path, f"{rows} rows of {cols} values, expected {DIGITS_ROWS} of 65")
    if not np.array_equal(table, np.rint(table)) or table.min() < 0:
        raise _digits_damaged(path, "values other than whole numbers >= 0")
    if table[:, :64].max() > 16 or table[:, 64].max() > 9:
        raise _digits_damaged(path, "pixels above 16 or labels above 9")
    return table[:, :64].astype(np.uint8), table[:, 64].astype(np.int64)


def load_digits_splits(split_seed: int = 0) -> DatasetSplits:
    """scikit-learn's bundled 8x8 digits, with stratified validation and test hold-outs."""
    import numpy as np
    import torch

    pixels, labels = read_digits(digits_folder() / DIGITS_FILE)
    x = torch.from_numpy(np.divide(pixels, np.float32(16.0), dtype=np.float32))
    y = torch.from_numpy(labels)
    n = int(y.shape[0])
    n_test = round(n * DIGITS_TEST_FRACTION)
    n_val = round(n * DIGITS_VAL_FRACTION)
    rest, test, val = stratified_split(labels, [n_test, n_val], split_seed)

    def part(index: np.ndarray) -> Split:
        rows = torch.from_numpy(index)
        return Split(X=x.index_select(0, rows), y=y.index_select(0, rows))

    return DatasetSplits(
        name="digits",
        n_classes=10,
        image_shape=(8, 8),
        train=part(rest),
        val=part(val),
        _test=part(test),
    )


def load_splits(
    name: str, data_dir: Path | str | None = None, split_seed: int = 0
) -> DatasetSplits:
    """Train, validation and test splits of a data set, fetching its files on first use.

    Inputs are CPU float32, flattened and scaled to [0, 1]; labels are int64. The split is
    stratified and fixed by `split_seed`, so it is the same in every call and process.
    """
    name = check_name(name)
    seed = check_seed(split_seed)
    if name == "digits":
        return load_digits_splits(seed)
    return load_idx_splits(RAW_SPECS[name], data_dir, seed)
