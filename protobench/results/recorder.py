"""Records runs in MLflow (one run per method, dataset and seed) and in the tidy table.

Runs are logged through explicit run ids with `MlflowClient`, never through MLflow's global
"active run", so several runs (or threads) can be recorded side by side. Each MLflow run is
created when its fit starts, so a process killed mid-run leaves a RUNNING record that the next
invocation marks FAILED instead of a silent gap.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protobench.errors import ResultsError
from protobench.results.names import mlflow_key, sqlite_url
from protobench.results.table import TABLE_NAME, append_rows

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from protobench.harness.runner import RunInfo, RunResult

logger = logging.getLogger(__name__)

DEFAULT_RESULTS_DIR = Path("bench-results")
STORE_NAME = "mlflow.db"
ARTIFACTS_NAME = "artifacts"
_MAX_PARAM_CHARS = 6000
# Ends a parameter value cut to fit MLflow; the whole value is in the run's params.json.
TRUNCATION_MARK = " ...(whole value in params.json)"
_BATCH = 100


def prepare_results_dir(path: Path) -> Path:
    """Create the results folder and check it is writable; a clear error otherwise."""
    path = path.expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as exc:
        raise ResultsError(
            f"results folder {str(path)!r} is not writable: {exc.strerror or exc}"
        ) from None
    return path


def local_tracking_uri(results_dir: Path) -> str:
    return sqlite_url(results_dir / STORE_NAME)


def tracking_uri_for(results_dir: Path, tracking_uri: str | None) -> str:
    """The MLflow store: an explicit URI, else MLFLOW_TRACKING_URI, else the local SQLite file."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(
        results_dir
    )


def _quiet_mlflow() -> None:
    # MLflow's SQLite store logs every schema migration at INFO on first use.
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # With a tracking server, MLflow writes two "View run at" lines to stdout per ended run.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class Recorder:
    """An observer of the runner that writes each run to MLflow and to the results table."""

    def __init__(
        self, results_dir: Path, tracking_uri: str | None = None, table_name: str = TABLE_NAME
    ) -> None:
        from mlflow.tracking import MlflowClient

        _quiet_mlflow()
        self.results_dir = prepare_results_dir(results_dir)
        self.tracking_uri = tracking_uri_for(self.results_dir, tracking_uri)
        self.table_path = self.results_dir / table_name
        try:
            self.client: MlflowClient = MlflowClient(tracking_uri=self.tracking_uri)
        except Exception as exc:
            raise ResultsError(
                f"cannot open the MLflow store {self.tracking_uri!r}: {exc}"
            ) from None
        self._experiments: dict[str, str] = {}
        self.results: list[RunResult] = []

    # The observer interface -------------------------------------------------------------

    def run_started(
        self, info: RunInfo, extra_tags: Mapping[str, str] | None = None
    ) -> str | None:
        """Create the run; `extra_tags` (e.g. a tuning trial's) are set in the same call."""
        experiment_id = self.experiment_id(info.dataset)
        tags = {
            "method": info.method,
            "dataset": info.dataset,
            "kind": "run",
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            **(extra_tags or {}),
        }
        run = self.client.create_run(
            experiment_id, run_name=f"{info.method}-seed{info.repeat}", tags=tags
        )
        return str(run.info.run_id)

    def run_progress(self, info: RunInfo, done: int, total: int, unit: str) -> None:
        """Progress is for the display only."""

    def run_finished(self, result: RunResult) -> None:
        self.results.append(result)
        if result.run_id is not None:
            self._log_run(result.run_id, result)
        append_rows(self.table_path, [result_row(result)])

    # Helpers ----------------------------------------------------------------------------

    def experiment_id(self, dataset: str) -> str:
        if dataset in self._experiments:
            return self._experiments[dataset]
        name = f"protobench-{dataset}"
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            exp_id = str(found.experiment_id)
        else:
            artifact_location = None
            if self.tracking_uri.startswith("sqlite:"):
                artifact_location = (self.results_dir / ARTIFACTS_NAME).resolve().as_uri()
            try:
                exp_id = self.client.create_experiment(name, artifact_location=artifact_location)
            except Exception:
                # Another process created it between our look-up and our create.
                again = self.client.get_experiment_by_name(name)
                if again is None:
                    raise
                exp_id = str(again.experiment_id)
        self._experiments[dataset] = exp_id
        return exp_id

    def _log_run(self, run_id: str, result: RunResult) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        params: list[Param] = []
        long_params: dict[str, str] = {}
        for key, value in run_params(result).items():
            text = str(value)
            if len(text) > _MAX_PARAM_CHARS:
                long_params[key] = text
                text = text[: _MAX_PARAM_CHARS - len(TRUNCATION_MARK)] + TRUNCATION_MARK
            params.append(Param(mlflow_key(key), text))
        metrics: list[Metric] = []
        non_finite: list[str] = []
        for key, value in run_metrics(result).items():
            if math.isfinite(value):
                metrics.append(Metric(mlflow_key(key), value, now, 0))
            else:
                non_finite.append(key)
        for point in result.curve:
            metrics.append(Metric("curve_val_accuracy", point.val_accuracy, now, point.epoch))
            metrics.append(Metric("curve_fit_seconds", point.fit_seconds, now, point.epoch))
        for epoch, diag in result.step_diagnostics:
            for key, value in diag.items():
                if math.isfinite(value):
                    metrics.append(Metric(mlflow_key(f"diag_{key}"), value, now, epoch))
        tags = [RunTag(mlflow_key(f"env.{k}"), v) for k, v in result.environment.items()]
        tags.append(RunTag("status", result.status))
        if result.error:
            tags.append(RunTag("error", result.error[:5000]))
        if non_finite:
            tags.append(RunTag("non_finite_metrics", ",".join(non_finite)))
        tags.append(RunTag("cut_by_budget", str(result.cut).lower()))
        for batch in _chunks(params, _BATCH):
            self.client.log_batch(run_id, params=batch)
        for batch in _chunks(tags, _BATCH):
            self.client.log_batch(run_id, tags=batch)
        for batch in _chunks(metrics, 1000):
            self.client.log_batch(run_id, metrics=batch)
        self.client.log_text(run_id, json.dumps(result.environment, indent=2),
                             "environment.json")
        if long_params:
            self.client.log_text(run_id, json.dumps(long_params, indent=2), "params.json")
        self._log_artifacts(run_id, result)
        self.client.set_terminated(run_id, result.status)

    def _log_artifacts(self, run_id: str, result: RunResult) -> None:
        """The method's inspection files under `inspection/`, listed in a tag; a store that
        refuses them costs the pictures, never the run's record."""
        import tempfile

        from protobench.harness.artifacts import ARTIFACT_DIR, ARTIFACTS_TAG

        error = result.artifact_error
        if result.artifacts:
            try:
                with tempfile.TemporaryDirectory(prefix="protobench-artifacts-") as tmp:
                    for name, data in result.artifacts.items():
                        (Path(tmp) / name).write_bytes(data)
                    self.client.log_artifacts(run_id, tmp, ARTIFACT_DIR)
                self.client.set_tag(run_id, ARTIFACTS_TAG, ",".join(sorted(result.artifacts)))
            except Exception as exc:
                error = f"cannot store them: {type(exc).__name__}: {exc}"
                logger.warning("run %s: inspection artifacts not stored: %s", run_id, error)
        if error:
            self.client.set_tag(run_id, "artifact_error", error[:5000])

    def mark_orphans(self) -> int:
        """Mark FAILED the RUNNING runs of this host whose process no longer exists."""
        host = socket.gethostname()
        count = 0
        experiments = self.client.search_experiments()
        ids = [e.experiment_id for e in experiments if e.name.startswith("protobench-")]
        if not ids:
            return 0
        runs = self.client.search_runs(
            ids, filter_string=f"attributes.status = 'RUNNING' and tags.host = '{host}'"
        )
        for run in runs:
            pid = int(run.data.tags.get("pid", "0") or 0)
            if pid and pid != os.getpid() and not process_alive(pid):
                self.client.set_tag(run.info.run_id, "error", "orphaned: its process died")
                self.client.set_terminated(run.info.run_id, "FAILED")
                logger.warning("run %s of a dead process (pid %d) marked FAILED",
                               run.info.run_id, pid)
                count += 1
        return count


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (signal 0 probes without harm)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run_params(result: RunResult) -> dict[str, Any]:
    """Parameters of a run: the method's hyperparameters and the invocation's rules."""
    info, cfg = result.info, result.info.config
    params: dict[str, Any] = {f"hp.{k}": v for k, v in info.params.items()}
    params.update({
        "method": info.method, "dataset": info.dataset, "repeat": info.repeat,
        "seed": info.seed, "base_seed": cfg.base_seed, "device": cfg.device,
        "epochs": cfg.epochs, "time_budget": cfg.time_budget, "target": cfg.target,
        "eval_every": cfg.eval_every, "threads": result.environment.get("threads", ""),
        "eval_batch": cfg.eval_batch,
    })
    return params


def run_metrics(result: RunResult) -> dict[str, float]:
    """Scalar figures of a run, each under a stable key."""
    metrics: dict[str, float] = {
        "test_accuracy": result.test_accuracy,
        "val_accuracy": result.val_accuracy,
        "trainable_params": float(result.trainable_params),
        "stored_params": float(result.stored_params),
        "inference_throughput": result.inference_throughput,
        "peak_memory_mb": result.peak_memory_mb,
    }
    for phase, seconds in result.phases.items():
        metrics[f"time_{phase}_s"] = seconds
    if result.info.config.target is not None:
        ttt = result.time_to_target
        metrics["time_to_target_s"] = math.inf if ttt is None else ttt
    for key, value in result.diagnostics.items():
        metrics[f"diag_{key}"] = value
    return metrics


def result_row(result: RunResult) -> dict[str, Any]:
    """One tidy row of the results table."""
    info = result.info
    row: dict[str, Any] = {
        "run_id": result.run_id or "",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": info.method,
        "dataset": info.dataset,
        "repeat": info.repeat,
        "seed": info.seed,
        "status": result.status,
        "error": result.error,
        "device": result.environment.get("device", info.config.device),
        "test_accuracy": result.test_accuracy,
        "val_accuracy": result.val_accuracy,
        "fit_seconds": result.fit_seconds,
        "target": info.config.target,
        "time_to_target_s": result.time_to_target,
        "cut_by_budget": result.cut,
        "trainable_params": result.trainable_params,
        "stored_params": result.stored_params,
        "inference_throughput": result.inference_throughput,
        "peak_memory_mb": result.peak_memory_mb,
    }
    for phase, seconds in result.phases.items():
        row[f"time_{phase}_s"] = seconds
    row["params"] = json.dumps(info.params, sort_keys=True)
    row["git_commit"] = result.environment.get("git_commit", "")
    return row


def finished_run_keys(table_path: Path) -> set[tuple[str, str, str, str]]:
    """(method, dataset, seed, params) of every FINISHED run in the results table."""
    from protobench.results.table import read_rows

    return {
        (row["method"], row["dataset"], row["seed"], row.get("params", ""))
        for row in read_rows(table_path)
        if row.get("status") == "FINISHED"
    }


def run_key(info: RunInfo) -> tuple[str, str, str, str]:
    """The key under which `finished_run_keys` finds a planned run."""
    return (info.method, info.dataset, str(info.seed), json.dumps(info.params, sort_keys=True))
