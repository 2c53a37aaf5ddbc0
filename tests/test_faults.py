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
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python then keeps it ignored;
    # the child must react to Ctrl-C as it does in a terminal, however the tests were started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(predicate, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


def _mlflow_runs(results_dir: Path) -> list:  # type: ignore[type-arg]
    from mlflow.tracking import MlflowClient

    from protobench.results.names import sqlite_url

    client = MlflowClient(sqlite_url(results_dir / "mlflow.db"))
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


# A child that appends two rows, then dies by SIGKILL halfway through writing the third: every
# file it opens in the table's folder from then on writes half of what it is given and kills
# the process, whichever way the table code writes (in place, or beside it and renamed).
KILLED_MID_WRITE = """
import io, os, signal, sys
from pathlib import Path
from protobench.results.table import append_rows

table = Path(sys.argv[1])
append_rows(table, [{"run": 1, "payload": "a" * 5000}])
append_rows(table, [{"run": 2, "payload": "b" * 5000}])
real_open = io.open

class DiesHalfway:
    def __init__(self, handle):
        self._handle = handle
    def write(self, data):
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    def writelines(self, lines):
        self.write("".join(lines))
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)
    def __getattr__(self, name):
        return getattr(self._handle, name)

def in_folder(file):
    target = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else file
    return Path(target).resolve().parent == table.parent.resolve()

def dying_open(file, mode="r", *args, **kwargs):
    handle = real_open(file, mode, *args, **kwargs)
    return DiesHalfway(handle) if in_folder(file) and mode != "r" else handle

io.open = __builtins__.open = dying_open
append_rows(table, [{"run": 3, "payload": "c" * 5000}])
"""


def test_sigkill_mid_write_leaves_the_whole_previous_table(tmp_path: Path) -> None:
    table = tmp_path / "results.csv"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(table)], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr  # it did die while writing
    text = table.read_text(encoding="utf-8")
    assert text.endswith("\n")
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["run"], r["payload"]) for r in rows] == [("1", "a" * 5000), ("2", "b" * 5000)]


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


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_closed_form_solves_run_at_highest_matmul_precision(
    monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here; TF32 rounding exists only there")

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
        results = [run_one(p, splits, resolve_device(device)) for p in plans]
        assert torch.get_float32_matmul_precision() == "medium"  # restored afterwards
    finally:
        torch.set_float32_matmul_precision("highest")
    assert [r.status for r in results] == ["FINISHED", "FINISHED"]
    assert seen and set(seen) == {"highest"}
    assert {r.environment["matmul_precision"] for r in results} == {"highest"}


def test_paths_with_spaces_and_unicode_work(tmp_path: Path, mlflow_template: Path) -> None:
    import shutil

    # '?' and '%41' would start a query and an escape in an unquoted sqlite:/// URL.
    results = tmp_path / "résultats du banc ü ?x %41"
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
    # The MLflow store is the one in that folder, not a copy under an escaped name.
    assert [r.info.status for r in _mlflow_runs(results)] == ["FINISHED"]


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("plants_marker:Method", {}, "error: unknown method 'plants_marker:Method'; valid"),
        ("elm", {"hidden": "__import__('plants_marker')"}, "error: elm.hidden must be"),
    ],
)
def test_a_parameters_file_that_imports_is_refused_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, str],
    message: str,
) -> None:
    import json

    from click.testing import CliRunner

    from protobench.cli import main

    # A module that leaves a marker when imported, where an import would find it.
    marker = tmp_path / "imported"
    (tmp_path / "plants_marker.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    hostile = tmp_path / "best.json"
    hostile.write_text(json.dumps({"method": method, "params": params}))
    results = tmp_path / "results"
    out = CliRunner().invoke(main, ["run", "--methods", "elm", "--dataset", "digits",
                                    "--params-from", str(hostile), "--results", str(results)])
    assert out.exit_code == 2, out.output
    assert out.output.startswith(message), out.output
    assert not marker.exists() and not results.exists()
