"""Stratified hold-out splits that are the same for a seed in every process."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from protobench.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)


def check_seed(split_seed: object) -> int:
    """A split seed must be a non-negative integer."""
    import numbers

    if isinstance(split_seed, bool) or not isinstance(split_seed, numbers.Integral):
        raise ConfigError(f"split_seed {split_seed!r} is not an integer; allowed: integers >= 0")
    if split_seed < 0:
        raise ConfigError(f"split_seed {split_seed!r} is negative; allowed: integers >= 0")
    return int(split_seed)


def class_quotas(counts: np.ndarray, size: int) -> np.ndarray:
    """Share `size` among classes in proportion to `counts`, each within one of its exact share.

    Largest remainders: every class gets the floor of its share, and the samples left over go
    to the classes with the largest fractional parts (ties to the lower class index).
    """
    import numpy as np

    total = int(counts.sum())
    exact = counts.astype(np.int64) * size  # share * total, kept in integers to stay exact
    quotas = exact // total
    left = size - int(quotas.sum())
    order = np.argsort(-(exact % total), kind="stable")
    quotas[order[:left]] += 1
    return quotas


def stratified_split(
    labels: np.ndarray, sizes: Sequence[int], seed: int
) -> tuple[np.ndarray, ...]:
    """Indices of the rest and of each hold-out of the given sizes, in that order, each sorted.

    Hold-outs are drawn one after another from what is left, each stratified by label.
    """
    import numpy as np

    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if any(s < 0 for s in sizes) or sum(sizes) > labels.shape[0]:
        raise ValueError(f"hold-out sizes {list(sizes)} do not fit {labels.shape[0]} samples")
    rng = np.random.default_rng(seed)
    rest = np.arange(labels.shape[0])
    holdouts: list[np.ndarray] = []
    for size in sizes:
        classes, counts = np.unique(labels[rest], return_counts=True)
        quotas = class_quotas(counts, size)
        chosen = [
            rng.permutation(rest[labels[rest] == c])[:q]
            for c, q in zip(classes, quotas, strict=True)
        ]
        picked = np.sort(np.concatenate(chosen)) if chosen else rest[:0]
        holdouts.append(picked)
        rest = np.setdiff1d(rest, picked, assume_unique=True)
    return (rest, *holdouts)
