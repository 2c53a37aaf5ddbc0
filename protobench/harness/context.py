"""A concrete FitContext: seeds, device and callbacks, with no clock of its own.

The runner passes callbacks that pause the protocol's clock and evaluate; tests and notebooks can
use it bare to fit a method directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from protobench.harness.seeding import make_generator

if TYPE_CHECKING:
    import torch

CheckpointHook = Callable[[int, Mapping[str, float]], bool]
ProgressHook = Callable[[int, int, str], None]


class RunContext:
    """Implements `protobench.harness.api.FitContext`."""

    def __init__(
        self,
        device: torch.device,
        seed: int,
        on_checkpoint: CheckpointHook | None = None,
        on_progress: ProgressHook | None = None,
    ) -> None:
        self._device = device
        self._seed = seed
        self._on_checkpoint = on_checkpoint
        self._on_progress = on_progress
        self.checkpoints: list[int] = []
        self.diagnostics: list[dict[str, float]] = []

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def seed(self) -> int:
        return self._seed

    def generator(self, stream: str = "") -> torch.Generator:
        return make_generator(self._seed, stream)

    def checkpoint(self, epoch: int, diagnostics: Mapping[str, float] | None = None) -> bool:
        diag = dict(diagnostics or {})
        self.checkpoints.append(epoch)
        self.diagnostics.append(diag)
        if self._on_checkpoint is None:
            return False
        return self._on_checkpoint(epoch, diag)

    def progress(self, done: int, total: int, unit: str = "epoch") -> None:
        if self._on_progress is not None:
            self._on_progress(done, total, unit)
