"""What the proto-pinv family keeps with a run to be looked at: its prototypes, before and after.

`ProtoPinvH.fit` keeps a copy of Xp (Np, d'+1) and Yp (Np, k) as it starts; once the run is
scored, `prototype_artifacts` turns both copies and the trained prototypes into

- `prototypes.npz`: the arrays the pictures are drawn from (and `bench report` redraws),
- `prototype_grid.png`: Xp mapped back to pixels through the inverse of the input projection
  (`Projection.inverse`; Xp's last, bias, column is left out), one row per class,
- `prototype_embedding.png`: a 2-D PCA map of the prototypes among real training rows.

A prototype's class is the argmax of its row of Yp. The real rows are a stratified sample of
the training split (`SAMPLE_PER_CLASS` per class, from a fixed seed), projected like the
prototypes, so that both live in the space where the method trains them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from protobench.harness.api import FitData
    from protobench.harness.artifacts import Artifact
    from protobench.methods.projection import Projection

logger = logging.getLogger(__name__)

SAMPLE_PER_CLASS = 50
_SAMPLE_SEED = 0


def prototype_arrays(
    method: str, projection: Projection,
    start: tuple[torch.Tensor, torch.Tensor], end: tuple[torch.Tensor, torch.Tensor],
    data: FitData, epochs: int, sample_per_class: int = SAMPLE_PER_CLASS,
) -> dict[str, np.ndarray]:
    """The arrays of `prototypes.npz`; `start` and `end` are (Xp, Yp) pairs.

    Keys: z_start, z_end (Np, d') projected prototypes; images_start, images_end (Np, d) in
    pixel space; labels_start, labels_end (Np,); sample_z (n, d'), sample_labels (n,);
    image_shape; n_classes; epochs; method; projection.
    """
    import numpy as np
    import torch

    if sample_per_class < 1:
        raise ValueError(f"sample_per_class must be >= 1, got {sample_per_class}")
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for when, (Xp, Yp) in (("start", start), ("end", end)):
            Z = Xp.detach()[:, :-1].float()  # (Np, d'), the bias column left out
            out[f"z_{when}"] = Z.cpu().numpy()
            out[f"images_{when}"] = projection.inverse(Z).cpu().numpy()
            out[f"labels_{when}"] = Yp.detach().argmax(dim=1).cpu().numpy()
        rows = _stratified_rows(data.y.cpu(), data.n_classes, sample_per_class)
        sample = data.X.index_select(0, rows.to(data.X.device))
        out["sample_z"] = projection.apply(sample).float().cpu().numpy()
        out["sample_labels"] = data.y.cpu()[rows].numpy()
    out["image_shape"] = np.asarray(data.image_shape, dtype=np.int64)
    out["n_classes"] = np.asarray(data.n_classes, dtype=np.int64)
    out["epochs"] = np.asarray(epochs, dtype=np.int64)
    out["method"] = np.asarray(method)
    out["projection"] = np.asarray(projection.kind)
    return out


def _stratified_rows(y: torch.Tensor, k: int, per_class: int) -> torch.Tensor:
    """Up to `per_class` random row indices of each class, from a fixed seed."""
    import torch

    gen = torch.Generator().manual_seed(_SAMPLE_SEED)
    picks = []
    for c in range(k):
        rows = (y == c).nonzero().flatten()
        order = torch.randperm(rows.numel(), generator=gen)[:per_class]
        picks.append(rows[order])
    return torch.cat(picks) if picks else torch.empty(0, dtype=torch.long)


def prototype_artifacts(
    method: str, projection: Projection | None,
    start: tuple[torch.Tensor, torch.Tensor] | None,
    end: tuple[torch.Tensor, torch.Tensor] | None, data: FitData, epochs: int,
) -> dict[str, Artifact]:
    """`prototypes.npz` and the two pictures drawn from it (see the module docstring)."""
    from protobench.results.prototype_pictures import prototype_figures

    if projection is None or start is None or end is None:
        raise RuntimeError(f"{method}: prototype pictures need a finished fit")
    arrays = prototype_arrays(method, projection, start, end, data, epochs)
    named: dict[str, Any] = {"prototypes": arrays}
    named.update(prototype_figures(arrays, embedding="pca"))
    return named
