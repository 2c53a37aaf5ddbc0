"""Shared fixtures: a tiny synthetic data set, a fake clock, and a scripted method."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from protobench.datasets.base import DatasetSplits, Split
from protobench.harness import registry
from protobench.harness.api import FitContext, FitData, Method
from protobench.harness.params import HyperParam


def make_split(n: int, seed: int) -> Split:
    """Rows whose column 0 holds the label and column 1 a uniform 'difficulty' in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    X = torch.zeros(n, 4)
    X[:, 0] = y.float()
    X[:, 1] = torch.rand(n, generator=g)
    return Split(X=X, y=y)


@pytest.fixture
def tiny_splits() -> DatasetSplits:
    return DatasetSplits(
        name="tiny", n_classes=3, image_shape=(2, 2),
        train=make_split(60, 1), val=make_split(100, 2), _test=make_split(100, 3),
    )


class FakeClock:
    """A clock the test moves by hand; counts readings and device synchronisations."""

    def __init__(self) -> None:
        self.t = 0.0
        self.reads = 0
        self.syncs = 0
        self.log: list[str] = []

    def now(self) -> float:
        self.reads += 1
        self.log.append("read")
        return self.t

    def sync(self) -> None:
        self.syncs += 1
        self.log.append("sync")

    def advance(self, seconds: float) -> None:
        self.t += seconds


class ScriptedMethod(Method):
    """A method whose cost and skill follow a script, to test what the harness measures.

    Each epoch costs `epoch_cost` fake seconds and raises the fraction of rows it predicts
    correctly by `gain`; `predict` costs `predict_cost`, `warmup` costs `warmup_cost`.
    """

    name: ClassVar[str] = "scripted"
    summary: ClassVar[str] = "test double"
    hyperparams: ClassVar[tuple[HyperParam, ...]] = (
        HyperParam("epochs", "int", 5, "epochs", low=1, high=100),
        HyperParam("gain", "float", 0.2, "skill gained per epoch", low=0, high=1),
        HyperParam("fail", "choice", "none", "fault to inject",
                   choices=("none", "raise", "shape", "nan")),
        HyperParam("sleep", "float", 0.0, "real seconds to sleep per epoch", low=0, high=600),
    )
    clock: FakeClock | None = None
    epoch_cost = 1.0
    predict_cost = 100.0
    warmup_cost = 5.0
    prepare_cost = 3.0

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.skill = 0.0
        self.epochs_run = 0
        self.k = 3

    def _spend(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.advance(seconds)

    def prepare(self, data: FitData, ctx: FitContext) -> None:
        self.k = data.n_classes
        self._spend(self.prepare_cost)

    def warmup(self, data: FitData, ctx: FitContext) -> None:
        self._spend(self.warmup_cost)

    def fit(self, data: FitData, ctx: FitContext) -> None:
        if self.params["fail"] == "raise":
            raise RuntimeError("scripted failure inside fit")
        for epoch in range(1, self.params["epochs"] + 1):
            self._spend(self.epoch_cost)
            if self.params["sleep"]:
                time.sleep(self.params["sleep"])
            self.skill = min(1.0, self.skill + self.params["gain"])
            self.epochs_run = epoch
            ctx.progress(epoch, self.params["epochs"])
            if ctx.checkpoint(epoch, {"cond": 10.0 * epoch}):
                return

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        self._spend(self.predict_cost)
        if self.params["fail"] == "shape":
            return torch.zeros(X.shape[0], 2)
        if self.params["fail"] == "nan":
            return torch.full((X.shape[0], self.k), float("nan"))
        labels = X[:, 0].long().clamp(0, self.k - 1)
        wrong = (labels + 1) % self.k
        pred = torch.where(X[:, 1] < self.skill, labels, wrong)
        return torch.nn.functional.one_hot(pred, self.k).float()

    def trainable_parameters(self) -> int:
        return 7

    def stored_parameters(self) -> int:
        return 9


@pytest.fixture
def scripted() -> Iterator[type[ScriptedMethod]]:
    registry.register(ScriptedMethod)
    try:
        yield ScriptedMethod
    finally:
        registry.unregister(ScriptedMethod.name)
        ScriptedMethod.clock = None


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, migrated once per session (migration takes ~10 s)."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow-template")
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    client.search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def results_dir(tmp_path: Path, mlflow_template: Path) -> Path:
    """A fresh results folder whose MLflow store starts as a copy of the migrated template."""
    folder = tmp_path / "results"
    folder.mkdir()
    shutil.copy(mlflow_template, folder / "mlflow.db")
    return folder


@pytest.fixture
def no_default_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any use of the default data sources (mirrors, PyPI) fail the test."""
    from protobench.datasets import fetching

    def refuse(spec: object) -> list[object]:
        raise AssertionError(f"a test reached the default sources for {spec}")

    monkeypatch.setattr(fetching, "default_sources", refuse)
