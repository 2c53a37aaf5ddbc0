"""The report: accuracy against fit time and size, Pareto fronts, curves and tables.

`build_report` reads the runs from MLflow (`records.load_runs`), so a report can be made from
any store, local or remote, long after the runs. Per data set it writes static plots (PNG,
SVG), a Markdown and a CSV table of per-method aggregates, and one self-contained HTML page
that embeds every plot as inline SVG whose points name their run's hyperparameters on hover.
Where the records hold them, it adds the figures of `protobench.results.inspection`:
conditioning over training, prototype pictures and grid-study heat maps.

Per-method aggregates and Pareto fronts use finished runs (kind "run") only; tuning trials are
drawn faintly as what they are, and FAILED or KILLED runs are listed with their errors.
"""

from __future__ import annotations

import html
import io
import logging
import math
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protobench.errors import ConfigError, ResultsError
from protobench.results.names import file_stem
from protobench.results.pareto import pareto_front

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("png", "svg", "html", "md", "csv")
HTML_NAME = "report.html"
RUNS_CSV = "runs.csv"
FINISHED = "FINISHED"
PLOTS = ("accuracy_vs_time", "accuracy_vs_params", "time_to_accuracy")
ENV_FIELDS: tuple[tuple[str, str], ...] = (
    ("env.cpu_model", "CPU"), ("env.cpu_cores", "cores"), ("env.gpu_name", "GPU"),
    ("env.gpu_memory_gb", "GPU GiB"), ("env.device", "device"), ("env.threads", "threads"),
    ("env.torch", "torch"), ("env.cuda", "CUDA"), ("env.blas", "BLAS"),
    ("env.python", "Python"), ("env.platform", "platform"), ("env.protobench", "protobench"),
    ("env.git_commit", "git commit"), ("host", "host"),
)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")
_TOOLTIP_VALUE_CHARS = 80
_CELL_CHARS = 60


def parse_formats(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """'png,svg' or a sequence into the known formats, in their canonical order."""
    if spec is None:
        return FORMATS
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    wanted = {item.strip().lower() for item in items if item.strip()}
    unknown = sorted(wanted - set(FORMATS))
    if unknown:
        raise ConfigError(
            f"unknown report format {unknown[0]!r}; valid formats: {', '.join(FORMATS)}"
        )
    if not wanted:
        raise ConfigError(f"--format needs at least one of {', '.join(FORMATS)}")
    return tuple(f for f in FORMATS if f in wanted)


# Small formatting helpers --------------------------------------------------------------------


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _pct(mean: float, std: float = math.nan, n: int = 1) -> str:
    if not _finite(mean):
        return "-"
    if n <= 1 or not _finite(std):
        return f"{100 * mean:.2f}%"
    return f"{100 * mean:.2f} ± {100 * std:.2f}%"


def _secs(value: Any) -> str:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "-"
    if math.isinf(x) and x > 0:
        return "not reached"
    if not math.isfinite(x):
        return "-"
    if abs(x) < 0.01:
        return f"{x:.2g}"
    if abs(x) < 100:
        return f"{x:.3g}"
    return f"{x:,.0f}"


def _count(value: Any) -> str:
    return f"{int(round(float(value))):,}" if _finite(value) else "-"


def _int(value: Any) -> str:
    return str(int(round(float(value)))) if _finite(value) else "-"


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _hp_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("hp.")]


def _hp_items(row: pd.Series, hp_cols: Sequence[str]) -> list[tuple[str, str]]:
    import pandas as pd

    items = []
    for col in hp_cols:
        value = row[col]
        if value is None or (not isinstance(value, str) and pd.isna(value)):
            continue
        items.append((col[3:], str(value)))
    return items


# The data behind a data set's section ---------------------------------------------------------


@dataclass
class _Figure:
    name: str
    title: str
    caption: str
    figure: Figure
    tooltips: dict[str, str] = field(default_factory=dict)
    svg: str = ""
    group: str = ""  # the heading the HTML page shows it under ("": the section's own plots)


@dataclass
class _Front:
    objective: str
    members: list[str]


@dataclass
class _Section:
    dataset: str
    stem: str
    runs: pd.DataFrame
    aggregates: pd.DataFrame
    accuracy: str
    figures: list[_Figure]
    fronts: list[_Front]
    has_target: bool
    paths: dict[str, Path] = field(default_factory=dict)


def _with_configs(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` with a `config` label: the method, plus the hyperparameters that tell its
    settings apart when one data set holds the same method with different settings."""
    frame = runs.copy()
    hp_cols = _hp_columns(frame)
    frame["config"] = frame["method"]
    is_run = frame["kind"] == "run"
    for method in frame.loc[is_run, "method"].unique():
        rows = frame.index[is_run & (frame["method"] == method)]
        signatures = {i: dict(_hp_items(frame.loc[i], hp_cols)) for i in rows}
        keys = sorted({k for sig in signatures.values() for k in sig})
        differing = [k for k in keys
                     if len({sig.get(k, "") for sig in signatures.values()}) > 1]
        if not differing:
            continue
        for i, sig in signatures.items():
            parts = ", ".join(f"{k}={_short(sig.get(k, '-'), 16)}" for k in differing)
            frame.loc[i, "config"] = f"{method} [{parts}]"
    return frame


def _accuracy_column(runs: pd.DataFrame) -> str:
    ok = runs[(runs["status"] == FINISHED) & (runs["kind"] == "run")]
    if ok["test_accuracy"].notna().any():
        return "test_accuracy"
    return "val_accuracy"


def method_aggregates(runs: pd.DataFrame, accuracy: str = "test_accuracy") -> pd.DataFrame:
    """Per-configuration aggregates over seeds of the runs (kind "run") of one data set.

    Columns: config, method, runs, failed, n (finished runs with a finite accuracy),
    acc_mean, acc_std, acc_ci95, fit_s_median, fit_s_q1, fit_s_q3, fit_s_iqr,
    trainable_params, stored_params, time_to_target_s_median (inf: not reached by most),
    peak_memory_mb_median, inference_throughput_median; best mean accuracy first.
    Non-finite values are left out of every statistic; FAILED runs only count in `failed`.
    """
    import pandas as pd

    from protobench.protocols.accuracy import summarise_accuracy, summarise_times

    frame = runs if "config" in runs.columns else _with_configs(runs)
    frame = frame[frame["kind"] == "run"]
    rows: list[dict[str, Any]] = []
    for config, group in frame.groupby("config", sort=False):
        ok = group[group["status"] == FINISHED]
        accs = [float(v) for v in ok[accuracy] if _finite(v)]
        fits = [float(v) for v in ok["time_fit_s"] if _finite(v)]
        ttts = [float(v) for v in ok["time_to_target_s"]
                if _finite(v) or (pd.notna(v) and float(v) == math.inf)]
        acc = summarise_accuracy(accs) if accs else None
        fit = summarise_times(fits) if fits else None
        ttt = summarise_times(ttts) if ttts else None
        rows.append({
            "config": config,
            "method": str(group["method"].iloc[0]),
            "runs": len(group),
            "failed": int((group["status"] != FINISHED).sum()),
            "n": acc.n if acc else 0,
            "acc_mean": acc.mean if acc else math.nan,
            "acc_std": acc.std if acc else math.nan,
            "acc_ci95": acc.ci95 if acc else math.nan,
            "fit_s_median": fit.median if fit else math.nan,
            "fit_s_q1": fit.q1 if fit else math.nan,
            "fit_s_q3": fit.q3 if fit else math.nan,
            "fit_s_iqr": fit.iqr if fit else math.nan,
            "trainable_params": ok["trainable_params"].median() if len(ok) else math.nan,
            "stored_params": ok["stored_params"].median() if len(ok) else math.nan,
            "time_to_target_s_median": ttt.median if ttt else math.nan,
            "peak_memory_mb_median": _median(ok["peak_memory_mb"]),
            "inference_throughput_median": _median(ok["inference_throughput"]),
        })
    columns = ["config", "method", "runs", "failed", "n", "acc_mean", "acc_std", "acc_ci95",
               "fit_s_median", "fit_s_q1", "fit_s_q3", "fit_s_iqr", "trainable_params",
               "stored_params", "time_to_target_s_median", "peak_memory_mb_median",
               "inference_throughput_median"]
    table = pd.DataFrame(rows, columns=columns)
    table = table.sort_values("acc_mean", ascending=False, na_position="last", kind="stable")
    return table.reset_index(drop=True)


def _median(series: pd.Series) -> float:
    values = [float(v) for v in series if _finite(v)]
    if not values:
        return math.nan
    values.sort()
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


# Plots ---------------------------------------------------------------------------------------


def _new_figure() -> tuple[Figure, Axes]:
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, 5.4), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.08, right=0.70, top=0.91, bottom=0.12)
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    return fig, ax


def _styles(configs: Iterable[str]) -> dict[str, tuple[str, str]]:
    """A (colour, marker) per configuration, stable for a given list."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    out: dict[str, tuple[str, str]] = {}
    for i, config in enumerate(configs):
        rgba = cmap(i % 10)
        colour = "#{:02x}{:02x}{:02x}".format(*(int(255 * c) for c in rgba[:3]))
        out[config] = (colour, _MARKERS[i % len(_MARKERS)])
    return out


def _log_x(ax: Axes, counts: bool, label_text: str) -> None:
    """A log x axis whose ticks read as numbers (0.5, 1, 10; 10k, 1M), not powers of ten.

    `label_text` names the axis, with `{unit}` where the unit goes: for seconds, ticks of a
    range below 0.1 s read in ms or µs so they stay short.
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    low, high = ax.get_xlim()
    scale, unit = 1.0, "count" if counts else "s"
    if not counts and high < 1e-3:
        scale, unit = 1e6, "µs"
    elif not counts and high < 1e-1:
        scale, unit = 1e3, "ms"

    def label(value: float, _pos: int) -> str:
        if counts and value >= 1e6:
            return f"{value / 1e6:g}M"
        if counts and value >= 1e3:
            return f"{value / 1e3:g}k"
        return f"{value * scale:.4g}"

    # Between the powers of ten, label every tick on a range within one decade (4.8-9.1 s
    # would otherwise show "5" alone), 2, 3 and 5 on a narrow range and 3 on a wider one.
    decades = math.log10(high / low) if low > 0 else math.inf
    if decades < 0.7:
        named: tuple[int, ...] = tuple(range(2, 10))
    else:
        named = (2, 3, 5) if decades < 1.5 else (3,) if decades < 3.5 else ()

    def minor(value: float, pos: int) -> str:
        mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
        return label(value, pos) if round(mantissa) in named else ""

    ax.xaxis.set_major_formatter(FuncFormatter(label))
    ax.xaxis.set_minor_formatter(FuncFormatter(minor) if named else NullFormatter())
    ax.set_xlabel(label_text.format(unit=unit))


def _run_tooltip(row: pd.Series, accuracy: str, hp_cols: Sequence[str]) -> str:
    kind = "tuning trial" if row["kind"] == "trial" else "run"
    seed = row["seed"]
    lines = [f"{row['config']} ({kind}, seed {_int(seed)}, "
             f"run {str(row['run_id'])[:8]})",
             f"{accuracy.replace('_', ' ')} {_pct(row[accuracy])}, "
             f"fit {_secs(row['time_fit_s'])} s, "
             f"{_count(row['trainable_params'])} trainable params"]
    if row["kind"] == "trial" and row["parent_run_id"]:
        lines.append(f"study {str(row['parent_run_id'])[:8]}")
    items = _hp_items(row, hp_cols)
    lines += [f"{k} = {_short(v, _TOOLTIP_VALUE_CHARS)}" for k, v in items]
    return "\n".join(lines)


def _scatter(
    section_stem: str, name: str, runs: pd.DataFrame, aggregates: pd.DataFrame,
    x_col: str, x_label: str, accuracy: str, styles: dict[str, tuple[str, str]],
    title: str, caption: str, front_label: str,
) -> tuple[_Figure, _Front]:
    """Accuracy against `x_col` (log x): runs, per-config means ± std, and the Pareto front."""
    import numpy as np

    fig, ax = _new_figure()
    out = _Figure(name=name, title=title, caption=caption, figure=fig)
    hp_cols = _hp_columns(runs)
    ok = runs[runs["status"] == FINISHED]
    acc = ok[accuracy].astype(float)
    xs = ok[x_col].astype(float)
    shown = ok[np.isfinite(acc) & np.isfinite(xs) & (xs > 0)]
    hidden = len(ok[ok["kind"] == "run"]) - len(shown[shown["kind"] == "run"])
    gid_base = f"{section_stem}-{name}"
    obstacles: list[tuple[float, float]] = []
    counter = 0

    trials = shown[shown["kind"] == "trial"]
    for _, row in trials.iterrows():
        colour, _marker = styles.get(row["config"], ("#777777", "o"))
        gid = f"{gid_base}-t{counter}"
        counter += 1
        ax.plot([row[x_col]], [100 * row[accuracy]], marker=".", ms=6, ls="none",
                color=colour, alpha=0.3, gid=gid, zorder=1)
        out.tooltips[gid] = _run_tooltip(row, accuracy, hp_cols)
    if len(trials):
        ax.plot([], [], marker=".", ls="none", color="#777777", alpha=0.5,
                label="tuning trials")

    runs_shown = shown[shown["kind"] == "run"]
    for config in aggregates["config"]:
        group = runs_shown[runs_shown["config"] == config]
        if group.empty:
            continue
        colour, marker = styles[config]
        for _, row in group.iterrows():
            gid = f"{gid_base}-r{counter}"
            counter += 1
            ax.plot([row[x_col]], [100 * row[accuracy]], marker=marker, ms=5, ls="none",
                    color=colour, alpha=0.45, gid=gid, zorder=2)
            out.tooltips[gid] = _run_tooltip(row, accuracy, hp_cols)
            obstacles.append((float(row[x_col]), 100 * float(row[accuracy])))
        x = group[x_col].astype(float).to_numpy()
        y = 100 * group[accuracy].astype(float).to_numpy()
        x_mean, y_mean = float(x.mean()), float(y.mean())
        x_std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
        y_std = float(y.std(ddof=1)) if len(y) > 1 else 0.0
        # On a log axis the lower error bar stops short of zero.
        x_low = min(x_std, x_mean - 0.5 * float(x.min())) if x_std else 0.0
        bars = ax.errorbar(
            [x_mean], [y_mean], xerr=[[max(x_low, 0.0)], [x_std]], yerr=[[y_std], [y_std]],
            fmt=marker, ms=9, color=colour, mec="black", mew=0.8, ecolor=colour,
            elinewidth=1.4, capsize=3, zorder=4, label=f"{config} (n={len(group)})",
        )
        gid = f"{gid_base}-m{counter}"
        counter += 1
        bars.lines[0].set_gid(gid)
        out.tooltips[gid] = (
            f"{config}: mean of {len(group)} run(s)\n"
            f"{accuracy.replace('_', ' ')} {_pct(y_mean / 100, y_std / 100, len(group))}\n"
            f"{x_col}: mean {_secs(x_mean) if 'time' in x_col else _count(x_mean)}"
        )
        obstacles.append((x_mean, y_mean))

    front = _Front(objective=front_label, members=[])
    labels: list[tuple[float, float, str]] = []
    if len(runs_shown):
        points = np.column_stack([runs_shown[accuracy].astype(float).to_numpy(),
                                  runs_shown[x_col].astype(float).to_numpy()])
        idx = pareto_front(points, maximize=(True, False))
        members = runs_shown.iloc[idx].copy()
        members["_x"] = members[x_col].astype(float)
        members["_y"] = 100 * members[accuracy].astype(float)
        members = members.sort_values(["_x", "_y"], ascending=[True, False])
        fx, fy = members["_x"].to_numpy(), members["_y"].to_numpy()
        right = float(runs_shown[x_col].astype(float).max())
        ax.step(np.append(fx, max(right, float(fx[-1]))), np.append(fy, fy[-1]),
                where="post", color="black", lw=1.1, ls="--", zorder=3,
                label="Pareto front")
        ax.plot(fx, fy, marker="o", ms=12, mfc="none", mec="black", mew=1.0, ls="none",
                zorder=3)
        best: dict[str, tuple[float, float]] = {}
        for _, row in members.iterrows():
            front.members.append(
                f"{row['config']} (seed {_int(row['seed'])}): {_pct(row[accuracy])}, "
                + (f"{_secs(row['_x'])} s" if "time" in x_col else
                   f"{_count(row['_x'])} params")
            )
            if row["config"] not in best or row["_y"] > best[row["config"]][1]:
                best[row["config"]] = (float(row["_x"]), float(row["_y"]))
        labels = [(x, y, config) for config, (x, y) in best.items()]

    ax.margins(x=0.12, y=0.14)
    _log_x(ax, "params" in x_col, x_label)
    ax.set_ylabel(f"{accuracy.replace('_', ' ')} (%)")
    ax.set_title(title)
    what = "parameter count" if "params" in x_col else "fit time"
    if shown.empty:
        ax.text(0.5, 0.5, f"no finished run with a finite accuracy and a positive {what}",
                transform=ax.transAxes, ha="center", va="center", color="#555555")
        ax.set_yticks([])
        ax.set_xticks([], minor=True)
        ax.set_xticks([])
    elif hidden > 0:
        ax.text(0.99, 0.01, f"{hidden} finished run(s) without a finite accuracy and a "
                f"positive {what} not shown",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="#555555")
    _legend(ax)
    _place_labels(fig, ax, labels, obstacles)
    return out, front


def _legend(ax: Axes) -> None:
    """The legend outside the axes, on the right, where it covers no point."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  fontsize=8, frameon=False)


def _place_labels(
    fig: Figure, ax: Axes, labels: Sequence[tuple[float, float, str]],
    obstacles: Sequence[tuple[float, float]],
) -> None:
    """Name points with small offsets, taking the first spot that overlaps nothing placed.

    Candidates are tried around each point in a fixed order; a label must stay inside the
    axes and clear of the other labels and of the plotted points; if no spot is clear the one
    with the fewest overlaps wins.
    """
    if not labels:
        return
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    frame = ax.get_window_extent(renderer)
    to_px = ax.transData.transform
    dots = [Bbox.from_bounds(px - 5, py - 5, 10, 10)
            for px, py in (to_px((x, y)) for x, y in obstacles)]
    placed: list[Bbox] = []
    candidates = [(8, 6, "left", "bottom"), (8, -6, "left", "top"),
                  (-8, 6, "right", "bottom"), (-8, -6, "right", "top"),
                  (10, 18, "left", "bottom"), (10, -18, "left", "top"),
                  (-10, 18, "right", "bottom"), (-10, -18, "right", "top"),
                  (0, 30, "center", "bottom"), (0, -30, "center", "top")]
    for x, y, text in sorted(labels, key=lambda item: item[0]):
        own = to_px((x, y))
        best: tuple[int, Any, Bbox] | None = None
        for dx, dy, ha, va in candidates:
            far = abs(dy) > 10
            ann = ax.annotate(
                text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                fontsize=8, zorder=6,
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "#999999",
                      "lw": 0.5, "alpha": 0.85},
                arrowprops={"arrowstyle": "-", "color": "#777777", "lw": 0.6} if far
                else None,
            )
            box = ann.get_window_extent(renderer)
            outside = (box.x0 < frame.x0 or box.x1 > frame.x1 or box.y0 < frame.y0
                       or box.y1 > frame.y1)
            hits = sum(box.overlaps(other) for other in placed) * 3
            hits += sum(box.overlaps(dot) for dot in dots
                        if not (abs(dot.x0 + 5 - own[0]) < 1 and abs(dot.y0 + 5 - own[1]) < 1))
            score = hits + (100 if outside else 0)
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, ann, box)
            else:
                ann.remove()
            if score == 0:
                break
        if best is not None:
            placed.append(best[2])


def _curves_figure(
    section_stem: str, runs: pd.DataFrame, curves: pd.DataFrame,
    aggregates: pd.DataFrame, styles: dict[str, tuple[str, str]], dataset: str,
) -> _Figure:
    """Validation accuracy against fit seconds: thin lines per seed, a bold mean per config."""
    import numpy as np

    title = f"{dataset}: time to accuracy (validation)"
    fig, ax = _new_figure()
    out = _Figure(name="time_to_accuracy", title=title, figure=fig,
                  caption="Validation accuracy at each evaluated epoch against the fit time "
                          "spent so far (evaluation excluded). Thin lines: single seeds; "
                          "bold: the mean over seeds at each epoch.")
    ok = runs[(runs["status"] == FINISHED) & (runs["kind"] == "run")]
    data = curves.merge(ok[["run_id", "config", "seed"]], on="run_id", how="inner")
    data = data[np.isfinite(data["val_accuracy"]) & np.isfinite(data["fit_seconds"])]
    dropped = int((data["fit_seconds"] <= 0).sum())
    data = data[data["fit_seconds"] > 0]
    counter = 0
    for config in aggregates["config"]:
        group = data[data["config"] == config]
        if group.empty:
            continue
        colour, marker = styles[config]
        for _, seed_curve in group.groupby("run_id", sort=False):
            seed_curve = seed_curve.sort_values("step")
            ax.plot(seed_curve["fit_seconds"], 100 * seed_curve["val_accuracy"], lw=0.8,
                    color=colour, alpha=0.35, marker=marker, ms=3, zorder=2)
        mean = group.groupby("step").agg(fit_seconds=("fit_seconds", "mean"),
                                         val_accuracy=("val_accuracy", "mean"),
                                         seeds=("run_id", "nunique"))
        gid = f"{section_stem}-curve-{counter}"
        counter += 1
        ax.plot(mean["fit_seconds"], 100 * mean["val_accuracy"], lw=2.0, color=colour,
                marker=marker, ms=6, mec="black", mew=0.6, zorder=4, gid=gid,
                label=f"{config} ({_seeds(group['run_id'].nunique())})")
        last = mean.iloc[-1]
        out.tooltips[gid] = (
            f"{config}: mean over {_seeds(int(last['seeds']))}\n"
            f"final validation accuracy {_pct(last['val_accuracy'])} "
            f"after {_secs(last['fit_seconds'])} s (epoch {int(mean.index[-1])})"
        )
    targets = sorted({float(t) for t in ok["target"] if _finite(t)})
    for target in targets:
        ax.axhline(100 * target, color="#555555", ls=":", lw=1.2, zorder=1,
                   label=f"target {100 * target:g}%")
    ax.margins(x=0.08, y=0.1)
    if data.empty:
        ax.text(0.5, 0.5, "no validation curves recorded", transform=ax.transAxes,
                ha="center", va="center", color="#555555")
        ax.set_xlabel("fit time elapsed (s)")
    else:
        _log_x(ax, False, "fit time elapsed ({unit}, log scale)")
    if dropped:
        ax.text(0.99, 0.01, f"{dropped} point(s) at 0 s not shown", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=7, color="#555555")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    _legend(ax)
    return out


def _svg_text(fig: _Figure, salt: str) -> str:
    """The figure as SVG text with text kept as text and a <title> on every hover target."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.figure.savefig(buffer, format="svg", bbox_inches="tight",
                           metadata={"Date": None})
    text = buffer.getvalue()
    for gid, tip in fig.tooltips.items():
        text = text.replace(f'<g id="{gid}">',
                            f'<g id="{gid}" class="hover"><title>{html.escape(tip)}</title>', 1)
    return text


def _inline_svg(svg: str) -> str:
    """SVG file text made fit to sit inside HTML: no XML prolog, scales with the page."""
    start = svg.find("<svg")
    body = svg[start:]
    head_end = body.find(">")
    head = body[:head_end]
    head = re.sub(r'\s(width|height)="[^"]*"', "", head)
    return head + ' class="plot" role="img"' + body[head_end:]


# Tables --------------------------------------------------------------------------------------


def _summary_rows(aggregates: pd.DataFrame, has_target: bool) -> tuple[list[str], list[list[str]]]:
    header = ["method", "accuracy (mean ± std)", "n", "fit s (median)", "fit s (Q1 – Q3)",
              "trainable params", "stored params"]
    if has_target:
        header.append("time to target s (median)")
    header += ["peak MB (median)", "failed"]
    rows = []
    for _, agg in aggregates.iterrows():
        row = [str(agg["config"]), _pct(agg["acc_mean"], agg["acc_std"], int(agg["n"])),
               str(int(agg["n"])), _secs(agg["fit_s_median"]),
               f"{_secs(agg['fit_s_q1'])} – {_secs(agg['fit_s_q3'])}"
               if _finite(agg["fit_s_q1"]) else "-",
               _count(agg["trainable_params"]), _count(agg["stored_params"])]
        if has_target:
            row.append(_secs(agg["time_to_target_s_median"]))
        row += [_secs(agg["peak_memory_mb_median"]), f"{int(agg['failed'])}/{int(agg['runs'])}"]
        rows.append(row)
    return header, rows


def _md_cell(text: str) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(section: _Section, image_names: Sequence[str]) -> str:
    header, rows = _summary_rows(section.aggregates, section.has_target)
    lines = [f"# {section.dataset}: per-method results", ""]
    acc = section.accuracy.replace("_", " ")
    lines.append(f"Finished runs (kind `run`) aggregated over seeds; accuracy is {acc}; "
                 "times are fit seconds (evaluation excluded).")
    lines.append("")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    lines.append("")
    for front in section.fronts:
        lines.append(f"Pareto front ({front.objective}):")
        lines.append("")
        lines += [f"- {_md_cell(m)}" for m in front.members] or ["- (none)"]
        lines.append("")
    failed = section.runs[section.runs["status"] != FINISHED]
    if len(failed):
        lines.append("Runs that did not finish:")
        lines.append("")
        for _, row in failed.iterrows():
            lines.append(f"- {_md_cell(str(row['method']))} seed {_int(row['seed'])} "
                         f"({row['status']}): {_md_cell(_short(str(row['error']), 300))}")
        lines.append("")
    for name in image_names:
        lines.append(f"![{name}]({name})")
    lines.append("")
    return "\n".join(lines)


def _environments(runs: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Each distinct environment the runs came from, with how many runs; runs that record
    none (a tuning study's parent, say) are left out."""
    cols = [(key, label) for key, label in ENV_FIELDS if key in runs.columns]
    header = [label for _, label in cols] + ["runs"]
    env_keys = [key for key, _ in cols if key.startswith("env.")]
    if not env_keys:
        return header, []
    runs = runs[(runs[env_keys] != "").any(axis=1)]
    keys = [key for key, _ in cols]
    grouped = runs.groupby(keys, dropna=False, sort=False).size()
    rows = []
    for values, count in grouped.items():
        values = values if isinstance(values, tuple) else (values,)
        rows.append([str(v) if str(v) not in ("", "nan") else "-" for v in values]
                    + [str(int(count))])
    return header, rows


# HTML ----------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5rem auto;
max-width:1180px;padding:0 1rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{margin-top:2.4rem;border-bottom:2px solid #ddd}
h3{margin-top:1.6rem}.meta{color:#555;font-size:.9rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.85rem}
th,td{border:1px solid #d8d8d8;padding:.25rem .5rem;text-align:right;vertical-align:top}
th{background:#f3f3f5;cursor:default}td:first-child,th:first-child{text-align:left}
td{white-space:nowrap}td.text{text-align:left}
td.wrap{white-space:normal;min-width:16rem;max-width:30rem;overflow-wrap:anywhere}
table.sortable th{cursor:pointer}table.sortable th:after{content:" \\2195";color:#aaa}
tr.failed td{background:#fff0f0}figure{margin:1rem 0}
figcaption{color:#555;font-size:.85rem}svg.plot{width:100%;max-width:1100px;height:auto}
svg.plot g.hover{cursor:crosshair}.warn{color:#a04000}
div.scroll{overflow-x:auto;max-width:100%}
"""

_JS = """
(function () {
  "use strict";
  function cellValue(row, index) {
    var cell = row.cells[index];
    var raw = cell ? (cell.getAttribute("data-sort") || cell.textContent) : "";
    var number = parseFloat(raw.replace(/[,%\\s]/g, ""));
    return isNaN(number) ? raw.toLowerCase() : number;
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var headers = table.tHead ? table.tHead.rows[0].cells : [];
    Array.prototype.forEach.call(headers, function (th, index) {
      th.addEventListener("click", function () {
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        var ascending = th.getAttribute("data-order") !== "asc";
        rows.sort(function (a, b) {
          var x = cellValue(a, index), y = cellValue(b, index);
          if (x === y) { return 0; }
          var less = typeof x === typeof y ? x < y : typeof x === "number";
          return (less ? -1 : 1) * (ascending ? 1 : -1);
        });
        rows.forEach(function (row) { body.appendChild(row); });
        th.setAttribute("data-order", ascending ? "asc" : "desc");
      });
    });
  });
  document.body.setAttribute("data-ready", "1");
})();
"""


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], css: str = "",
                row_classes: Sequence[str] | None = None,
                sort_keys: Sequence[Sequence[str | None]] | None = None,
                text_columns: Sequence[int] = (0,), wrap_columns: Sequence[int] = ()
                ) -> str:
    parts = ['<div class="scroll">', f'<table class="{css}">' if css else "<table>",
             "<thead><tr>"]
    parts += [f"<th>{html.escape(h)}</th>" for h in header]
    parts.append("</tr></thead><tbody>")
    for i, row in enumerate(rows):
        klass = row_classes[i] if row_classes else ""
        parts.append(f'<tr class="{klass}">' if klass else "<tr>")
        for j, cell in enumerate(row):
            classes = (["text"] if j in text_columns else []) + (
                ["wrap"] if j in wrap_columns else [])
            attrs = f' class="{" ".join(classes)}"' if classes else ""
            key = sort_keys[i][j] if sort_keys else None
            if key is not None:
                attrs += f' data-sort="{html.escape(key)}"'
            parts.append(f"<td{attrs}>{html.escape(cell)}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def _runs_table(section: _Section) -> str:
    runs = section.runs
    hp_cols = _hp_columns(runs)
    header = ["method", "kind", "seed", "status", section.accuracy.replace("_", " "),
              "val accuracy", "fit s", "trainable params", "stored params", "peak MB",
              "device", "hyperparameters", "run"]
    rows, classes, keys = [], [], []
    for _, row in runs.iterrows():
        hps = ", ".join(f"{k}={_short(v, _CELL_CHARS)}" for k, v in _hp_items(row, hp_cols))
        rows.append([str(row["config"]), str(row["kind"]), _int(row["seed"]),
                     str(row["status"]), _pct(row[section.accuracy]),
                     _pct(row["val_accuracy"]), _secs(row["time_fit_s"]),
                     _count(row["trainable_params"]), _count(row["stored_params"]),
                     _secs(row["peak_memory_mb"]), str(row["device"]), hps,
                     str(row["run_id"])[:12]])
        classes.append("" if row["status"] == FINISHED else "failed")
        keys.append([None, None, None, None, _sort_key(row[section.accuracy]),
                     _sort_key(row["val_accuracy"]), _sort_key(row["time_fit_s"]),
                     None, None, None, None, None, None])
    return _html_table(header, rows, "sortable", classes, keys,
                       text_columns=(0, 1, 3, 10, 11), wrap_columns=(11,))


def _sort_key(value: Any) -> str:
    return repr(float(value)) if _finite(value) else "-"


def _html_section(section: _Section) -> str:
    runs = section.runs
    n_run = int((runs["kind"] == "run").sum())
    n_ok = int(((runs["kind"] == "run") & (runs["status"] == FINISHED)).sum())
    n_trials = int((runs["kind"] == "trial").sum())
    parts = [f'<section id="ds-{html.escape(section.stem)}">',
             f"<h2>{html.escape(section.dataset)}</h2>",
             f'<p class="meta">{n_ok} of {n_run} run(s) finished'
             + (f", {n_trials} tuning trial(s)" if n_trials else "")
             + f"; accuracy shown is {html.escape(section.accuracy.replace('_', ' '))}. "
             "Hover over a point for its run's hyperparameters; click a column header to "
             "sort.</p>",
             "<h3>Per-method aggregates</h3>"]
    header, rows = _summary_rows(section.aggregates, section.has_target)
    parts.append(_html_table(header, rows, "sortable"))
    group = ""
    for fig in section.figures:
        if fig.group != group:
            group = fig.group
            parts.append(f"<h3>{html.escape(group)}</h3>")
        parts.append(f'<figure id="{html.escape(section.stem)}-{fig.name}">'
                     f"{_inline_svg(fig.svg)}<figcaption>{html.escape(fig.caption)}"
                     "</figcaption></figure>")
    for front in section.fronts:
        parts.append(f"<h3>Pareto front: {html.escape(front.objective)}</h3><ul>")
        parts += [f"<li>{html.escape(m)}</li>" for m in front.members] or ["<li>none</li>"]
        parts.append("</ul>")
    failed = runs[runs["status"] != FINISHED]
    if len(failed):
        parts.append(f'<h3 class="warn">Runs that did not finish ({len(failed)})</h3>')
        rows = [[str(r["method"]), _int(r["seed"]), str(r["status"]), str(r["error"])]
                for _, r in failed.iterrows()]
        parts.append(_html_table(["method", "seed", "status", "error"], rows,
                                 text_columns=(0, 2, 3), wrap_columns=(3,)))
    parts.append(f"<h3>All runs ({len(runs)})</h3>")
    parts.append(_runs_table(section))
    header, rows = _environments(runs)
    parts.append("<h3>Environment</h3>")
    if len(rows) > 1:
        parts.append('<p class="warn">These runs come from more than one environment; '
                     "compare their times with care.</p>")
    parts.append(_html_table(header, rows, text_columns=tuple(range(len(header) - 1))))
    parts.append("</section>")
    return "\n".join(parts)


def _html_page(sections: Sequence[_Section], uri: str) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    nav = " · ".join(f'<a href="#ds-{html.escape(s.stem)}">{html.escape(s.dataset)}</a>'
                     for s in sections)
    body = "\n".join(_html_section(s) for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>protobench report: {html.escape(', '.join(s.dataset for s in sections))}"
        f"</title><style>{_CSS}</style></head>\n<body>\n"
        "<h1>protobench report</h1>"
        f'<p class="meta">Made {html.escape(stamp)} from the MLflow store '
        f"<code>{html.escape(uri)}</code>. Data sets: {nav}</p>\n"
        f"{body}\n<script>{_JS}</script>\n</body></html>\n"
    )


# The whole report ----------------------------------------------------------------------------


def _section(dataset: str, runs: pd.DataFrame, curves: pd.DataFrame,
             styles: dict[str, tuple[str, str]]) -> _Section:
    stem = file_stem(dataset)
    accuracy = _accuracy_column(runs)
    aggregates = method_aggregates(runs, accuracy)
    ok = runs[(runs["status"] == FINISHED) & (runs["kind"] == "run")]
    has_target = bool(ok["target"].notna().any())
    acc_word = "test" if accuracy == "test_accuracy" else "validation"
    time_fig, time_front = _scatter(
        stem, "accuracy_vs_time", runs, aggregates, "time_fit_s",
        "fit time ({unit}, log scale)", accuracy, styles,
        f"{dataset}: {acc_word} accuracy vs fit time",
        "Each small marker is a run; large markers are per-method means with error bars of "
        "one standard deviation over seeds; the dashed staircase is the Pareto front "
        "(higher accuracy, less fit time).",
        f"max {acc_word} accuracy, min fit time",
    )
    size_fig, size_front = _scatter(
        stem, "accuracy_vs_params", runs, aggregates, "trainable_params",
        "trainable parameters ({unit}, log scale)", accuracy, styles,
        f"{dataset}: {acc_word} accuracy vs trainable parameters",
        "Each small marker is a run; large markers are per-method means (± one standard "
        "deviation over seeds); the dashed staircase is the Pareto front (higher accuracy, "
        "fewer trainable parameters).",
        f"max {acc_word} accuracy, min trainable parameters",
    )
    curve_fig = _curves_figure(stem, runs, curves, aggregates, styles, dataset)
    return _Section(dataset=dataset, stem=stem, runs=runs, aggregates=aggregates,
                    accuracy=accuracy, figures=[time_fig, size_fig, curve_fig],
                    fronts=[time_front, size_front], has_target=has_target)


def build_report(
    tracking_uri: str,
    out_dir: Path,
    datasets: Sequence[str] | None = None,
    formats: Sequence[str] | str | None = None,
    embedding: str = "pca",
) -> list[Path]:
    """Write the report of the runs in `tracking_uri` into `out_dir`; the paths written.

    `datasets`: the data sets to report (default: every one with runs). `formats`: any of
    png, svg, html, md, csv (default: all). Per data set `<name>_accuracy_vs_time`,
    `<name>_accuracy_vs_params` and `<name>_time_to_accuracy` plots; where recorded,
    `<name>_conditioning_<method>_<run>` per run, `<name>_prototypes_<method>_<run>` and
    `<name>_embedding_<method>_<run>` (a 2-D map by `embedding`: pca or tsne) per run that
    kept its prototypes, and `<name>_sensitivity_<study>` per grid study; then
    `<name>_summary.md`, `<name>_summary.csv`, `runs.csv` (the whole tidy table) and
    `report.html`. Raises NoRunsError / ResultsError for a store without such runs or one
    that cannot be read, ConfigError for an unknown format or embedding.
    """
    from protobench.results.inspection import inspection_figures
    from protobench.results.prototype_pictures import check_embedding
    from protobench.results.records import load_curves, load_runs

    wanted = parse_formats(formats)
    check_embedding(embedding)
    runs = load_runs(tracking_uri, datasets)
    out_dir = Path(out_dir).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsError(f"cannot create the report folder {str(out_dir)!r}: "
                           f"{exc.strerror or exc}") from None
    order = list(dict.fromkeys(datasets)) if datasets else sorted(runs["dataset"].unique())
    runs = _with_configs_per_dataset(runs)
    styles = _styles(_config_order(runs))
    ok_ids = runs.loc[(runs["status"] == FINISHED) & (runs["kind"] == "run"), "run_id"]
    curves = load_curves(tracking_uri, list(ok_ids))
    written: list[Path] = []
    sections: list[_Section] = []
    for dataset in order:
        subset = runs[runs["dataset"] == dataset].reset_index(drop=True)
        section = _section(dataset, subset, curves, styles)
        if set(wanted) & {"png", "svg", "html"}:
            section.figures += [
                _Figure(name=f.name, title=f.title, caption=f.caption, figure=f.figure,
                        group=f.group)
                for f in inspection_figures(tracking_uri, subset, curves, dataset, embedding)
            ]
        sections.append(section)
        written += _write_section(section, out_dir, wanted)
    if "csv" in wanted:
        path = out_dir / RUNS_CSV
        runs.drop(columns=["config"]).to_csv(path, index=False)
        written.append(path)
    if "html" in wanted:
        for section in sections:
            for fig in section.figures:
                if not fig.svg:
                    fig.svg = _svg_text(fig, f"{section.stem}-{fig.name}")
        path = out_dir / HTML_NAME
        path.write_text(_html_page(sections, tracking_uri), encoding="utf-8")
        written.append(path)
    for section in sections:
        for fig in section.figures:
            fig.figure.clear()
    logger.info("report of %d data set(s) written to %s", len(sections), out_dir)
    return written


def _with_configs_per_dataset(runs: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    parts = [_with_configs(group) for _, group in runs.groupby("dataset", sort=False)]
    return pd.concat(parts).sort_index() if parts else runs.assign(config=runs["method"])


def _config_order(runs: pd.DataFrame) -> list[str]:
    """Configurations in a stable order (by name), so one method keeps its colour everywhere."""
    return sorted(runs["config"].unique(), key=lambda c: (str(c).split(" [")[0], str(c)))


def _write_section(section: _Section, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    written: list[Path] = []
    images: list[str] = []
    for fig in section.figures:
        base = f"{section.stem}_{fig.name}"
        if "png" in formats:
            path = out_dir / f"{base}.png"
            fig.figure.savefig(path, format="png", dpi=150, bbox_inches="tight")
            written.append(path)
            images.append(path.name)
        if "svg" in formats:
            fig.svg = _svg_text(fig, f"{section.stem}-{fig.name}")
            path = out_dir / f"{base}.svg"
            path.write_text(fig.svg, encoding="utf-8")
            written.append(path)
            if "png" not in formats:
                images.append(path.name)
        section.paths[fig.name] = out_dir / base
    if "md" in formats:
        path = out_dir / f"{section.stem}_summary.md"
        path.write_text(_markdown(section, images), encoding="utf-8")
        written.append(path)
    if "csv" in formats:
        path = out_dir / f"{section.stem}_summary.csv"
        section.aggregates.to_csv(path, index=False)
        written.append(path)
    return written
