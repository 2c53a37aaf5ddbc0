"""Pictures of a prototype method's prototypes, drawn from recorded arrays only.

Both the proto-pinv run (for its MLflow artifacts) and `bench report` (from the run's
`inspection/prototypes.npz`) draw with these functions; the arrays' keys are those of
`protobench.methods.proto_pinv_pictures.prototype_arrays`.

- The grid: each prototype's pixel image, one row per class, at fit start and after training
  side by side, on the inputs' grey scale [0, 1] (values beyond it clipped).
- The embedding: a 2-D map (PCA, or t-SNE) of the prototypes among real training rows,
  coloured by class, fitted once on all the points so that both panels share their axes.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from protobench.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

EMBEDDINGS: tuple[str, ...] = ("pca", "tsne")
# At most this many prototypes of a class are drawn in its row of the grid.
MAX_COLUMNS = 20
_PAD = 2  # pixels between tiles
_WHEN = (("start", "at fit start"), ("end", "after training"))
_TSNE_SEED = 0


def check_embedding(embedding: str) -> str:
    """`embedding` if it is a known 2-D map, else a ConfigError naming the choices."""
    if embedding not in EMBEDDINGS:
        raise ConfigError(f"embedding must be one of {', '.join(EMBEDDINGS)}, got {embedding!r}")
    return embedding


def prototype_figures(arrays: Mapping[str, np.ndarray], embedding: str = "pca"
                      ) -> dict[str, Figure]:
    """{'prototype_grid': ..., 'prototype_embedding': ...}; the grid only for image data."""
    check_embedding(embedding)
    figures: dict[str, Figure] = {}
    grid = grid_figure(arrays)
    if grid is not None:
        figures["prototype_grid"] = grid
    figures["prototype_embedding"] = embedding_figure(arrays, embedding)
    return figures


def new_figure(width: float, height: float) -> Figure:
    """A Figure on the Agg canvas, without pyplot's global state (safe in worker threads)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _text(arrays: Mapping[str, np.ndarray], key: str, default: str = "") -> str:
    return str(arrays[key]) if key in arrays else default


def _tile_shape(arrays: Mapping[str, np.ndarray]) -> tuple[int, int] | None:
    """(height, width) of one image, or None when the rows are not 2-D images."""
    shape = [int(s) for s in arrays["image_shape"].reshape(-1) if int(s) != 1]
    d = int(arrays["images_start"].shape[1])
    if len(shape) != 2 or shape[0] * shape[1] != d:
        return None
    return shape[0], shape[1]


def _mosaic(images: np.ndarray, labels: np.ndarray, k: int, tile: tuple[int, int],
            columns: int) -> np.ndarray:
    """One array of k rows of up to `columns` tiles; NaN between and beside the tiles."""
    import numpy as np

    h, w = tile
    out = np.full((k * (h + _PAD) - _PAD, columns * (w + _PAD) - _PAD), np.nan)
    for c in range(k):
        for j, i in enumerate(np.flatnonzero(labels == c)[:columns]):
            top, left = c * (h + _PAD), j * (w + _PAD)
            out[top:top + h, left:left + w] = images[i].reshape(h, w)
    return out


def grid_figure(arrays: Mapping[str, np.ndarray]) -> Figure | None:
    """The before/after grid of pixel prototypes, or None when the rows are not images."""
    import numpy as np

    tile = _tile_shape(arrays)
    if tile is None:
        logger.debug("prototype grid skipped: image shape %s does not match the rows",
                     arrays["image_shape"])
        return None
    k = int(arrays["n_classes"])
    counts = {when: np.bincount(arrays[f"labels_{when}"], minlength=k) for when, _ in _WHEN}
    columns = max(1, min(MAX_COLUMNS, max(int(c.max()) for c in counts.values())))
    # The inputs' own range, [0, 1]: a trained prototype's values beyond it are clipped (the
    # colour bar's pointed ends say so), so that the background stays white in both panels.
    both = np.concatenate([arrays["images_start"].ravel(), arrays["images_end"].ravel()])
    both = both[np.isfinite(both)]
    below, above = bool((both < 0).any()), bool((both > 1).any())
    extend = "both" if below and above else "min" if below else "max" if above else "neither"

    tile_in = 0.36 if max(tile) >= 16 else 0.24
    width = max(7.5, 2 * columns * tile_in + 3.2)
    fig = new_figure(width, max(3.2, k * tile_in + 1.6))
    axes = fig.subplots(1, 2)
    import matplotlib

    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="#dce6f2")
    image = None
    for ax, (when, label) in zip(axes, _WHEN, strict=True):
        picture = _mosaic(arrays[f"images_{when}"], arrays[f"labels_{when}"], k, tile, columns)
        image = ax.imshow(picture, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        rows = [c * (tile[0] + _PAD) + (tile[0] - 1) / 2 for c in range(k)]
        names = [f"{c} ({int(n)})" for c, n in enumerate(counts[when])]
        ax.set_yticks(rows, names, fontsize=8 if k <= 12 else 6)
        ax.set_xticks([])
        epochs = int(arrays["epochs"]) if "epochs" in arrays else 0
        ax.set_title(f"{label} (epoch {0 if when == 'start' else epochs})", fontsize=10)
        if when == "start":
            ax.set_ylabel("class (prototypes in it)")
        hidden = int(np.clip(counts[when] - columns, 0, None).sum())
        note = f"; {hidden} more not shown" if hidden else ""
        ax.set_xlabel(f"prototypes, up to {columns} per class{note}", fontsize=9)
    assert image is not None
    bar = fig.colorbar(image, ax=list(axes), fraction=0.025, pad=0.02, extend=extend)
    bar.set_label("pixel intensity (0 = background, 1 = ink)")
    fig.suptitle(
        f"{_text(arrays, 'method', 'prototypes')}: input prototypes Xp in pixel space "
        f"({_text(arrays, 'projection', '?')} inverse), class = argmax of Yp", fontsize=11)
    return fig


def _class_colours(k: int) -> list[tuple[float, float, float, float]]:
    import matplotlib

    name = "tab10" if k <= 10 else "tab20" if k <= 20 else "turbo"
    cmap = matplotlib.colormaps[name]
    if name == "turbo":
        return [cmap(i / max(k - 1, 1)) for i in range(k)]
    return [cmap(i) for i in range(k)]


def _map_2d(points: np.ndarray, embedding: str) -> tuple[np.ndarray, tuple[str, str]]:
    """2-D coordinates of `points` (n, p) and the two axis labels."""
    import numpy as np

    centred = points - points.mean(axis=0)
    if embedding == "pca":
        _u, s, vt = np.linalg.svd(centred, full_matrices=False)
        coords = centred @ vt[:2].T
        if coords.shape[1] < 2:
            coords = np.column_stack([coords, np.zeros(len(coords))])
        share = (s**2) / max(float((s**2).sum()), 1e-300)
        labels = tuple(f"PC {i + 1} (pixel-intensity units, {100 * share[i]:.1f}% of variance)"
                       if i < len(share) else f"PC {i + 1}" for i in range(2))
        return coords, (labels[0], labels[1])
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 3)))
    tsne = TSNE(n_components=2, init="pca", random_state=_TSNE_SEED, perplexity=perplexity)
    coords = tsne.fit_transform(centred)
    return coords, ("t-SNE 1 (arbitrary units)", "t-SNE 2 (arbitrary units)")


def embedding_figure(arrays: Mapping[str, np.ndarray], embedding: str = "pca") -> Figure:
    """Prototypes (large, outlined) among training rows (small), before and after."""
    import numpy as np
    from matplotlib.lines import Line2D

    check_embedding(embedding)
    k = int(arrays["n_classes"])
    parts = [arrays["sample_z"], arrays["z_start"], arrays["z_end"]]
    sizes = [len(p) for p in parts]
    coords, (xlabel, ylabel) = _map_2d(np.concatenate(parts).astype(np.float64), embedding)
    sample, start, end = np.split(coords, np.cumsum(sizes)[:2])
    colours = np.asarray(_class_colours(k))

    fig = new_figure(12.0, 5.4)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    fig.subplots_adjust(left=0.07, right=0.86, top=0.86, bottom=0.12, wspace=0.08)
    epochs = int(arrays["epochs"]) if "epochs" in arrays else 0
    labels = arrays["sample_labels"]
    for ax, (when, title), protos in zip(axes, _WHEN, (start, end), strict=True):
        ax.scatter(sample[:, 0], sample[:, 1], s=7, c=colours[labels], alpha=0.35,
                   linewidths=0, zorder=1)
        proto_labels = arrays[f"labels_{when}"]
        ax.scatter(protos[:, 0], protos[:, 1], s=42, c=colours[proto_labels], marker="o",
                   edgecolors="black", linewidths=0.8, zorder=3)
        ax.set_title(f"{title} (epoch {0 if when == 'start' else epochs})", fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(ylabel, fontsize=9)
    handles = [Line2D([], [], ls="none", marker="o", ms=4, color="#888888", alpha=0.6,
                      label=f"training row ({len(sample)} sampled)"),
               Line2D([], [], ls="none", marker="o", ms=7, mfc="#888888", mec="black",
                      label="prototype")]
    if k <= 20:
        handles += [Line2D([], [], ls="none", marker="s", ms=7, color=colours[c],
                           label=f"class {c}") for c in range(k)]
    axes[1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                   borderaxespad=0.0, fontsize=8, frameon=False)
    name = "PCA" if embedding == "pca" else "t-SNE"
    fig.suptitle(
        f"{_text(arrays, 'method', 'prototypes')}: prototypes among training rows, "
        f"2-D {name} of the {_text(arrays, 'projection', '?')}-projected inputs "
        "(colour = class; prototypes by argmax of Yp)", fontsize=11)
    return fig

