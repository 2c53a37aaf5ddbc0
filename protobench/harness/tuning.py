"""Hyperparameter tuning with Optuna, on the train and validation splits only.

Each trial is one run of the shared runner (`RunConfig(score_test=False)`, so the test split is
never read) with parameters drawn from the plugin's declared search ranges. Studies live in an
Optuna storage (a SQLite file in the results folder by default) and resume by name; `trials`
counts COMPLETE trials of the whole study, however many workers (threads, processes, machines)
share it: a worker starts a trial only while the study's COMPLETE and RUNNING trials fall short
of the target, and that look and the new trial's creation are serialised across workers by a
`_Gate` (a PostgreSQL advisory lock, or a lock file beside a SQLite or journal file). Trials of a
worker that died are marked FAILED (by heartbeat, and at once when the dead process ran on this
host) and retried once.

MLflow gets one parent run per study (tag kind=study) and one nested child run per trial, written
by the ordinary `Recorder` through explicit run ids, so trials may run in parallel threads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protobench.errors import ConfigError, ResultsError
from protobench.results.names import sqlite_path, sqlite_url
from protobench.results.recorder import DEFAULT_RESULTS_DIR, process_alive
from protobench.results.table import locked

if TYPE_CHECKING:
    import optuna

    from protobench.datasets.base import DatasetSplits
    from protobench.harness.api import Method
    from protobench.harness.params import HyperParam
    from protobench.harness.runner import RunConfig, RunInfo, RunObserver, RunResult
    from protobench.protocols.timing import CurvePoint
    from protobench.results.recorder import Recorder

logger = logging.getLogger(__name__)

OBJECTIVES = ("accuracy", "pareto")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "percentile", "hyperband", "none")
# Objective values of each objective, and whether each is maximised.
OBJECTIVE_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "accuracy": (("val_accuracy", "maximize"),),
    "pareto": (
        ("val_accuracy", "maximize"),
        ("fit_seconds", "minimize"),
        ("trainable_params", "minimize"),
    ),
}
STORAGE_NAME = "optuna.db"
TRIALS_TABLE_NAME = "tune-trials.csv"
JOURNAL_PREFIX = "journal:"
JOURNAL_SUFFIXES = (".log", ".journal")
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
DEFAULT_TRIALS = 20
DEFAULT_HEARTBEAT_S = 30
HEARTBEAT_ENV = "PROTOBENCH_TUNE_HEARTBEAT"
# Seconds a SQLite connection waits for another process's lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 300
_OPEN_ATTEMPTS = 6
_TRIAL_ATTRS = ("val_accuracy", "fit_seconds", "trainable_params")
_NO_REASON = "no reason recorded: its worker stopped sending heartbeats, or tuning itself raised"


@dataclass(frozen=True)
class TuneConfig:
    """What `tune` searches, where the study lives and how trials are run.

    `fixed` holds `--set` values (raw strings or Python values) that are never varied; `grid`
    maps a parameter to the values `sampler="grid"` visits. `trials` is the number of COMPLETE
    trials the study should hold (default 20, or the grid size). `heartbeat` is the Optuna
    heartbeat interval in seconds: a RUNNING trial without a heartbeat for twice as long is failed.
    """

    method: str
    dataset: str
    trials: int | None = None
    timeout: float | None = None
    objective: str = "accuracy"
    study: str | None = None
    storage: str | None = None
    n_jobs: int = 1
    seed: int = 0
    fixed: Mapping[str, Any] = field(default_factory=dict)
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    sampler: str | None = None
    pruner: str | None = None
    prune_startup_trials: int = 5
    prune_warmup_steps: int = 0
    results_dir: Path = DEFAULT_RESULTS_DIR
    data_dir: Path | None = None
    tracking_uri: str | None = None
    epochs: int | None = None
    device: str = "auto"
    eval_every: int = 1
    threads: int | None = None
    heartbeat: int = DEFAULT_HEARTBEAT_S
    max_failures: int = 10
    retry_dead: int = 1

    def __post_init__(self) -> None:
        _check_choice("--objective", self.objective, OBJECTIVES)
        if self.sampler is not None:
            _check_choice("--sampler", self.sampler, SAMPLERS)
        if self.pruner is not None:
            _check_choice("--pruner", self.pruner, PRUNERS)
        _check_at_least("--trials", self.trials, 1)
        _check_at_least("--n-jobs", self.n_jobs, 1)
        _check_at_least("--threads", self.threads, 1)
        _check_at_least("--heartbeat", self.heartbeat, 1)
        _check_at_least("--max-failures", self.max_failures, 1)
        _check_at_least("--prune-startup-trials", self.prune_startup_trials, 0)
        _check_at_least("--prune-warmup-steps", self.prune_warmup_steps, 0)
        _check_at_least("retry_dead", self.retry_dead, 0)
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.grid and self.resolved_sampler != "grid":
            raise ConfigError(f"--grid needs --sampler grid, got --sampler {self.sampler}")
        if self.resolved_sampler == "grid" and not self.grid:
            raise ConfigError("--sampler grid needs at least one --grid KEY=V1,V2,...")

    @property
    def resolved_sampler(self) -> str:
        return self.sampler or ("grid" if self.grid else "tpe")

    @property
    def resolved_pruner(self) -> str:
        """Pruning is off for the multi-objective `pareto` (Optuna cannot prune it)."""
        if self.objective == "pareto":
            return "none"
        return self.pruner or "median"

    @property
    def study_name(self) -> str:
        return self.study or f"{self.method}-{self.dataset}-{self.objective}"

    def notes(self) -> list[str]:
        """Things the user asked for that this configuration does not do."""
        out = []
        if self.objective == "pareto" and self.pruner not in (None, "none"):
            out.append(
                f"pruning is off for --objective pareto (multi-objective trials cannot be "
                f"pruned); --pruner {self.pruner} is ignored"
            )
        return out


def _check_choice(option: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")


def _check_at_least(option: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{option} must be >= {low}, got {value}")


@dataclass
class TrialSummary:
    """One finished trial as the user sees it."""

    number: int
    state: str
    values: list[float] | None
    params: dict[str, Any]
    tuned: dict[str, Any]
    metrics: dict[str, float]
    reason: str = ""
    run_id: str = ""


@dataclass
class TuneOutcome:
    """What a `tune` call did and what the study holds now."""

    study_name: str
    storage: str
    method: str
    dataset: str
    objective: str
    metric_names: tuple[str, ...]
    best: list[TrialSummary]
    counts: dict[str, int]
    new_trials: list[TrialSummary]
    stop_reason: str
    reaped: int = 0
    best_params_path: Path | None = None
    parent_run_id: str = ""
    tracking_uri: str = ""
    failures: list[TrialSummary] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the study holds at least one COMPLETE trial."""
        return self.counts.get("COMPLETE", 0) > 0


# Parsing ---------------------------------------------------------------------------------


def parse_fixed(method: str, items: Sequence[str]) -> dict[str, str]:
    """Parse `--set KEY=VALUE` items (`METHOD.KEY=VALUE` is accepted too)."""
    out: dict[str, str] = {}
    for item in items:
        key, value = _split_item(method, item, "--set", "KEY=VALUE (e.g. lam=0.01)")
        out[key] = value
    return out


def parse_grid(method: str, items: Sequence[str]) -> dict[str, list[str]]:
    """Parse `--grid KEY=V1,V2,...` items into {key: [raw values]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, value = _split_item(method, item, "--grid", "KEY=V1,V2,... (e.g. lam=0.1,1,10)")
        values = [v.strip() for v in value.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--grid {key} needs at least one value, got {item!r}")
        out.setdefault(key, []).extend(values)
    return out


def _split_item(method: str, item: str, option: str, form: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if key.startswith(method + "."):
        key = key[len(method) + 1:]
    if not sep or not key or "." in key:
        raise ConfigError(f"{option} expects {form} for method {method}, got {item!r}")
    return key, value.strip()


# Search space ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchDim:
    """One tuned parameter: an Optuna distribution built from a HyperParam's `search`."""

    name: str
    kind: str  # "int", "float" or "choice"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.trial.Trial) -> Any:
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def describe(self) -> str:
        if self.kind == "choice":
            return "{" + ", ".join(str(c) for c in self.choices) + "}"
        return f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


def search_space(
    method: str,
    fixed: Iterable[str] = (),
    grid: Mapping[str, Sequence[Any]] | None = None,
) -> list[SearchDim]:
    """The tuned parameters of `method`: its declared search ranges less the `fixed` names.

    With a grid, exactly the grid's parameters, each value validated by its HyperParam.
    """
    from protobench.harness.registry import get_method

    cls = get_method(method)
    by_name = {p.name: p for p in cls.hyperparams}
    fixed_keys = set(fixed)
    if grid:
        dims = []
        for key, raw_values in grid.items():
            if key not in by_name:
                raise ConfigError(
                    f"unknown hyperparameter {method}.{key} in --grid; {method} takes: "
                    + ", ".join(sorted(by_name))
                )
            if key in fixed_keys:
                raise ConfigError(f"{method}.{key} is both fixed by --set and varied by --grid")
            values = tuple(dict.fromkeys(by_name[key].parse(v, method) for v in raw_values))
            dims.append(SearchDim(key, "choice", choices=values))
        return dims
    dims = [_dim(method, p) for p in cls.hyperparams
            if p.search is not None and p.name not in fixed_keys]
    if not dims:
        raise ConfigError(
            f"nothing to tune: {method} declares no search range outside the fixed parameters "
            f"({', '.join(sorted(fixed_keys)) or 'none'}); use --grid with --sampler grid"
        )
    return dims


def _dim(method: str, p: HyperParam) -> SearchDim:
    from optuna.distributions import FloatDistribution, IntDistribution

    search = tuple(p.search or ())
    label = f"{method}.{p.name}"
    try:
        if p.kind in ("int", "float") and len(search) == 2:
            low, high = (p.parse(v, method) for v in search)
            if p.kind == "int":
                IntDistribution(int(low), int(high), log=p.log)
            else:
                FloatDistribution(float(low), float(high), log=p.log)
            return SearchDim(p.name, p.kind, low=low, high=high, log=p.log)
        choices = tuple(dict.fromkeys(p.parse(v, method) for v in search))
        if not choices:
            raise ValueError("no values")
        return SearchDim(p.name, "choice", choices=choices)
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"{label}: declared search range {search!r} is not usable: {exc}"
                          ) from None


# Storage ---------------------------------------------------------------------------------


def storage_url(spec: str | None, results_dir: Path) -> str:
    """Normalise `--storage`: None is `<results>/optuna.db`; see `open_storage` for the forms."""
    if spec is None or not spec.strip():
        return sqlite_url(results_dir / STORAGE_NAME)
    spec = spec.strip()
    if spec.startswith(JOURNAL_PREFIX):
        path = spec[len(JOURNAL_PREFIX):]
        if not path:
            raise ConfigError("--storage journal: needs a file path, e.g. journal:study.log")
        return JOURNAL_PREFIX + str(Path(path).expanduser().resolve())
    if "://" in spec:
        return spec
    file = Path(spec).expanduser()
    if file.suffix in JOURNAL_SUFFIXES:
        return JOURNAL_PREFIX + str(file.resolve())
    if file.suffix in SQLITE_SUFFIXES:
        return sqlite_url(file)
    raise ConfigError(
        f"--storage must be an Optuna storage URL (sqlite:///FILE, postgresql://...), "
        f"journal:FILE, or a file ending in {', '.join(SQLITE_SUFFIXES + JOURNAL_SUFFIXES)}; "
        f"got {spec!r}"
    )


def display_url(url: str) -> str:
    """`url` with any password masked, for logs and tables."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        creds, _, host = rest.partition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


@contextmanager
def _quiet_optuna_warnings() -> Iterator[None]:
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def open_storage(
    url: str,
    heartbeat: int | None = None,
    retry_dead: int = 0,
) -> optuna.storages.BaseStorage:
    """Open an Optuna storage from a normalised URL (see `storage_url`).

    `journal:PATH` opens a JournalStorage on a JournalFileBackend (no heartbeat: only dead
    workers of this host are detected); anything else is an RDB URL, opened with a heartbeat and,
    for SQLite, a long busy timeout so that concurrent processes wait instead of failing.
    """
    import optuna
    import sqlalchemy.exc

    if url.startswith(JOURNAL_PREFIX):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len(JOURNAL_PREFIX):])
        _make_parent(path)
        try:
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise ResultsError(f"cannot open the journal {str(path)!r}: {exc}") from None
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        file = sqlite_path(url)
        if file is not None:
            _make_parent(file)
    stale_callback = _retry_callback(retry_dead) if heartbeat else None
    last: Exception | None = None
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            with _quiet_optuna_warnings():
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                    heartbeat_stale_trial_callback=stale_callback,
                )
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError,
                sqlalchemy.exc.ProgrammingError) as exc:
            # Several processes creating the same new database race on its tables (PostgreSQL:
            # "type ... already exists" is a ProgrammingError): try again.
            last = exc
            time.sleep(0.2 * (attempt + 1))
        except (ImportError, ValueError, sqlalchemy.exc.ArgumentError) as exc:
            raise ConfigError(f"--storage {display_url(url)!r} cannot be used: {exc}") from None
    raise ResultsError(f"cannot open the Optuna storage {display_url(url)!r}: {last}")


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsError(f"cannot create {str(path.parent)!r}: {exc}") from None


StaleCallback = Callable[["optuna.Study", "optuna.trial.FrozenTrial"], None]


def _retry_callback(max_retry: int) -> StaleCallback | None:
    if max_retry <= 0:
        return None
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with _quiet_optuna_warnings():
        return RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def _open_study(
    storage: optuna.storages.BaseStorage, name: str, directions: list[str]
) -> optuna.Study:
    import optuna
    import sqlalchemy.exc

    last: Exception | None = None
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            return optuna.create_study(
                storage=storage, study_name=name, load_if_exists=True,
                directions=[optuna.study.StudyDirection[d.upper()] for d in directions],
            )
        except (sqlalchemy.exc.OperationalError, optuna.exceptions.StorageInternalError,
                optuna.exceptions.DuplicatedStudyError) as exc:
            # Another process created the study between our look-up and our insert.
            last = exc
            time.sleep(0.2 * (attempt + 1))
    raise ResultsError(f"cannot create or load study {name!r}: {last}")


# Workers sharing a study -----------------------------------------------------------------


class _Gate:
    """A lock that the workers of a study take in turn, on every machine that shares its storage.

    It serialises what must not race between workers: the look at the study's room for one more
    trial together with that trial's creation (see `_Driver`), and finding or creating the
    study's MLflow run. PostgreSQL: a session advisory lock, on a connection drawn from the
    storage's pool for the while (the server drops the lock when a worker dies); SQLite and
    journal files: an flock beside the file; other databases: this process's threads only.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, url: str, study_name: str) -> None:
        self._threads = threading.Lock()
        self._held = threading.local()
        self._holding = ExitStack()
        self._file: Path | None = None
        self._engine: Any = None
        digest = hashlib.sha256(f"protobench-study:{study_name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)
        if url.startswith(JOURNAL_PREFIX):
            self._file = Path(url[len(JOURNAL_PREFIX):])
        elif url.startswith("sqlite:///") and sqlite_path(url) is not None:
            self._file = sqlite_path(url)
        else:
            engine = getattr(storage, "engine", None)
            if engine is not None and engine.dialect.name == "postgresql":
                self._engine = engine

    def acquire(self) -> None:
        self._threads.acquire()
        try:
            if self._engine is not None:
                self._holding.enter_context(self._advisory_lock())
            elif self._file is not None:
                lock = self._file.with_name(self._file.name + "-gate")
                self._holding.enter_context(locked(lock))
        except BaseException:
            self._threads.release()
            raise
        self._held.value = True

    def release(self) -> None:
        """Release the gate if this thread holds it."""
        if not getattr(self._held, "value", False):
            return
        self._held.value = False
        try:
            self._holding.close()
        finally:
            self._threads.release()

    @contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    @contextmanager
    def _advisory_lock(self) -> Iterator[None]:
        import sqlalchemy

        with self._engine.connect() as connection:
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            key = {"key": self._key}
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), key)
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), key)


# Dead workers ----------------------------------------------------------------------------


def fail_dead_trials(study: optuna.Study, retry_dead: int = 0) -> int:
    """Mark FAILED the RUNNING trials whose worker died; returns how many this call failed.

    Uses Optuna's heartbeat (any host, after the grace period) and, at once, the process id of
    workers on this host. A failed trial is re-queued (WAITING, same parameters and grid point)
    up to `retry_dead` times.
    """
    import optuna
    from optuna.trial import TrialState

    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with _quiet_optuna_warnings():
        optuna.storages.fail_stale_trials(study)
    storage = study._storage
    host, me = socket.gethostname(), os.getpid()
    callback = _retry_callback(retry_dead)
    failed_here = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if not isinstance(worker, dict) or worker.get("host") != host:
            continue
        pid = int(worker.get("pid") or 0)
        if not pid or pid == me or process_alive(pid):
            continue
        reason = f"its worker (pid {pid} on {host}) died mid-trial"
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            changed = storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            continue  # another process got there first
        if changed:
            failed_here += 1
            logger.warning("trial %d: %s; marked FAILED", t.number, reason)
            if callback is not None:
                frozen = copy.deepcopy(storage.get_trial(t._trial_id))
                frozen.user_attrs = {
                    k: v for k, v in frozen.user_attrs.items() if k != "fail_reason"
                }
                callback(study, frozen)
    failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    stale = len(before & failed) - failed_here
    if stale > 0:
        logger.warning("%d trial(s) without a heartbeat marked FAILED", stale)
    return len(before & failed)


def reap(study: optuna.Study, retry_dead: int, target: int) -> int:
    """Fail the trials of dead workers, re-queueing them only while the study needs trials.

    Once the study holds `target` COMPLETE trials, no worker starts another, so retries still
    WAITING would stay so for ever: they are closed as FAIL, with the reason. Call it holding
    the study's gate. Returns how many trials of dead workers it failed.
    """
    import optuna
    from optuna.trial import TrialState

    short = _complete(study) < target
    failed = fail_dead_trials(study, retry_dead if short else 0)
    if short and _complete(study) < target:
        return failed
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if "failed_trial" not in t.system_attrs:
            continue  # queued by someone else (study.enqueue_trial): theirs to run
        reason = (f"a retry of trial {t.system_attrs['failed_trial']} that was not needed: "
                  f"the study reached its {target} complete trials first")
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                logger.info("trial %d: %s", t.number, reason)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            continue  # another worker took it or closed it first
    return failed


def _complete(study: optuna.Study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


# Samplers and pruners --------------------------------------------------------------------


def _sampler(
    config: TuneConfig, dims: Sequence[SearchDim], n_existing: int
) -> optuna.samplers.BaseSampler:
    import optuna

    name = config.resolved_sampler
    if name == "grid":
        # Every process must shuffle the grid alike: Optuna maps trial numbers to grid points.
        space = {d.name: list(d.choices) for d in dims}
        return optuna.samplers.GridSampler(space, seed=config.seed)
    seed = config.seed
    if n_existing:
        # A resumed study must not replay the first run's draws.
        text = f"{config.seed}:{n_existing}:{os.getpid()}"
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(config: TuneConfig) -> optuna.pruners.BasePruner:
    import optuna

    name = config.resolved_pruner
    startup, warmup = config.prune_startup_trials, config.prune_warmup_steps
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(
            25.0, n_startup_trials=startup, n_warmup_steps=warmup
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup))
    return optuna.pruners.NopPruner()


# MLflow ----------------------------------------------------------------------------------


def _study_key(url: str, name: str) -> str:
    return hashlib.sha1(f"{url}\0{name}".encode()).hexdigest()[:16]


def _parent_run(recorder: Recorder, config: TuneConfig, url: str,
                dims: Sequence[SearchDim], gate: _Gate) -> str:
    """The study's MLflow run (tag kind=study), created once even by concurrent workers."""
    from protobench.results.names import file_stem

    # Workers sharing the study or the results folder take turns; others: "oldest wins".
    with locked(recorder.results_dir / f".study-{file_stem(config.study_name)}"), gate.held():
        return _find_or_create_parent(recorder, config, url, dims)


def _find_or_create_parent(recorder: Recorder, config: TuneConfig, url: str,
                           dims: Sequence[SearchDim]) -> str:
    client = recorder.client
    experiment_id = recorder.experiment_id(config.dataset)
    key = _study_key(url, config.study_name)
    query = f"tags.kind = 'study' and tags.study_key = '{key}'"

    def existing() -> list[Any]:
        runs = client.search_runs([experiment_id], filter_string=query, max_results=50)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    found = existing()
    if found:
        run_id = str(found[0].info.run_id)
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {
        "kind": "study", "study": config.study_name, "study_key": key,
        "method": config.method, "dataset": config.dataset, "objective": config.objective,
        "optuna_storage": display_url(url),
    }
    created = client.create_run(experiment_id, run_name=f"study-{config.study_name}", tags=tags)
    mine = str(created.info.run_id)
    from mlflow.entities import Param

    params = [Param("method", config.method), Param("dataset", config.dataset),
              Param("objective", config.objective)]
    params += [Param(_key(f"search.{d.name}"), d.describe()[:500]) for d in dims]
    client.log_batch(mine, params=params)
    # Two workers may have created one each at the same moment: keep the oldest.
    winner = str(existing()[0].info.run_id)
    if winner != mine:
        client.delete_run(mine)
    return winner


def _key(name: str) -> str:
    from protobench.results.names import mlflow_key

    return mlflow_key(name)


class _TrialObserver:
    """Runner observer for one trial: the Recorder with trial tags, and the pruning hook."""

    def __init__(
        self,
        trial: optuna.trial.Trial,
        recorder: Recorder,
        parent_run_id: str,
        study_name: str,
        report: bool,
        prune: bool,
        last_epoch: int | None,
    ) -> None:
        self.trial = trial
        self.recorder = recorder
        self.parent_run_id = parent_run_id
        self.study_name = study_name
        self.report = report
        self.prune = prune
        self.last_epoch = last_epoch
        self.reported: set[int] = set()
        self.pruned_at: int | None = None
        self.run_id = ""

    def run_started(self, info: RunInfo) -> str | None:
        # Created as a trial in one call, so that no worker's death leaves a plain run behind.
        tags = {
            "kind": "trial",
            "mlflow.parentRunId": self.parent_run_id,
            "trial": str(self.trial.number),
            "study": self.study_name,
        }
        run_id = self.recorder.run_started(info, tags)
        if run_id is None:
            return None
        self.run_id = run_id
        self.trial.set_user_attr("mlflow_run_id", run_id)  # the figures hold it only at the end
        self.recorder.client.set_tag(run_id, "mlflow.runName", f"trial-{self.trial.number}")
        return run_id

    def run_progress(self, info: RunInfo, done: int, total: int, unit: str) -> None:
        self.recorder.run_progress(info, done, total, unit)

    def run_checkpoint(self, info: RunInfo, point: CurvePoint) -> bool:
        """Report the validation accuracy at a checkpoint; True asks the runner to stop."""
        if not self.report_point(point):
            return False
        final = self.last_epoch is not None and point.epoch >= self.last_epoch
        if self.prune and not final and self.trial.should_prune():
            self.pruned_at = point.epoch
            return True
        return False

    def report_point(self, point: CurvePoint) -> bool:
        if not self.report or point.epoch in self.reported:
            return False
        if math.isfinite(point.val_accuracy):
            self.trial.report(point.val_accuracy, point.epoch)
        self.reported.add(point.epoch)
        return True

    def run_finished(self, result: RunResult) -> None:
        self.recorder.run_finished(result)


class _Objective:
    """The function Optuna calls once per trial."""

    def __init__(
        self,
        config: TuneConfig,
        dims: Sequence[SearchDim],
        base_params: Mapping[str, Any],
        run_config: RunConfig,
        splits: DatasetSplits,
        recorder: Recorder,
        parent_run_id: str,
        observers: Sequence[RunObserver],
        data_load_seconds: float,
    ) -> None:
        from protobench.harness.registry import get_method
        from protobench.harness.runner import resolve_device
        from protobench.protocols.accuracy import run_seed

        self.config = config
        self.dims = list(dims)
        self.base_params = dict(base_params)
        self.run_config = run_config
        self.splits = splits
        self.recorder = recorder
        self.parent_run_id = parent_run_id
        self.observers = list(observers)
        self.data_load_seconds = data_load_seconds
        self.cls: type[Method] = get_method(config.method)
        self.device = resolve_device(run_config.device)
        # Every trial uses the same seed, so trials differ only in their parameters.
        self.seed = run_seed(config.seed, config.dataset, config.method, 0)
        self.metrics = OBJECTIVE_METRICS[config.objective]

    def __call__(self, trial: optuna.trial.Trial) -> float | list[float]:
        import optuna

        from protobench.harness.runner import FAILED, RunInfo, run_one

        tuned = {d.name: d.suggest(trial) for d in self.dims}
        params = self.cls.check_params({**self.base_params, **tuned})
        trial.set_user_attr("params", params)
        info = RunInfo(self.config.method, self.config.dataset, 0, self.seed, params,
                       self.run_config)
        single = len(self.metrics) == 1
        prune = single and self.config.resolved_pruner != "none" and self.cls.iterative
        epochs = params.get("epochs")
        watcher = _TrialObserver(
            trial, self.recorder, self.parent_run_id, self.config.study_name,
            report=single, prune=prune, last_epoch=epochs if isinstance(epochs, int) else None,
        )
        try:
            result = run_one(info, self.splits, self.device, [watcher, *self.observers],
                             data_load_seconds=self.data_load_seconds)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted by the user")
            raise
        for point in result.curve:  # points the runner did not pass to the hook
            watcher.report_point(point)
        figures = {
            "val_accuracy": result.val_accuracy,
            "fit_seconds": result.fit_seconds,
            "trainable_params": float(result.trainable_params),
        }
        trial.set_user_attr("figures", {
            **{k: _json_float(v) for k, v in figures.items()},
            "mlflow_run_id": result.run_id or "",
        })
        values = [figures[name] for name, _ in self.metrics]
        reason = ""
        if result.status == FAILED:
            reason = result.error or "the run failed"
        elif result.status != "FINISHED":
            reason = f"the run ended {result.status}"
        elif not all(math.isfinite(v) for v in values):
            shown = ", ".join(f"{n}={v}" for (n, _), v in zip(self.metrics, values, strict=True))
            reason = f"objective is not finite ({shown})"
        state = "FAIL" if reason else "PRUNED" if watcher.pruned_at is not None else "COMPLETE"
        self._log_trial(result.run_id, state, values, reason, watcher.pruned_at)
        if reason:
            trial.set_user_attr("fail_reason", reason)
            logger.info("trial %d FAILED: %s (params %s)", trial.number, reason, params)
            return math.nan if single else [math.nan] * len(values)
        if watcher.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at epoch {watcher.pruned_at}")
        return values[0] if single else values

    def _log_trial(self, run_id: str | None, state: str, values: Sequence[float], reason: str,
                   pruned_at: int | None) -> None:
        if not run_id:
            return
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [
            Metric(_key(f"objective_{name}"), value, now, 0)
            for (name, _), value in zip(self.metrics, values, strict=True)
            if math.isfinite(value)
        ]
        tags = [RunTag("state", state)]
        if reason:
            tags.append(RunTag("fail_reason", reason[:5000]))
        if pruned_at is not None:
            tags.append(RunTag("pruned_at_epoch", str(pruned_at)))
        client = self.recorder.client
        client.log_batch(run_id, metrics=metrics, tags=tags)
        if state == "FAIL":
            client.set_terminated(run_id, "FAILED")


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


# Driving trials --------------------------------------------------------------------------


class _Driver:
    """Runs trials in `n_jobs` threads until the study holds `target` COMPLETE trials.

    A thread starts a trial only while the study's complete trials plus its trials in flight
    (RUNNING, on any worker) fall short of the target, the grid has points left, fewer than
    `max_failures` trials in a row failed, and the timeout has not run out. That look and the
    new trial's creation happen under the `gate`, so workers together do not overshoot the
    target. Without a heartbeat (journal storage) only this host's RUNNING trials count as in
    flight: those are the ones whose death can be seen.
    """

    def __init__(
        self,
        study: optuna.Study,
        objective: Callable[[optuna.trial.Trial], float | list[float]],
        callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]],
        target: int,
        config: TuneConfig,
        grid: Mapping[str, list[Any]] | None,
        gate: _Gate,
        heartbeat: bool,
    ) -> None:
        self.study = study
        self.objective = objective
        self.callbacks = [*callbacks, self._after_trial]
        self.target = target
        self.config = config
        self.grid = dict(sorted(grid.items())) if grid else None
        self.grid_size = math.prod(len(v) for v in grid.values()) if grid else 0
        self.gate = gate
        self.heartbeat = heartbeat
        self.host = socket.gethostname()
        self._local = threading.local()
        self.in_flight = 0
        self.streak = 0
        self.tripped = False
        self.done = False
        self.started_at = time.monotonic()
        self._cond = threading.Condition()

    def run(self) -> None:
        if self.config.n_jobs == 1:
            self._worker()
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.config.n_jobs) as pool:
            futures = [pool.submit(self._worker) for _ in range(self.config.n_jobs)]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                self._stop()  # e.g. Ctrl-C: the other threads finish their trial, then stop
                raise

    def timed_out(self) -> bool:
        timeout = self.config.timeout
        return timeout is not None and time.monotonic() - self.started_at >= timeout

    def _worker(self) -> None:
        try:
            while self._claim():
                self._local.trial_id = None
                try:
                    self.study.optimize(self._run, n_trials=1, callbacks=self.callbacks)
                except ValueError as exc:
                    if not self._lost(exc):
                        raise
                finally:
                    self.gate.release()  # still held only when the trial was never created
                    with self._cond:
                        self.in_flight -= 1
                        self._cond.notify_all()
        except BaseException:
            self._stop()
            raise

    def _run(self, trial: optuna.trial.Trial) -> float | list[float]:
        self._local.trial_id = trial._trial_id
        # One write, so that a worker killed after it is always recognisable as dead.
        trial.set_user_attr("worker", {"host": self.host, "pid": os.getpid()})
        self.gate.release()  # the trial is in the study: the next worker may look
        return self.objective(trial)

    def _lost(self, exc: ValueError) -> bool:
        """Whether another worker failed this thread's trial before its result could be told.

        That happens when its heartbeats were late (a stalled machine): the trial is FAIL and
        re-queued elsewhere, so this worker drops the result and carries on.
        """
        from optuna.trial import TrialState

        trial_id = getattr(self._local, "trial_id", None)
        if trial_id is None or not str(exc).startswith("Cannot tell a"):
            return False
        frozen = self.study._storage.get_trial(trial_id)
        if frozen.state != TrialState.FAIL:
            return False
        logger.warning("trial %d was marked FAILED by another worker (its heartbeat was late) "
                       "before it ended here; its result is dropped", frozen.number)
        return True

    def _stop(self) -> None:
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def _claim(self) -> bool:
        """Wait until a trial may start (True, holding the gate) or none should (False)."""
        while True:
            with self._cond:
                if self.done or self.tripped or self.timed_out():
                    return False
            self.gate.acquire()
            try:
                # Failing a dead worker's trial and re-queueing it happen under the gate, so
                # that no worker sees the room the failure left before the retry is queued.
                reap(self.study, self.config.retry_dead, self.target)
                verdict = self._room()
            except BaseException:
                self.gate.release()
                raise
            if verdict == "start":
                with self._cond:
                    self.in_flight += 1
                return True  # `_run` releases the gate once the trial exists
            self.gate.release()
            if verdict == "stop":
                self._stop()
                return False
            # A trial in flight may yet fail or be pruned and leave room; one whose worker
            # died is failed at the next look (and re-queued) once its heartbeat is stale.
            with self._cond:
                self._cond.wait(timeout=1.0)

    def _room(self) -> str:
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        running = sum(t.state == TrialState.RUNNING and self._watched(t) for t in trials)
        if complete >= self.target:
            return "stop"
        if complete + running >= self.target:
            return "wait"
        if self.grid is None or any(t.state == TrialState.WAITING for t in trials):
            return "start"
        covered = {
            t.system_attrs.get("grid_id") for t in trials
            if t.state.is_finished() and "grid_id" in t.system_attrs
            and _same_grid(t.system_attrs.get("search_space"), self.grid)
        }
        if len(covered) + running < self.grid_size:
            return "start"
        return "stop" if len(covered) >= self.grid_size else "wait"

    def _watched(self, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether a RUNNING trial counts as in flight: its death would be noticed."""
        if self.heartbeat:
            return True
        worker = trial.user_attrs.get("worker")
        return isinstance(worker, dict) and worker.get("host") == self.host

    def _after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        from optuna.trial import TrialState

        with self._cond:
            if trial.state == TrialState.FAIL:
                self.streak += 1
            elif trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
                self.streak = 0
            if self.streak >= self.config.max_failures and not self.tripped:
                self.tripped = True
                logger.warning("%d trials in a row FAILED: stopping", self.streak)


def _same_grid(stored: Any, grid: Mapping[str, list[Any]]) -> bool:
    if not isinstance(stored, dict):
        return False
    return {k: list(v) for k, v in sorted(stored.items())} == dict(grid)


# The entry point -------------------------------------------------------------------------


def tune(
    config: TuneConfig,
    observers: Sequence[RunObserver] = (),
    splits: DatasetSplits | None = None,
    on_trial: Callable[[TrialSummary, dict[str, int]], None] | None = None,
) -> TuneOutcome:
    """Run (or resume) the study of `config` until it holds `config.trials` COMPLETE trials.

    `observers` see every run as in `run_benchmark`; `splits` replaces loading the data set (its
    test split is never read); `on_trial` is told of each trial this call finishes, with the
    study's counts by state.
    """

    from protobench.datasets import DATASET_NAMES, load_splits
    from protobench.harness.registry import get_method
    from protobench.harness.runner import RunConfig, method_params
    from protobench.results.recorder import Recorder, prepare_results_dir

    cls = get_method(config.method)
    if splits is None and config.dataset not in DATASET_NAMES:
        raise ConfigError(
            f"unknown data set {config.dataset!r}; valid data sets: {', '.join(DATASET_NAMES)}"
        )
    base_params = method_params(config.method, config.fixed, config.epochs)
    fixed_keys = set(config.fixed) | (
        {"epochs"} if config.epochs is not None and "epochs" in base_params else set()
    )
    dims = search_space(config.method, fixed_keys, config.grid or None)
    base_given = {k: v for k, v in base_params.items() if k in fixed_keys}
    threads = config.threads or max(1, (os.cpu_count() or 1) // config.n_jobs)
    run_config = RunConfig(
        dataset=config.dataset, device=config.device, base_seed=config.seed,
        epochs=config.epochs, eval_every=config.eval_every, threads=threads, score_test=False,
        keep_artifacts=False,
    )
    results_dir = prepare_results_dir(config.results_dir)
    url = storage_url(config.storage, results_dir)
    heartbeat = None if url.startswith(JOURNAL_PREFIX) else config.heartbeat
    storage = open_storage(url, heartbeat, config.retry_dead)
    metrics = OBJECTIVE_METRICS[config.objective]
    study = _open_study(storage, config.study_name, [d for _, d in metrics])
    grid = {d.name: list(d.choices) for d in dims} if config.resolved_sampler == "grid" else None
    _check_study(study, config, cls.name, [d for _, d in metrics], grid)
    target = config.trials or (
        math.prod(len(d.choices) for d in dims) if config.resolved_sampler == "grid"
        else DEFAULT_TRIALS
    )
    gate = _Gate(storage, url, config.study_name)
    with gate.held():
        reaped = reap(study, config.retry_dead, target)
    study.sampler = _sampler(config, dims, len(study.get_trials(deepcopy=False)))
    study.pruner = _pruner(config)

    recorder = Recorder(results_dir, config.tracking_uri, table_name=TRIALS_TABLE_NAME)
    recorder.mark_orphans()
    parent = _parent_run(recorder, config, url, dims, gate)

    load_seconds = 0.0
    if splits is None:
        started = time.perf_counter()
        splits = load_splits(config.dataset, config.data_dir)
        load_seconds = time.perf_counter() - started
    objective = _Objective(config, dims, base_given, run_config, splits, recorder, parent,
                           observers, load_seconds)
    new_trials: list[TrialSummary] = []
    lock = threading.Lock()

    def told(study_: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        summary = _summarise(frozen)
        with lock:
            new_trials.append(summary)
        if on_trial is not None:
            on_trial(summary, _counts(study_))

    driver = _Driver(study, objective, [told], target, config, grid, gate,
                     heartbeat=heartbeat is not None)
    logger.info("study %s: tuning %s on %s towards %d complete trials",
                config.study_name, config.method, config.dataset, target)
    driver.run()
    with gate.held():
        reaped += reap(study, config.retry_dead, target)
    _close_dead_runs(study, recorder, parent)
    stop_reason = _stop_reason(study, target, config, driver)
    outcome = _outcome(study, config, url, metrics, new_trials, stop_reason, reaped)
    outcome.parent_run_id = parent
    outcome.tracking_uri = recorder.tracking_uri
    if outcome.best:
        outcome.best_params_path = _write_best(results_dir, outcome)
    _finish_parent(recorder, parent, outcome)
    return outcome


def _close_dead_runs(study: optuna.Study, recorder: Recorder, parent: str) -> None:
    """Mark FAILED (tag state=FAIL) the trial runs of FAIL trials that do not say so yet.

    Those are trials failed for want of heartbeats, on any host: a worker that died leaves its
    run RUNNING (`Recorder.mark_orphans` only sees this host's dead processes), or FINISHED
    when it died between the run's end and the trial's; a live worker whose heartbeats were
    late (see `_Driver._lost`) ended its run as if the trial had completed.
    """
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException
    from optuna.trial import TrialState

    failed = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    if not failed:
        return
    client = recorder.client
    experiment_id = client.get_run(parent).info.experiment_id
    query = f"tags.kind = 'trial' and tags.mlflow.parentRunId = '{parent}'"
    token = None
    while True:
        runs = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        for run in runs:
            trial = failed.get(int(run.data.tags.get("trial", "-1")))
            if trial is None or (run.info.status == "FAILED"
                                 and run.data.tags.get("state") == "FAIL"):
                continue
            reason = str(trial.user_attrs.get("fail_reason") or _NO_REASON)
            try:
                client.log_batch(run.info.run_id, tags=[RunTag("state", "FAIL"),
                                                        RunTag("fail_reason", reason[:5000])])
                client.set_terminated(run.info.run_id, "FAILED")
            except MlflowException:
                continue  # deleted meanwhile
            logger.warning("trial %d: its MLflow run %s marked FAILED", trial.number,
                           run.info.run_id)
        token = runs.token
        if not token:
            return


def _check_study(study: optuna.Study, config: TuneConfig, method: str,
                 directions: list[str], grid: Mapping[str, list[Any]] | None) -> None:
    """A resumed study must be of the same method, data set, objective and search: a grid
    study resumed over another grid would mix two grids' points in one "best"."""
    have = [d.name.lower() for d in study.directions]
    if have != directions:
        raise ConfigError(
            f"study {config.study_name!r} has objective directions {have}, not those of "
            f"--objective {config.objective}; choose another --study name"
        )
    wanted = {"method": method, "dataset": config.dataset, "objective": config.objective}
    attrs = study.user_attrs
    for key, value in wanted.items():
        if key in attrs and attrs[key] != value:
            raise ConfigError(
                f"study {config.study_name!r} tunes {key} {attrs[key]!r}, not {value!r}; "
                f"choose another --study name"
            )
        if key not in attrs:
            study.set_user_attr(key, value)
    search = {"sampler": config.resolved_sampler,
              "grid": {k: list(v) for k, v in sorted(grid.items())} if grid else None}
    stored = attrs.get("search")
    if stored is None:
        study.set_user_attr("search", search)
    elif stored != search:
        def text(s: Mapping[str, Any]) -> str:
            if not s.get("grid"):
                return f"--sampler {s.get('sampler')}"
            axes = " ".join(f"--grid {k}={','.join(str(v) for v in vs)}"
                            for k, vs in s["grid"].items())
            return f"--sampler grid {axes}"
        raise ConfigError(
            f"study {config.study_name!r} was tuned with {text(stored)}, not {text(search)}; "
            "resume it with the same search, or choose another --study name"
        )


def _stop_reason(study: optuna.Study, target: int, config: TuneConfig, driver: _Driver) -> str:
    from optuna.trial import TrialState

    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if n_complete >= target:
        return f"the study holds {n_complete} complete trials (asked for {target})"
    if driver.tripped:
        return f"{driver.streak} trials in a row failed (--max-failures {config.max_failures})"
    if driver.timed_out():
        return f"the --timeout of {config.timeout:g} s ran out"
    if driver.grid is not None:
        return f"every point of the {driver.grid_size}-point grid has been run"
    return "stopped"


def _summarise(t: optuna.trial.FrozenTrial) -> TrialSummary:
    attrs = t.user_attrs
    figures = attrs.get("figures") or {}
    metrics = {k: float(figures[k]) for k in _TRIAL_ATTRS if figures.get(k) is not None}
    return TrialSummary(
        number=t.number,
        state=t.state.name,
        values=list(t.values) if t.values is not None else None,
        params=dict(attrs.get("params") or t.params),
        tuned=dict(t.params),
        metrics=metrics,
        reason=str(attrs.get("fail_reason", "")) or (
            _NO_REASON if t.state.name == "FAIL" else ""
        ),
        run_id=str(figures.get("mlflow_run_id", "")),
    )


def _counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _outcome(study: optuna.Study, config: TuneConfig, url: str,
             metrics: Sequence[tuple[str, str]], new_trials: list[TrialSummary],
             stop_reason: str, reaped: int) -> TuneOutcome:
    from optuna.trial import TrialState

    best: list[TrialSummary] = []
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if len(metrics) == 1:
            best = [_summarise(study.best_trial)]
        else:
            front = [_summarise(t) for t in study.best_trials]
            best = sorted(front, key=lambda s: (-(s.values or [0.0])[0], s.number))
    failures = [_summarise(t) for t in study.get_trials(deepcopy=False,
                                                         states=(TrialState.FAIL,))]
    return TuneOutcome(
        study_name=config.study_name, storage=display_url(url), method=config.method,
        dataset=config.dataset, objective=config.objective,
        metric_names=tuple(name for name, _ in metrics), best=best, counts=_counts(study),
        new_trials=sorted(new_trials, key=lambda s: s.number), stop_reason=stop_reason,
        reaped=reaped, failures=failures,
    )


# Best parameters -------------------------------------------------------------------------


def best_params_path(results_dir: Path, study_name: str) -> Path:
    from protobench.results.names import file_stem

    return results_dir / f"best-params-{file_stem(study_name)}.json"


def _trial_record(s: TrialSummary, names: Sequence[str]) -> dict[str, Any]:
    values = dict(zip(names, s.values or [], strict=False))
    return {"trial": s.number, "values": values, "params": s.params, "tuned": s.tuned,
            "metrics": s.metrics, "mlflow_run_id": s.run_id}


def _best_document(outcome: TuneOutcome) -> dict[str, Any]:
    chosen = outcome.best[0]
    doc: dict[str, Any] = {
        "study": outcome.study_name, "storage": outcome.storage, "method": outcome.method,
        "dataset": outcome.dataset, "objective": outcome.objective,
        "trial": chosen.number, "params": chosen.params,
    }
    if outcome.objective == "pareto":
        # `params` is the front's most accurate member; `front` holds every member.
        doc["front"] = [_trial_record(s, outcome.metric_names) for s in outcome.best]
    else:
        doc.update(_trial_record(chosen, outcome.metric_names))
    return doc


def _write_best(results_dir: Path, outcome: TuneOutcome) -> Path:
    from protobench.results.table import atomic_write_text

    path = best_params_path(results_dir, outcome.study_name)
    text = json.dumps(_best_document(outcome), indent=2, sort_keys=True, default=str)
    atomic_write_text(path, text + "\n")
    return path


def _finish_parent(recorder: Recorder, parent: str, outcome: TuneOutcome) -> None:
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    step = sum(outcome.counts.values())
    metrics = [Metric(f"n_{state.lower()}", float(n), now, step)
               for state, n in outcome.counts.items()]
    tags = [RunTag("stop_reason", outcome.stop_reason[:5000])]
    if outcome.best:
        best = outcome.best[0]
        if outcome.objective == "accuracy" and best.values:
            metrics.append(Metric("best_val_accuracy", best.values[0], now, step))
        tags.append(RunTag("best_trial", str(best.number)))
        tags.append(RunTag("pareto_front_size", str(len(outcome.best))))
    client = recorder.client
    client.log_batch(parent, metrics=metrics, tags=tags)
    if outcome.best:
        client.log_text(parent, json.dumps(_best_document(outcome), indent=2, default=str),
                        "best-params.json")
    client.set_terminated(parent, "FINISHED" if outcome.ok else "FAILED")


def load_best_params(
    source: str, results_dir: Path, storage: str | None = None
) -> tuple[str, dict[str, Any]]:
    """(method, params) from a best-params JSON file or a study name.

    A study name may end in `#N` to take trial N instead of the best one; for a pareto study,
    the best is the front's most accurate member (as in its best-params file). The parameters
    are checked against the method's declarations.
    """
    from protobench.harness.registry import get_method

    path = Path(source).expanduser()
    if path.suffix == ".json" or path.is_file():
        method, params = _params_from_file(path)
    else:
        method, params = _params_from_study(source, results_dir, storage)
    return method, get_method(method).check_params(params)


def _params_from_file(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"parameters file {str(path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"parameters file {str(path)!r} cannot be read: {exc}") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("method"), str)
            and isinstance(doc.get("params"), dict)):
        raise ConfigError(
            f"parameters file {str(path)!r} needs a 'method' name and a 'params' object"
        )
    return doc["method"], dict(doc["params"])


def _params_from_study(
    source: str, results_dir: Path, storage: str | None
) -> tuple[str, dict[str, Any]]:
    import optuna
    from optuna.trial import TrialState

    name, sep, number = source.partition("#")
    url = storage_url(storage, results_dir.expanduser())
    if storage is None and not (results_dir / STORAGE_NAME).exists():
        raise ConfigError(
            f"no study {name!r}: {str(results_dir / STORAGE_NAME)!r} does not exist "
            f"(give a best-params .json file, or --storage)"
        )
    store = open_storage(url)
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = optuna.get_all_study_names(store)
        raise ConfigError(
            f"no study {name!r} in {display_url(url)!r}; studies: {', '.join(names) or 'none'}"
        ) from None
    method = study.user_attrs.get("method")
    if not isinstance(method, str):
        raise ConfigError(f"study {name!r} was not made by bench tune (no method recorded)")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if sep:
        chosen = [t for t in complete if str(t.number) == number.strip()]
        if not chosen:
            raise ConfigError(
                f"study {name!r} has no COMPLETE trial {number!r}; complete trials: "
                + (", ".join(str(t.number) for t in complete) or "none")
            )
        trial = chosen[0]
    elif not complete:
        raise ConfigError(f"study {name!r} has no COMPLETE trial yet")
    elif len(study.directions) == 1:
        trial = study.best_trial
    else:
        trial = max(study.best_trials, key=lambda t: (t.values[0], -t.number))
    return method, dict(trial.user_attrs.get("params") or trial.params)

