"""The shape in which every data set reaches the harness."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Split:
    """Flattened inputs scaled to [0, 1] and integer labels, on the CPU."""

    X: torch.Tensor  # (N, d) float32
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class DatasetSplits:
    """Train and validation splits, and a test split that is handed out only on request.

    The test split is read through `test()` so that callers which must never see it (tuning)
    can be checked: `test_reads` counts the calls.
    """

    name: str
    n_classes: int
    image_shape: tuple[int, ...]  # e.g. (28, 28); d == prod(image_shape)
    train: Split
    val: Split
    _test: Split = field(repr=False)
    test_reads: int = 0

    def test(self) -> Split:
        """Return the held-out test split (counted in `test_reads`)."""
        self.test_reads += 1
        return self._test

    @property
    def n_features(self) -> int:
        return int(self.train.X.shape[1])
