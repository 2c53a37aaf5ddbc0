"""Interrupted, killed and concurrent runs: nothing finished is lost, nothing left RUNNING."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTED_BENCH = [sys.executable, "-m", "tests.bench_with_scripted"]


def _rows(results_dir: Path) -> list[dict[str, str]]:
    path = results_dir / "results.csv"
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _start(args: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    return subprocess.Popen([*SCRIPTED_BENCH, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(predicate, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


def _mlflow_runs(results_dir: Path) -> list:  # type: ignore[type-arg]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results_dir / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(exps))


def test_sigint_keeps_finished_runs_marks_the_current_killed_and_resume_skips(
    results_dir: Path,
) -> None:
    def args(scripted_epochs: int) -> list[str]:
        return ["run", "--methods", "elm,scripted", "--dataset", "digits",
                "--set", "elm.hidden=64", "--set", "scripted.sleep=2",
                "--set", f"scripted.epochs={scripted_epochs}", "--results", str(results_dir)]

    proc = _start(args(100))
    try:
        _wait_for(lambda: any(r["method"] == "elm" for r in _rows(results_dir)))
        time.sleep(1.0)  # let the scripted run start its first epoch
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    rows = _rows(results_dir)
    assert [(r["method"], r["status"]) for r in rows] == [
        ("elm", "FINISHED"), ("scripted", "KILLED")]
    statuses = sorted(r.info.status for r in _mlflow_runs(results_dir))
    assert statuses == ["FINISHED", "KILLED"]

    # --resume skips the finished elm run and runs the killed one again.
    resumed = subprocess.run(
        [*SCRIPTED_BENCH, *args(100), "--resume", "--time-budget", "0.001"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resume: 1 finished run(s) skipped, 1 to run" in resumed.stderr
    assert [(r["method"], r["status"]) for r in _rows(results_dir)] == [
        ("elm", "FINISHED"), ("scripted", "KILLED"), ("scripted", "FINISHED")]


def test_sigkill_leaves_a_whole_table_and_the_next_run_fails_the_orphan(
    results_dir: Path,
) -> None:
    proc = _start(["run", "--methods", "scripted", "--dataset", "digits", "--set",
                   "scripted.sleep=5", "--set", "scripted.epochs=100",
                   "--results", str(results_dir)])
    try:
        _wait_for(lambda: any(r.info.status == "RUNNING" for r in _mlflow_runs(results_dir)))
    finally:
        proc.kill()
        proc.wait(30)
    assert _rows(results_dir) == []  # nothing half-written

    again = subprocess.run(
        [*SCRIPTED_BENCH, "run", "--methods", "scripted", "--dataset", "digits",
         "--set", "scripted.epochs=1", "--results", str(results_dir)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    runs = _mlflow_runs(results_dir)
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    orphan = next(r for r in runs if r.info.status == "FAILED")
    assert orphan.data.tags["error"] == "orphaned: its process died"


@pytest.mark.slow
def test_two_processes_share_one_results_folder(results_dir: Path) -> None:
    args = ["run", "--methods", "elm,rf-ridge,scripted", "--dataset", "digits",
            "--set", "elm.hidden=64", "--set", "rf-ridge.features=64", "--seeds", "2",
            "--results", str(results_dir)]
    procs = [_start(args) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    rows = _rows(results_dir)
    assert len(rows) == 12 and {r["status"] for r in rows} == {"FINISHED"}
    runs = _mlflow_runs(results_dir)
    assert len(runs) == 12 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r["run_id"] for r in rows}) == 12


def test_closed_form_solves_run_at_highest_matmul_precision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from protobench.datasets import load_splits
    from protobench.harness.runner import RunConfig, plan_runs, resolve_device, run_one
    from protobench.methods import ridge

    seen: list[str] = []
    real = ridge._cholesky

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(torch.get_float32_matmul_precision())
        return real(*args, **kwargs)

    monkeypatch.setattr(ridge, "_cholesky", spy)
    torch.set_float32_matmul_precision("medium")  # a caller's setting must not leak in
    try:
        splits = load_splits("digits")
        plans = plan_runs(["elm", "proto-pinv-h"], RunConfig("digits", epochs=1),
                          {"elm": {"hidden": 32}})
        results = [run_one(p, splits, resolve_device("cpu")) for p in plans]
        assert torch.get_float32_matmul_precision() == "medium"  # restored afterwards
    finally:
        torch.set_float32_matmul_precision("highest")
    assert [r.status for r in results] == ["FINISHED", "FINISHED"]
    assert seen and set(seen) == {"highest"}
    assert {r.environment["matmul_precision"] for r in results} == {"highest"}


def test_paths_with_spaces_and_unicode_work(tmp_path: Path, mlflow_template: Path) -> None:
    import shutil

    results = tmp_path / "résultats du banc ü"
    data = tmp_path / "données à lire"
    results.mkdir()
    shutil.copy(mlflow_template, results / "mlflow.db")
    debian = Path("/usr/share/datasets/fashion-mnist")
    if not debian.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (set-up installs it)")
    done = subprocess.run(
        [*SCRIPTED_BENCH, "run", "--methods", "elm", "--dataset", "fashion-mnist",
         "--set", "elm.hidden=32", "--data-dir", str(data), "--results", str(results)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (data / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()
    assert [r["status"] for r in _rows(results)] == ["FINISHED"]
