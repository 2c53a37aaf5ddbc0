"""The contract between the harness and a method plugin.

A plugin receives tensors, a device, a seed, its hyperparameters and a context through which it
reports checkpoints and progress. It never reads a clock, never logs to a tracker and never sees
the test split: the harness decides what is timed and what is recorded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from protobench.harness.params import HyperParam, resolve_params

if TYPE_CHECKING:
    import torch

    from protobench.harness.artifacts import Artifact


@dataclass(frozen=True)
class FitData:
    """Training rows on the run's device; the validation split stays with the harness."""

    X: torch.Tensor  # (N, d) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64
    n_classes: int
    image_shape: tuple[int, ...]

    @property
    def n_samples(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    def check(self) -> None:
        """Refuse rows a method cannot learn from: none at all, non-finite values, labels
        that are not whole numbers in [0, n_classes). The harness's data sets always pass;
        this is for data handed to a plugin directly."""
        import torch

        from protobench.errors import DataError

        if self.X.ndim != 2 or self.y.shape != (self.X.shape[0],):
            raise DataError(f"training data needs X (N, d) and y (N,), got X "
                            f"{tuple(self.X.shape)} and y {tuple(self.y.shape)}")
        if self.n_samples == 0:
            raise DataError("training data has no rows")
        if not bool(torch.isfinite(self.X).all()):
            raise DataError("training rows X contain NaN or inf")
        if self.y.dtype.is_floating_point or self.y.dtype == torch.bool:
            raise DataError(f"labels y must be whole numbers, got dtype {self.y.dtype}")
        low, high = int(self.y.min()), int(self.y.max())
        if low < 0 or high >= self.n_classes:
            raise DataError(f"labels y must lie in [0, n_classes = {self.n_classes}), "
                            f"got {low}..{high}")


class FitContext(Protocol):
    """What the harness offers a plugin while it fits."""

    @property
    def device(self) -> torch.device: ...

    @property
    def seed(self) -> int: ...

    def generator(self, stream: str = "") -> torch.Generator:
        """A CPU generator seeded from the run's seed and `stream`; draw on CPU, then move."""
        ...

    def checkpoint(self, epoch: int, diagnostics: Mapping[str, float] | None = None) -> bool:
        """Report the end of an epoch; the harness may pause the clock and evaluate.

        Returns True when the run must stop now (its time budget is spent).
        """
        ...

    def progress(self, done: int, total: int, unit: str = "epoch") -> None:
        """Report progress for display only."""
        ...


class Method(ABC):
    """Base class of every method plugin.

    Subclasses set `name`, `summary` and `hyperparams`, and implement `fit`, `predict` and the two
    parameter counts. `prepare` (e.g. fitting a projection) is timed as its own phase; `warmup`
    runs once before the fit clock starts and its cost is reported apart.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    hyperparams: ClassVar[tuple[HyperParam, ...]]
    iterative: ClassVar[bool] = True

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params: dict[str, Any] = resolve_params(self.name, self.hyperparams, params or {})

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Validate `params` against the declarations without building the method."""
        return resolve_params(cls.name, cls.hyperparams, params)

    def prepare(self, data: FitData, ctx: FitContext) -> None:  # noqa: B027 - optional hook
        """Untimed-by-fit preprocessing such as a projection fitted on train (own phase)."""

    def warmup(self, data: FitData, ctx: FitContext) -> None:  # noqa: B027 - optional hook
        """One throw-away step that pays one-off costs (allocation, kernel selection)."""

    @abstractmethod
    def fit(self, data: FitData, ctx: FitContext) -> None:
        """Train; call `ctx.checkpoint(epoch)` after each epoch and stop when it returns True."""

    @abstractmethod
    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """Class scores (N, n_classes) for inputs (N, d) on the run's device."""

    @abstractmethod
    def trainable_parameters(self) -> int:
        """Number of values the training procedure optimises."""

    @abstractmethod
    def stored_parameters(self) -> int:
        """Number of values inference needs to keep."""

    def summary_diagnostics(self) -> dict[str, float]:
        """Final figures the method wants recorded with the run (e.g. worst condition number)."""
        return {}

    def artifacts(self, data: FitData) -> Mapping[str, Artifact]:
        """Pictures and arrays to keep with the run (see `protobench.harness.artifacts`).

        Called once the run is scored, with every clock stopped and the peak memory read, so
        drawing costs the run nothing it reports. `data` is the training data of the fit.
        """
        return {}
