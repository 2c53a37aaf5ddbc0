"""The accuracy protocol: derived seeds, one budget rule for all, statistics over seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from protobench.harness.seeding import derive_seed


def run_seed(base_seed: int, dataset: str, method: str, repeat: int) -> int:
    """The seed of repeat `repeat` of `method` on `dataset`; the same in every invocation."""
    return derive_seed(base_seed, dataset, method, repeat)


@dataclass(frozen=True)
class AccuracySummary:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for a single run
    ci95: float  # half-width of the 95% confidence interval of the mean (Student t)


@dataclass(frozen=True)
class TimeSummary:
    median: float
    q1: float
    q3: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def summarise_accuracy(values: Sequence[float]) -> AccuracySummary:
    """Mean, sample std and 95% CI half-width; non-finite values are refused."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarise_accuracy needs at least one value")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"accuracies must be finite, got {vals}")
    n = len(vals)
    mean = statistics.fmean(vals)
    if n == 1:
        return AccuracySummary(1, mean, 0.0, math.nan)
    std = statistics.stdev(vals)
    from scipy.stats import t

    half = float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return AccuracySummary(n, mean, std, half)


def summarise_times(values: Sequence[float]) -> TimeSummary:
    """Median and quartiles; infinite values (a target never reached) sort last."""
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("summarise_times needs at least one value")
    return TimeSummary(_quantile(vals, 0.5), _quantile(vals, 0.25), _quantile(vals, 0.75))


def _quantile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolation quantile that keeps inf when the position lands on it."""
    pos = (len(sorted_vals) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    if lo == hi or sorted_vals[lo] == sorted_vals[hi]:
        return sorted_vals[lo]
    if math.isinf(sorted_vals[hi]):
        return math.inf
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)
