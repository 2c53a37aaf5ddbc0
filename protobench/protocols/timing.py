"""The timing protocol: one clock, phases timed apart, evaluation kept outside the fit time.

Every reading of the clock first synchronises the device when it runs asynchronously (CUDA), so
queued GPU work is counted where it was issued rather than where it happens to finish. Both the
time source and the synchronisation are injectable, which is how the tests check the rules with a
fake clock and a fake device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PHASES = ("data_load", "preprocess", "warmup", "fit", "evaluation", "inference")


def device_sync(device: torch.device) -> Callable[[], None] | None:
    """The call that waits for queued work on `device`, or None where work is synchronous."""
    if device.type == "cuda":
        import torch

        return lambda: torch.cuda.synchronize(device)
    return None


class Clock:
    """Monotonic seconds; synchronises the device before every reading when given a sync."""

    def __init__(
        self,
        now: Callable[[], float] = time.perf_counter,
        sync: Callable[[], None] | None = None,
    ) -> None:
        self._now = now
        self._sync = sync

    def read(self) -> float:
        if self._sync is not None:
            self._sync()
        return self._now()


@dataclass
class Stopwatch:
    """Accumulates running time between start and stop, excluding paused intervals."""

    clock: Clock
    _elapsed: float = 0.0
    _since: float | None = None

    def start(self) -> None:
        if self._since is None:
            self._since = self.clock.read()

    def stop(self) -> float:
        if self._since is not None:
            self._elapsed += self.clock.read() - self._since
            self._since = None
        return self._elapsed

    @property
    def running(self) -> bool:
        return self._since is not None

    def elapsed(self) -> float:
        """Seconds so far; reads the clock only while running."""
        if self._since is None:
            return self._elapsed
        return self._elapsed + self.clock.read() - self._since


@dataclass
class PhaseTimes:
    """Seconds spent in each named phase of one run."""

    clock: Clock
    seconds: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}; phases: {', '.join(self.seconds)}")
        start = self.clock.read()
        try:
            yield
        finally:
            self.seconds[name] += self.clock.read() - start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds


@dataclass(frozen=True)
class CurvePoint:
    """One evaluation checkpoint: validation accuracy after `fit_seconds` of fit time."""

    epoch: int
    fit_seconds: float
    val_accuracy: float


def time_to_target(curve: list[CurvePoint], target: float) -> float | None:
    """Fit seconds at the first checkpoint whose validation accuracy reaches `target`."""
    for point in curve:
        if point.val_accuracy >= target:
            return point.fit_seconds
    return None
