"""proto-pinv-h and proto-pinv: gradients, forward pass, training, refusals, projections."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

from protobench.errors import ConfigError, SolveError
from protobench.harness.api import FitData
from protobench.harness.context import RunContext
from protobench.harness.registry import get_method
from protobench.methods.projection import fit_projection
from protobench.methods.proto_pinv import (
    ProtoPinv,
    ProtoPinvH,
    forward,
    proto_loss,
    solve_prototypes,
)

F64 = torch.float64
CPU = torch.device("cpu")


def tiny_problem(
    n_protos: int, d: int, h: int, k: int, n: int = 8, seed: int = 0, depth: int = 1
) -> dict[str, Any]:
    """Float64 rows X~ (n, d) whose last column is 1, labels, and prototypes."""
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=g, dtype=F64)
    X[:, -1] = 1.0
    Xp = torch.rand(n_protos, d, generator=g, dtype=F64)
    Xp[:, -1] = 1.0
    return {
        "X": X,
        "y": torch.arange(n) % k,
        "Xp": Xp,
        "Hp": [torch.randn(n_protos, h, generator=g, dtype=F64) for _ in range(depth)],
        "Yp": torch.randn(n_protos, k, generator=g, dtype=F64),
        "rho": torch.tensor([-1.0, -0.5], dtype=F64),
    }


def loss_of(
    prob: dict[str, Any], activation: str = "tanh", temperature: float = 0.0
) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """The loss as a function of (Xp, Hp..., Yp, rho), for gradcheck, and its inputs."""
    depth = len(prob["Hp"])

    def fn(Xp: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        Hp, Yp, rho = list(rest[:depth]), rest[depth], rest[depth + 1]
        lam = torch.nn.functional.softplus(rho)
        loss = proto_loss(prob["X"], prob["y"], Xp, Hp, Yp, lam[0], lam[1], lam3=0.05,
                             activation=activation, temperature=temperature)
        return loss

    inputs = (prob["Xp"], *prob["Hp"], prob["Yp"], prob["rho"])
    return fn, tuple(t.clone().requires_grad_(True) for t in inputs)


@pytest.mark.parametrize(
    ("n_protos", "d", "h", "depth", "activation", "temperature"),
    [
        (6, 5, 4, 1, "tanh", 0.0),  # primal forms (Np >= width + 1)
        (6, 9, 8, 1, "gelu", 0.0),  # dual forms, layer 1 in kernel form on 8 rows
        (6, 9, 32, 1, "tanh", 0.0),  # output layer explicit and skinny (k = 3 <= 32 / 8)
        (6, 9, 8, 2, "sigmoid", 0.7),  # two hidden layers, softmax targets
    ],
)
def test_gradcheck_loss_wrt_prototypes_and_rho(
    n_protos: int, d: int, h: int, depth: int, activation: str, temperature: float
) -> None:
    prob = tiny_problem(n_protos, d, h, 3, depth=depth)
    fn, inputs = loss_of(prob, activation, temperature)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize(
    ("n_protos", "d", "h"),
    [
        (24, 30, 32),  # dual forms; the output system (24 x 24, k = 3 columns) is factored
        (40, 9, 31),  # primal forms; the output system (32 x 32, k = 3 columns) is factored
    ],
)
def test_systems_with_few_right_hand_sides_are_solved_by_their_cholesky_factor(
    n_protos: int, d: int, h: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from protobench.methods import proto_pinv, ridge

    prob = tiny_problem(n_protos, d, h, 3, n=16)
    fn, inputs = loss_of(prob)
    factored: list[tuple[int, ...]] = []
    real = ridge.spd_cholesky

    def spy(G: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        factored.append(tuple(G.shape))
        return real(G, *args, **kwargs)

    monkeypatch.setattr(ridge, "spd_cholesky", spy)
    loss = fn(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    assert factored == [(min(n_protos, h + 1),) * 2]  # the output system only
    assert torch.autograd.gradcheck(fn, inputs)

    # The same loss and gradients through the explicit inverse.
    monkeypatch.setattr(proto_pinv, "_FEW_RHS", 10**9)
    factored.clear()
    loss_inv = fn(*inputs)
    grads_inv = torch.autograd.grad(loss_inv, inputs)
    assert factored == []
    torch.testing.assert_close(loss, loss_inv, rtol=1e-12, atol=1e-12)
    for g, g_inv in zip(grads, grads_inv, strict=True):
        torch.testing.assert_close(g, g_inv, rtol=1e-9, atol=1e-11)


def test_gradcheck_with_nearly_rank_deficient_xp() -> None:
    prob = tiny_problem(6, 5, 4, 3)
    g = torch.Generator().manual_seed(1)
    u = torch.rand(6, 1, generator=g, dtype=F64)
    v = torch.rand(1, 5, generator=g, dtype=F64)
    prob["Xp"] = u @ v + 1e-3 * torch.randn(6, 5, generator=g, dtype=F64)  # rank 1 + noise
    fn, inputs = loss_of(prob)
    assert torch.autograd.gradcheck(fn, inputs)


def test_relu_gradcheck_away_from_kinks() -> None:
    prob = tiny_problem(6, 9, 8, 3)
    fn, inputs = loss_of(prob, "relu")
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-7, atol=1e-5)


def _ridge64(A: torch.Tensor, B: torch.Tensor, lam: float) -> torch.Tensor:
    # W = (A^T A + lam I)^-1 A^T B, written out in float64
    return torch.linalg.solve(A.T @ A + lam * torch.eye(A.shape[1], dtype=F64), A.T @ B)


@pytest.mark.parametrize("rows", [3, 40])
def test_two_layer_forward_matches_hand_written(rows: int) -> None:
    prob = tiny_problem(6, 9, 8, 3, n=rows, depth=2)
    X, Xp, (H1, H2), Yp = prob["X"], prob["Xp"], prob["Hp"], prob["Yp"]
    lam1, lam2 = 0.05, 0.2

    def ones(a: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.ones(a.shape[0], 1, dtype=F64), a], dim=1)

    W1 = _ridge64(Xp, H1, lam1)  # (d, h)
    W2 = _ridge64(ones(torch.tanh(H1)), H2, lam1)  # (h+1, h)
    W3 = _ridge64(ones(torch.tanh(H2)), Yp, lam2)  # (h+1, k)
    expected = ones(torch.tanh(ones(torch.tanh(X @ W1)) @ W2)) @ W3

    # batch_rows picks the kernel form for small batches; None is the explicit (inference) form.
    for batch_rows in (rows, None):
        layers = solve_prototypes(Xp, [H1, H2], Yp, lam1, lam2, activation="tanh",
                                  batch_rows=batch_rows)
        torch.testing.assert_close(forward(X, layers, "tanh"), expected, rtol=1e-9, atol=1e-10)
    penalty = sum(float((W * W).sum()) for W in (W1, W2, W3))
    ce = torch.nn.functional.cross_entropy(expected, prob["y"])
    loss = proto_loss(X, prob["y"], Xp, [H1, H2], Yp, lam1, lam2, lam3=0.1,
                         activation="tanh")
    torch.testing.assert_close(loss, ce + 0.1 * penalty, rtol=1e-9, atol=1e-10)


def _reference_loss(
    prob: dict[str, Any], Xp: torch.Tensor, Hp: list[torch.Tensor], Yp: torch.Tensor,
    lam1: torch.Tensor, lam2: torch.Tensor, activation: str, temperature: float, lam3: float,
) -> torch.Tensor:
    """The loss written the plain way: explicit weights from float64 normal equations, then
    autograd through torch.linalg.solve (independent of the plugin's forms and adjoints)."""
    act = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid,
           "gelu": torch.nn.functional.gelu}[activation]

    def ones(a: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.ones(a.shape[0], 1, dtype=F64), a], dim=1)

    def ridge(A: torch.Tensor, B: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(A.T @ A + lam * torch.eye(A.shape[1], dtype=F64), A.T @ B)

    targets = torch.softmax(Yp / temperature, dim=1) if temperature > 0 else Yp
    weights = [ridge(Xp, Hp[0], lam1)]
    weights += [ridge(ones(act(Hp[i - 1])), Hp[i], lam1) for i in range(1, len(Hp))]
    weights.append(ridge(ones(act(Hp[-1])), targets, lam2))
    out = prob["X"] @ weights[0]
    for W in weights[1:]:
        out = ones(act(out)) @ W
    penalty = sum((W * W).sum() for W in weights)
    return torch.nn.functional.cross_entropy(out, prob["y"]) + lam3 * penalty


@pytest.mark.parametrize(
    ("n_protos", "d", "h", "depth", "activation", "temperature"),
    [
        (6, 5, 4, 1, "tanh", 0.0),  # primal forms
        (6, 9, 8, 1, "relu", 0.0),  # dual forms, layer 1 in kernel form
        (6, 9, 32, 1, "gelu", 0.0),  # output layer explicit and skinny
        (6, 9, 8, 2, "sigmoid", 0.7),  # two hidden layers, softmax targets
        (24, 30, 32, 1, "tanh", 0.3),  # output system solved by its Cholesky factor
        (40, 9, 31, 2, "relu", 0.0),  # primal, factored output system, two layers
    ],
)
def test_loss_and_gradients_match_a_plain_autograd_reference(
    n_protos: int, d: int, h: int, depth: int, activation: str, temperature: float
) -> None:
    prob = tiny_problem(n_protos, d, h, 3, n=8, depth=depth)
    inputs = [t.clone().requires_grad_(True)
              for t in (prob["Xp"], *prob["Hp"], prob["Yp"], prob["rho"])]
    Xp, Hp, Yp, rho = inputs[0], inputs[1:1 + depth], inputs[1 + depth], inputs[-1]
    lam, lam_ref = torch.nn.functional.softplus(rho), torch.nn.functional.softplus(rho)
    ours = proto_loss(prob["X"], prob["y"], Xp, Hp, Yp, lam[0], lam[1], lam3=0.05,
                      activation=activation, temperature=temperature)
    ref = _reference_loss(prob, Xp, Hp, Yp, lam_ref[0], lam_ref[1], activation, temperature,
                          0.05)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10)
    for g, g_ref in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(ref, inputs),
                        strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-9)


# -- the Method on small synthetic data ----------------------------------------------------------


def blobs(n: int, d: int = 64, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits-sized data in [0, 1]: k noisy class templates (fixed templates, seeded noise)."""
    templates = torch.rand(k, d, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    X = (templates[y] + 0.35 * torch.randn(n, d, generator=g)).clamp(0.0, 1.0)
    return X, y


def fit_data(n: int = 1200, d: int = 64, seed: int = 0) -> FitData:
    X, y = blobs(n, d, seed=seed)
    return FitData(X=X, y=y, n_classes=10, image_shape=(d,))


SMALL = {"n_prototypes": 40, "hidden": 64, "proj_dim": 24, "epochs": 4, "batch_size": 200}


def run_fit(method: ProtoPinvH, data: FitData, ctx: RunContext | None = None) -> RunContext:
    ctx = ctx or RunContext(CPU, seed=0)
    method.prepare(data, ctx)
    method.warmup(data, ctx)
    method.fit(data, ctx)
    return ctx


def test_registry_names_resolve() -> None:
    assert get_method("proto-pinv-h") is ProtoPinvH
    assert get_method("proto-pinv") is ProtoPinv


def test_fit_end_to_end_well_above_chance() -> None:
    data = fit_data()
    seen: list[float] = []
    method = ProtoPinvH({**SMALL, "epochs": 6})
    X_val, y_val = blobs(500, seed=1)

    def on_checkpoint(epoch: int, diag: Any) -> bool:
        with torch.inference_mode():  # the harness evaluates mid-fit like this
            seen.append(float((method.predict(X_val).argmax(1) == y_val).float().mean()))
        return False

    ctx = run_fit(method, data, RunContext(CPU, seed=0, on_checkpoint=on_checkpoint))
    assert ctx.checkpoints == [1, 2, 3, 4, 5, 6]
    with torch.inference_mode():
        logits = method.predict(X_val)
    assert logits.shape == (500, 10)
    acc = float((logits.argmax(1) == y_val).float().mean())
    assert acc > 0.8, acc  # chance is 0.1
    assert seen[-1] == pytest.approx(acc)
    diag = ctx.diagnostics[-1]
    for key in ("cond_Xp", "sigma_min_Xp", "cond_Hp1", "sigma_min_Hp1", "solve_retries"):
        assert key in diag
    assert diag["cond_Xp"] >= 1.0 and diag["sigma_min_Xp"] > 0
    summary = method.summary_diagnostics()
    assert summary["worst_cond_Xp"] >= summary["cond_Xp"]
    assert summary["worst_sigma_min_Hp1"] <= summary["sigma_min_Hp1"]
    assert summary["epochs_run"] == 6


def test_fit_is_deterministic_and_stops_when_told() -> None:
    data = fit_data(400)
    a = ProtoPinvH(SMALL)
    run_fit(a, data)
    b = ProtoPinvH(SMALL)
    run_fit(b, data)
    assert a.Xp is not None and b.Xp is not None
    assert torch.equal(a.Xp, b.Xp)
    c = ProtoPinvH(SMALL)
    ctx = run_fit(c, data, RunContext(CPU, seed=0, on_checkpoint=lambda e, d: e >= 2))
    assert ctx.checkpoints == [1, 2] and c.epochs_run == 2


def test_frozen_hidden_prototypes_get_no_gradient() -> None:
    data = fit_data(400)
    method = ProtoPinv({**SMALL, "learn_lam": True})
    ctx = RunContext(CPU, seed=0)
    method.prepare(data, ctx)
    assert method.Xp is not None
    Hp0, Xp0 = method.Hp[0].clone(), method.Xp.detach().clone()
    method.warmup(data, ctx)
    method.fit(data, ctx)
    assert method.Hp[0].grad is None and not method.Hp[0].requires_grad
    assert torch.equal(method.Hp[0], Hp0)
    assert not torch.equal(method.Xp.detach(), Xp0)
    # Xp (40 x 25) + Yp (40 x 10) + rho (2); the hidden prototypes are not trainable.
    assert method.trainable_parameters() == 40 * 25 + 40 * 10 + 2
    with torch.inference_mode():
        assert float((method.predict(data.X).argmax(1) == data.y).float().mean()) > 0.5


@pytest.mark.parametrize("extra", [{}, {"depth": 2, "activation": "tanh", "temperature": 0.5}])
def test_a_training_step_equals_autograd_then_adamw(extra: dict[str, Any]) -> None:
    """One full-batch step of fit against autograd through proto_loss and the same AdamW:
    catches a gradient of the wrong value or of the wrong memory layout (the fused Adam step
    reads .grad as if laid out like its parameter)."""
    from protobench.methods.proto_pinv import proto_loss

    data = fit_data(400)
    # 80 prototypes against 10 classes: the output system is solved by its Cholesky factor.
    method = ProtoPinvH({**SMALL, **extra, "n_prototypes": 80, "hidden": 96, "epochs": 1,
                         "batch_size": 0})
    method.prepare(data, RunContext(CPU, seed=0))
    assert method.Xp is not None and method.Yp is not None
    assert method._Xt is not None and method._y is not None
    p = method.params
    leaves = [t.detach().clone().requires_grad_(True)
              for t in (method.Xp, *method.Hp, method.Yp)]
    loss = proto_loss(method._Xt, method._y, leaves[0], leaves[1:-1], leaves[-1], p["lam1"],
                      p["lam2"], lam3=p["lam3"], activation=p["activation"],
                      temperature=p["temperature"])
    loss.backward()
    # One step, so the schedule leaves lr as given; the decays are 0 by default.
    torch.optim.AdamW(leaves, lr=p["lr"], weight_decay=0.0, fused=True).step()

    method.fit(data, RunContext(CPU, seed=0))
    for ours, ref in zip((method.Xp, *method.Hp, method.Yp), leaves, strict=True):
        assert ours.grad is not None and ours.grad.stride() == ours.stride()
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda X, y: (X[:0], y[:0]), "has no rows"),
        (lambda X, y: (X.index_fill(0, torch.tensor([3]), math.nan), y), "NaN or inf"),
        (lambda X, y: (X, y.index_fill(0, torch.tensor([5]), 10)), r"in \[0, n_classes = 10\)"),
        (lambda X, y: (X, y.index_fill(0, torch.tensor([5]), -1)), r"got -1\.\.9"),
        (lambda X, y: (X, y.float()), "whole numbers"),
        (lambda X, y: (X, y[:-1]), r"X \(N, d\) and y \(N,\)"),
    ],
)
def test_training_data_a_method_cannot_learn_from_is_refused(
    change: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    message: str,
) -> None:
    from protobench.errors import DataError

    X, y = blobs(100)
    X, y = change(X, y)
    data = FitData(X=X, y=y, n_classes=10, image_shape=(64,))
    with pytest.raises(DataError, match=message):
        ProtoPinvH(SMALL).prepare(data, RunContext(CPU, seed=0))


def test_warmup_changes_nothing() -> None:
    data = fit_data(400)
    method = ProtoPinvH(SMALL)
    ctx = RunContext(CPU, seed=0)
    method.prepare(data, ctx)
    assert method.Xp is not None and method.Yp is not None
    before = [t.detach().clone() for t in (method.Xp, method.Yp, *method.Hp)]
    method.warmup(data, ctx)
    after = (method.Xp, method.Yp, *method.Hp)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(t.grad is None for t in after)


@pytest.mark.parametrize(
    "extra",
    [
        {"depth": 2, "activation": "gelu"},
        {"schedule": "cosine", "warmup_frac": 0.2, "temperature": 0.5},
        {"learn_lam": True, "wd_xp": 1e-3, "wd_hp": 1e-3, "wd_yp": 1e-3},
        {"projection": "pls", "init": "normal", "activation": "sigmoid"},
        {"projection": "none", "batch_size": 0, "epochs": 2},
    ],
)
def test_options_train(extra: dict[str, Any]) -> None:
    data = fit_data(600)
    method = ProtoPinvH({**SMALL, **extra})
    run_fit(method, data)
    with torch.inference_mode():
        acc = float((method.predict(data.X).argmax(1) == data.y).float().mean())
    assert acc > 0.3, (extra, acc)
    if extra.get("learn_lam"):
        assert method.rho is not None and method.rho.grad is not None


def test_nan_prototypes_stop_with_solve_error() -> None:
    data = fit_data(400)
    method = ProtoPinvH(SMALL)
    ctx = RunContext(CPU, seed=0)
    method.prepare(data, ctx)
    assert method.Xp is not None
    with torch.no_grad():
        method.Xp[3, 2] = float("nan")
    with pytest.raises(SolveError, match="non-finite prototypes at epoch 1"):
        method.fit(data, ctx)


def test_diverging_steps_stop_with_solve_error() -> None:
    data = fit_data(400)
    method = ProtoPinvH({**SMALL, "lr": 1e30, "lam1": 1e-6, "lam2": 1e-6})
    with pytest.raises(SolveError, match="non-finite"):
        run_fit(method, data)


def test_parameter_counts_with_defaults() -> None:
    X = torch.rand(500, 784, generator=torch.Generator().manual_seed(0))
    data = FitData(X=X, y=torch.arange(500) % 10, n_classes=10, image_shape=(28, 28))
    method = ProtoPinvH()
    method.prepare(data, RunContext(CPU, seed=0))
    assert method.trainable_parameters() == 150 * 401 + 150 * 512 + 150 * 10 == 138_450
    # mean + components, W1 (d'+1, h), W2 (h+1, k)
    assert method.stored_parameters() == 784 + 784 * 400 + 401 * 512 + 513 * 10
    frozen = ProtoPinv()
    frozen.prepare(data, RunContext(CPU, seed=0))
    assert frozen.trainable_parameters() == 150 * 401 + 150 * 10


@pytest.mark.parametrize(
    ("cls", "params", "match"),
    [
        (ProtoPinvH, {"lam1": -1}, r"proto-pinv-h\.lam1 must be in \(0, inf\]"),
        (ProtoPinvH, {"lam2": 0}, r"proto-pinv-h\.lam2 must be in \(0, inf\]"),
        (ProtoPinvH, {"lam3": -1e-3}, r"proto-pinv-h\.lam3 must be in \[0, inf\]"),
        (ProtoPinvH, {"activation": "foo"}, r"proto-pinv-h\.activation must be .*relu, tanh"),
        (ProtoPinvH, {"projection": "ica"}, r"proto-pinv-h\.projection must be .*none, pca"),
        (ProtoPinvH, {"depth": 0}, r"proto-pinv-h\.depth must be in \[1, inf\]"),
        (ProtoPinvH, {"lr": 0.0}, r"proto-pinv-h\.lr must be in \(0, inf\]"),
        (ProtoPinvH, {"warmup_frac": 1.5}, r"proto-pinv-h\.warmup_frac must be in \[0, 0\.9\]"),
        (ProtoPinvH, {"temperature": float("nan")}, r"temperature must be a finite number"),
        (ProtoPinv, {"wd_hp": 0.1}, r"unknown hyperparameter proto-pinv\.wd_hp"),
    ],
)
def test_bad_hyperparameters_are_refused(
    cls: type[ProtoPinvH], params: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        cls(params)


def test_projection_wider_than_input_keeps_the_input_width() -> None:
    method = ProtoPinvH({**SMALL, "proj_dim": 65})
    method.prepare(fit_data(300), RunContext(CPU, seed=0))
    assert method.projection is not None and method.projection.components is not None
    assert method.projection.components.shape == (64, 64)


def test_pls_stops_at_the_data_rank() -> None:
    X = torch.rand(200, 4, generator=torch.Generator().manual_seed(0))
    X = torch.cat([X, X[:, :2] + X[:, 2:]], dim=1)  # rank 4 in 6 columns
    proj = fit_projection(X, torch.arange(200) % 3, 3, "pls", 5)
    assert proj.out_dim == 4
    with pytest.raises(ConfigError, match="projection=pls needs training inputs that vary"):
        fit_projection(torch.ones(50, 6), torch.arange(50) % 3, 3, "pls", 2)


def test_pls_defaults_run_on_digits_sized_inputs() -> None:
    data = fit_data(300)
    X = data.X.clone()
    X[:, :5] = 0.0  # constant pixels, as in the corners of real digits: rank 59 < 64
    method = ProtoPinvH({**SMALL, "projection": "pls", "proj_dim": 400, "epochs": 1})
    run_fit(method, FitData(X=X, y=data.y, n_classes=10, image_shape=(64,)))
    assert method.Xp is not None and method.Xp.shape == (40, 59 + 1)


@pytest.mark.parametrize("kind", ["pca", "pls"])
def test_projections(kind: str) -> None:
    X, y = blobs(800, 30)
    proj = fit_projection(X, y, 10, kind, 12)
    Z = proj.apply(X).double()
    assert Z.shape == (800, 12)
    torch.testing.assert_close(Z.mean(0), torch.zeros(12, dtype=F64), atol=1e-5, rtol=0)
    cov = Z.T @ Z
    off = cov - torch.diag(cov.diagonal())
    assert float(off.abs().max()) < 1e-4 * float(cov.diagonal().max())  # uncorrelated scores
    assert proj.components is not None
    norms = proj.components.norm(dim=0)
    torch.testing.assert_close(norms, torch.ones(12), atol=1e-5, rtol=0)
    Xc = (X - X.mean(0)).double()
    if kind == "pca":
        _, _, Vh = torch.linalg.svd(Xc, full_matrices=False)
        cos = (proj.components.double() * Vh[:12].T).sum(0).abs()
    else:
        # The first PLS weight is the leading left singular vector of Xc^T Y.
        Y = torch.nn.functional.one_hot(y, 10).double()
        U, _, _ = torch.linalg.svd(Xc.T @ Y, full_matrices=False)
        cos = (proj.components[:, :1].double() * U[:, :1]).sum(0).abs()
    torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-5, rtol=0)


def test_module_import_does_not_import_torch() -> None:
    code = (
        "import sys, protobench.methods.proto_pinv as m; "
        "assert 'torch' not in sys.modules, 'torch imported'; print(len(m.ProtoPinvH.hyperparams))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == 20


def test_singular_float32_prototypes_take_the_float64_retry() -> None:
    from protobench.methods.ridge import SolveStats

    # Prototypes 0 and 1 are identical (inputs, hidden and output rows); integer entries make
    # both float32 Gram matrices exactly singular, so each Cholesky meets a zero pivot.
    # The first pivots are perfect squares (|Xp_0|^2 = 1, |act(Hp_0)|^2 + 1 = 4).
    Xp = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 1],
                       [0, 0, 1, 2, 0, 1]], dtype=torch.float32)
    Hp = torch.tensor([[1, 0, 1, 0, 1], [1, 0, 1, 0, 1], [0, 3, 0, 1, 0], [2, 0, 0, 1, 1]],
                      dtype=torch.float32)
    Yp = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float32)
    X = torch.rand(5, 6, generator=torch.Generator().manual_seed(0))
    X[:, -1] = 1.0
    stats = SolveStats()
    layers = solve_prototypes(Xp, [Hp], Yp, 1e-12, 1e-12, activation="relu", batch_rows=5,
                              stats=stats)
    logits = forward(X, layers, "relu")
    assert stats.retries == 2 and bool(torch.isfinite(logits).all())
    ref = forward(X.double(), solve_prototypes(Xp.double(), [Hp.double()], Yp.double(), 1e-12,
                                               1e-12, activation="relu"), "relu")
    # The float64 reference solves systems of condition ~1e12 itself: good to ~1e-4.
    torch.testing.assert_close(logits.double(), ref, rtol=1e-3, atol=1e-3)


# -- a nearly rank-deficient prototype matrix: rank 1 plus 1e-6 noise ---------------------------


def rank_one_plus_noise(rows: int, cols: int, noise: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, 1, generator=g, dtype=F64)
    v = torch.rand(1, cols, generator=g, dtype=F64)
    return u @ v + noise * torch.randn(rows, cols, generator=g, dtype=F64)


@pytest.mark.parametrize("lam", [1e-2, 1e-4])  # the default, and the low end of the search range
@pytest.mark.parametrize(("d", "h"), [(5, 4), (9, 8)])  # primal forms; dual and kernel forms
def test_gradient_through_rank_one_plus_noise_matches_central_differences(
    d: int, h: int, lam: float
) -> None:
    prob = tiny_problem(6, d, h, 3)
    prob["Xp"] = rank_one_plus_noise(6, d, 1e-6)
    sv = torch.linalg.svdvals(prob["Xp"])
    assert float(sv[1] / sv[0]) < 1e-5  # rank 1 up to the noise

    def loss(Xp: torch.Tensor, Hp: torch.Tensor, Yp: torch.Tensor) -> torch.Tensor:
        out = proto_loss(prob["X"], prob["y"], Xp, [Hp], Yp, lam, lam, lam3=0.05,
                            activation="tanh")
        return out

    inputs = (prob["Xp"], prob["Hp"][0], prob["Yp"])
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    grads = torch.autograd.grad(loss(*leaves), leaves)
    # The solves bend on the scale of lam (the smallest eigenvalue of G + lam I), so the step
    # must be far below it; measured, the error is ~(eps / lam)^2 down to rounding at ~1e-9.
    eps = 1e-3 * lam
    for which, (t, grad) in enumerate(zip(inputs, grads, strict=True)):
        assert bool(torch.isfinite(grad).all())
        numeric = torch.empty_like(t)
        for i in range(t.numel()):
            step = torch.zeros_like(t).view(-1)
            step[i] = eps
            up, down = list(inputs), list(inputs)
            up[which] = t + step.view_as(t)
            down[which] = t - step.view_as(t)
            numeric.view(-1)[i] = (loss(*up) - loss(*down)) / (2 * eps)
        rel = float((grad - numeric).norm() / numeric.norm())
        assert rel < 1e-4, (("Xp", "Hp", "Yp")[which], rel)


@pytest.mark.parametrize("lam", [1e-2, 1e-12])
def test_training_through_rank_deficient_prototypes_never_leaves_nan(lam: float) -> None:
    data = fit_data(400)
    method = ProtoPinvH({**SMALL, "epochs": 2, "lam1": lam, "lam2": lam})
    ctx = RunContext(CPU, seed=0)
    method.prepare(data, ctx)
    assert method.Xp is not None and method.Yp is not None
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # Every input prototype a multiple of the mean row, plus 1e-6 noise: rank 1 + noise.
        u = torch.rand(method.Xp.shape[0], 1, generator=g, dtype=F64)
        line = method.Xp.double().mean(0, keepdim=True)  # (1, d'+1)
        noise = 1e-6 * torch.randn(method.Xp.shape, generator=g, dtype=F64)
        method.Xp.copy_(u @ line + noise)
    try:
        method.fit(data, ctx)
    except SolveError as exc:
        # Refusing is allowed where float32 cannot resolve lam; leaving NaN behind is not.
        assert lam < 1e-8, exc
        assert "ridge system" in str(exc) and "increase the ridge strength" in str(exc), exc
    else:
        assert method.epochs_run == 2
    for t in (method.Xp, method.Yp, *method.Hp):
        assert bool(torch.isfinite(t).all())


def _nan_gradient_on(method: ProtoPinvH, steps: int | None) -> None:
    """Make the gradient of Xp NaN on the first `steps` training steps (None: on all)."""
    seen = [0]
    real = method._gradients

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = real(*args, **kwargs)
        seen[0] += 1
        if (steps is None or seen[0] <= steps) and method.Xp is not None:
            assert method.Xp.grad is not None
            method.Xp.grad.mul_(math.nan)
        return loss

    method._gradients = poisoned  # type: ignore[method-assign]


def test_a_step_with_a_non_finite_gradient_is_skipped_and_counted() -> None:
    data = fit_data(400)
    method = ProtoPinvH({**SMALL, "epochs": 2})
    ctx = RunContext(CPU, seed=0)
    method.prepare(data, ctx)
    _nan_gradient_on(method, steps=1)
    method.fit(data, ctx)
    assert method.skipped_steps == 1 and method.epochs_run == 2
    assert ctx.diagnostics[-1]["skipped_steps"] == 1.0
    for t in (method.Xp, method.Yp, *method.Hp):
        assert bool(torch.isfinite(t).all())


def test_a_whole_epoch_of_non_finite_gradients_stops_the_run() -> None:
    data = fit_data(400)
    method = ProtoPinvH({**SMALL, "epochs": 2})
    ctx = RunContext(CPU, seed=0)
    method.prepare(data, ctx)
    _nan_gradient_on(method, steps=None)
    with pytest.raises(SolveError, match=r"every step of a whole epoch .*non-finite gradient"):
        method.fit(data, ctx)
    assert method.Xp is not None and bool(torch.isfinite(method.Xp).all())


def test_the_projected_width_actually_used_is_reported_when_proj_dim_is_capped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = fit_data(400, d=32)
    method = ProtoPinvH({**SMALL, "epochs": 1, "proj_dim": 100})
    with caplog.at_level("WARNING", logger="protobench.methods.projection"):
        run_fit(method, data)
    assert method.summary_diagnostics()["projected_width"] == 32.0
    assert "proj_dim 100 exceeds the input width 32; projecting to 32" in caplog.text
