"""Per-method aggregates over seeds, as the accuracy protocol defines them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protobench.protocols.accuracy import (
    AccuracySummary,
    TimeSummary,
    summarise_accuracy,
    summarise_times,
)

if TYPE_CHECKING:
    from protobench.harness.runner import RunResult


@dataclass(frozen=True)
class MethodSummary:
    method: str
    runs: int
    finished: int
    test: AccuracySummary | None
    val: AccuracySummary | None
    fit: TimeSummary | None
    time_to_target: TimeSummary | None  # None when no target was set
    trainable_params: int
    stored_params: int
    errors: tuple[str, ...]
    cut: int


def summarise_results(results: Sequence[RunResult]) -> list[MethodSummary]:
    """One summary per method, in the order the methods first appear."""
    order: list[str] = []
    for r in results:
        if r.info.method not in order:
            order.append(r.info.method)
    summaries = []
    for method in order:
        runs = [r for r in results if r.info.method == method]
        ok = [r for r in runs if r.status == "FINISHED"]
        tests = [r.test_accuracy for r in ok if math.isfinite(r.test_accuracy)]
        vals = [r.val_accuracy for r in ok if math.isfinite(r.val_accuracy)]
        has_target = any(r.info.config.target is not None for r in ok)
        ttt = [math.inf if r.time_to_target is None else r.time_to_target for r in ok]
        summaries.append(MethodSummary(
            method=method,
            runs=len(runs),
            finished=len(ok),
            test=summarise_accuracy(tests) if tests else None,
            val=summarise_accuracy(vals) if vals else None,
            fit=summarise_times([r.fit_seconds for r in ok]) if ok else None,
            time_to_target=summarise_times(ttt) if ok and has_target else None,
            trainable_params=ok[0].trainable_params if ok else 0,
            stored_params=ok[0].stored_params if ok else 0,
            errors=tuple(r.error for r in runs if r.error),
            cut=sum(r.cut for r in ok),
        ))
    return summaries
