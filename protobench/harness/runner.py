"""The runner: one path that every method takes, from splits to a recorded result.

The runner asks the data set for its splits, starts the protocol's clock, hands the plugin a
context whose checkpoint pauses that clock to evaluate, and passes what was measured to its
observers (the recorder, the progress display). A plugin that raises, or that returns scores of
the wrong shape or non-finite scores, yields a FAILED result; the next method still runs. Once a
run is scored and its peak memory read, the plugin's inspection artifacts (`Method.artifacts`)
are encoded into files for the recorder, outside every timed phase; a failure there is logged
and kept in `RunResult.artifact_error`, never fatal.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from protobench.errors import ConfigError, ProtobenchError
from protobench.harness.api import FitData, Method
from protobench.harness.context import RunContext
from protobench.harness.registry import get_method
from protobench.protocols.accuracy import run_seed
from protobench.protocols.timing import (
    Clock,
    CurvePoint,
    PhaseTimes,
    Stopwatch,
    device_sync,
    time_to_target,
)

if TYPE_CHECKING:
    import torch

    from protobench.datasets.base import DatasetSplits, Split

logger = logging.getLogger(__name__)

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


class MethodFaultError(ProtobenchError):
    """A plugin broke the contract (wrong output shape, non-finite scores)."""


@dataclass(frozen=True)
class RunConfig:
    """How every method of one invocation is run; the same rules for all of them."""

    dataset: str
    device: str = "auto"
    base_seed: int = 0
    repeats: int = 1
    epochs: int | None = None
    time_budget: float | None = None
    target: float | None = None
    eval_every: int = 1
    threads: int | None = None
    eval_batch: int = 10_000
    score_test: bool = True
    # Keep the plugin's inspection artifacts (`Method.artifacts`) with each run; tuning trials
    # do not (megabytes per trial, and no report draws them).
    keep_artifacts: bool = True

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.repeats < 1:
            raise ConfigError(f"--seeds must be >= 1, got {self.repeats}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ConfigError(f"--time-budget must be > 0 seconds, got {self.time_budget}")
        if self.target is not None and not 0 < self.target <= 1:
            raise ConfigError(f"--target must be an accuracy in (0, 1], got {self.target}")
        if self.eval_every < 1:
            raise ConfigError(f"--eval-every must be >= 1, got {self.eval_every}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class RunInfo:
    """Identifies one run: a (method, dataset, repeat) with its derived seed and parameters."""

    method: str
    dataset: str
    repeat: int
    seed: int
    params: dict[str, Any]
    config: RunConfig


@dataclass
class RunResult:
    info: RunInfo
    status: str = FINISHED
    error: str = ""
    test_accuracy: float = math.nan
    val_accuracy: float = math.nan
    phases: dict[str, float] = field(default_factory=dict)
    curve: list[CurvePoint] = field(default_factory=list)
    time_to_target: float | None = None
    cut: bool = False
    trainable_params: int = 0
    stored_params: int = 0
    inference_throughput: float = math.nan
    peak_memory_mb: float = math.nan
    memory_kind: str = ""
    diagnostics: dict[str, float] = field(default_factory=dict)
    step_diagnostics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    # {file name: bytes} of the method's inspection artifacts; why none, if they failed.
    artifacts: dict[str, bytes] = field(default_factory=dict)
    artifact_error: str = ""

    @property
    def fit_seconds(self) -> float:
        return self.phases.get("fit", math.nan)


class RunObserver(Protocol):
    """Told when runs start, progress and end (the recorder, the progress display)."""

    def run_started(self, info: RunInfo) -> str | None: ...

    def run_progress(self, info: RunInfo, done: int, total: int, unit: str) -> None: ...

    def run_finished(self, result: RunResult) -> None: ...


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is a clear error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for, but no CUDA device is available; use cpu")
    return torch.device(name)


@contextmanager
def pinned_numerics(threads: int | None) -> Iterator[int]:
    """Pin the thread count and float32 matmul precision 'highest' for the run, then restore.

    TF32 rounds float32 products on recent GPUs; closed-form solves need full precision.
    """
    import torch

    old_threads = torch.get_num_threads()
    old_precision = torch.get_float32_matmul_precision()
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    torch.set_float32_matmul_precision("highest")
    try:
        yield n
    finally:
        torch.set_num_threads(old_threads)
        torch.set_float32_matmul_precision(old_precision)


def method_params(
    name: str, overrides: Mapping[str, Any], epochs: int | None
) -> dict[str, Any]:
    """Validated hyperparameters of `name`: defaults, `--epochs`, then `--set` overrides."""
    cls = get_method(name)
    given: dict[str, Any] = {}
    if epochs is not None and any(p.name == "epochs" for p in cls.hyperparams):
        given["epochs"] = epochs
    given.update(overrides)
    return cls.check_params(given)


def evaluate(method: Method, split: Split, device: torch.device, batch: int, n_classes: int
             ) -> float:
    """Accuracy of `method` on `split`, predicting in batches under inference mode."""
    import torch

    correct = 0
    n = len(split)
    with torch.inference_mode():
        for start in range(0, n, batch):
            X = split.X[start:start + batch].to(device, non_blocking=True)
            scores = method.predict(X)
            _check_scores(method, scores, X.shape[0], n_classes)
            pred = scores.argmax(dim=1).cpu()
            correct += int((pred == split.y[start:start + batch]).sum())
    return correct / n if n else math.nan


def _check_scores(method: Method, scores: Any, n: int, k: int) -> None:
    import torch

    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (n, k):
        shape = tuple(scores.shape) if hasattr(scores, "shape") else type(scores).__name__
        raise MethodFaultError(
            f"plugin {method.name!r} returned predictions of shape {shape}, expected {(n, k)}"
        )
    if not bool(torch.isfinite(scores).all()):
        raise MethodFaultError(f"plugin {method.name!r} returned non-finite scores (NaN or inf)")


class _Observers:
    def __init__(self, observers: Sequence[RunObserver]) -> None:
        self._observers = list(observers)

    def started(self, info: RunInfo) -> str | None:
        run_id = None
        for obs in self._observers:
            run_id = obs.run_started(info) or run_id
        return run_id

    def progress(self, info: RunInfo, done: int, total: int, unit: str) -> None:
        for obs in self._observers:
            obs.run_progress(info, done, total, unit)

    def finished(self, result: RunResult) -> None:
        for obs in self._observers:
            obs.run_finished(result)

    def checkpoint(self, info: RunInfo, point: CurvePoint) -> bool:
        # Optional hook `run_checkpoint(info, point) -> bool`: True stops the fit (pruning).
        hooks = [getattr(obs, "run_checkpoint", None) for obs in self._observers]
        return any([hook(info, point) for hook in hooks if hook is not None])


def run_one(
    info: RunInfo,
    splits: DatasetSplits,
    device: torch.device,
    observers: Sequence[RunObserver] = (),
    clock: Clock | None = None,
    data_load_seconds: float = 0.0,
) -> RunResult:
    """Run one method once under the timing and accuracy protocols."""
    from protobench.protocols.environment import environment_record
    from protobench.protocols.memory import peak_kind, peak_megabytes, reset_peak

    obs = _Observers(observers)
    clock = clock or Clock(sync=device_sync(device))
    result = RunResult(info=info)
    result.run_id = obs.started(info)
    phases = PhaseTimes(clock)
    phases.add("data_load", data_load_seconds)
    try:
        with pinned_numerics(info.config.threads):
            result.environment = environment_record(device)
            reset_peak(device)
            method, data = _fit_and_score(info, splits, device, clock, phases, result, obs)
            result.peak_memory_mb = peak_megabytes(device)
            result.memory_kind = peak_kind(device)
            # Untimed and after the peak memory is read: pictures cost the run nothing.
            if info.config.keep_artifacts:
                _collect_artifacts(method, data, result)
    except KeyboardInterrupt:
        result.status, result.error = KILLED, "interrupted by the user"
        result.phases = dict(phases.seconds)
        obs.finished(result)
        raise
    except Exception as exc:  # a plugin's failure must not stop the other methods
        result.status = FAILED
        result.error = f"{info.method}: {type(exc).__name__}: {exc}"
        logger.error("run %s failed: %s", info.method, result.error)
        logger.debug("traceback:\n%s", traceback.format_exc())
    result.phases = dict(phases.seconds)
    obs.finished(result)
    return result


def _fit_and_score(
    info: RunInfo,
    splits: DatasetSplits,
    device: torch.device,
    clock: Clock,
    phases: PhaseTimes,
    result: RunResult,
    obs: _Observers,
) -> tuple[Method, FitData]:
    cfg = info.config
    k = splits.n_classes

    # Train rows move to the device as part of loading the data.
    with phases.phase("data_load"):
        data = FitData(
            X=splits.train.X.to(device), y=splits.train.y.to(device),
            n_classes=k, image_shape=splits.image_shape,
        )
    method = get_method(info.method)(info.params)
    fit_watch = Stopwatch(clock)
    last_eval_epoch: list[int] = []

    def on_checkpoint(epoch: int, diagnostics: Mapping[str, float]) -> bool:
        # The fit clock is paused while the harness evaluates.
        fit_watch.stop()
        if diagnostics:
            result.step_diagnostics.append((epoch, dict(diagnostics)))
        if epoch % cfg.eval_every == 0:
            with phases.phase("evaluation"):
                acc = evaluate(method, splits.val, device, cfg.eval_batch, k)
            result.curve.append(CurvePoint(epoch, fit_watch.elapsed(), acc))
            last_eval_epoch[:] = [epoch]
            if obs.checkpoint(info, result.curve[-1]):
                return True
        over_budget = cfg.time_budget is not None and fit_watch.elapsed() >= cfg.time_budget
        if over_budget and method.iterative:
            result.cut = True
            return True
        fit_watch.start()
        return False

    def on_progress(done: int, total: int, unit: str) -> None:
        obs.progress(info, done, total, unit)

    ctx = RunContext(device, info.seed, on_checkpoint, on_progress)
    with phases.phase("preprocess"):
        method.prepare(data, ctx)
    with phases.phase("warmup"):
        _warm_torch_runtime(device)
        method.warmup(data, ctx)
    fit_watch.start()
    method.fit(data, ctx)
    phases.add("fit", fit_watch.stop())

    # Final validation score: reuse the last checkpoint only if nothing changed since.
    if result.curve and ctx.checkpoints and last_eval_epoch == [ctx.checkpoints[-1]]:
        result.val_accuracy = result.curve[-1].val_accuracy
    else:
        with phases.phase("evaluation"):
            result.val_accuracy = evaluate(method, splits.val, device, cfg.eval_batch, k)
        epoch = ctx.checkpoints[-1] if ctx.checkpoints else 1
        result.curve.append(CurvePoint(epoch, phases.seconds["fit"], result.val_accuracy))
    if cfg.target is not None:
        result.time_to_target = time_to_target(result.curve, cfg.target)
    result.trainable_params = int(method.trainable_parameters())
    result.stored_params = int(method.stored_parameters())
    result.diagnostics = {k_: float(v) for k_, v in method.summary_diagnostics().items()}

    # The test split leaves the data module only here, for the final score.
    if cfg.score_test:
        test = splits.test()
        with phases.phase("inference"):
            result.test_accuracy = evaluate(method, test, device, cfg.eval_batch, k)
        seconds = phases.seconds["inference"]
        result.inference_throughput = len(test) / seconds if seconds > 0 else math.inf
    return method, data


@functools.cache
def _warm_torch_runtime(device: torch.device) -> None:
    """Pay, once per process and device and before any fit clock, what torch defers to its
    first optimizer: building one imports its compiler stack (1.8 s measured on this CPU),
    which the first method of an invocation would otherwise be charged for."""
    import torch

    weight = torch.zeros(2, device=device, requires_grad=True)
    weight.grad = torch.zeros_like(weight)
    fused = True if device.type in ("cpu", "cuda") else None
    torch.optim.AdamW([weight], lr=1e-3, fused=fused).step()


def _collect_artifacts(method: Method, data: FitData, result: RunResult) -> None:
    """The method's inspection artifacts as files; a failure is logged, never fatal."""
    from protobench.harness.artifacts import encode_artifacts

    try:
        result.artifacts = encode_artifacts(method.artifacts(data))
    except Exception as exc:  # a picture that cannot be drawn must not fail a scored run
        result.artifact_error = f"{type(exc).__name__}: {exc}"
        logger.warning("run %s: inspection artifacts not kept: %s", result.info.method,
                       result.artifact_error)
        logger.debug("traceback:\n%s", traceback.format_exc())


def plan_runs(
    methods: Sequence[str],
    config: RunConfig,
    overrides: Mapping[str, Mapping[str, Any]],
) -> list[RunInfo]:
    """Every (method, repeat) of an invocation, with validated parameters and derived seeds."""
    unknown = sorted(set(overrides) - set(methods))
    if unknown:
        raise ConfigError(
            f"--set names method {unknown[0]!r}, which is not among the methods being run "
            f"({', '.join(methods)})"
        )
    plans: list[RunInfo] = []
    for name in methods:
        params = method_params(name, overrides.get(name, {}), config.epochs)
        for repeat in range(config.repeats):
            seed = run_seed(config.base_seed, config.dataset, name, repeat)
            plans.append(RunInfo(name, config.dataset, repeat, seed, params, config))
    return plans


def run_benchmark(
    plans: Sequence[RunInfo],
    data_dir: Any = None,
    observers: Sequence[RunObserver] = (),
    splits: DatasetSplits | None = None,
) -> list[RunResult]:
    """Load the data set once (timed) and run every plan in order."""
    import time

    from protobench.datasets import load_splits

    if not plans:
        return []
    config = plans[0].config
    device = resolve_device(config.device)
    load_seconds = 0.0
    if splits is None:
        start = time.perf_counter()
        splits = load_splits(config.dataset, data_dir)
        load_seconds = time.perf_counter() - start
    logger.info("data set %s ready in %.2f s on %s", config.dataset, load_seconds, device)
    return [
        run_one(info, splits, device, observers, data_load_seconds=load_seconds)
        for info in plans
    ]
