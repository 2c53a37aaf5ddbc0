"""Records: MLflow keys, the tidy table under concurrent writers, and the MLflow recorder."""

from __future__ import annotations

import csv
import math
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from protobench.datasets.base import DatasetSplits
from protobench.errors import ResultsError
from protobench.harness.runner import RunConfig, plan_runs, run_benchmark
from protobench.results.names import mlflow_key
from protobench.results.recorder import Recorder, prepare_results_dir
from protobench.results.table import append_rows, read_rows
from tests.conftest import ScriptedMethod


def test_mlflow_keys_are_sanitised_without_collisions() -> None:
    assert mlflow_key("proto-pinv-h.lam1") == "proto-pinv-h.lam1"
    a, b = mlflow_key("a+b"), mlflow_key("a*b")
    assert a != b and a.startswith("a_b-") and b.startswith("a_b-")
    assert all(c.isalnum() or c in "_-. :/" for c in a)


def _append_many(path: str, worker: int) -> None:
    for i in range(20):
        append_rows(Path(path), [{"worker": worker, "i": i, "payload": "x" * 200}])


def test_concurrent_appends_lose_and_interleave_nothing(tmp_path: Path) -> None:
    table = tmp_path / "results.csv"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(table), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    rows = read_rows(table)
    assert sorted((int(r["worker"]), int(r["i"])) for r in rows) == [
        (w, i) for w in range(3) for i in range(20)
    ]
    assert all(r["payload"] == "x" * 200 for r in rows)
    assert not list(tmp_path.glob(".results.csv.*"))  # no temporary files left behind


def test_table_widens_its_header_for_new_columns(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    append_rows(table, [{"a": 1}])
    append_rows(table, [{"a": 2, "b": 0.5}])
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [{"a": "1", "b": ""}, {"a": "2", "b": "0.5"}]


def test_unwritable_results_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ResultsError, match="results folder .* is not writable"):
        prepare_results_dir(blocker / "sub")


def test_recorder_writes_runs_to_a_real_mlflow_store_and_the_table(
    scripted: type[ScriptedMethod], tiny_splits: DatasetSplits, results_dir: Path
) -> None:
    from mlflow.tracking import MlflowClient

    recorder = Recorder(results_dir)
    cfg = RunConfig("tiny", repeats=2, target=0.5)
    ok = plan_runs(["scripted"], cfg, {})
    bad = plan_runs(["scripted"], RunConfig("tiny"), {"scripted": {"fail": "raise"}})
    results = run_benchmark(ok + bad, observers=[recorder], splits=tiny_splits)
    assert [r.status for r in results] == ["FINISHED", "FINISHED", "FAILED"]

    client = MlflowClient(recorder.tracking_uri)
    exp = client.get_experiment_by_name("protobench-tiny")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "FINISHED"]
    done = next(r for r in runs if r.info.status == "FINISHED")
    assert done.data.metrics["trainable_params"] == 7
    assert done.data.params["hp.gain"] == "0.2"
    assert "time_fit_s" in done.data.metrics and "time_warmup_s" in done.data.metrics
    assert "env.torch" in done.data.tags and done.data.tags["env.matmul_precision"] == "highest"
    curve = client.get_metric_history(done.info.run_id, "curve_val_accuracy")
    assert [m.step for m in curve] == [1, 2, 3, 4, 5]
    assert len(client.get_metric_history(done.info.run_id, "diag_cond")) == 5
    failed = next(r for r in runs if r.info.status == "FAILED")
    assert "scripted failure inside fit" in failed.data.tags["error"]

    rows = read_rows(recorder.table_path)
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED", "FAILED"]
    assert math.isclose(float(rows[0]["test_accuracy"]), results[0].test_accuracy)


def test_recorder_marks_runs_of_dead_processes_failed(results_dir: Path) -> None:
    recorder = Recorder(results_dir)
    exp = recorder.experiment_id("tiny")
    import socket

    run = recorder.client.create_run(exp, tags={"host": socket.gethostname(), "pid": "999999"})
    assert recorder.mark_orphans() == 1
    assert recorder.client.get_run(run.info.run_id).info.status == "FAILED"


def test_non_finite_metrics_are_flagged_not_logged(
    scripted: type[ScriptedMethod], tiny_splits: DatasetSplits, results_dir: Path
) -> None:
    recorder = Recorder(results_dir)
    plans = plan_runs(["scripted"], RunConfig("tiny", score_test=False), {})
    [result] = run_benchmark(plans, observers=[recorder], splits=tiny_splits)
    run = recorder.client.get_run(result.run_id)
    assert "test_accuracy" not in run.data.metrics
    assert "test_accuracy" in run.data.tags["non_finite_metrics"]
    assert torch.isfinite(torch.tensor(run.data.metrics["val_accuracy"]))
