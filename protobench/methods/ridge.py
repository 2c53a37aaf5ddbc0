"""The closed-form ridge solve that every method shares.

    W = argmin_W |A W - B|^2 + lam |W|^2

Primal form (A has at least as many rows as columns):   (A^T A + lam I) W = A^T B
Dual form (fewer rows than columns):   W = A^T (A A^T + lam I)^-1 B
The two are equal by the push-through identity (A^T A + lam I)^-1 A^T = A^T (A A^T + lam I)^-1.

Both reduce to one symmetric positive-definite system (G + lam I) X = C, solved by Cholesky.
Gradients flow through `torch.linalg.cholesky_ex` and `torch.cholesky_solve`: autograd
differentiates the factorisation itself, so d/dG of X = (G + lam I)^-1 C is
-(G + lam I)^-1 dG X without any hand-written adjoint.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch

from protobench.errors import ConfigError, SolveError

logger = logging.getLogger(__name__)

Form = Literal["auto", "primal", "dual"]

# Relative size of the diagonal jitter added on the float64 retry, scaled by the mean diagonal.
_RETRY_JITTER = 1e-10


@dataclass
class SolveStats:
    """Counts of what the solves of one fit had to do; a method keeps one and reports it."""

    solves: int = 0
    retries: int = 0


def check_lam(lam: float, name: str = "lam") -> None:
    """Refuse a ridge strength that is not a finite number > 0."""
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {lam!r}")


def solve_spd(
    G: torch.Tensor, C: torch.Tensor, lam: float | torch.Tensor,
    stats: SolveStats | None = None, what: str = "ridge system",
) -> torch.Tensor:
    """Solve (G + lam I) X = C for symmetric positive semi-definite G by Cholesky.

    A failed or non-finite factorisation is retried once in float64 with a small diagonal jitter;
    if that fails too, SolveError names the system. Non-finite inputs fail at once: no retry can
    make them meaningful.
    """
    if isinstance(lam, (int, float)):
        check_lam(float(lam))
    if not bool(torch.isfinite(G).all()) or not bool(torch.isfinite(C).all()):
        raise SolveError(f"non-finite values in the {what} (inputs contain NaN or inf)")
    L, retried = _cholesky(G, lam, stats, what)
    if not retried:
        return torch.cholesky_solve(C, L)
    return torch.cholesky_solve(C.double(), L).to(C.dtype)


def spd_cholesky(
    G: torch.Tensor, lam: float | torch.Tensor,
    stats: SolveStats | None = None, what: str = "ridge system",
) -> torch.Tensor:
    """Lower Cholesky factor L of G + lam I, with the checks and retry of `solve_spd`.

    L has G's dtype, or float64 when the float64 retry was needed (solve in L's dtype).
    """
    if isinstance(lam, (int, float)):
        check_lam(float(lam))
    L, _ = _cholesky(G, lam, stats, what)  # refuses a non-finite G
    return L


def spd_inverse(
    G: torch.Tensor, lam: float | torch.Tensor,
    stats: SolveStats | None = None, what: str = "ridge system",
) -> torch.Tensor:
    """(G + lam I)^-1 for symmetric positive semi-definite G, with the checks and retry of
    `solve_spd`.

    P has G's dtype, or float64 when the float64 retry was needed: a float32 copy of a nearly
    singular inverse would lose the accuracy the retry bought, so multiply in P's dtype,
    (P @ C.to(P.dtype)).to(C.dtype). For many right-hand sides (more than a few dozen) P @ C
    is several times faster than `solve_spd` on CPU (torch.cholesky_solve runs far below
    matmul speed there), and P serves a backward pass too.
    """
    if isinstance(lam, (int, float)):
        check_lam(float(lam))
    L, _ = _cholesky(G, lam, stats, what)  # refuses a non-finite G
    return torch.cholesky_inverse(L)


def _cholesky(
    G: torch.Tensor, lam: float | torch.Tensor, stats: SolveStats | None, what: str
) -> tuple[torch.Tensor, bool]:
    """Lower Cholesky factor of G + lam I, and whether it needed the float64 retry."""
    n = G.shape[-1]
    if stats is not None:
        stats.solves += 1
    shifted = G.clone()  # G + lam I, with lam added on the diagonal only
    shifted.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(shifted)
    # One reduction rather than an element-wise isfinite (this runs twice per training step):
    # a NaN or inf anywhere in L makes its sum non-finite. A sum that overflows on finite
    # entries (|L| near 1e38) only sends the solve to the float64 retry below.
    if int(info) == 0 and math.isfinite(float(L.detach().sum())):
        return L, False
    if not bool(torch.isfinite(G).all()):
        raise SolveError(f"non-finite values in the {what} (inputs contain NaN or inf)")

    # Retry in float64, with a jitter proportional to the matrix's scale that covers the
    # rounding of G's own dtype (a float32 G may be indefinite by about n eps32 scale).
    if stats is not None:
        stats.retries += 1
    logger.warning("Cholesky of the %s failed in %s; retrying in float64", what, G.dtype)
    G64 = G.double()
    eye64 = torch.eye(n, dtype=torch.float64, device=G.device)
    scale = float(G64.diagonal().abs().mean().detach()) if n else 0.0
    noise = n * torch.finfo(G.dtype).eps  # the rounding of G's own dtype, relative
    jitter = max(_RETRY_JITTER * max(scale, 1.0), noise * scale)
    lam64 = lam.double() if isinstance(lam, torch.Tensor) else float(lam)
    L64, info64 = torch.linalg.cholesky_ex(G64 + (lam64 + jitter) * eye64)
    if int(info64) != 0 or not bool(torch.isfinite(L64).all()):
        raise SolveError(
            f"the {what} ({n}x{n}) is not positive definite even in float64 with jitter "
            f"{jitter:.1e}; increase the ridge strength"
        )
    return L64, True


def choose_form(n_rows: int, n_cols: int, form: Form = "auto") -> Literal["primal", "dual"]:
    """Primal when A is tall (the Gram matrix is n_cols square), dual when it is wide."""
    if form == "auto":
        return "primal" if n_rows >= n_cols else "dual"
    if form not in ("primal", "dual"):
        raise ConfigError(f"form must be one of auto, primal, dual, got {form!r}")
    return form


def ridge(
    A: torch.Tensor, B: torch.Tensor, lam: float | torch.Tensor,
    form: Form = "auto", stats: SolveStats | None = None, what: str = "ridge system",
) -> torch.Tensor:
    """W = argmin |A W - B|^2 + lam |W|^2 for A (n, p) and B (n, k); returns W (p, k)."""
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[0]:
        raise ConfigError(
            f"ridge needs A (n, p) and B (n, k) with the same n, got {tuple(A.shape)} "
            f"and {tuple(B.shape)}"
        )
    if choose_form(A.shape[0], A.shape[1], form) == "primal":
        # (A^T A + lam I) W = A^T B
        return solve_spd(A.T @ A, A.T @ B, lam, stats, what)
    # W = A^T (A A^T + lam I)^-1 B
    return A.T @ solve_spd(A @ A.T, B, lam, stats, what)
