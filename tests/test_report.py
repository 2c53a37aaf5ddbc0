"""The reporting layer: the runs table read back from MLflow, Pareto fronts, plots and HTML.

One real local MLflow store is seeded once for the module, through the real Recorder: runs of
a method named 'proto+x' with a 7,000-character parameter, a FAILED run, a run whose test
accuracy is NaN, a run that never reaches its target, a tuning study with a trial, runs with
known values written as RunResults, and on a tiny 28x28 data set ('pix') a real two-layer
proto-pinv-h run and a real 2 x 2 grid study of proto-pinv-h (`tune` with the grid sampler),
whose conditioning curves, prototype pictures and heat map the report draws.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from click.testing import CliRunner

from protobench.cli import main
from protobench.datasets.base import DatasetSplits
from protobench.errors import ResultsError
from protobench.harness import registry
from protobench.harness.params import HyperParam
from protobench.harness.runner import RunConfig, RunInfo, RunResult, plan_runs, run_benchmark
from protobench.harness.tuning import TuneConfig, parse_grid, tune
from protobench.protocols.timing import CurvePoint
from protobench.results.pareto import pareto_front
from protobench.results.recorder import Recorder
from tests.conftest import ScriptedMethod, make_split
from tests.pixel_data import pixel_splits

LONG_VALUE = "".join(random.Random(7).choice("abcdefghij") for _ in range(7000))
ENV = {"cpu_model": "Test CPU 9000", "cpu_cores": "8", "device": "cpu", "threads": "8",
       "torch": "2.14.1", "cuda": "none", "gpu_name": "none", "git_commit": "0123abcd",
       "python": "3.11", "platform": "Linux", "blas": "blas=mkl", "protobench": "0.1.0",
       "matmul_precision": "highest"}
# proto-pinv-h small enough for a test; two hidden layers, so that two Hp matrices are watched.
PROTO = {"n_prototypes": 12, "hidden": 24, "proj_dim": 16, "epochs": 3, "batch_size": 80}
GRID = ["lam1=0.001,0.01", "lr=0.01,0.03"]
CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)


class PlusMethod(ScriptedMethod):
    """A scripted method whose name needs sanitising and whose one parameter is very long."""

    name: ClassVar[str] = "proto+x"
    hyperparams: ClassVar[tuple[HyperParam, ...]] = ScriptedMethod.hyperparams + (
        HyperParam("note", "choice", LONG_VALUE, "a long value", choices=(LONG_VALUE,)),
    )


@dataclass
class Store:
    results: Path
    uri: str
    plus: list[RunResult]
    failed: RunResult
    nan_run: RunResult
    unreached: RunResult
    trial_id: str
    study_id: str
    known: RunResult
    proto: RunResult
    grid_study_id: str


def _known_run(recorder: Recorder, method: str, dataset: str, repeat: int, acc: float,
               fit: float, trainable: int, epochs: int = 3) -> RunResult:
    """A run with chosen figures, recorded by the real Recorder as the runner would."""
    info = RunInfo(method, dataset, repeat, 100 + repeat, {"width": 64},
                   RunConfig(dataset))
    result = RunResult(info=info, environment=dict(ENV), test_accuracy=acc,
                       val_accuracy=acc + 0.01, trainable_params=trainable,
                       stored_params=2 * trainable, inference_throughput=5000.0,
                       peak_memory_mb=12.5)
    result.run_id = recorder.run_started(info)
    result.phases = {"data_load": 0.25, "preprocess": 0.01, "warmup": 0.02, "fit": fit,
                     "evaluation": 0.1, "inference": 0.05}
    result.curve = [CurvePoint(e, fit * e / epochs, acc - 0.1 * (epochs - e))
                    for e in range(1, epochs + 1)]
    recorder.run_finished(result)
    return result


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    splits = DatasetSplits(name="tiny", n_classes=3, image_shape=(2, 2),
                           train=make_split(60, 1), val=make_split(100, 2),
                           _test=make_split(100, 3))
    results = tmp_path_factory.mktemp("report") / "res"
    registry.register(ScriptedMethod)
    registry.register(PlusMethod)
    try:
        recorder = Recorder(results)
        plus = run_benchmark(plan_runs(["proto+x"], RunConfig("tiny", repeats=2, target=0.3),
                                       {}), observers=[recorder], splits=splits)
        [failed] = run_benchmark(
            plan_runs(["scripted"], RunConfig("tiny"), {"scripted": {"fail": "raise"}}),
            observers=[recorder], splits=splits)
        [nan_run] = run_benchmark(plan_runs(["scripted"], RunConfig("tiny", score_test=False),
                                            {}), observers=[recorder], splits=splits)
        [unreached] = run_benchmark(
            plan_runs(["scripted"], RunConfig("tiny", target=1.0),
                      {"scripted": {"gain": 0.05, "epochs": 2}}),
            observers=[recorder], splits=splits)
        # A tuning study: a parent run (kind=study) and one child trial.
        study = recorder.client.create_run(recorder.experiment_id("tiny"),
                                           tags={"kind": "study", "method": "scripted",
                                                 "dataset": "tiny"})
        recorder.client.set_terminated(study.info.run_id, "FINISHED")
        [trial] = run_benchmark(plan_runs(["scripted"], RunConfig("tiny"),
                                          {"scripted": {"gain": 0.3}}),
                                observers=[recorder], splits=splits)
        assert trial.run_id is not None
        recorder.client.set_tag(trial.run_id, "kind", "trial")
        recorder.client.set_tag(trial.run_id, "mlflow.parentRunId", study.info.run_id)
        known = _known_run(recorder, "wide", "other", 0, 0.8125, 2.5, 123)
        _known_run(recorder, "wide", "other", 1, 0.875, 4.0, 456)
        _known_run(recorder, "narrow", "other", 0, 0.75, 0.5, 50, epochs=1)
    finally:
        registry.unregister(PlusMethod.name)
        registry.unregister(ScriptedMethod.name)
    # Real proto-pinv-h records: a run with its pictures and a grid study. One thread: on a
    # small shared machine, two threads that contend make the 784 x 784 PCA ten times slower.
    pix = pixel_splits()
    [proto] = run_benchmark(
        plan_runs(["proto-pinv-h"], RunConfig("pix", device="cpu", threads=1),
                  {"proto-pinv-h": {**PROTO, "depth": 2}}),
        observers=[recorder], splits=pix)
    assert proto.status == "FINISHED", proto.error
    outcome = tune(TuneConfig(method="proto-pinv-h", dataset="pix", results_dir=results,
                              grid=parse_grid("proto-pinv-h", GRID), sampler="grid",
                              pruner="none", device="cpu", threads=1,
                              fixed={k: str(v) for k, v in PROTO.items()}), splits=pix)
    assert outcome.counts == {"COMPLETE": 4}
    yield Store(results, recorder.tracking_uri, plus, failed, nan_run, unreached,
                trial.run_id, study.info.run_id, known, proto, outcome.parent_run_id)


@pytest.fixture(scope="module")
def report_dir(store: Store) -> Path:
    """The report of the seeded store, written by `bench report`."""
    out = store.results / "report"
    result = CliRunner().invoke(main, ["report", "--results", str(store.results)])
    assert result.exit_code == 0, result.output
    return out


# The table read back from MLflow -----------------------------------------------------------


def test_table_has_one_row_per_ended_run_with_the_recorded_values(store: Store) -> None:
    from protobench.results.records import load_runs

    runs = load_runs(store.uri)
    # 2 proto+x, failed, NaN, unreached, study, trial, 3 known; pix: a run, a study, 4 trials
    assert len(runs) == 16
    assert runs["run_id"].is_unique

    plus = runs[runs["method"] == "proto+x"].sort_values("repeat")
    assert list(plus["seed"]) == [r.info.seed for r in store.plus]
    assert list(plus["status"]) == ["FINISHED", "FINISHED"]
    assert all(v == LONG_VALUE for v in plus["hp.note"])  # restored whole from params.json
    assert plus["hp.gain"].tolist() == [0.2, 0.2] and plus["hp.epochs"].tolist() == [5, 5]
    assert plus["test_accuracy"].tolist() == pytest.approx([r.test_accuracy for r in store.plus])
    assert plus["trainable_params"].tolist() == [7, 7]
    assert plus["target"].tolist() == [0.3, 0.3]
    assert plus["target_reached"].tolist() == [True, True]
    assert (plus["time_fit_s"] > 0).all() and plus["env.matmul_precision"].eq("highest").all()

    by_id = runs.set_index("run_id")
    failed = by_id.loc[store.failed.run_id]
    assert failed["status"] == "FAILED" and "scripted failure inside fit" in failed["error"]
    assert math.isnan(failed["test_accuracy"])

    nan_row = by_id.loc[store.nan_run.run_id]
    assert nan_row["status"] == "FINISHED" and math.isnan(nan_row["test_accuracy"])
    assert "test_accuracy" in nan_row["non_finite_metrics"].split(",")
    assert math.isfinite(nan_row["val_accuracy"])

    unreached = by_id.loc[store.unreached.run_id]
    assert unreached["time_to_target_s"] == math.inf and not unreached["target_reached"]

    assert by_id.loc[store.trial_id, "kind"] == "trial"
    assert by_id.loc[store.trial_id, "parent_run_id"] == store.study_id
    assert by_id.loc[store.study_id, "kind"] == "study"

    known = by_id.loc[store.known.run_id]
    assert (known["dataset"], known["method"], known["seed"]) == ("other", "wide", 100)
    assert known["test_accuracy"] == 0.8125 and known["time_fit_s"] == 2.5
    assert known["trainable_params"] == 123 and known["stored_params"] == 246
    assert known["hp.width"] == 64 and known["peak_memory_mb"] == 12.5
    assert known["env.cpu_model"] == "Test CPU 9000" and known["device"] == "cpu"
    assert known["env.git_commit"] == "0123abcd"


def test_table_filters_data_sets_and_reads_curves(store: Store) -> None:
    from protobench.results.records import NoRunsError, load_curves, load_runs

    other = load_runs(store.uri, ["other"])
    assert set(other["dataset"]) == {"other"} and len(other) == 3
    assert store.known.run_id is not None
    curves = load_curves(store.uri, [store.known.run_id])
    assert curves["step"].tolist() == [1, 2, 3]
    assert curves["fit_seconds"].tolist() == pytest.approx([2.5 / 3, 5 / 3, 2.5])
    assert curves["val_accuracy"].tolist() == pytest.approx([0.6125, 0.7125, 0.8125])
    with pytest.raises(NoRunsError, match="no runs for data set 'cifar'.*other, pix, tiny"):
        load_runs(store.uri, ["cifar"])


def test_aggregates_and_fronts_leave_out_failed_and_non_finite_runs(store: Store) -> None:
    from protobench.results.records import load_runs
    from protobench.results.report import _with_configs, method_aggregates

    runs = _with_configs(load_runs(store.uri, ["tiny"]))
    table = method_aggregates(runs).set_index("config")
    assert table.loc["proto+x", "n"] == 2 and table.loc["proto+x", "failed"] == 0
    failed_config = runs.loc[runs["run_id"] == store.failed.run_id, "config"].item()
    assert table.loc[failed_config, "failed"] == 1 and table.loc[failed_config, "n"] == 0
    nan_config = runs.loc[runs["run_id"] == store.nan_run.run_id, "config"].item()
    assert nan_config.startswith("scripted [") and table.loc[nan_config, "n"] == 0
    assert "study" not in set(runs.loc[runs["config"].isin(table.index), "kind"])
    unreached_config = runs.loc[runs["run_id"] == store.unreached.run_id, "config"].item()
    assert table.loc[unreached_config, "time_to_target_s_median"] == math.inf


def test_missing_or_unreachable_stores_are_one_line_errors(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from protobench.results.records import load_runs

    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ResultsError, match="no MLflow store at"):
        load_runs(f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}")
    assert not (tmp_path / "absent").exists()  # reading never creates a store
    with _hanging_up_server() as port:
        start = time.monotonic()
        with pytest.raises(ResultsError, match="cannot reach the MLflow tracking server"):
            load_runs(f"http://127.0.0.1:{port}")
        assert time.monotonic() - start < 10
        result = CliRunner().invoke(main, ["report", "--tracking-uri",
                                           f"http://127.0.0.1:{port}",
                                           "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.startswith("error: cannot reach") and result.output.count("\n") == 1


@contextmanager
def _hanging_up_server() -> Iterator[int]:
    """A loopback server of the test's own that accepts each connection and closes it."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        server.close()


# Pareto fronts ------------------------------------------------------------------------------


def _brute_front(points: np.ndarray, maximize: tuple[bool, ...]) -> list[int]:
    signs = np.array([1.0 if m else -1.0 for m in maximize])
    front = []
    for i, p in enumerate(points):
        if np.isnan(p).any():
            continue
        dominated = False
        for j, q in enumerate(points):
            if j == i or np.isnan(q).any():
                continue
            a, b = q * signs, p * signs
            if all(a >= b) and any(a > b):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front


@pytest.mark.parametrize("k", [2, 3])
def test_pareto_front_matches_brute_force_with_ties(k: int) -> None:
    rng = np.random.default_rng(1234 + k)
    for trial in range(150):
        n = int(rng.integers(1, 40))
        # Few distinct values, so ties and exact duplicates are common.
        points = rng.integers(0, 6, size=(n, k)).astype(float)
        if trial % 5 == 0:
            points[rng.integers(0, n)] = np.nan
        if trial % 7 == 0 and n > 1:
            points[-1] = points[0]  # an exact duplicate
        maximize = tuple(bool(b) for b in rng.integers(0, 2, size=k))
        assert pareto_front(points, maximize) == _brute_front(points, maximize)


def test_pareto_front_small_cases() -> None:
    # (accuracy up, seconds down): the slow, worse run is dominated; equal points both stay.
    points = [(0.9, 1.0), (0.95, 5.0), (0.85, 6.0), (0.9, 1.0), (0.95, math.inf)]
    assert pareto_front(points) == [0, 1, 3]
    assert pareto_front(np.empty((0, 2))) == []
    with pytest.raises(ValueError, match="2 entries for 3 objectives"):
        pareto_front([(1.0, 2.0, 3.0)])


# The report files ---------------------------------------------------------------------------


def test_bench_report_writes_every_format(store: Store, report_dir: Path) -> None:
    for stem in ("tiny", "other"):
        for plot in ("accuracy_vs_time", "accuracy_vs_params", "time_to_accuracy"):
            png = (report_dir / f"{stem}_{plot}.png").read_bytes()
            assert png.startswith(b"\x89PNG") and len(png) > 20_000
            svg = (report_dir / f"{stem}_{plot}.svg").read_text()
            assert "<svg" in svg and "</svg>" in svg
        md = (report_dir / f"{stem}_summary.md").read_text()
        assert md.startswith(f"# {stem}: per-method results") and "Pareto front" in md
        assert (report_dir / f"{stem}_summary.csv").read_text().startswith("config,method,")
    md = (report_dir / "tiny_summary.md").read_text()
    assert "| proto+x | " in md and "scripted failure inside fit" in md
    other = (report_dir / "other_summary.md").read_text()
    assert "| wide | 84.38 ± 4.42% | 2 | 3.25 |" in other
    svg = (report_dir / "other_accuracy_vs_time.svg").read_text()
    assert "<title>wide (run, seed 100, run" in svg and "width = 64" in svg
    runs_csv = (report_dir / "runs.csv").read_text()
    assert LONG_VALUE in runs_csv
    page = (report_dir / "report.html").read_text()
    # 3 plots for each of tiny, other and pix; pix adds conditioning, 2 prototype pictures
    # and a heat map.
    assert page.count("<svg") == 13 and "Test CPU 9000" in page and "0123abcd" in page
    # Self-contained: nothing is fetched, neither scripts nor styles nor images (the pixel
    # pictures travel inside their SVG as data URIs).
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert all(ref.startswith(("#", "data:image/png;base64,")) for ref in refs), refs
    assert "<link" not in page and "url(http" not in page and "@import" not in page


def test_report_looks_inside_proto_pinv_runs_and_grid_studies(store: Store,
                                                             report_dir: Path) -> None:
    from protobench.results.records import load_runs, load_step_metrics

    proto_id = store.proto.run_id
    assert proto_id is not None
    stem = f"pix_{{}}_proto-pinv-h_{proto_id[:8]}"
    study = "pix_sensitivity_proto-pinv-h-pix-accuracy"
    for name in (stem.format("conditioning"), stem.format("prototypes"),
                 stem.format("embedding"), study):
        png = (report_dir / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 20_000, name
        assert "</svg>" in (report_dir / f"{name}.svg").read_text()

    # Conditioning: what the method measured each epoch, read back from the step metrics.
    keys = [f"diag_{k}_{m}" for k in ("cond", "sigma_min") for m in ("Xp", "Hp1", "Hp2")]
    steps = load_step_metrics(store.uri, [proto_id], keys)
    measured = {(f"diag_{key}", epoch): value for epoch, diag in store.proto.step_diagnostics
                for key, value in diag.items() if f"diag_{key}" in keys}
    assert len(measured) == 18  # 6 series over 3 epochs
    assert {(k, s): v for k, s, v in zip(steps["key"], steps["step"], steps["value"],
                                         strict=True)} == pytest.approx(measured)
    svg = (report_dir / f"{stem.format('conditioning')}.svg").read_text()
    for text in ("Xp (input prototypes)", "[1, act(Hp2)] (hidden layer 2)", "epoch",
                 "validation accuracy (%)", "condition number σmax/σmin"):
        assert text in svg, text

    # The heat map: one cell per grid point, annotated with its trial's accuracy.
    runs = load_runs(store.uri, ["pix"])
    trials = runs[runs["parent_run_id"] == store.grid_study_id]
    assert len(trials) == 4 and set(trials["trial_state"]) == {"COMPLETE"}
    # Pictures are kept with runs, not with tuning trials (megabytes each, never drawn).
    proto_run = runs[runs["run_id"] == proto_id].iloc[0]
    assert "prototypes.npz" in str(proto_run["inspection_artifacts"])
    assert not trials["inspection_artifacts"].fillna("").astype(bool).any()
    assert sorted(zip(trials["hp.lam1"], trials["hp.lr"], strict=True)) == [
        (0.001, 0.01), (0.001, 0.03), (0.01, 0.01), (0.01, 0.03)]
    svg = (report_dir / f"{study}.svg").read_text()
    for acc in trials["val_accuracy"]:
        assert f">{100 * acc:.1f}<" in svg or f"> {100 * acc:.1f}<" in svg, acc
    for text in ("lam1", "lr", "0.001", "0.03", "validation accuracy (%)"):
        assert text in svg, text

    page = (report_dir / "report.html").read_text()
    for heading in ("Conditioning over training", "Prototypes before and after training",
                    "Sensitivity: grid studies"):
        assert f"<h3>{heading}</h3>" in page
    assert f'id="pix-{stem.format("prototypes")[4:]}"' in page

    bad = CliRunner().invoke(main, ["report", "--results", str(store.results), "--embedding",
                                    "umap"])
    assert bad.exit_code == 2 and "embedding must be one of pca, tsne, got 'umap'" in bad.output


def test_report_formats_and_data_set_selection(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "only-md"
    result = CliRunner().invoke(main, ["report", "--results", str(store.results), "--out",
                                       str(out), "--dataset", "other", "--format", "md,csv"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["other_summary.csv", "other_summary.md",
                                                     "runs.csv"]
    bad = CliRunner().invoke(main, ["report", "--results", str(store.results), "--format",
                                    "pdf"])
    assert bad.exit_code == 2 and "unknown report format 'pdf'" in bad.output


# The HTML in a headless browser ----------------------------------------------------------------

_CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]? ?(.*)")


def _browser(page: Path, profile: Path, *action: str) -> tuple[str, list[str]]:
    """Open `page` in headless Chromium; its stdout and the page's console messages.

    The report page writes nothing to the console, so every console message (an uncaught
    error above all) counts against it. Chromium gets no proxy and resolves no host name.
    """
    assert CHROMIUM is not None
    args = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-extensions", "--no-proxy-server",
        "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
        "--enable-logging=stderr", "--v=0", "--window-size=1280,2000", *action,
        page.as_uri(),
    ]
    env = {**os.environ, "HOME": str(profile)}
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    messages = [m.group(1) for m in map(_CONSOLE.search, done.stderr.splitlines()) if m]
    return done.stdout, messages


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"
)


@needs_chromium
def test_console_error_detector_catches_a_broken_page(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p id='x'>hi</p><script>"
                    "document.body.setAttribute('data-ready', '1'); undefinedFunction();"
                    "</script></body></html>")
    dom, messages = _browser(page, tmp_path / "profile", "--dump-dom")
    assert 'data-ready="1"' in dom
    assert any("Uncaught ReferenceError" in m for m in messages), messages


@needs_chromium
def test_html_report_renders_in_a_headless_browser(report_dir: Path, tmp_path: Path) -> None:
    page = report_dir / "report.html"
    dom, messages = _browser(page, tmp_path / "profile", "--dump-dom")
    assert messages == []
    assert 'data-ready="1"' in dom  # the page's script ran to its end
    assert dom.count("<svg") == 13 and dom.count('class="hover"') > 10
    assert '<section id="ds-tiny">' in dom and '<section id="ds-other">' in dom
    assert '<section id="ds-pix">' in dom and "Sensitivity: grid studies" in dom
    assert "proto+x" in dom and 'class="sortable"' in dom
    shot = tmp_path / "shot.png"
    _dom, messages = _browser(page, tmp_path / "profile", f"--screenshot={shot}")
    assert messages == []
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 50_000


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        ((4.8, 9.1), ["5", "6", "7", "8", "9"]),  # within one decade: every tick named
        ((0.4, 30.0), ["1", "3", "10", "30"]),  # two decades and more: 1, 3, 10, not crowded
    ],
)
def test_a_log_time_axis_names_enough_ticks_to_read(
    times: tuple[float, float], expected: list[str]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from protobench.results.report import _log_x

    fig, ax = plt.subplots()
    try:
        ax.scatter(list(times), [0.5, 0.6])
        _log_x(ax, False, "fit time ({unit}, log scale)")
        fig.canvas.draw()
        low, high = ax.get_xlim()
        shown = [t.get_text() for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True)
                 if t.get_text() and low <= t.get_position()[0] <= high]
    finally:
        plt.close(fig)
    assert sorted(shown, key=float) == expected
