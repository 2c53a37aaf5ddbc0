"""Looking inside the runs: conditioning over training, grid-study heat maps, prototype pictures.

Every figure here is drawn from MLflow records only, so it can be made from any store:

- Conditioning: for each finished run that logged `diag_cond_<M>` / `diag_sigma_min_<M>` step
  metrics (the proto-pinv family, per epoch, for Xp and each hidden prototype matrix), both
  against the epoch on log axes, with the validation accuracy of the run's curve on a second y
  axis.
- Sensitivity: for each tuning study whose searched ranges are all finite sets (what
  `bench tune --sampler grid` records), one heat map of validation accuracy per pair of swept
  parameters, the other swept parameters held at the values of the best trial. Only trials
  that finished COMPLETE count (a pruned trial's accuracy is that of an unfinished fit); a
  point run more than once shows the mean.
- Prototypes: the pictures of `protobench.results.prototype_pictures`, redrawn from each run's
  `inspection/prototypes.npz` with the embedding the report asks for.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protobench.results.names import file_stem
from protobench.results.prototype_pictures import new_figure

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

FINISHED = "FINISHED"
COND_PREFIX = "diag_cond_"
SIGMA_PREFIX = "diag_sigma_min_"
PROTOTYPES_FILE = "prototypes.npz"
# At most this many runs per data set get conditioning curves, and prototype pictures.
MAX_CONDITIONING_RUNS = 12
MAX_PICTURE_RUNS = 6

CONDITIONING = "Conditioning over training"
_MARKERS = ("o", "s", "D", "P", "X", "h")
PROTOTYPES = "Prototypes before and after training"
SENSITIVITY = "Sensitivity: grid studies"


@dataclass
class InspectionFigure:
    """A drawn figure with what the report needs to name, group and caption it."""

    name: str
    title: str
    caption: str
    figure: Figure
    group: str


def _label(row: pd.Series) -> str:
    seed = row["seed"]
    seed_text = str(int(seed)) if seed is not None and not _isna(seed) else "-"
    return f"{row['method']} (seed {seed_text}, run {str(row['run_id'])[:8]})"


def _isna(value: Any) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def _finished_runs(runs: pd.DataFrame) -> pd.DataFrame:
    ok = runs[(runs["status"] == FINISHED) & (runs["kind"] == "run")]
    return ok.sort_values(["method", "seed", "run_id"], kind="stable")


# Conditioning over training -------------------------------------------------------------------


def conditioning_runs(runs: pd.DataFrame) -> dict[str, list[str]]:
    """{run_id: matrix names} of the finished runs that recorded conditioning diagnostics.

    A matrix counts when its condition number or smallest singular value was recorded, or
    was flagged non-finite (an infinite condition number is never logged as a number).
    """
    names = sorted({c[len(p):] for p in (COND_PREFIX, SIGMA_PREFIX) for c in runs.columns
                    if c.startswith(p)})
    out: dict[str, list[str]] = {}
    for _, row in _finished_runs(runs).iterrows():
        flagged = set(str(row["non_finite_metrics"]).split(","))
        have = [n for n in names
                if any(f"{p}{n}" in flagged or (f"{p}{n}" in row and not _isna(row[f"{p}{n}"]))
                       for p in (COND_PREFIX, SIGMA_PREFIX))]
        if have:
            out[str(row["run_id"])] = sorted(have, key=_matrix_order)
    return out


def _matrix_order(name: str) -> tuple[int, str]:
    # Xp first, then Hp1, Hp2, ... by depth, then anything else by name.
    if name == "Xp":
        return (0, "")
    if name.startswith("Hp") and name[2:].isdigit():
        return (1, f"{int(name[2:]):06d}")
    return (2, name)


def conditioning_figure(row: pd.Series, matrices: Sequence[str], steps: pd.DataFrame,
                        curve: pd.DataFrame, dataset: str) -> Figure:
    """Condition number and smallest singular value per matrix against the epoch, each panel
    with the run's validation accuracy on a second y axis.

    An epoch whose smallest singular value is 0 (a rank-deficient matrix, an infinite
    condition number) is marked at the panel's edge: a triangle at the top of the condition
    panel, at the bottom of the singular-value panel.
    """
    import matplotlib
    from matplotlib.lines import Line2D

    fig = new_figure(9.6, 6.6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    fig.subplots_adjust(left=0.1, right=0.72, top=0.91, bottom=0.09, hspace=0.12)
    colours = matplotlib.colormaps["tab10"]
    handles: list[Any] = []
    singular: dict[str, list[int]] = {}
    for i, name in enumerate(matrices):
        sigma = steps[steps["key"] == f"{SIGMA_PREFIX}{name}"]
        singular[name] = sorted(int(s) for s in sigma.loc[sigma["value"] <= 0, "step"])
        handles.append(Line2D([], [], color=colours(i % 10), marker=_MARKERS[i % 6], ms=4,
                              lw=1.6, label=_matrix_text(name)))
    panels = ((top, COND_PREFIX, "condition number σmax/σmin", "^", 0.97),
              (bottom, SIGMA_PREFIX, "smallest singular value σmin", "v", 0.03))
    for ax, prefix, what, edge_marker, edge_y in panels:
        positive: list[float] = []
        for i, name in enumerate(matrices):
            series = steps[steps["key"] == f"{prefix}{name}"].sort_values("step")
            series = series[series["value"] > 0]
            positive += [float(v) for v in series["value"]]
            ax.plot(series["step"], series["value"], marker=_MARKERS[i % 6], ms=4, lw=1.6,
                    color=colours(i % 10))
            if singular[name]:
                ax.plot(singular[name], [edge_y] * len(singular[name]), ls="none",
                        marker=edge_marker, ms=7, color=colours(i % 10), clip_on=False,
                        transform=ax.get_xaxis_transform())
        _value_scale(ax, positive, what)
        ax.grid(True, which="major", alpha=0.35)
        acc_line = _accuracy_twin(ax, curve)
        if acc_line is not None and ax is top:
            handles.append(acc_line)
    if any(singular.values()):
        handles.append(Line2D([], [], ls="none", marker="^", ms=7, color="#777777",
                              label="σmin = 0 (rank-deficient):\ncondition number infinite"))
    bottom.set_xlabel("epoch")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    top.set_title(f"{dataset}: conditioning over training,\n{_label(row)}", fontsize=11)
    top.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.15, 1.0),
               borderaxespad=0.0, fontsize=8, frameon=False)
    return fig


def _value_scale(ax: Axes, values: Sequence[float], what: str) -> None:
    """A log y axis where the values span more than a factor of 10, else a linear one."""
    if not values:
        ax.set_yticks([])
        ax.set_ylabel(f"{what}\n(no finite value)")
        return
    if max(values) / min(values) > 10:
        ax.set_yscale("log")
        ax.set_ylabel(f"{what}\n(log scale)")
    else:
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        ax.set_ylabel(what)


def _matrix_text(name: str) -> str:
    if name == "Xp":
        return "Xp (input prototypes)"
    if name.startswith("Hp") and name[2:].isdigit():
        return f"[1, act(Hp{name[2:]})] (hidden layer {name[2:]})"
    return name


def _accuracy_twin(ax: Axes, curve: pd.DataFrame) -> Any:
    """The validation accuracy (%) on a second y axis of `ax`; its line, or None."""
    twin = ax.twinx()
    twin.set_ylabel("validation accuracy (%)", color="#444444")
    if curve.empty:
        twin.set_yticks([])
        return None
    curve = curve.sort_values("step")
    (line,) = twin.plot(curve["step"], 100 * curve["val_accuracy"], color="black", ls="--",
                        lw=1.2, marker="s", ms=3, label="validation accuracy (right axis)")
    return line


def conditioning_figures(tracking_uri: str, runs: pd.DataFrame, curves: pd.DataFrame,
                         dataset: str) -> list[InspectionFigure]:
    """One conditioning figure per finished run with the diagnostics (up to the cap)."""
    from protobench.results.records import load_step_metrics

    found = conditioning_runs(runs)
    if not found:
        return []
    chosen = list(found)[:MAX_CONDITIONING_RUNS]
    if len(found) > len(chosen):
        logger.info("%s: conditioning drawn for %d of %d runs", dataset, len(chosen),
                    len(found))
    keys = sorted({f"{p}{m}" for rid in chosen for m in found[rid]
                   for p in (COND_PREFIX, SIGMA_PREFIX)})
    steps = load_step_metrics(tracking_uri, chosen, keys)
    by_id = runs.set_index("run_id")
    out = []
    for run_id in chosen:
        row = by_id.loc[run_id].copy()
        row["run_id"] = run_id
        run_steps = steps[steps["run_id"] == run_id]
        if run_steps.empty:
            continue
        curve = curves[curves["run_id"] == run_id] if len(curves) else curves
        fig = conditioning_figure(row, found[run_id], run_steps, curve, dataset)
        out.append(InspectionFigure(
            name=f"conditioning_{file_stem(str(row['method']))}_{run_id[:8]}",
            title=f"{dataset}: conditioning of {_label(row)}",
            caption=f"{_label(row)}: condition number (top) and smallest singular value "
                    "(bottom) of each prototype matrix a ridge layer solves with, after each "
                    "epoch, both on log scales; dashed black, right axis: validation accuracy "
                    "at the evaluated epochs.",
            figure=fig, group=CONDITIONING))
    return out


# Sensitivity heat maps -----------------------------------------------------------------------


@dataclass
class GridStudy:
    """A study over a finite grid: its swept parameters and its COMPLETE trials."""

    run_id: str
    name: str
    method: str
    params: list[str]
    trials: pd.DataFrame


def grid_studies(runs: pd.DataFrame) -> list[GridStudy]:
    """Studies whose searched ranges are all finite sets, with their usable trials."""
    import numpy as np

    search_cols = [c for c in runs.columns if c.startswith("search.")]
    studies = runs[runs["kind"] == "study"]
    out = []
    for _, study in studies.iterrows():
        ranges = {c[len("search."):]: str(study[c]) for c in search_cols
                  if not _isna(study[c]) and str(study[c])}
        if not ranges or not all(v.startswith("{") for v in ranges.values()):
            continue
        trials = runs[(runs["kind"] == "trial") & (runs["parent_run_id"] == study["run_id"])
                      & (runs["status"] == FINISHED)
                      & runs["trial_state"].isin(["COMPLETE", ""])]
        trials = trials[np.isfinite(trials["val_accuracy"].astype(float))]
        params = [p for p in sorted(ranges) if f"hp.{p}" in runs.columns]
        name = str(study["run_name"]).removeprefix("study-") or str(study["run_id"])[:8]
        out.append(GridStudy(str(study["run_id"]), name, str(study["method"]), params, trials))
    return out


def _values(series: pd.Series) -> list[Any]:
    """The distinct values of a column, in numeric order where all are numbers."""
    values = list(dict.fromkeys(v for v in series if not _isna(v)))
    try:
        return sorted(values, key=float)
    except (TypeError, ValueError):
        return sorted(values, key=str)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def heatmap_figure(study: GridStudy, dataset: str) -> Figure | None:
    """One heat map per pair of swept parameters; None when there is no pair or no trial."""
    import matplotlib
    import numpy as np

    trials = study.trials
    if len(study.params) < 2 or trials.empty:
        return None
    best = trials.loc[trials["val_accuracy"].astype(float).idxmax()]
    pairs = list(itertools.combinations(study.params, 2))
    ncols = min(3, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    values = {p: _values(trials[f"hp.{p}"]) for p in study.params}
    cells = []
    for a, b in pairs:
        others = [p for p in study.params if p not in (a, b)]
        keep = trials
        for p in others:
            keep = keep[keep[f"hp.{p}"] == best[f"hp.{p}"]]
        grid = np.full((len(values[a]), len(values[b])), np.nan)
        for i, va in enumerate(values[a]):
            for j, vb in enumerate(values[b]):
                hit = keep[(keep[f"hp.{a}"] == va) & (keep[f"hp.{b}"] == vb)]
                if len(hit):
                    grid[i, j] = 100 * float(hit["val_accuracy"].astype(float).mean())
        cells.append(grid)
    finite = np.concatenate([g[np.isfinite(g)] for g in cells])
    low, high = float(finite.min()), float(finite.max())
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    norm = matplotlib.colors.Normalize(vmin=low, vmax=high)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e6e6e6")

    fig = new_figure(max(4.6 * ncols + 1.2, 7.0), 4.1 * nrows + 1.0)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    image = None
    for ax, (a, b), grid in zip(axes, pairs, cells, strict=False):
        image = ax.imshow(grid, cmap=cmap, norm=norm, origin="lower", aspect="auto")
        ax.set_xticks(range(len(values[b])), [_fmt(v) for v in values[b]], fontsize=8)
        ax.set_yticks(range(len(values[a])), [_fmt(v) for v in values[a]], fontsize=8)
        ax.set_xlabel(b)
        ax.set_ylabel(a)
        others = [p for p in study.params if p not in (a, b)]
        held = ", ".join(f"{p}={_fmt(best[f'hp.{p}'])}" for p in others)
        ax.set_title(f"{a} × {b}" + (f"\n(best {held})" if held else ""), fontsize=9)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                _annotate(ax, i, j, grid[i, j], norm)
        bi = values[a].index(best[f"hp.{a}"])
        bj = values[b].index(best[f"hp.{b}"])
        ax.add_patch(matplotlib.patches.Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False,
                                                  ec="#d62728", lw=2.2))
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    fig.subplots_adjust(left=0.1, right=0.86, top=1 - 1.3 / (4.1 * nrows + 1.0),
                        bottom=0.7 / (4.1 * nrows + 1.0) + 0.02, wspace=0.45, hspace=0.55)
    assert image is not None
    cax = fig.add_axes((0.89, 0.15, 0.018, 0.7))
    bar = fig.colorbar(image, cax=cax)
    bar.set_label("validation accuracy (%)")
    fig.suptitle(f"{dataset}: study {study.name} ({study.method})\nvalidation accuracy over "
                 f"the grid; {len(trials)} complete trial(s), best boxed in red", fontsize=11)
    return fig


def _annotate(ax: Axes, i: int, j: int, value: float, norm: Any) -> None:
    if not math.isfinite(value):
        ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="#777777")
        return
    # Dark text on the light (yellow) end of viridis, light text on the dark end.
    colour = "black" if norm(value) > 0.6 else "white"
    ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=9, color=colour)


def heatmap_figures(runs: pd.DataFrame, dataset: str) -> list[InspectionFigure]:
    """One heat-map figure per grid study with at least two swept parameters."""
    out = []
    for study in grid_studies(runs):
        fig = heatmap_figure(study, dataset)
        if fig is None:
            logger.info("study %s: no heat map (%d swept parameter(s), %d complete trial(s))",
                        study.name, len(study.params), len(study.trials))
            continue
        out.append(InspectionFigure(
            name=f"sensitivity_{file_stem(study.name)}",
            title=f"{dataset}: sensitivity over the grid of study {study.name}",
            caption=f"Study {study.name} ({study.method}): validation accuracy (%) of each "
                    "grid point, one panel per pair of swept parameters, the other swept "
                    "parameters held at the best trial's values (named under each panel). "
                    "Only trials that finished COMPLETE count; a point run more than once "
                    "shows the mean; n/a: no complete trial at that point.",
            figure=fig, group=SENSITIVITY))
    return out


# Prototype pictures --------------------------------------------------------------------------


def prototype_runs(runs: pd.DataFrame) -> list[str]:
    """Finished runs that stored `inspection/prototypes.npz`, in method and seed order."""
    ok = _finished_runs(runs)
    has = ok["inspection_artifacts"].map(lambda s: PROTOTYPES_FILE in str(s).split(","))
    return [str(r) for r in ok.loc[has, "run_id"]]


def prototype_figures(tracking_uri: str, runs: pd.DataFrame, dataset: str,
                      embedding: str) -> list[InspectionFigure]:
    """The grid and the embedding of each run's prototypes (up to the cap), redrawn."""
    import numpy as np

    from protobench.errors import ResultsError
    from protobench.results import prototype_pictures
    from protobench.results.records import load_inspection_artifact

    prototype_pictures.check_embedding(embedding)
    found = prototype_runs(runs)
    by_id = runs.set_index("run_id")
    out = []
    for run_id in found[:MAX_PICTURE_RUNS]:
        row = by_id.loc[run_id].copy()
        row["run_id"] = run_id
        try:
            data = load_inspection_artifact(tracking_uri, run_id, PROTOTYPES_FILE)
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
            figures = prototype_pictures.prototype_figures(arrays, embedding)
        except (ResultsError, OSError, ValueError, KeyError) as exc:
            logger.warning("run %s: prototype pictures not drawn: %s", run_id, exc)
            continue
        stem = f"{file_stem(str(row['method']))}_{run_id[:8]}"
        name = "PCA" if embedding == "pca" else "t-SNE"
        if "prototype_grid" in figures:
            out.append(InspectionFigure(
                name=f"prototypes_{stem}", title=f"{dataset}: prototypes of {_label(row)}",
                caption=f"{_label(row)}: each input prototype (a row of Xp without its bias "
                        "column) mapped back to pixels through the inverse of the input "
                        "projection, one row per class (the argmax of its row of Yp), at fit "
                        "start and after training, on one grey scale.",
                figure=figures["prototype_grid"], group=PROTOTYPES))
        out.append(InspectionFigure(
            name=f"embedding_{stem}", title=f"{dataset}: prototype map of {_label(row)}",
            caption=f"{_label(row)}: a 2-D {name} map, fitted once on all points shown, of the "
                    "projected prototypes (outlined) among a stratified sample of training "
                    "rows, coloured by class, at fit start and after training.",
            figure=figures["prototype_embedding"], group=PROTOTYPES))
    if len(found) > MAX_PICTURE_RUNS:
        logger.info("%s: prototype pictures drawn for %d of %d runs", dataset,
                    MAX_PICTURE_RUNS, len(found))
    return out


def inspection_figures(tracking_uri: str, runs: pd.DataFrame, curves: pd.DataFrame,
                       dataset: str, embedding: str = "pca") -> list[InspectionFigure]:
    """Every inspection figure of one data set's runs, grouped as the report shows them."""
    return [*conditioning_figures(tracking_uri, runs, curves, dataset),
            *prototype_figures(tracking_uri, runs, dataset, embedding),
            *heatmap_figures(runs, dataset)]
