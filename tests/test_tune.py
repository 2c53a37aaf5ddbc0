"""`bench tune`: Optuna studies over the validation split, resumable, logged to MLflow."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from click.testing import CliRunner

from protobench.datasets.base import DatasetSplits, Split
from protobench.errors import ConfigError
from protobench.harness import registry
from protobench.harness.api import FitContext, FitData
from protobench.harness.params import HyperParam
from protobench.harness.tuning import (
    TuneConfig,
    fail_dead_trials,
    load_best_params,
    open_storage,
    parse_fixed,
    parse_grid,
    reap,
    search_space,
    storage_url,
    tune,
)
from tests.conftest import ScriptedMethod, make_split


class TunableScripted(ScriptedMethod):
    """The scripted double with search ranges, a parameter count and an optional sleep."""

    name: ClassVar[str] = "scripted-tune"
    hyperparams: ClassVar[tuple[HyperParam, ...]] = (
        HyperParam("epochs", "int", 4, "epochs", low=1, high=100),
        HyperParam("gain", "float", 0.2, "skill per epoch", low=0, high=1,
                   search=(0.01, 0.5), log=True),
        HyperParam("width", "int", 8, "reported trainable parameters", low=1, high=64,
                   search=(1, 64)),
        HyperParam("mode", "choice", "a", "an inert choice", choices=("a", "b"),
                   search=("a", "b")),
        HyperParam("fail", "choice", "none", "fault to inject",
                   choices=("none", "raise", "shape", "nan")),
        HyperParam("sleep", "float", 0.0, "wall seconds per epoch", low=0, high=60),
    )

    def fit(self, data: FitData, ctx: FitContext) -> None:
        if self.params["fail"] == "raise":
            raise RuntimeError("scripted failure inside fit")
        for epoch in range(1, self.params["epochs"] + 1):
            time.sleep(self.params["sleep"])
            self.skill = min(1.0, self.skill + self.params["gain"])
            ctx.progress(epoch, self.params["epochs"])
            if ctx.checkpoint(epoch):
                return

    def trainable_parameters(self) -> int:
        return int(self.params["width"])


def tune_worker(kw: dict[str, Any]) -> None:
    """A separate tuning process: registers the double and tunes on tiny splits."""
    registry.register(TunableScripted)
    splits = DatasetSplits(name="tiny", n_classes=3, image_shape=(2, 2), train=make_split(60, 1),
                           val=make_split(100, 2), _test=make_split(100, 3))
    outcome = tune(TuneConfig(**kw), splits=splits)
    sys.exit(0 if outcome.ok and splits.test_reads == 0 else 1)


@pytest.fixture(scope="module")
def processes() -> Any:
    """Starts real processes from a server that imported torch, MLflow and Optuna once."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "optuna", "mlflow.tracking", "tests.test_tune"])
    return ctx


@pytest.fixture
def tunable() -> Iterator[type[TunableScripted]]:
    registry.register(TunableScripted)
    try:
        yield TunableScripted
    finally:
        registry.unregister(TunableScripted.name)


def _config(results_dir: Path, **kw: Any) -> TuneConfig:
    base: dict[str, Any] = {
        "method": "scripted-tune", "dataset": "tiny", "trials": 3, "results_dir": results_dir,
        "device": "cpu", "seed": 0,
    }
    base.update(kw)
    return TuneConfig(**base)


def _study(results_dir: Path, name: str) -> Any:
    import optuna

    return optuna.load_study(study_name=name, storage=storage_url(None, results_dir))


def _mlflow_runs(results_dir: Path, dataset: str) -> tuple[list[Any], list[Any]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"protobench-{dataset}")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    children = [r for r in runs if r.data.tags.get("kind") == "trial"]
    return parents, children


def _worker(ctx: Any, results_dir: Path, **kw: Any) -> Any:
    config = {"method": "scripted-tune", "dataset": "tiny", "device": "cpu",
              "results_dir": results_dir, **kw}
    process = ctx.Process(target=tune_worker, args=(config,))
    process.start()
    return process


# Configuration ---------------------------------------------------------------------------


def test_search_space_comes_from_declared_ranges(tunable: type[TunableScripted]) -> None:
    dims = {d.name: d for d in search_space("scripted-tune")}
    assert set(dims) == {"gain", "width", "mode"}
    assert dims["gain"].kind == "float" and dims["gain"].log
    assert dims["width"].kind == "int" and (dims["width"].low, dims["width"].high) == (1, 64)
    assert dims["mode"].choices == ("a", "b")
    assert {d.name for d in search_space("scripted-tune", {"gain"})} == {"width", "mode"}
    grid = search_space("scripted-tune", (), {"gain": ["0.1", "0.1", "0.3"]})
    assert [(d.name, d.choices) for d in grid] == [("gain", (0.1, 0.3))]


def test_user_errors_name_the_parameter_and_allowed_values(
    tunable: type[TunableScripted], tiny_splits: DatasetSplits, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"scripted-tune\.gain must be in \[0, 1\], got 7"):
        tune(_config(tmp_path, fixed={"gain": "7"}), splits=tiny_splits)
    with pytest.raises(ConfigError, match="unknown hyperparameter scripted-tune.nope"):
        tune(_config(tmp_path, fixed={"nope": "1"}), splits=tiny_splits)
    with pytest.raises(ConfigError, match=r"--set expects KEY=VALUE"):
        parse_fixed("elm", ["lam"])
    with pytest.raises(ConfigError, match="--grid needs --sampler grid"):
        _config(tmp_path, grid=parse_grid("scripted-tune", ["gain=0.1,0.2"]), sampler="tpe")
    with pytest.raises(ConfigError, match="--objective must be one of accuracy, pareto"):
        _config(tmp_path, objective="speed")
    with pytest.raises(ConfigError, match="both fixed by --set and varied by --grid"):
        search_space("scripted-tune", {"gain"}, {"gain": ["0.1"]})
    with pytest.raises(ConfigError, match="--storage must be an Optuna storage URL"):
        storage_url("study.txt", tmp_path)
    assert storage_url("journal:j.log", tmp_path).startswith("journal:/")
    assert storage_url(str(tmp_path / "x.log"), tmp_path) == f"journal:{tmp_path / 'x.log'}"
    notes = _config(tmp_path, objective="pareto", pruner="median").notes()
    assert notes and "pruning is off for --objective pareto" in notes[0]


# One process -----------------------------------------------------------------------------


def test_tuning_never_reads_test_fixes_set_values_and_prunes_mid_fit(
    tunable: type[TunableScripted], tiny_splits: DatasetSplits, results_dir: Path
) -> None:
    config = _config(results_dir, trials=6, fixed={"width": "5", "epochs": "6"},
                     prune_startup_trials=2)
    outcome = tune(config, splits=tiny_splits)

    assert tiny_splits.test_reads == 0
    study = _study(results_dir, config.study_name)
    trials = study.get_trials()
    assert {t.user_attrs["params"]["width"] for t in trials} == {5}
    assert all("width" not in t.params and "epochs" not in t.params for t in trials)
    assert len({t.params["gain"] for t in trials}) == len(trials)  # gain is varied
    assert outcome.counts["COMPLETE"] == 6 and outcome.ok
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned, "the median pruner should stop some low-gain trials"
    assert all(max(t.intermediate_values) < 6 for t in pruned)  # stopped before the last epoch
    _, children = _mlflow_runs(results_dir, "tiny")
    states = {c.data.tags["trial"]: c.data.tags["state"] for c in children}
    assert states == {str(t.number): t.state.name for t in trials}
    assert all(c.data.metrics.get("test_accuracy") is None for c in children)

    best = json.loads(outcome.best_params_path.read_text())  # type: ignore[union-attr]
    assert best["method"] == "scripted-tune" and best["params"]["width"] == 5
    assert best["trial"] == study.best_trial.number
    assert load_best_params(config.study_name, results_dir) == ("scripted-tune", best["params"])
    assert load_best_params(str(outcome.best_params_path), results_dir)[1] == best["params"]
    with pytest.raises(ConfigError, match="no study 'nope'"):
        load_best_params("nope", results_dir)


def test_nan_objective_is_failed_with_its_params_and_reason(
    tunable: type[TunableScripted], results_dir: Path
) -> None:
    empty_val = DatasetSplits(
        name="tiny", n_classes=3, image_shape=(2, 2), train=make_split(60, 1),
        val=Split(X=torch.zeros(0, 4), y=torch.zeros(0, dtype=torch.long)),
        _test=make_split(10, 3),
    )
    outcome = tune(_config(results_dir, trials=2, max_failures=2), splits=empty_val)

    assert not outcome.ok and outcome.counts == {"FAIL": 2}
    assert "2 trials in a row failed" in outcome.stop_reason
    for failure in outcome.failures:
        assert failure.reason == "objective is not finite (val_accuracy=nan)"
        assert set(failure.params) >= {"gain", "width", "mode", "epochs"}
    study = _study(results_dir, "scripted-tune-tiny-accuracy")
    assert all(t.user_attrs["fail_reason"].startswith("objective is not finite")
               for t in study.trials)
    _, children = _mlflow_runs(results_dir, "tiny")
    assert {(c.info.status, c.data.tags["state"]) for c in children} == {("FAILED", "FAIL")}


def test_all_failed_study_ends_with_a_summary_and_exit_status_1(
    tunable: type[TunableScripted], results_dir: Path
) -> None:
    from protobench.cli import main

    result = CliRunner().invoke(main, [
        "tune", "--method", "scripted-tune", "--dataset", "digits", "--trials", "3",
        "--set", "fail=raise", "--max-failures", "2", "--results", str(results_dir),
        "--device", "cpu",
    ])
    assert result.exit_code == 1, result.output
    assert "no completed trial" in result.output
    assert "RuntimeError: scripted failure inside fit" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_cli_user_error_is_one_line_and_status_2(
    tunable: type[TunableScripted], tmp_path: Path
) -> None:
    from protobench.cli import main

    result = CliRunner().invoke(main, [
        "tune", "--method", "scripted-tune", "--dataset", "digits", "--set", "gain=2",
        "--results", str(tmp_path),
    ])
    assert result.exit_code == 2
    assert "error: scripted-tune.gain must be in [0, 1], got 2" in result.output


def test_pareto_objective_gives_the_front(
    tunable: type[TunableScripted], tiny_splits: DatasetSplits, results_dir: Path
) -> None:
    config = _config(results_dir, trials=6, objective="pareto", sampler="random",
                     fixed={"epochs": "2"})
    outcome = tune(config, splits=tiny_splits)

    study = _study(results_dir, config.study_name)
    assert len(study.directions) == 3
    assert {s.number for s in outcome.best} == {t.number for t in study.best_trials}
    assert outcome.counts == {"COMPLETE": 6}  # pruning is off for pareto
    doc = json.loads(outcome.best_params_path.read_text())  # type: ignore[union-attr]
    assert {m["trial"] for m in doc["front"]} == {t.number for t in study.best_trials}
    assert set(doc["front"][0]["values"]) == {"val_accuracy", "fit_seconds", "trainable_params"}
    method, params = load_best_params(config.study_name, results_dir)
    assert method == "scripted-tune" and params == doc["params"]
    member = doc["front"][-1]
    assert load_best_params(f"{config.study_name}#{member['trial']}", results_dir)[1] == (
        member["params"])
    with pytest.raises(ConfigError, match="has no COMPLETE trial '99'"):
        load_best_params(f"{config.study_name}#99", results_dir)


def test_grid_visits_every_point_once_also_when_resumed(
    tunable: type[TunableScripted], tiny_splits: DatasetSplits, results_dir: Path
) -> None:
    grid = parse_grid("scripted-tune", ["gain=0.1,0.2,0.3", "mode=a,b"])
    first = tune(_config(results_dir, trials=2, grid=grid, fixed={"epochs": "1"}),
                 splits=tiny_splits)
    assert first.counts == {"COMPLETE": 2}
    second = tune(_config(results_dir, trials=None, grid=grid, fixed={"epochs": "1"}),
                  splits=tiny_splits)
    again = tune(_config(results_dir, trials=10, grid=grid, fixed={"epochs": "1"}),
                 splits=tiny_splits)

    assert again.new_trials == [] and "6-point grid" in again.stop_reason
    study = _study(results_dir, "scripted-tune-tiny-accuracy")
    points = [(t.params["gain"], t.params["mode"]) for t in study.trials]
    assert sorted(points) == sorted((g, m) for g in (0.1, 0.2, 0.3) for m in ("a", "b"))
    assert second.counts == {"COMPLETE": 6}

    # The same study over another grid, or by another sampler, is refused: one "best" over
    # two searches would mean nothing.
    other = parse_grid("scripted-tune", ["gain=0.1,0.4", "mode=a,b"])
    with pytest.raises(ConfigError, match=r"was tuned with --sampler grid --grid gain=0.1,0.2"):
        tune(_config(results_dir, trials=8, grid=other, fixed={"epochs": "1"}),
             splits=tiny_splits)
    with pytest.raises(ConfigError, match=r"not --sampler tpe; resume it with the same search"):
        tune(_config(results_dir, trials=8, fixed={"epochs": "1"}), splits=tiny_splits)

    # A store that holds tuning trials only still makes a report, with the grid's heat map.
    from protobench.results.recorder import tracking_uri_for
    from protobench.results.report import build_report

    paths = build_report(tracking_uri_for(results_dir, None), results_dir / "report",
                         formats="png,html")
    names = sorted(p.name for p in paths)
    assert "tiny_sensitivity_scripted-tune-tiny-accuracy.png" in names, names


def test_n_jobs_2_logs_one_parent_and_a_child_per_trial(
    tunable: type[TunableScripted], tiny_splits: DatasetSplits, results_dir: Path
) -> None:
    config = _config(results_dir, trials=4, n_jobs=2, pruner="none",
                     fixed={"sleep": "0.05", "epochs": "2"})
    outcome = tune(config, splits=tiny_splits)

    parents, children = _mlflow_runs(results_dir, "tiny")
    assert len(parents) == 1 and parents[0].info.run_id == outcome.parent_run_id
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 4 == outcome.counts["COMPLETE"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {outcome.parent_run_id}
    assert sorted(int(c.data.tags["trial"]) for c in children) == [0, 1, 2, 3]
    assert all("objective_val_accuracy" in c.data.metrics for c in children)
    assert all(c.data.params["hp.sleep"] == "0.05" for c in children)


def test_heartbeat_fails_a_silent_running_trial(tunable: type[TunableScripted],
                                                tmp_path: Path) -> None:
    import optuna

    storage = open_storage(storage_url(None, tmp_path), heartbeat=1)
    assert isinstance(storage, optuna.storages.RDBStorage)
    study = optuna.create_study(study_name="s", storage=storage)
    with pytest.warns(UserWarning, match="Heartbeat of storage is supposed to be used"):
        trial = study.ask()  # RUNNING, with no host or pid: only the heartbeat can fail it
    storage.record_heartbeat(trial._trial_id)
    time.sleep(3.5)  # the grace period is 2 heartbeats; SQLite's clock has whole seconds
    assert fail_dead_trials(study) == 1
    assert study.trials[0].state.name == "FAIL"


def test_a_retry_left_waiting_once_the_study_is_full_is_closed_with_its_reason(
    tmp_path: Path,
) -> None:
    import optuna

    study = optuna.create_study(storage=open_storage(storage_url(None, tmp_path)))
    for x in (1.0, 2.0):
        study.add_trial(optuna.trial.create_trial(
            params={"x": x}, distributions={"x": optuna.distributions.FloatDistribution(0, 9)},
            value=x))
    retry = optuna.trial.create_trial(
        params={"x": 3.0}, distributions={"x": optuna.distributions.FloatDistribution(0, 9)},
        state=optuna.trial.TrialState.WAITING, system_attrs={"failed_trial": 0})
    study.add_trial(retry)
    study.enqueue_trial({"x": 4.0})  # a user's own queued trial is never touched

    assert reap(study, retry_dead=1, target=3) == 0
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "WAITING", "WAITING"]

    assert reap(study, retry_dead=1, target=2) == 0
    closed, queued = study.trials[2], study.trials[3]
    assert closed.state.name == "FAIL"
    assert "retry of trial 0 that was not needed" in closed.user_attrs["fail_reason"]
    assert queued.state.name == "WAITING"


# Several processes -----------------------------------------------------------------------


@pytest.mark.slow
def test_resume_after_a_killed_worker_reaches_the_count(
    tunable: type[TunableScripted], tiny_splits: DatasetSplits, results_dir: Path,
    processes: Any,
) -> None:
    worker = _worker(processes, results_dir, trials=3, fixed={"sleep": 0.25}, heartbeat=1,
                     study="killed")
    db = results_dir / "optuna.db"
    deadline = time.monotonic() + 90
    states: list[str] = []
    # Kill it once a trial has completed and the next one is mid-fit (its params recorded).
    query = (
        "select t.state, a.key from trials t left join trial_user_attributes a "
        "on a.trial_id = t.trial_id and a.key = 'params'"
    )
    while time.monotonic() < deadline and worker.is_alive():
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=5) as con:
                    states = [f"{row[0]}:{row[1]}" for row in con.execute(query)]
            except sqlite3.OperationalError:
                states = []
        if "COMPLETE:params" in states and "RUNNING:params" in states:
            break
        time.sleep(0.1)
    assert worker.is_alive(), f"the worker ended first (exit code {worker.exitcode})"
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()

    config = _config(results_dir, trials=3, study="killed", heartbeat=1)
    outcome = tune(config, splits=tiny_splits)

    study = _study(results_dir, "killed")
    by_state: dict[str, list[Any]] = {}
    for t in study.trials:
        by_state.setdefault(t.state.name, []).append(t)
    assert "RUNNING" not in by_state and "WAITING" not in by_state
    assert len(by_state["COMPLETE"]) == 3 and outcome.ok
    (killed,) = by_state["FAIL"]
    assert "died mid-trial" in killed.user_attrs["fail_reason"]
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params
    assert outcome.reaped == 1
    _, children = _mlflow_runs(results_dir, "tiny")
    assert not [c for c in children if c.info.status == "RUNNING"]


@pytest.mark.slow
def test_four_processes_share_one_sqlite_study(results_dir: Path, processes: Any) -> None:
    workers = [
        _worker(processes, results_dir, trials=6, study="shared", fixed={"sleep": 0.02},
                seed=i)
        for i in range(4)
    ]
    for worker in workers:
        worker.join(timeout=240)

    # A "database is locked" error would have ended a worker with a traceback and status 1.
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    study = _study(results_dir, "shared")
    states = [t.state.name for t in study.trials]
    assert set(states) <= {"COMPLETE", "PRUNED"} and states.count("COMPLETE") >= 6
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) >= 2  # shared work
    assert states.count("COMPLETE") <= 9  # each other worker may finish one trial past it
    parents, children = _mlflow_runs(results_dir, "tiny")
    assert len(parents) == 1
    assert sorted(int(c.data.tags["trial"]) for c in children) == sorted(
        t.number for t in study.trials)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
