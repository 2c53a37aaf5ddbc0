"""The shared ridge solver: both forms against a float64 reference, refusals, retry, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from protobench.errors import ConfigError, SolveError
from protobench.methods.ridge import SolveStats, choose_form, ridge, solve_spd, spd_inverse


def reference_ridge(A: torch.Tensor, B: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin |A W - B|^2 + lam |W|^2 as least squares on [A; sqrt(lam) I] W = [B; 0]."""
    A64, B64 = A.double(), B.double()
    p, k = A64.shape[1], B64.shape[1]
    A_aug = torch.cat([A64, math.sqrt(lam) * torch.eye(p, dtype=torch.float64)])
    B_aug = torch.cat([B64, torch.zeros(p, k, dtype=torch.float64)])
    return torch.linalg.lstsq(A_aug, B_aug, driver="gelsd").solution


def draw(n: int, p: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, p, generator=g, dtype=torch.float64)
    B = torch.randn(n, k, generator=g, dtype=torch.float64)
    return A, B


@pytest.mark.parametrize(("n", "p"), [(30, 8), (8, 30), (12, 12)])
def test_primal_and_dual_agree_with_float64_reference(n: int, p: int) -> None:
    A, B = draw(n, p, 3)
    lam = 0.1
    primal = ridge(A, B, lam, form="primal")
    dual = ridge(A, B, lam, form="dual")
    auto = ridge(A, B, lam)
    ref = reference_ridge(A, B, lam)
    assert primal.dtype == torch.float64 and primal.shape == (p, 3)
    torch.testing.assert_close(primal, dual, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(primal, ref, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(auto, ref, rtol=1e-10, atol=1e-11)


def test_auto_form_picks_the_smaller_gram() -> None:
    assert choose_form(100, 10) == "primal"
    assert choose_form(10, 100) == "dual"
    assert choose_form(10, 10) == "primal"
    with pytest.raises(ConfigError, match="form must be one of auto, primal, dual"):
        choose_form(10, 10, "cholesky")  # type: ignore[arg-type]


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_lam_is_refused(lam: float) -> None:
    A, B = draw(6, 3, 2)
    with pytest.raises(ConfigError, match="lam must be a finite number > 0"):
        ridge(A, B, lam)
    with pytest.raises(ConfigError, match="lam must be a finite number > 0"):
        solve_spd(A.T @ A, A.T @ B, lam)


def test_mismatched_shapes_are_refused() -> None:
    A, B = draw(6, 3, 2)
    with pytest.raises(ConfigError, match=r"ridge needs A \(n, p\) and B \(n, k\)"):
        ridge(A, B[:5], 0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises_solve_error(bad: float) -> None:
    A, B = draw(6, 3, 2)
    A[2, 1] = bad
    stats = SolveStats()
    with pytest.raises(SolveError, match="non-finite values in the ridge system"):
        ridge(A, B, 0.1, stats=stats)
    assert stats.retries == 0


def test_singular_float32_gram_is_retried_once_in_float64() -> None:
    # Rows 0 and 1 are equal (a duplicated sample, same target). Integer entries make the
    # float32 Gram exact, so its Cholesky meets a pivot of exactly 0: 1e-12 is lost in 1.0f.
    A = torch.tensor(
        [[1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 2]],
        dtype=torch.float32,
    )
    B = torch.tensor([[1.0, -2.0], [1.0, -2.0], [0.5, 3.0], [2.0, 1.0]])
    L, info = torch.linalg.cholesky_ex(A @ A.T + 1e-12 * torch.eye(4))
    assert int(info) != 0  # the premise: float32 fails
    stats = SolveStats()
    W = ridge(A, B, 1e-12, stats=stats)
    assert stats.retries == 1 and stats.solves == 1
    assert W.dtype == torch.float32 and bool(torch.isfinite(W).all())
    torch.testing.assert_close(W.double(), reference_ridge(A, B, 1e-12), rtol=1e-5, atol=1e-5)


def test_hopeless_system_raises_solve_error() -> None:
    G = -torch.eye(3, dtype=torch.float64)  # negative definite: no jitter helps
    stats = SolveStats()
    with pytest.raises(SolveError, match="not positive definite even in float64"):
        solve_spd(G, torch.ones(3, 1, dtype=torch.float64), 1e-3, stats)
    assert stats.retries == 1


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_gradcheck_through_ridge(form: str) -> None:
    A, B = draw(5, 4, 2, seed=3)
    A.requires_grad_(True)
    B.requires_grad_(True)
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, lm: ridge(a, b, lm, form=form),  # type: ignore[arg-type]
        (A, B, lam),
    )


def test_spd_inverse_matches_solve_and_shares_its_policy() -> None:
    A, B = draw(7, 5, 3, seed=4)
    G = A.T @ A
    stats = SolveStats()
    P = spd_inverse(G, 0.2, stats)
    torch.testing.assert_close(P @ B[:5], solve_spd(G, B[:5], 0.2, stats), rtol=1e-11, atol=1e-12)
    assert stats.solves == 2 and stats.retries == 0
    with pytest.raises(ConfigError, match="lam must be a finite number > 0"):
        spd_inverse(G, -0.5)
    G[0, 0] = float("nan")
    with pytest.raises(SolveError, match="non-finite values in the output system"):
        spd_inverse(G, 0.2, what="output system")


def test_spd_inverse_retries_a_singular_float32_gram_in_float64() -> None:
    A = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])  # rows 0, 1 equal
    B = torch.tensor([[1.0, 2.0], [1.0, 2.0], [-1.0, 0.5]])
    stats = SolveStats()
    P = spd_inverse(A @ A.T, 1e-12, stats)
    assert stats.retries == 1 and bool(torch.isfinite(P).all())
    assert P.dtype == torch.float64  # kept: a float32 copy of this inverse would be useless
    W = A.T.double() @ (P @ B.double())  # the dual ridge solution, formed in P's precision
    torch.testing.assert_close(W, reference_ridge(A, B, 1e-12), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lam", [1e-6, 1e-7, 1e-8])
def test_a_float32_gram_made_indefinite_by_rounding_is_solved_by_the_retry(lam: float) -> None:
    # Rank 1 plus 1e-6 noise, formed in float32: rounding leaves G + lam I indefinite by about
    # n eps32 |G|, far more than lam; the retry's jitter must cover that, not just float64's.
    g = torch.Generator().manual_seed(1)
    u = torch.rand(40, 1, generator=g, dtype=torch.float64)
    v = torch.rand(1, 25, generator=g, dtype=torch.float64)
    A = (u @ v + 1e-6 * torch.randn(40, 25, generator=g, dtype=torch.float64)).float()
    stats = SolveStats()
    P = spd_inverse(A.T @ A, lam, stats, "layer-1 ridge system")
    assert stats.retries == 1
    assert bool(torch.isfinite(P).all())
    assert float(torch.linalg.eigvalsh(P.double()).min()) > 0
