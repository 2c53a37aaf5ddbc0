"""Linear input projections fitted on the training split: PCA and PLS.

Both reduce flattened inputs X (N, d) to Z = (X - mean) P with P (d, d'), columns of unit
length. Neither whitens: the scores keep the variance of the data along each direction.

PCA: P holds the d' leading eigenvectors of the covariance C = Xc^T Xc, computed in float64 by
`torch.linalg.eigh`, so the result is deterministic given the data. Each column's sign is fixed so
that its entry of largest magnitude is positive.

PLS: SIMPLS (de Jong, 1993) against one-hot labels. Every step works on the cross-product matrices
C = Xc^T Xc (d, d) and S = Xc^T Yc (d, k), never on the rows, so its cost does not grow with N:
    q = leading right singular vector of S,   r = S q / |S q|      (weight, |r| = 1)
    p = C r / (r^T C r)                                              (loading)
    v = p orthogonalised against the previous v's, normalised
    S <- S - v (v^T S)                                               (deflation)
The scores t = Xc r of different steps are uncorrelated. PLS can extract at most rank(Xc)
directions: asking for more yields only those (logged), as a projection never widens its input;
training inputs with no variance at all are refused with a ConfigError.

Inverse map (`Projection.inverse`, for pictures of points that live in the projected space):
    x = mean + z (P^T P)^-1 P^T
the minimum-norm x - mean with (x - mean) P = z, so that apply(inverse(z)) = z. For PCA,
P^T P = I and this is the PCA reconstruction z P^T + mean. For PLS it is the least-squares
inverse through the weights: inverse(apply(x)) is mean + the orthogonal projection of x - mean
onto span(P), not SIMPLS's own reconstruction through its X-loadings (which the fitted
projection does not keep).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protobench.errors import ConfigError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PROJECTIONS: tuple[str, ...] = ("none", "pca", "pls")

# Rows per block when the covariance is accumulated (bounds the float32 temporaries).
_COV_BLOCK = 16384
# PLS stops when the next direction is numerical noise (C and S are accumulated from float32
# products, good to ~1e-7 of their scale): when its score variance r^T C r falls below this
# fraction of trace(C) / d, or S below this fraction of its first size: the data hold no
# further independent direction.
_PLS_RANK_TOL = 1e-6


@dataclass
class Projection:
    """A fitted projection Z = (X - mean) P; `kind == "none"` passes inputs through unchanged."""

    kind: str
    mean: torch.Tensor | None  # (d,)
    components: torch.Tensor | None  # (d, d')
    offset: torch.Tensor | None  # (d',) = -mean P, folded into one addmm

    @property
    def out_dim(self) -> int | None:
        """d', or None for the identity (the input width is kept)."""
        return None if self.components is None else int(self.components.shape[1])

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """Project X (N, d) to (N, d')."""
        if self.components is None or self.offset is None:
            return X
        import torch

        # (X - mean) P = X P - mean P
        return torch.addmm(self.offset, X, self.components)

    def inverse(self, Z: torch.Tensor) -> torch.Tensor:
        """Map projected rows Z (N, d') back to input space (N, d); see the module's notes."""
        if self.components is None or self.mean is None:
            return Z
        import torch

        if Z.ndim != 2 or Z.shape[1] != self.components.shape[1]:
            raise ValueError(
                f"Z must have shape (N, {self.components.shape[1]}) to invert a {self.kind} "
                f"projection, got {tuple(Z.shape)}"
            )
        # x = mean + z (P^T P)^-1 P^T, the Gram inverse formed in float64
        P64 = self.components.double()
        back = torch.linalg.solve(P64.T @ P64, P64.T)  # (d', d)
        out = torch.addmm(self.mean.to(Z.device, torch.float64), Z.double(), back.to(Z.device))
        return out.to(Z.dtype)

    def stored_values(self) -> int:
        """Values inference keeps: the mean and the components."""
        if self.components is None or self.mean is None:
            return 0
        return int(self.mean.numel() + self.components.numel())


def identity_projection() -> Projection:
    """The projection that leaves inputs unchanged."""
    return Projection(kind="none", mean=None, components=None, offset=None)


def centred_moments(
    X: torch.Tensor, Y: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Mean (d,), covariance sum Xc^T Xc (d, d) and cross sum Xc^T Y (d, k), all float64.

    Rows are accumulated in float32 blocks around the mean, then summed in float64.
    """
    import torch

    n, d = X.shape
    mean32 = X.mean(dim=0)
    mean = mean32.double()
    C = torch.zeros(d, d, dtype=torch.float64, device=X.device)
    S = None if Y is None else torch.zeros(d, Y.shape[1], dtype=torch.float64, device=X.device)
    for start in range(0, n, _COV_BLOCK):
        Xc = X[start:start + _COV_BLOCK] - mean32  # (b, d)
        C += (Xc.T @ Xc).double()
        if S is not None and Y is not None:
            S += (Xc.T @ Y[start:start + _COV_BLOCK].to(X.dtype)).double()
    C = 0.5 * (C + C.T)
    return mean, C, S


def _fix_signs(P: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its entry of largest magnitude is positive."""
    import torch

    rows = P.abs().argmax(dim=0)
    signs = torch.sign(P[rows, torch.arange(P.shape[1], device=P.device)])
    signs[signs == 0] = 1.0
    return P * signs


def pca_components(C: torch.Tensor, dim: int) -> torch.Tensor:
    """The `dim` leading eigenvectors (d, dim) of the symmetric matrix C, largest first."""
    import torch

    _, vecs = torch.linalg.eigh(C)  # ascending eigenvalues
    return _fix_signs(vecs[:, -dim:].flip(1))


def pls_components(C: torch.Tensor, S: torch.Tensor, dim: int) -> torch.Tensor:
    """SIMPLS weights R (d, m), unit columns, from C = Xc^T Xc and S = Xc^T Yc (float64);
    m = dim, or fewer when the data hold fewer independent directions."""
    import torch

    d = C.shape[0]
    R = torch.zeros(d, dim, dtype=C.dtype, device=C.device)
    V = torch.zeros(d, dim, dtype=C.dtype, device=C.device)
    floor = _PLS_RANK_TOL * float(C.diagonal().sum()) / d
    s_first = 0.0
    S = S.clone()
    for a in range(dim):
        # q = leading right singular vector of S;  r = S q, kept orthogonal to the earlier
        # loadings V (exact in theory, since S is; enforced here against rounding once S has
        # shrunk to noise), so that the score t = Xc r is uncorrelated with earlier scores.
        _, sv, Vh = torch.linalg.svd(S, full_matrices=False)
        s_top = float(sv[0])
        s_first = s_top if a == 0 else s_first
        r = S @ Vh[0]
        for _ in range(2):
            r = r - V[:, :a] @ (V[:, :a].T @ r)
        norm = float(r.norm())
        r = r / norm if norm > 0 else r
        # Score variance r^T C r (times N): about 0 once the loadings span the data's range.
        Cr = C @ r
        var = float(r @ Cr)
        # Exhausted: S has shrunk to rounding noise, r lies in span(V), or t has no variance.
        exhausted = s_top <= _PLS_RANK_TOL * s_first or norm <= _PLS_RANK_TOL * s_top
        if exhausted or not var > floor:
            if a == 0:
                raise ConfigError("projection=pls needs training inputs that vary; these do not")
            logger.info("PLS found %d independent directions; projecting to %d, not %d",
                        a, a, dim)
            return _fix_signs(R[:, :a])
        # p = C r / (r^T C r);  v = p - V V^T p (twice, for orthogonality), normalised
        v = Cr / var
        for _ in range(2):
            v = v - V[:, :a] @ (V[:, :a].T @ v)
        v = v / v.norm()
        # S <- S - v (v^T S)
        S = S - torch.outer(v, v @ S)
        R[:, a] = r
        V[:, a] = v
    return _fix_signs(R)


def fit_projection(
    X: torch.Tensor, y: torch.Tensor, n_classes: int, kind: str, dim: int
) -> Projection:
    """Fit `kind` (none | pca | pls) on training rows X (N, d), labels y (N,), to `dim` outputs."""
    import torch

    if kind not in PROJECTIONS:
        raise ConfigError(f"projection must be one of {', '.join(PROJECTIONS)}, got {kind!r}")
    if kind == "none":
        return identity_projection()
    n, d = X.shape
    if dim < 1:
        raise ConfigError(f"proj_dim must be >= 1, got {dim}")
    if dim > d:
        # A projection cannot widen its input: the default d'=400 on 8x8 digits keeps all 64.
        logger.warning("proj_dim %d exceeds the input width %d; projecting to %d", dim, d, d)
        dim = d
    if kind == "pca":
        mean, C, _ = centred_moments(X)
        P = pca_components(C, dim)
    else:
        Y = torch.nn.functional.one_hot(y, n_classes)
        mean, C, S = centred_moments(X, Y)
        if S is None:
            raise RuntimeError("centred_moments returned no cross sum for labelled rows")
        P = pls_components(C, S, dim)
    components = P.to(X.dtype)
    mean32 = mean.to(X.dtype)
    offset = -(mean32 @ components)
    if components.shape[1] < dim:
        logger.warning("%s found only %d directions in the training rows (their rank); "
                       "projecting to %d, not proj_dim %d", kind, components.shape[1],
                       components.shape[1], dim)
    logger.debug("fitted %s projection %d -> %d on %d rows", kind, d, components.shape[1], n)
    return Projection(kind=kind, mean=mean32, components=components, offset=offset)
