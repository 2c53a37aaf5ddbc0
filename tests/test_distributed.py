"""Beyond one machine: workers sharing a PostgreSQL-backed Optuna study, records on a real
MLflow tracking server (its backend store in PostgreSQL, its artifacts proxied to a folder).

Both servers are real, started once per session on 127.0.0.1 (see tests/servers.py); workers
are real `bench` processes, forked from a server that imported the heavy libraries once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.servers import QUIET_MLFLOW_ENV, Servers, ServerUnavailableError, in_ci

pytestmark = pytest.mark.slow

TRIALS = 24
WORKERS = 4
# Short, yet long enough that a live worker on this loaded 2-core machine is not taken for dead.
HEARTBEAT_S = 3
WORKER_TIMEOUT_S = 240
# elm on digits with a tiny hidden layer: a trial takes milliseconds, so what is measured is
# the sharing of the study and of the tracking server.
ELM_SETTINGS = ["--method", "elm", "--dataset", "digits", "--set", "hidden=24",
                "--device", "cpu"]


def bench_worker(args: list[str], env: dict[str, str], log: str) -> None:
    """A `bench` process: its output goes to `log`, its exit status is the command's."""
    os.environ.update(env)  # a forked child has the fork server's environment, not ours
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from protobench.cli import main

    main.main(args=args, prog_name="bench")


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """PostgreSQL and an MLflow server for the session, always stopped at its end."""
    try:
        started = Servers.start(tmp_path_factory.mktemp("servers"))
    except ServerUnavailableError as exc:
        if in_ci():
            pytest.fail(f"CI=true, and the distributed tests cannot run: {exc}")
        pytest.skip(str(exc))
    saved = {k: os.environ.get(k) for k in QUIET_MLFLOW_ENV}
    os.environ.update(QUIET_MLFLOW_ENV)
    try:
        yield started
    finally:
        started.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def processes() -> Any:
    """Starts real processes from a server that imported torch, MLflow and Optuna once."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([
        "torch", "optuna", "mlflow.tracking", "sqlalchemy", "sklearn.datasets",
        "protobench.cli", "protobench.harness.tuning", "protobench.results.recorder",
        "tests.test_distributed", "tests.test_tune",
    ])
    return ctx


class Workers:
    """`bench` processes started together, each with its own log and results folder."""

    def __init__(self, ctx: Any, folder: Path) -> None:
        self.ctx = ctx
        self.folder = folder
        self.env = {**QUIET_MLFLOW_ENV, "PROTOBENCH_DATA_DIR": str(folder / "data")}
        self.env.pop("MLFLOW_SERVER_ENABLE_JOB_EXECUTION")
        self.procs: list[Any] = []

    def start(self, args: list[str], env: dict[str, str] | None = None) -> Any:
        n = len(self.procs)
        log = self.folder / f"worker-{n}.log"
        process = self.ctx.Process(target=bench_worker,
                                   args=(args, {**self.env, **(env or {})}, str(log)))
        process.start()
        self.procs.append(process)
        return process

    def join(self, timeout: float = WORKER_TIMEOUT_S) -> list[int | None]:
        """Exit codes, once every worker ended; those still alive after `timeout` are killed."""
        deadline = time.monotonic() + timeout
        for process in self.procs:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
        for process in self.procs:
            if process.is_alive():
                process.kill()
                process.join()
        return [p.exitcode for p in self.procs]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.folder.glob("worker-*.log")))


def _client(servers: Servers) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(servers.mlflow.url)


def _runs(servers: Servers, kind: str) -> list[Any]:
    client = _client(servers)
    experiment = client.get_experiment_by_name("protobench-digits")
    assert experiment is not None, "nothing was recorded on the tracking server"
    return list(client.search_runs([experiment.experiment_id], f"tags.kind = '{kind}'",
                                   max_results=1000))


def _artifact_file(servers: Servers, run: Any, name: str) -> Path:
    """Where the server stored a run's artifact (its artifact URI is mlflow-artifacts:/...)."""
    uri = str(run.info.artifact_uri)
    assert uri.startswith("mlflow-artifacts:/"), f"artifacts are not proxied: {uri}"
    return servers.mlflow.artifacts / uri.removeprefix("mlflow-artifacts:/").lstrip("/") / name


# Tuning ----------------------------------------------------------------------------------


def _trial_of(study: Any, pid: int) -> Any | None:
    """The RUNNING trial of worker `pid` once it has its MLflow run, else None."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        if worker.get("pid") == pid and t.user_attrs.get("mlflow_run_id"):
            return t
    return None


def _kill_mid_trial(study: Any, victim: Any, after_complete: int) -> int:
    """SIGKILL `victim` in the middle of a trial (once the study has some complete trials).

    The victim is frozen with SIGSTOP while its trial is looked up, so that "mid-trial" is
    what the study says at the moment of the kill. Returns the killed trial's number.
    """
    from optuna.trial import TrialState

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.is_alive():
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(done) >= after_complete:
            os.kill(victim.pid, signal.SIGSTOP)
            trial = _trial_of(study, victim.pid)
            if trial is not None:
                os.kill(victim.pid, signal.SIGKILL)
                victim.join()
                return int(trial.number)
            os.kill(victim.pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError(f"could not catch the victim mid-trial (exit code {victim.exitcode})")


@pytest.fixture(scope="module")
def shared_study(servers: Servers, processes: Any,
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """4 workers tune one PostgreSQL study of elm to 24 trials; one is SIGKILLed mid-trial."""
    import optuna

    folder = tmp_path_factory.mktemp("tune-workers")
    workers = Workers(processes, folder)
    name = "elm-digits-shared"
    for i in range(WORKERS):
        args = ["tune", *ELM_SETTINGS, "--storage", servers.optuna_url, "--study", name,
                "--trials", str(TRIALS), "--seed", str(i), "--results", str(folder / f"r{i}")]
        # Half the workers are told by flag, half by environment, where to record and how
        # often to beat.
        if i % 2:
            args += ["--tracking-uri", servers.mlflow.url, "--heartbeat", str(HEARTBEAT_S)]
            workers.start(args)
        else:
            workers.start(args, {"MLFLOW_TRACKING_URI": servers.mlflow.url,
                                 "PROTOBENCH_TUNE_HEARTBEAT": str(HEARTBEAT_S)})
    try:
        assert _wait_for_study(servers, name), f"no study {name!r} appeared\n{workers.logs()}"
        study = optuna.load_study(study_name=name, storage=servers.optuna_url)
        victim = workers.procs[0]
        killed = _kill_mid_trial(study, victim, after_complete=3)
        killed_at = time.monotonic()
        failed_after = _seconds_until_failed(study, killed, timeout=60)
    except BaseException:
        workers.join(timeout=0)
        raise
    codes = workers.join()
    return {"study": study, "codes": codes, "killed": killed, "victim_pid": victim.pid,
            "failed_after": failed_after - killed_at if failed_after else None,
            "logs": workers.logs()}


def _wait_for_study(servers: Servers, name: str, timeout: float = 120) -> bool:
    """Whether the workers created the study; plain SQL, so as not to make Optuna's tables."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(servers.optuna_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                with engine.connect() as connection:
                    found = connection.execute(
                        sqlalchemy.text("SELECT 1 FROM studies WHERE study_name = :name"),
                        {"name": name}).first()
                if found is not None:
                    return True
            except sqlalchemy.exc.ProgrammingError:  # no table yet: the workers make it
                pass
            time.sleep(0.2)
    finally:
        engine.dispose()
    return False


def _seconds_until_failed(study: Any, number: int, timeout: float) -> float | None:
    """The monotonic time at which trial `number` was seen FAIL, or None after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = study.get_trials(deepcopy=False)[number].state.name
        if state == "FAIL":
            return time.monotonic()
        time.sleep(0.1)
    return None


def test_workers_share_one_postgres_study_to_exactly_the_asked_trials(
    shared_study: dict[str, Any], servers: Servers
) -> None:
    study, logs = shared_study["study"], shared_study["logs"]
    assert shared_study["codes"][1:] == [0] * (WORKERS - 1), logs
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == TRIALS, (states, logs)
    assert "RUNNING" not in states and "WAITING" not in states, states
    pids = {t.user_attrs["worker"]["pid"] for t in trials if t.state.name == "COMPLETE"}
    assert len(pids) >= 3, "the surviving workers should all have drawn trials"

    children = _runs(servers, "trial")
    numbers = sorted(int(c.data.tags["trial"]) for c in children)
    assert numbers == [t.number for t in trials], "each trial is one child run on the server"
    parents = _runs(servers, "study")
    assert len(parents) == 1, "one study run, however many workers"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    complete = [c for c in children if c.data.tags.get("state") == "COMPLETE"]
    assert len(complete) == TRIALS and all(c.info.status == "FINISHED" for c in complete)
    environment = _artifact_file(servers, complete[0], "environment.json")
    assert environment.is_file(), "artifacts reach the server's artifact store"


def test_a_worker_killed_mid_trial_is_failed_by_heartbeat_and_the_others_finish(
    shared_study: dict[str, Any], servers: Servers
) -> None:
    study, killed = shared_study["study"], shared_study["killed"]
    assert shared_study["codes"][0] == -signal.SIGKILL
    trial = study.get_trials(deepcopy=False)[killed]
    assert trial.state.name == "FAIL"
    assert trial.user_attrs["worker"]["pid"] == shared_study["victim_pid"]
    assert shared_study["failed_after"] is not None, "the dead worker's trial stayed RUNNING"
    assert shared_study["failed_after"] < 2 * HEARTBEAT_S + 30
    retried = [t for t in study.get_trials(deepcopy=False)
               if t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and retried[0].params == trial.params
    (run,) = [c for c in _runs(servers, "trial") if c.data.tags["trial"] == str(killed)]
    assert run.info.status == "FAILED", "the dead trial's MLflow run does not stay RUNNING"


def test_a_journal_file_study_is_shared_too(
    servers: Servers, processes: Any, tmp_path: Path
) -> None:
    import optuna

    journal = tmp_path / "study.journal"
    workers = Workers(processes, tmp_path)
    for i in range(2):
        workers.start(["tune", *ELM_SETTINGS, "--storage", str(journal), "--study", "j",
                       "--trials", "5", "--seed", str(i), "--results", str(tmp_path / f"r{i}"),
                       "--tracking-uri", servers.mlflow.url])
    assert workers.join() == [0, 0], workers.logs()
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal)))
    states = [t.state.name for t in optuna.load_study(study_name="j", storage=storage).trials]
    assert states == ["COMPLETE"] * 5


# Runs and the report ---------------------------------------------------------------------


def test_bench_run_from_three_processes_records_every_run_and_report_reads_them(
    servers: Servers, processes: Any, tmp_path: Path
) -> None:
    from protobench.cli import main

    workers = Workers(processes, tmp_path)
    for i in range(3):
        args = ["run", "--methods", "elm,rf-ridge", "--dataset", "digits", "--device", "cpu",
                "--set", "elm.hidden=24", "--set", "rf-ridge.features=24", "--seed", str(i),
                "--results", str(tmp_path / f"r{i}"), "--threads", "1"]
        if i == 2:
            workers.start(args, {"MLFLOW_TRACKING_URI": servers.mlflow.url})
        else:
            workers.start([*args, "--tracking-uri", servers.mlflow.url])
    assert workers.join() == [0, 0, 0], workers.logs()

    runs = _runs(servers, "run")
    assert len(runs) == 6, [r.data.tags.get("mlflow.runName") for r in runs]
    assert sorted(r.data.tags["method"] for r in runs) == ["elm"] * 3 + ["rf-ridge"] * 3
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["pid"] for r in runs}) == 3
    for run in runs:
        assert _artifact_file(servers, run, "environment.json").is_file()

    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", "--tracking-uri", servers.mlflow.url,
                                       "--dataset", "digits", "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text(encoding="utf-8")
    assert servers.mlflow.url in page
    for run in runs:
        assert str(run.info.run_id)[:12] in page


# A live worker taken for dead --------------------------------------------------------------


@pytest.fixture
def tunable() -> Iterator[type[Any]]:
    from protobench.harness import registry
    from tests.test_tune import TunableScripted

    registry.register(TunableScripted)
    try:
        yield TunableScripted
    finally:
        registry.unregister(TunableScripted.name)


def test_a_worker_whose_trial_was_failed_elsewhere_drops_it_and_carries_on(
    tunable: type[Any], tiny_splits: Any, results_dir: Path
) -> None:
    """Late heartbeats (a stalled machine) let another worker fail a trial that still runs."""
    import threading

    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from protobench.harness.tuning import TuneConfig, open_storage, storage_url, tune

    config = TuneConfig(method="scripted-tune", dataset="tiny", trials=2, study="lost",
                        results_dir=results_dir, device="cpu", pruner="none",
                        fixed={"sleep": "0.3", "epochs": "3"})
    storage = open_storage(storage_url(None, results_dir))  # the tables, before the worker
    assert isinstance(storage, optuna.storages.RDBStorage)
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(tune(config, splits=tiny_splits)))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        victim = None
        while victim is None and time.monotonic() < deadline:
            time.sleep(0.05)
            with contextlib.suppress(KeyError):  # the study is not there yet
                study_id = storage.get_study_id_from_name("lost")
                victim = next((t for t in storage.get_all_trials(study_id)
                               if t.state == TrialState.RUNNING
                               and t.user_attrs.get("mlflow_run_id")), None)
        assert victim is not None, "no trial started"
        storage.set_trial_state_values(victim._trial_id, TrialState.FAIL)  # as a reaper would
    finally:
        worker.join(timeout=120)

    assert outcome and outcome[0].counts == {"COMPLETE": 2, "FAIL": 1}
    run = MlflowClient(f"sqlite:///{results_dir / 'mlflow.db'}").get_run(
        victim.user_attrs["mlflow_run_id"])
    assert (run.info.status, run.data.tags["state"]) == ("FAILED", "FAIL")
