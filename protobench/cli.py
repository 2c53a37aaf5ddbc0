"""The `bench` command line: parsing, progress and tables; the work lives in the package.

Heavy libraries (torch, torchvision, MLflow, Optuna) are imported inside the commands that use
them, so `bench --help` and `bench list` answer quickly.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from protobench.errors import ProtobenchError

if TYPE_CHECKING:
    from rich.console import Console

    from protobench.harness.runner import RunInfo, RunResult
    from protobench.results.summary import MethodSummary

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn a user-facing error into one line on stderr and exit status 2."""
    try:
        yield
    except ProtobenchError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        click.echo(f"error: {message}", err=True)
        sys.exit(EXIT_USAGE)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="protobench")
def main(verbose: int) -> None:
    """Benchmark fast, closed-form ways of training classifiers against backprop."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    from rich.logging import RichHandler

    logging.basicConfig(
        level=level, format="%(name)s: %(message)s", datefmt="[%X]",
        handlers=[RichHandler(console=_console(stderr=True), show_path=False)],
    )


# bench list ------------------------------------------------------------------------------


@main.command("list")
def list_cmd() -> None:
    """List the registered methods with their hyperparameters, and the data sets."""
    from rich.table import Table

    from protobench.datasets import DATASET_NAMES
    from protobench.harness.registry import get_method, method_names

    console = _console()
    with _user_errors():
        for name in method_names():
            cls = get_method(name)
            table = Table(title=f"{name}: {cls.summary}", title_justify="left")
            for col in ("hyperparameter", "type", "default", "valid", "tuned over", "meaning"):
                table.add_column(col)
            for p in cls.hyperparams:
                search = "-" if p.search is None else _search_text(p.search, p.log)
                table.add_row(p.name, p.kind, str(p.default), p.describe_range(), search, p.help)
            console.print(table)
        console.print("data sets: " + ", ".join(DATASET_NAMES))


def _search_text(search: tuple[Any, ...], log: bool) -> str:
    if len(search) == 2 and all(isinstance(v, (int, float)) for v in search) and not all(
        isinstance(v, bool) for v in search
    ):
        return f"{search[0]}..{search[1]}" + (" (log)" if log else "")
    return ", ".join(str(v) for v in search)


# bench data ------------------------------------------------------------------------------


@main.group("data")
def data_group() -> None:
    """Fetch and verify data sets ahead of time."""


def _data_dir_option(func: F) -> F:
    return click.option(
        "--data-dir", type=click.Path(path_type=Path), default=None,
        help="Data folder [default: $PROTOBENCH_DATA_DIR or the user cache].",
    )(func)


@data_group.command("fetch")
@click.argument("names", nargs=-1, required=True)
@_data_dir_option
def data_fetch(names: Sequence[str], data_dir: Path | None) -> None:
    """Fetch and verify data sets NAMES (mnist, fashion-mnist, digits)."""
    from protobench.datasets import fetch

    with _user_errors():
        for name in names:
            folder = fetch(name, data_dir)
            click.echo(f"{name}: ready in {folder}")


# bench run -------------------------------------------------------------------------------


@main.command("run")
@click.option("--methods", default="all", show_default=True,
              help="'all' or a comma-separated list of method names.")
@click.option("--dataset", default="mnist", show_default=True,
              help="mnist, fashion-mnist or digits.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", "base_seed", type=int, default=0, show_default=True,
              help="Base seed; each run's seed derives from it, the data set, method and repeat.")
@click.option("--seeds", "repeats", type=int, default=1, show_default=True,
              help="Repeats of every method, each with its own derived seed.")
@click.option("--set", "assignments", multiple=True, metavar="METHOD.KEY=VALUE",
              help="Override a hyperparameter; repeatable.")
@click.option("--epochs", type=int, default=None, help="Epochs for every iterative method.")
@click.option("--time-budget", type=float, default=None,
              help="Stop iterative methods at the first checkpoint past this many fit seconds.")
@click.option("--target", type=float, default=None,
              help="Validation accuracy whose time-to-target is reported, e.g. 0.975.")
@click.option("--eval-every", type=int, default=1, show_default=True,
              help="Evaluate validation accuracy every K epochs (outside the fit clock).")
@click.option("--threads", type=int, default=None, help="Torch threads [default: all cores].")
@_data_dir_option
@click.option("--results", "results_dir", type=click.Path(path_type=Path),
              default=Path("bench-results"), show_default=True,
              help="Results folder (MLflow store and results table).")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI or the results folder].")
@click.option("--resume", is_flag=True,
              help="Skip (method, seed) runs that the results table already holds as FINISHED.")
@click.option("--params-from", default=None, metavar="FILE|STUDY",
              help="Hyperparameters from a best-params file or a study of `bench tune` "
                   "(STUDY#N for trial N); --set still overrides them.")
@click.option("--report", "with_report", is_flag=True,
              help="Build the report (plots, tables, HTML) for this data set at the end.")
def run_cmd(
    methods: str, dataset: str, device: str, base_seed: int, repeats: int,
    assignments: Sequence[str], epochs: int | None, time_budget: float | None,
    target: float | None, eval_every: int, threads: int | None, data_dir: Path | None,
    results_dir: Path, tracking_uri: str | None, resume: bool, params_from: str | None,
    with_report: bool,
) -> None:
    """Run methods on a data set under the shared timing and accuracy protocols."""
    from protobench.datasets import DATASET_NAMES
    from protobench.errors import ConfigError
    from protobench.harness.params import parse_assignments
    from protobench.harness.registry import resolve_method_list
    from protobench.harness.runner import RunConfig, plan_runs

    with _user_errors():
        if dataset not in DATASET_NAMES:
            raise ConfigError(
                f"unknown data set {dataset!r}; valid data sets: {', '.join(DATASET_NAMES)}"
            )
        names = resolve_method_list(methods)
        config = RunConfig(
            dataset=dataset, device=device, base_seed=base_seed, repeats=repeats,
            epochs=epochs, time_budget=time_budget, target=target, eval_every=eval_every,
            threads=threads,
        )
        overrides = parse_assignments(assignments)
        if params_from is not None:
            overrides = _tuned_overrides(params_from, names, results_dir, overrides)
        plans = plan_runs(names, config, overrides)
        from protobench.results.recorder import Recorder, prepare_results_dir

        prepare_results_dir(results_dir)
        recorder = Recorder(results_dir, tracking_uri)
        recorder.mark_orphans()
        if resume:
            plans = _skip_finished(plans, recorder.table_path)
        results = _run_with_progress(plans, data_dir, recorder)
    console = _console()
    _print_summary(console, results, dataset, target)
    console.print(f"records: {recorder.tracking_uri}  table: {recorder.table_path}")
    if with_report and results:
        from protobench.results.report import HTML_NAME, build_report

        with _user_errors():
            paths = build_report(recorder.tracking_uri, results_dir / "report", [dataset])
        page = [p for p in paths if p.name == HTML_NAME]
        console.print(f"report: {page[0] if page else results_dir / 'report'}")
    failed = [r for r in results if r.status != "FINISHED"]
    if failed:
        sys.exit(1)


def _tuned_overrides(
    source: str, names: Sequence[str], results_dir: Path,
    overrides: dict[str, dict[str, str]],
) -> dict[str, dict[str, Any]]:
    """Tuned parameters for the study's method, with --set applied on top."""
    from protobench.errors import ConfigError
    from protobench.harness.tuning import load_best_params

    method, params = load_best_params(source, results_dir.expanduser().resolve())
    if method not in names:
        raise ConfigError(
            f"--params-from {source!r} holds parameters of {method!r}, which is not among "
            f"--methods ({', '.join(names)})"
        )
    merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in overrides.items()}
    merged[method] = {**params, **overrides.get(method, {})}
    return merged


def _skip_finished(plans: Sequence[RunInfo], table_path: Path) -> list[RunInfo]:
    from protobench.results.recorder import finished_run_keys, run_key

    done = finished_run_keys(table_path)
    todo = [p for p in plans if run_key(p) not in done]
    skipped = len(plans) - len(todo)
    if skipped:
        click.echo(f"resume: {skipped} finished run(s) skipped, {len(todo)} to run", err=True)
    return todo


def _run_with_progress(
    plans: Sequence[RunInfo], data_dir: Path | None, recorder: Any
) -> list[RunResult]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from protobench.harness.runner import run_benchmark

    progress = Progress(
        TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), console=_console(stderr=True),
        transient=False,
    )
    display = _ProgressDisplay(progress)
    try:
        with progress:
            return run_benchmark(plans, data_dir, [recorder, display])
    except KeyboardInterrupt:
        click.echo("interrupted: finished runs are recorded; the current one is KILLED",
                   err=True)
        sys.exit(EXIT_INTERRUPTED)


class _ProgressDisplay:
    """A runner observer that draws one rich progress bar per run."""

    def __init__(self, progress: Any) -> None:
        self._progress = progress
        self._tasks: dict[tuple[str, int], Any] = {}

    def _label(self, info: RunInfo) -> str:
        suffix = f" #{info.repeat}" if info.config.repeats > 1 else ""
        return f"{info.method}{suffix}"

    def run_started(self, info: RunInfo) -> str | None:
        self._tasks[(info.method, info.repeat)] = self._progress.add_task(
            self._label(info), total=None, unit=""
        )
        return None

    def run_progress(self, info: RunInfo, done: int, total: int, unit: str) -> None:
        task = self._tasks[(info.method, info.repeat)]
        self._progress.update(task, completed=done, total=total, unit=f"{unit}s")

    def run_finished(self, result: RunResult) -> None:
        task = self._tasks[(result.info.method, result.info.repeat)]
        current = self._progress.tasks[task]
        total = current.total or 1
        self._progress.update(task, completed=total, total=total,
                              unit=result.status.lower())


def _pct(summary: Any) -> str:
    if summary is None:
        return "-"
    if summary.n == 1:
        return f"{100 * summary.mean:.2f}%"
    return f"{100 * summary.mean:.2f} ± {100 * summary.std:.2f}%"


def _seconds(value: float) -> str:
    return "not reached" if math.isinf(value) else f"{value:.1f}"


def _print_summary(
    console: Console, results: Sequence[RunResult], dataset: str, target: float | None
) -> None:
    from rich.table import Table

    from protobench.results.summary import summarise_results

    summaries: list[MethodSummary] = summarise_results(results)
    table = Table(
        title=f"{dataset}: test accuracy (mean ± std over seeds), median times, parameters",
    )
    columns = ["method", "test acc", "val acc", "fit s"]
    if target is not None:
        columns.append(f"time to {100 * target:g}% s")
    columns += ["trainable", "stored", "runs ok"]
    for col in columns:
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for s in summaries:
        row = [s.method, _pct(s.test), _pct(s.val), _seconds(s.fit.median) if s.fit else "-"]
        if target is not None:
            ttt = s.time_to_target
            row.append(_seconds(ttt.median) if ttt else "-")
        row += [f"{s.trainable_params:,}", f"{s.stored_params:,}", f"{s.finished}/{s.runs}"]
        table.add_row(*row, style=None if s.finished == s.runs else "red")
    console.print(table)
    for s in summaries:
        for error in dict.fromkeys(s.errors):
            console.print(f"[red]FAILED[/red] {error}", markup=True, highlight=False)


# bench tune ------------------------------------------------------------------------------

from protobench.harness import tuning as _tuning  # noqa: E402 - light: no optuna, no torch


@main.command("tune")
@click.option("--method", required=True, help="The method to tune (see `bench list`).")
@click.option("--dataset", default="mnist", show_default=True,
              help="mnist, fashion-mnist or digits (train and validation splits only).")
@click.option("--trials", type=int, default=None,
              help="COMPLETE trials the study should hold, earlier runs included "
                   "[default: 20, or the grid size].")
@click.option("--timeout", type=float, default=None,
              help="Start no new trial after this many seconds.")
@click.option("--objective", type=click.Choice(_tuning.OBJECTIVES), default="accuracy",
              show_default=True,
              help="accuracy: maximise validation accuracy, pruning bad trials at checkpoints. "
                   "pareto: maximise validation accuracy, minimise fit seconds and trainable "
                   "parameters (no pruning).")
@click.option("--study", "study_name", default=None,
              help="Study name [default: METHOD-DATASET-OBJECTIVE]; an existing study resumes.")
@click.option("--storage", default=None, metavar="URL|FILE",
              help="Optuna storage: an RDB URL (sqlite:///FILE, postgresql://...), a FILE "
                   "ending .db/.sqlite (SQLite), or journal:FILE / a FILE ending .log or "
                   ".journal (Optuna journal file) [default: RESULTS/optuna.db].")
@click.option("--n-jobs", type=int, default=1, show_default=True,
              help="Trials run at once by this process (threads).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the sampler and of every trial's run.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Fix a hyperparameter so that it is never tuned; repeatable.")
@click.option("--grid", "grid_items", multiple=True, metavar="KEY=V1,V2,...",
              help="One axis of the grid for --sampler grid; repeatable. Each grid point is "
                   "run once, also across resumes; other parameters keep their defaults.")
@click.option("--sampler", type=click.Choice(_tuning.SAMPLERS), default=None,
              help="[default: grid when --grid is given, else tpe]")
@click.option("--pruner", type=click.Choice(_tuning.PRUNERS), default=None,
              help="[default: median; always off for --objective pareto]")
@click.option("--no-prune", is_flag=True, help="Do not prune (same as --pruner none).")
@click.option("--max-failures", type=int, default=10, show_default=True,
              help="Stop after this many FAILED trials in a row.")
@click.option("--heartbeat", type=int, default=_tuning.DEFAULT_HEARTBEAT_S, show_default=True,
              envvar=_tuning.HEARTBEAT_ENV, show_envvar=True,
              help="Seconds between a running trial's heartbeats (RDB storage); a RUNNING "
                   "trial silent for twice as long is marked FAILED.")
@_data_dir_option
@click.option("--results", "results_dir", type=click.Path(path_type=Path),
              default=Path("bench-results"), show_default=True,
              help="Results folder (Optuna study, MLflow store, tune-trials.csv, best params).")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI or the results folder].")
@click.option("--epochs", type=int, default=None,
              help="Epochs of an iterative method (fixed, not tuned).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--threads", type=int, default=None,
              help="Torch threads of each trial [default: the cores / --n-jobs]; lower it "
                   "when other workers share this machine.")
def tune_cmd(
    method: str, dataset: str, trials: int | None, timeout: float | None, objective: str,
    study_name: str | None, storage: str | None, n_jobs: int, seed: int,
    assignments: Sequence[str], grid_items: Sequence[str], sampler: str | None,
    pruner: str | None, no_prune: bool, max_failures: int, heartbeat: int,
    data_dir: Path | None, results_dir: Path, tracking_uri: str | None, epochs: int | None,
    device: str, threads: int | None,
) -> None:
    """Tune a method's hyperparameters with Optuna on the validation split.

    The search space is each hyperparameter's declared search range (see `bench list`). The test
    split is never read. Trials of a study are logged to MLflow as child runs of one study run;
    the best parameters (the Pareto front for pareto) go to RESULTS/best-params-STUDY.json.
    Exit status 1 when the study holds no completed trial.
    """
    console = _console()
    err = _console(stderr=True)
    _quiet_optuna()
    with _user_errors():
        config = _tuning.TuneConfig(
            method=method, dataset=dataset, trials=trials, timeout=timeout,
            objective=objective, study=study_name, storage=storage, n_jobs=n_jobs, seed=seed,
            fixed=_tuning.parse_fixed(method, assignments),
            grid=_tuning.parse_grid(method, grid_items), sampler=sampler,
            pruner="none" if no_prune else pruner, max_failures=max_failures,
            results_dir=results_dir, data_dir=data_dir, tracking_uri=tracking_uri,
            epochs=epochs, device=device, heartbeat=heartbeat, threads=threads,
        )
        for note in config.notes():
            err.print(f"note: {note}", highlight=False)
        try:
            outcome = _tuning.tune(config, on_trial=lambda s, c: _trial_line(err, s, c))
        except KeyboardInterrupt:
            click.echo("interrupted: finished trials are stored; the study resumes by name",
                       err=True)
            sys.exit(EXIT_INTERRUPTED)
    _print_tune_outcome(console, outcome)
    if not outcome.ok:
        sys.exit(1)


def _quiet_optuna() -> None:
    import optuna

    verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.ERROR)


def _trial_line(console: Console, summary: Any, counts: dict[str, int]) -> None:
    colour = {"COMPLETE": "green", "PRUNED": "yellow"}.get(summary.state, "red")
    acc = summary.metrics.get("val_accuracy")
    shown = f"val acc {100 * acc:.2f}%" if acc is not None else ""
    if summary.reason:
        shown = summary.reason
    tuned = ", ".join(f"{k}={_fmt_value(v)}" for k, v in summary.tuned.items())
    total = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    console.print(
        f"trial {summary.number:>3} [{colour}]{summary.state:<8}[/{colour}] {shown}  {tuned}"
        f"  ({total})", highlight=False,
    )


def _fmt_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_tune_outcome(console: Console, outcome: Any) -> None:
    from rich.table import Table

    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(outcome.counts.items()))
    console.print(f"study {outcome.study_name} ({outcome.storage}): {counts or 'no trials'}; "
                  f"{outcome.stop_reason}", highlight=False)
    if not outcome.ok:
        console.print(f"[red]no completed trial[/red] in study {outcome.study_name}: "
                      f"nothing to report", highlight=False)
        for reason in dict.fromkeys(f.reason for f in outcome.failures if f.reason):
            console.print(f"[red]FAILED[/red] {reason}", highlight=False)
        return
    pareto = outcome.objective == "pareto"
    title = (f"{outcome.method} on {outcome.dataset}: Pareto front ({len(outcome.best)} trials)"
             if pareto else f"{outcome.method} on {outcome.dataset}: best trial")
    table = Table(title=title)
    for col in ("trial", "val acc", "fit s", "trainable params"):
        table.add_column(col, justify="right")
    names = sorted({k for s in outcome.best for k in s.tuned})
    for name in names:
        table.add_column(name, justify="right")
    for s in outcome.best:
        acc, fit = s.metrics.get("val_accuracy"), s.metrics.get("fit_seconds")
        trainable = s.metrics.get("trainable_params")
        table.add_row(
            str(s.number), "-" if acc is None else f"{100 * acc:.2f}%",
            "-" if fit is None else f"{fit:.2f}",
            "-" if trainable is None else f"{int(trainable):,}",
            *(_fmt_value(s.tuned.get(n, "-")) for n in names),
        )
    console.print(table)
    console.print(f"best parameters: {outcome.best_params_path}  records: "
                  f"{outcome.tracking_uri} (study run {outcome.parent_run_id})",
                  highlight=False)


# bench report ----------------------------------------------------------------------------


@main.command("report")
@click.option("--dataset", "datasets", multiple=True, metavar="NAME",
              help="Data set to report; repeatable or comma-separated "
                   "[default: every data set with runs].")
@click.option("--results", "report_results_dir", type=click.Path(path_type=Path),
              default=Path("bench-results"), show_default=True,
              help="Results folder whose MLflow store is read.")
@click.option("--tracking-uri", "report_tracking_uri", default=None,
              help="MLflow tracking URI to read [default: $MLFLOW_TRACKING_URI or the "
                   "results folder's store].")
@click.option("--out", "report_out", type=click.Path(path_type=Path), default=None,
              help="Folder for the report [default: RESULTS/report].")
@click.option("--format", "report_formats", default="png,svg,html,md,csv",
              show_default=True, help="Comma-separated outputs: png, svg, html, md, csv.")
@click.option("--embedding", "report_embedding", default="pca", show_default=True,
              help="2-D map of the prototype pictures: pca or tsne (slower).")
def report_cmd(
    datasets: Sequence[str], report_results_dir: Path, report_tracking_uri: str | None,
    report_out: Path | None, report_formats: str, report_embedding: str,
) -> None:
    """Plots (accuracy vs fit time and size, time to accuracy, and where recorded conditioning,
    prototype pictures and grid-study heat maps), tables and one HTML page."""
    from protobench.results.recorder import tracking_uri_for
    from protobench.results.report import HTML_NAME, build_report, parse_formats

    with _user_errors():
        names = [n.strip() for item in datasets for n in item.split(",") if n.strip()]
        formats = parse_formats(report_formats)
        uri = tracking_uri_for(report_results_dir.expanduser().resolve(), report_tracking_uri)
        out = report_out if report_out is not None else report_results_dir / "report"
        paths = build_report(uri, out, names or None, formats, report_embedding)
    for path in paths:
        click.echo(str(path))
    page = [p for p in paths if p.name == HTML_NAME]
    if page:
        click.echo(f"report: {page[0].resolve().as_uri()}", err=True)


if __name__ == "__main__":
    main()
