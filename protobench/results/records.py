"""Reads the runs recorded in MLflow back into one tidy pandas table.

Everything here reads MLflow records only (runs, their tags, params, metrics and artifacts),
never live harness objects, so the same code serves a local SQLite store and a tracking
server. The recorder's format is the contract: experiments `protobench-<dataset>`, tags
`method`, `dataset`, `kind`, `status`, `error`, `env.*`, `non_finite_metrics`, a tuning
trial's `state` and the list of `inspection/` artifacts, params `hp.*` plus the invocation's
rules (and a study's `search.*`), scalar metrics, and the step metrics of the validation curve
and of the methods' diagnostics (`diag_*` at each epoch).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from protobench.errors import ResultsError
from protobench.harness.artifacts import ARTIFACT_DIR, ARTIFACTS_TAG
from protobench.results.names import mlflow_key, sqlite_path
from protobench.results.recorder import TRUNCATION_MARK

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

T = TypeVar("T")

EXPERIMENT_PREFIX = "protobench-"
# Runs still RUNNING (or SCHEDULED) are in flight, not results; every ended status is read.
ENDED_STATUSES = ("FINISHED", "FAILED", "KILLED")
# How the recorder marks a parameter value cut short; the whole value is in params.json.
LONG_PARAMS_ARTIFACT = "params.json"
CURVE_METRICS = ("curve_val_accuracy", "curve_fit_seconds")
_PROBE_TIMEOUT_S = 5.0
_PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"

# The columns every table has, in this order; hp.*, diag_* and env.* columns follow.
BASE_COLUMNS: tuple[str, ...] = (
    "run_id", "run_name", "dataset", "method", "kind", "parent_run_id", "status", "error",
    "seed", "repeat", "base_seed", "device",
    "test_accuracy", "val_accuracy",
    "time_data_load_s", "time_preprocess_s", "time_warmup_s", "time_fit_s",
    "time_evaluation_s", "time_inference_s",
    "target", "time_to_target_s", "target_reached",
    "trainable_params", "stored_params", "inference_throughput", "peak_memory_mb",
    "cut_by_budget", "non_finite_metrics", "trial_state", "inspection_artifacts",
    "epochs", "time_budget", "eval_every", "threads", "eval_batch",
    "start_time", "end_time", "host", "experiment_id",
)
_INT_COLUMNS = ("seed", "repeat", "base_seed", "trainable_params", "stored_params",
                "epochs", "eval_every", "threads", "eval_batch")
_FLOAT_PARAMS = ("target", "time_budget")
_RULE_PARAMS = ("seed", "repeat", "base_seed", "epochs", "time_budget", "target",
                "eval_every", "threads", "eval_batch")


class NoRunsError(ResultsError):
    """The store holds no protobench runs (for the data sets asked for)."""


def open_store(tracking_uri: str) -> MlflowClient:
    """An MLflow client for `tracking_uri`, after checking the store is there to be read.

    A local SQLite or file store that does not exist is an error rather than a new empty
    store; an HTTP tracking server that cannot be reached fails within seconds instead of
    after MLflow's minutes of retries.
    """
    from mlflow.tracking import MlflowClient

    from protobench.results.recorder import _quiet_mlflow

    _quiet_mlflow()
    _check_store_exists(tracking_uri)
    try:
        return MlflowClient(tracking_uri=tracking_uri)
    except Exception as exc:
        raise ResultsError(f"cannot open the MLflow store {tracking_uri!r}: {exc}") from None


def _check_store_exists(uri: str) -> None:
    scheme, sep, rest = uri.partition(":")
    if not sep or len(scheme) == 1:  # a plain path (or a Windows drive letter)
        scheme, rest = "file", uri
    scheme = scheme.lower()
    if scheme == "sqlite":
        file = sqlite_path(uri)
        if file is not None and not file.is_file():
            path = str(file)
            raise ResultsError(
                f"no MLflow store at {path}: nothing was recorded there yet "
                "(run `bench run` with the same --results, or pass --tracking-uri)"
            )
    elif scheme == "file":
        path = rest[2:] if rest.startswith("//") else rest
        if not Path(path).exists():
            raise ResultsError(f"no MLflow store at {path}: the folder does not exist")
    elif scheme in ("http", "https"):
        _probe_server(uri)


def _probe_server(uri: str) -> None:
    """Fail fast when nothing answers at `uri`; any HTTP answer at all counts as reachable."""
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=_PROBE_TIMEOUT_S) as response:
            response.read(64)
    except urllib.error.HTTPError:
        return  # the server answered, if not at /health: let MLflow talk to it
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ResultsError(f"cannot reach the MLflow tracking server {uri}: {reason}") from None


def _store_call(uri: str, what: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call the MLflow client; a failure of the store becomes one clear ResultsError."""
    try:
        return func(*args, **kwargs)
    except ResultsError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ResultsError(f"cannot {what} from the MLflow store {uri!r}: {first}") from None


def _experiments(client: MlflowClient, uri: str, datasets: Sequence[str] | None
                 ) -> dict[str, str]:
    """{experiment id: data set} of the protobench experiments to read."""
    found: dict[str, str] = {}
    token: str | None = None
    while True:
        page = _store_call(uri, "list experiments", client.search_experiments,
                           max_results=1000, page_token=token)
        for exp in page:
            if exp.name.startswith(EXPERIMENT_PREFIX):
                found[str(exp.experiment_id)] = exp.name[len(EXPERIMENT_PREFIX):]
        token = page.token
        if not token:
            break
    available = sorted(set(found.values()))
    if datasets is None:
        if not found:
            raise NoRunsError(f"no protobench runs in the MLflow store {uri}")
        return found
    missing = [d for d in datasets if d not in available]
    if missing:
        have = ", ".join(available) if available else "none"
        raise NoRunsError(
            f"no runs for data set {missing[0]!r} in the MLflow store {uri} "
            f"(data sets with runs: {have})"
        )
    return {eid: ds for eid, ds in found.items() if ds in datasets}


def _search_runs(client: MlflowClient, uri: str, experiment_ids: list[str]) -> list[Run]:
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = _store_call(uri, "read runs", client.search_runs, experiment_ids,
                           max_results=1000, page_token=token,
                           order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _long_params(client: MlflowClient, uri: str, run_id: str) -> dict[str, str]:
    """{MLflow param key: whole value} from the run's params.json; {} if it cannot be read."""
    with tempfile.TemporaryDirectory(prefix="protobench-params-") as tmp, _no_progress_bar():
        try:
            path = client.download_artifacts(run_id, LONG_PARAMS_ARTIFACT, tmp)
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except Exception as exc:
            logger.warning("run %s: whole parameter values unreadable from %s (%s); "
                           "keeping the shortened ones", run_id, uri, exc)
            return {}
    return {mlflow_key(str(k)): str(v) for k, v in data.items()}


@contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow draws a progress bar on stderr per downloaded artifact, unless told not to."""
    if _PROGRESS_ENV in os.environ:
        yield
        return
    os.environ[_PROGRESS_ENV] = "false"
    try:
        yield
    finally:
        os.environ.pop(_PROGRESS_ENV, None)


def _number(text: str | None) -> float | int:
    """A recorded parameter as a number: ints stay exact (seeds use all 63 bits)."""
    if text is None or text in ("", "None"):
        return math.nan
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return math.nan


def _to_int64(series: pd.Series) -> pd.Series:
    """A nullable Int64 column built value by value, never through float64 (exact seeds)."""
    import pandas as pd

    values: list[int | None] = []
    for value in series:
        if isinstance(value, bool):
            values.append(int(value))
        elif isinstance(value, int):
            values.append(value)
        elif isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            values.append(int(value))
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            values.append(int(round(number)) if math.isfinite(number) else None)
    return pd.Series(pd.array(values, dtype="Int64"), index=series.index, name=series.name)


def _row(run: Run, dataset: str, long_values: dict[str, str]) -> dict[str, Any]:
    import pandas as pd

    tags, params, metrics = run.data.tags, dict(run.data.params), run.data.metrics
    params.update({k: v for k, v in long_values.items() if k in params})
    non_finite = [k for k in tags.get("non_finite_metrics", "").split(",") if k]
    row: dict[str, Any] = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name or "",
        "dataset": tags.get("dataset") or dataset,
        "method": tags.get("method") or params.get("method", ""),
        "kind": tags.get("kind", "run") or "run",
        "parent_run_id": tags.get("mlflow.parentRunId", ""),
        "status": run.info.status,
        "error": tags.get("error", ""),
        "device": tags.get("env.device") or params.get("device", ""),
        "cut_by_budget": tags.get("cut_by_budget", "false") == "true",
        "non_finite_metrics": ",".join(non_finite),
        "trial_state": tags.get("state", ""),
        "inspection_artifacts": tags.get(ARTIFACTS_TAG, ""),
        "host": tags.get("host", ""),
        "experiment_id": str(run.info.experiment_id),
        "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True)
        if run.info.start_time else pd.NaT,
        "end_time": pd.to_datetime(run.info.end_time, unit="ms", utc=True)
        if run.info.end_time else pd.NaT,
    }
    for key in _RULE_PARAMS:
        row[key] = _number(params.get(key))
    for key, value in params.items():
        if key.startswith(("hp.", "search.")):
            row[key] = value
    for key, number in metrics.items():
        if key not in CURVE_METRICS:
            row[key] = float(number)
    for key in non_finite:
        # Never logged: a NaN here, except an unreached target, which the recorder writes as
        # +inf on purpose (the accuracy protocol's medians keep it as "not reached").
        row[mlflow_key(key)] = math.inf if key == "time_to_target_s" else math.nan
    ttt = row.get("time_to_target_s", math.nan)
    row["target_reached"] = bool(math.isfinite(ttt)) if not math.isnan(ttt) else pd.NA
    for key, value in tags.items():
        if key.startswith("env."):
            row[key] = value
    return row


def _typed_hp(series: pd.Series) -> pd.Series:
    """A hyperparameter column as int, float or bool where every recorded value is one."""
    import pandas as pd

    present = series.dropna()
    if present.empty:
        return series
    texts = present.astype(str)
    if texts.isin(["True", "False"]).all():
        return series.map({"True": True, "False": False}, na_action="ignore").astype("boolean")
    numbers = pd.to_numeric(texts, errors="coerce")
    if numbers.isna().any():
        return series
    if texts.str.fullmatch(r"[+-]?\d+").all():
        return _to_int64(series)
    return pd.to_numeric(series, errors="coerce").astype(float)


_TEXT_COLUMNS = ("run_id", "run_name", "dataset", "method", "kind", "parent_run_id",
                 "status", "error", "device", "non_finite_metrics", "trial_state",
                 "inspection_artifacts", "host", "experiment_id")


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    # Built as objects first, so 63-bit seeds never pass through float64.
    frame = pd.DataFrame(rows, dtype=object)
    for col in BASE_COLUMNS:
        if col not in frame.columns:
            frame[col] = None
    hp = sorted(c for c in frame.columns if c.startswith("hp."))
    search = sorted(c for c in frame.columns if c.startswith("search."))
    diag = sorted(c for c in frame.columns if c.startswith("diag_"))
    env = sorted(c for c in frame.columns if c.startswith("env."))
    rest = sorted(set(frame.columns) - set(BASE_COLUMNS) - set(hp) - set(search) - set(diag)
                  - set(env))
    frame = frame[list(BASE_COLUMNS) + hp + search + rest + diag + env].copy()
    for col in _INT_COLUMNS:
        frame[col] = _to_int64(frame[col])
    for col in hp:
        frame[col] = _typed_hp(frame[col])
    for col in ("start_time", "end_time"):
        frame[col] = pd.to_datetime(frame[col], utc=True)
    frame["target_reached"] = frame["target_reached"].astype("boolean")
    frame["cut_by_budget"] = frame["cut_by_budget"].fillna(False).astype(bool)
    for col in (*_TEXT_COLUMNS, *search, *env):
        frame[col] = frame[col].fillna("").astype(str)
    numeric = set(frame.columns) - set(_INT_COLUMNS) - set(hp) - set(search) - set(env)
    numeric -= set(_TEXT_COLUMNS)
    numeric -= {"start_time", "end_time", "target_reached", "cut_by_budget"}
    for col in sorted(numeric):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    return frame.reset_index(drop=True)


def load_runs(tracking_uri: str, datasets: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per ended run of the protobench experiments in the MLflow store.

    Columns: identity (`run_id`, `dataset`, `method`, `kind` -- "run", "trial" for a tuning
    trial with its `parent_run_id`, "study" for a tuning parent -- `status`, `error`,
    `seed`, ...), the run rules (`target`, `epochs`, ...), every hyperparameter as `hp.<name>`
    (typed where all values parse), the scalar metrics (`test_accuracy`, `time_fit_s`,
    `trainable_params`, ...), `diag_*`, a study's searched ranges as `search.<name>`, a
    trial's Optuna `trial_state` (COMPLETE, PRUNED, FAIL), the comma-separated file names
    of the run's `inspection_artifacts`, and the environment as `env.<field>`. Metrics the
    recorder flagged non-finite are NaN (an unreached target's `time_to_target_s` is +inf,
    with `target_reached` false). Parameter values the recorder shortened are restored
    whole from the run's params.json. FAILED and KILLED runs are rows like the others:
    filter on `status`. Runs still RUNNING are left out.

    Raises NoRunsError when the store holds no runs for a data set asked for, and
    ResultsError when the store cannot be opened or read.
    """
    wanted = None if datasets is None else list(dict.fromkeys(datasets))
    client = open_store(tracking_uri)
    experiments = _experiments(client, tracking_uri, wanted)
    runs = _search_runs(client, tracking_uri, list(experiments))
    rows: list[dict[str, Any]] = []
    skipped = 0
    for run in runs:
        if run.info.status not in ENDED_STATUSES:
            skipped += 1
            continue
        long_values: dict[str, str] = {}
        if any(v.endswith(TRUNCATION_MARK) for v in run.data.params.values()):
            long_values = _long_params(client, tracking_uri, run.info.run_id)
        rows.append(_row(run, experiments[str(run.info.experiment_id)], long_values))
    if skipped:
        logger.info("%d run(s) still in flight left out of the table", skipped)
    found = {row["dataset"] for row in rows}
    for name in wanted or ():
        if name not in found:
            raise NoRunsError(f"no ended runs for data set {name!r} in the MLflow store "
                              f"{tracking_uri}")
    if not rows:
        raise NoRunsError(f"no ended protobench runs in the MLflow store {tracking_uri}")
    return _frame(rows)


def load_curves(tracking_uri: str, run_ids: Iterable[str]) -> pd.DataFrame:
    """The validation curves of `run_ids` in long form: run_id, step, fit_seconds, val_accuracy.

    One row per evaluated epoch (the step), from the recorder's step metrics
    `curve_val_accuracy` and `curve_fit_seconds`; a run without a curve has no rows.
    """
    import pandas as pd

    client = open_store(tracking_uri)
    rows: list[dict[str, Any]] = []
    for run_id in run_ids:
        series: dict[str, dict[int, float]] = {}
        for key in CURVE_METRICS:
            history = _store_call(tracking_uri, "read a curve", client.get_metric_history,
                                  run_id, key)
            series[key] = {int(m.step): float(m.value) for m in history}
        accuracy, seconds = series["curve_val_accuracy"], series["curve_fit_seconds"]
        for step in sorted(set(accuracy) & set(seconds)):
            rows.append({"run_id": run_id, "step": step, "fit_seconds": seconds[step],
                         "val_accuracy": accuracy[step]})
    frame = pd.DataFrame(rows, columns=["run_id", "step", "fit_seconds", "val_accuracy"])
    # Typed even when empty (a store of tuning trials only has no curves to read).
    return frame.astype({"step": "int64", "fit_seconds": "float64", "val_accuracy": "float64"})


def load_step_metrics(tracking_uri: str, run_ids: Iterable[str], keys: Iterable[str]
                      ) -> pd.DataFrame:
    """Step metrics `keys` of `run_ids` in long form: run_id, key, step, value.

    Only steps >= 1 are read: a step metric's step is the epoch it was measured after, while
    the recorder logs a run's final scalar figures (e.g. `diag_cond_Xp`) at step 0. A key a
    run never logged gives no rows.
    """
    import pandas as pd

    client = open_store(tracking_uri)
    wanted = list(dict.fromkeys(keys))
    rows: list[dict[str, Any]] = []
    for run_id in run_ids:
        for key in wanted:
            history = _store_call(tracking_uri, "read step metrics", client.get_metric_history,
                                  run_id, key)
            steps = {int(m.step): float(m.value) for m in history if int(m.step) >= 1}
            rows += [{"run_id": run_id, "key": key, "step": step, "value": value}
                     for step, value in sorted(steps.items())]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def load_inspection_artifact(tracking_uri: str, run_id: str, name: str) -> bytes:
    """The bytes of the run's `inspection/<name>` artifact; ResultsError if it is unreadable."""
    client = open_store(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="protobench-inspect-") as tmp, _no_progress_bar():
        path = _store_call(tracking_uri, f"read the artifact {ARTIFACT_DIR}/{name}",
                           client.download_artifacts, run_id, f"{ARTIFACT_DIR}/{name}", tmp)
        return Path(path).read_bytes()
