"""Pareto fronts: the points no other point beats in every objective at once."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)


def pareto_front(points: Any, maximize: Sequence[bool] = (True, False)) -> list[int]:
    """Indices (ascending) of the non-dominated rows of `points`, an (n, k) array-like.

    Objective j is maximised where `maximize[j]` is true and minimised otherwise. A point
    dominates another when it is at least as good in every objective and strictly better in
    one, so two points equal in every objective do not dominate each other: both stay on the
    front. A row with a NaN in any objective is neither on the front nor dominates anything;
    infinities compare as usual (an unreached time of +inf loses to every finite time).
    """
    import numpy as np

    arr = np.asarray(points, dtype=float)
    if arr.ndim == 1 and arr.size == 0:
        return []
    if arr.ndim != 2:
        raise ValueError(f"points must be an (n, k) array, got shape {arr.shape}")
    n, k = arr.shape
    if len(maximize) != k:
        raise ValueError(f"maximize has {len(maximize)} entries for {k} objectives")
    if n == 0:
        return []
    # Turn every objective into one to maximise.
    signs = np.where(np.asarray(maximize, dtype=bool), 1.0, -1.0)
    scores = arr * signs
    valid = ~np.isnan(scores).any(axis=1)
    candidates = scores[valid]
    index = np.flatnonzero(valid)
    front: list[int] = []
    for row, original in zip(candidates, index, strict=True):
        at_least = (candidates >= row).all(axis=1)
        better = (candidates > row).any(axis=1)
        if not bool((at_least & better).any()):
            front.append(int(original))
    return front
