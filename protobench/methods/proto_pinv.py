"""Prototype training with a dual pseudo-inverse and optimised hidden activations.

arXiv 2508.09787. A classifier is described by a few trainable prototypes: inputs Xp (Np, d'+1),
hidden activations Hp_l (Np, h) for each of L hidden layers, and outputs Yp (Np, k). Every layer's
weights are the closed-form ridge map between consecutive prototype matrices,
    W1 = ridge(Xp -> Hp_1, lam1)                          (d'+1, h)
    W_l = ridge([1, act(Hp_{l-1})] -> Hp_l, lam1)         (h+1, h), l = 2..L
    W_{L+1} = ridge([1, act(Hp_L)] -> Yp, lam2)           (h+1, k)
and the network [1, act(... [1, act(X~ W1)] ...)] W_{L+1} is applied to real training rows.
Adam trains the prototypes on cross-entropy + lam3 sum_l |W_l|^2, with gradients flowing through
the closed-form solves. With Np smaller than a layer's input width the dual (Np x Np) form is
used, and the first layer is applied to a batch as (x Xp^T) M rather than through W1.

Speed: a training step forms its gradients by hand (`loss_and_gradients`): one forward pass
keeps what the adjoints need, then each step's adjoint runs in reverse, in float32, without an
autograd graph. The solves reuse one factorisation for both passes: the explicit inverse from
`ridge.spd_inverse`, or for few right-hand sides the Cholesky factor from `ridge.spd_cholesky`.
Products are oriented the way CPU BLAS runs them fastest, and the projected training set is
formed once in `prepare`. `proto_loss` offers the same loss to autograd.

Inputs are first projected (PCA by default, unwhitened, fitted on train in `prepare`) and a bias
column of ones is appended: X~ = [(X - mean) P, 1] (N, d'+1). Xp's last column plays the same
role; it starts at 1 and is trained like every other entry (it is counted as trainable).

`proto-pinv` is the paper's ablation: the hidden prototypes stay at their random start.

Limits: the whole projected training set is kept on the device (N x (d'+1) float32).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from protobench.errors import SolveError
from protobench.harness.api import FitContext, FitData, Method
from protobench.harness.params import HyperParam
from protobench.methods.projection import PROJECTIONS, Projection, fit_projection

if TYPE_CHECKING:
    import torch

    from protobench.methods.ridge import SolveStats

logger = logging.getLogger(__name__)

ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "gelu", "sigmoid")
SCHEDULES: tuple[str, ...] = ("onecycle", "cosine")
INITS: tuple[str, ...] = ("samples", "normal")


def _hyperparams(train_hidden: bool) -> tuple[HyperParam, ...]:
    common = (
        HyperParam("n_prototypes", "int", 150, "number of prototypes Np", low=1,
                   search=(50, 400), log=True),
        HyperParam("hidden", "int", 512, "hidden width h", low=1, search=(128, 1024), log=True),
        HyperParam("depth", "int", 1, "number of hidden layers L", low=1),
        HyperParam("epochs", "int", 15, "passes over the training rows", low=1),
        HyperParam("batch_size", "int", 1000, "rows per Adam step (0 = full batch)", low=0,
                   search=(250, 4000), log=True),
        HyperParam("lr", "float", 2e-2, "peak Adam learning rate", low=0, low_open=True,
                   search=(1e-3, 1e-1), log=True),
        HyperParam("lam1", "float", 1e-2, "ridge strength of the hidden layers", low=0,
                   low_open=True, search=(1e-4, 1.0), log=True),
        HyperParam("lam2", "float", 1e-2, "ridge strength of the output layer", low=0,
                   low_open=True, search=(1e-4, 1.0), log=True),
        HyperParam("lam3", "float", 1e-4, "weight penalty lam3 (|W1|^2 + ... ) in the loss",
                   low=0, search=(1e-6, 1e-2), log=True),
        HyperParam("learn_lam", "bool", False,
                   "train lam1, lam2 as softplus(rho) with Adam (starting at their values)",
                   search=(False, True)),
        HyperParam("projection", "choice", "pca", "input projection fitted on train",
                   choices=PROJECTIONS),
        HyperParam("proj_dim", "int", 400, "projected input width d' (pca, pls)", low=1,
                   search=(100, 600), log=True),
        HyperParam("temperature", "float", 0.0,
                   "T > 0: targets softmax(Yp / T); T = 0: raw Yp", low=0),
        HyperParam("init", "choice", "samples",
                   "Xp start: stratified training rows or a normal draw", choices=INITS),
        HyperParam("activation", "choice", "relu", "hidden nonlinearity", choices=ACTIVATIONS,
                   search=ACTIVATIONS),
        HyperParam("schedule", "choice", "onecycle",
                   "learning-rate schedule (onecycle: 30% warm-up; cosine: see warmup_frac)",
                   choices=SCHEDULES),
        HyperParam("warmup_frac", "float", 0.05,
                   "fraction of the steps spent in linear warm-up (cosine schedule)",
                   low=0, high=0.9),
        HyperParam("wd_xp", "float", 0.0, "decoupled weight decay on Xp", low=0),
    )
    hidden = (
        (HyperParam("wd_hp", "float", 0.0, "decoupled weight decay on the Hp", low=0),)
        if train_hidden else ()
    )
    return (*common, *hidden,
            HyperParam("wd_yp", "float", 0.0, "decoupled weight decay on Yp", low=0))


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The (out-of-place, differentiable) nonlinearity `name`."""
    import torch

    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "relu": torch.relu,
        "tanh": torch.tanh,
        "gelu": torch.nn.functional.gelu,
        "sigmoid": torch.sigmoid,
    }
    if name not in table:
        from protobench.errors import ConfigError

        raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return table[name]


@dataclass
class ClosedFormLayer:
    """One solved layer as applied to rows; W = ridge([1,] a -> B, lam) for prototype inputs a
    (Np, p) and targets B (Np, q).

    `ones_in`: the layer's input has an implicit leading column of ones, A = [1, a]; the bias
    row b of W is kept apart so that no column of ones is ever appended to a batch.
    Kernel form (dual only): out = (x a^T [+ 1]) M with M = (A A^T + lam I)^-1 B (Np, q), which
    costs n Np (p + q) per n rows instead of n p q when Np is small.
    Explicit form: out = x W [+ b].
    """

    ones_in: bool
    protos: torch.Tensor | None = None  # a (Np, p), kernel form
    M: torch.Tensor | None = None  # (Np, q), kernel form
    W: torch.Tensor | None = None  # (p, q), explicit form
    b: torch.Tensor | None = None  # (q,), explicit form with ones_in

    def __call__(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """The layer's output for rows x, passed through `activation` when one is named."""
        return self.apply(x, activation)[0]

    def apply(
        self, x: torch.Tensor, activation: str | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(output, K, pre): K = x a^T [+ 1] in the kernel form, and the pre-activation when
        the activation's derivative needs it (gelu); both serve the backward pass."""
        import torch

        if self.protos is not None and self.M is not None:
            K = x @ self.protos.T  # (n, Np)
            if self.ones_in:
                K.add_(1.0)
            Z = K @ self.M  # (n, q)
        elif self.W is not None:
            K = None
            Z = _product(x, self.W)
            if self.b is not None:
                Z.add_(self.b)
        else:
            raise RuntimeError("closed-form layer holds neither kernel nor explicit weights")
        if activation is None:
            return Z, K, None
        if activation == "gelu":
            return torch.nn.functional.gelu(Z), K, Z
        _activation_inplace(activation)(Z)  # relu', tanh', sigmoid' follow from the output
        return Z, K, None

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Explicit (W, b); the kernel form is expanded to W = a^T M, b = 1^T M."""
        if self.W is not None:
            return self.W, self.b
        if self.protos is None or self.M is None:
            raise RuntimeError("closed-form layer holds neither kernel nor explicit weights")
        b = self.M.sum(dim=0) if self.ones_in else None
        return self.protos.T @ self.M, b


def _activation_inplace(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch

    return {"relu": torch.relu_, "tanh": torch.tanh_, "sigmoid": torch.sigmoid_}[name]


def _activation_backward(
    name: str, grad: torch.Tensor, out: torch.Tensor, pre: torch.Tensor | None
) -> torch.Tensor:
    """grad * act'(z) for out = act(z); gelu needs its input `pre`, the others their output."""
    import torch

    aten = torch.ops.aten
    if name == "relu":
        return aten.threshold_backward(grad, out, 0.0)
    if name == "tanh":
        return aten.tanh_backward(grad, out)
    if name == "sigmoid":
        return aten.sigmoid_backward(grad, out)
    if pre is None:
        raise RuntimeError("the gelu derivative needs the pre-activation")
    return aten.gelu_backward(grad, pre)


# An explicit layer is skinny when its width q is at most 1/_SKINNY of its input width p.
_SKINNY = 8


def _is_skinny(W: torch.Tensor) -> bool:
    return _SKINNY * W.shape[1] <= W.shape[0]


def _product(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """x W; a skinny W (q <= p / 8) runs as (W^T x^T)^T, about 3x faster on CPU BLAS."""
    if _is_skinny(W):
        return (W.T @ x.T).T
    return x @ W


def _times(P: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """P C in P's precision (float64 after a retried factorisation), returned in C's dtype."""
    if P.dtype == C.dtype:
        return P @ C
    return (P @ C.to(P.dtype)).to(C.dtype)


# A system with at most 1/_FEW_RHS as many right-hand sides as unknowns (the output layer: k
# columns against Np) is solved with its Cholesky factor; wider ones through the explicit
# inverse. Measured on a 2-core CPU for Np = 150: forward and backward with 10 columns take
# 0.11 ms by two triangular solves each, against 0.31 ms for forming the inverse and two
# products; with 512 columns a triangular solve takes 1.2 ms, the inverse route 0.6 ms.
_FEW_RHS = 8


def _spd_factor(
    G: torch.Tensor, lam: float | torch.Tensor, n_rhs: int, stats: SolveStats | None, what: str
) -> tuple[torch.Tensor, bool]:
    """(L, True): the Cholesky factor of G + lam I when `n_rhs` right-hand sides are few;
    otherwise (P, False): its inverse. Either is float64 after a retried factorisation."""
    from protobench.methods.ridge import spd_cholesky, spd_inverse

    if _FEW_RHS * n_rhs <= G.shape[-1]:
        return spd_cholesky(G, lam, stats, what), True
    return spd_inverse(G, lam, stats, what), False


def _inverse_times(F: torch.Tensor, is_factor: bool, C: torch.Tensor) -> torch.Tensor:
    """(G + lam I)^-1 C from `_spd_factor`'s result, in F's precision, returned in C's dtype."""
    import torch

    if not is_factor:
        return _times(F, C)
    return torch.cholesky_solve(C.to(F.dtype), F).to(C.dtype)


def _kernel_is_cheaper(n: int, n_protos: int, p: int, q: int) -> bool:
    # n Np (p + q)  versus  Np p q (forming W) + n p q
    return n * n_protos * (p + q) < n_protos * p * q + n * p * q


def _with_ones(a: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.cat([torch.ones_like(a[:, :1]), a], dim=1)


@dataclass
class _Solve:
    """One layer's ridge solve W = ridge([1,] a -> B, lam), with what its adjoint needs.

    Dual form (Np < p + ones_in): M = (G + lam I)^-1 B with G = a a^T (+ 1); the layer is then
    either applied in kernel form or expanded to W = a^T M, b = 1^T M.
    Primal form: W_full = (A^T A + lam I)^-1 A^T B with A = [1,] a, and [b; W] = W_full.
    F is (G + lam I)^-1, or its Cholesky factor when `is_factor` (few right-hand sides).
    """

    a: torch.Tensor
    B: torch.Tensor
    lam: float | torch.Tensor
    layer: ClosedFormLayer
    F: torch.Tensor
    is_factor: bool
    M: torch.Tensor | None = None  # dual form
    W_full: torch.Tensor | None = None  # primal form

    @property
    def kernel(self) -> bool:
        return self.layer.M is not None

    def sq_norm(self) -> torch.Tensor:
        """|W|_F^2, bias row included. Kernel form: tr(M^T A A^T M) = <M, B - lam M>, since
        (A A^T + lam I) M = B."""
        import torch

        if self.kernel and self.M is not None:
            # B - lam M (= A A^T M) first: <M, B> and lam <M, M> can be large and nearly equal
            return (self.M * (self.B - self.lam * self.M)).sum()
        W, b = self.layer.W, self.layer.b
        if W is None:
            raise RuntimeError("explicit layer without weights")
        norm = torch.linalg.vector_norm(W) ** 2
        return norm if b is None else norm + torch.dot(b, b)

    def backward(
        self, dM: torch.Tensor | None, dW: torch.Tensor | None, db: torch.Tensor | None,
        lam3: float, need_a: bool, need_lam: bool, da: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(da, dB, dlam) from the loss gradient on the layer's weights (dM in the kernel form,
        dW and db otherwise), the weight penalty lam3 |W|^2 included; `da` is added to (in
        place) when given: the part of the gradient on `a` that the rows contributed."""
        import torch

        ones_in = self.layer.ones_in
        penalised_B = False
        dlam: torch.Tensor | None = None
        if self.M is not None:  # dual form
            M, a = self.M, self.a
            if self.kernel:
                if dM is None:
                    raise RuntimeError("kernel layer backward needs dM")
                # d/dM, d/dB and d/dlam of lam3 <M, B - lam M>
                if lam3 > 0:
                    dM = dM.add(self.B, alpha=lam3).sub_(self.lam * M, alpha=2 * lam3)
                    penalised_B = True
                if need_lam and lam3 > 0:
                    dlam = -lam3 * torch.dot(M.reshape(-1), M.reshape(-1))
            else:
                W, b = self.layer.W, self.layer.b
                if dW is None or W is None:
                    raise RuntimeError("explicit layer backward needs dW")
                dW = dW.add(W, alpha=2 * lam3)
                # W = a^T M, b = 1^T M:  dM = a dW + 1 db^T,  da = M dW^T
                dM = a @ dW
                if ones_in and db is not None and b is not None:
                    dM.add_(db.add(b, alpha=2 * lam3))
                if need_a:
                    da_w = M @ dW.T
                    da = da_w if da is None else da.add_(da_w)
            # M = (G + lam I)^-1 B:  dB = (G + lam I)^-1 dM,  dG = -dB M^T,
            # da += (dG + dG^T) a,  dlam = -<dB, M>
            dB = _inverse_times(self.F, self.is_factor, dM)
            if need_a:
                dG = dB @ M.T
                d_solve = (dG + dG.T) @ a
                da = d_solve.neg_() if da is None else da.sub_(d_solve)
            if need_lam:
                dl = -torch.dot(dB.reshape(-1), M.reshape(-1))
                dlam = dl if dlam is None else dlam + dl
            if penalised_B:
                dB.add_(M, alpha=lam3)
            return da, dB, dlam
        # primal form: W_full = (G + lam I)^-1 C with G = A^T A, C = A^T B
        W_full, W, b = self.W_full, self.layer.W, self.layer.b
        if dW is None or W_full is None or W is None:
            raise RuntimeError("primal layer backward needs dW")
        dW = dW.add(W, alpha=2 * lam3)
        if ones_in and db is not None and b is not None:
            dW_full = torch.cat([db.add(b, alpha=2 * lam3)[None], dW], dim=0)
        else:
            dW_full = dW
        # dC = (G + lam I)^-1 dW_full,  dG = -dC W_full^T,  dA = A (dG + dG^T) + B dC^T,
        # dB = A dC,  dlam = -<dC, W_full>
        dC = _inverse_times(self.F, self.is_factor, dW_full)
        A = _with_ones(self.a) if ones_in else self.a
        dB = A @ dC
        if need_a:
            dG = dC @ W_full.T
            dA = self.B @ dC.T - A @ (dG + dG.T)
            dA = dA[:, 1:] if ones_in else dA
            da = dA if da is None else da.add_(dA)
        if need_lam:
            dlam = -torch.dot(dC.reshape(-1), W_full.reshape(-1))
        return da, dB, dlam


def _solve_layer(
    a: torch.Tensor, B: torch.Tensor, lam: float | torch.Tensor, *, ones_in: bool,
    batch_rows: int | None, stats: SolveStats | None, what: str,
) -> _Solve:
    """W = ridge([1,] a -> B, lam) for a (Np, p), B (Np, q); kernel form when cheaper on
    `batch_rows` rows (None: always explicit, as for inference)."""
    from protobench.methods.ridge import choose_form

    n_protos, p = a.shape
    q = B.shape[1]
    p_full = p + int(ones_in)
    if choose_form(n_protos, p_full) == "dual":
        # W = A^T (A A^T + lam I)^-1 B,   A A^T = a a^T (+ 1 for the ones column)
        G = a @ a.T  # (Np, Np)
        if ones_in:
            G.add_(1.0)
        F, is_factor = _spd_factor(G, lam, q, stats, what)
        M = _inverse_times(F, is_factor, B)  # (Np, q)
        if batch_rows is not None and _kernel_is_cheaper(batch_rows, n_protos, p_full, q):
            return _Solve(a, B, lam, ClosedFormLayer(ones_in, protos=a, M=M), F, is_factor, M=M)
        W = _product(a.T, M)  # (p, q) = a^T M
        b = M.sum(dim=0) if ones_in else None
        return _Solve(a, B, lam, ClosedFormLayer(ones_in, W=W, b=b), F, is_factor, M=M)
    A = _with_ones(a) if ones_in else a
    # (A^T A + lam I) W_full = A^T B
    F, is_factor = _spd_factor(A.T @ A, lam, q, stats, what)
    W_full = _inverse_times(F, is_factor, A.T @ B)  # (p_full, q)
    W, b = (W_full[1:], W_full[0]) if ones_in else (W_full, None)
    return _Solve(a, B, lam, ClosedFormLayer(ones_in, W=W, b=b), F, is_factor, W_full=W_full)


def _solve_all(
    Xp: torch.Tensor, Hp: Sequence[torch.Tensor], Yp: torch.Tensor,
    lam1: float | torch.Tensor, lam2: float | torch.Tensor, *,
    activation: str, temperature: float, batch_rows: int | None, stats: SolveStats | None,
) -> list[_Solve]:
    """All L + 1 ridge solves from the prototypes (see the module docstring)."""
    import torch

    act = activation_fn(activation)
    # W1 = ridge(Xp -> Hp_1, lam1)   (d'+1, h); Xp carries its own bias column
    solves = [_solve_layer(Xp, Hp[0], lam1, ones_in=False, batch_rows=batch_rows, stats=stats,
                           what="layer-1 ridge system")]
    for i in range(1, len(Hp)):
        # W_l = ridge([1, act(Hp_{l-1})] -> Hp_l, lam1)   (h+1, h)
        solves.append(_solve_layer(act(Hp[i - 1]), Hp[i], lam1, ones_in=True,
                                   batch_rows=batch_rows, stats=stats,
                                   what=f"layer-{i + 1} ridge system"))
    # W_{L+1} = ridge([1, act(Hp_L)] -> Yp, lam2)   (h+1, k); softmax(Yp / T) when T > 0
    targets = torch.softmax(Yp / temperature, dim=1) if temperature > 0 else Yp
    solves.append(_solve_layer(act(Hp[-1]), targets, lam2, ones_in=True, batch_rows=batch_rows,
                               stats=stats, what="output ridge system"))
    return solves


def solve_prototypes(
    Xp: torch.Tensor, Hp: Sequence[torch.Tensor], Yp: torch.Tensor,
    lam1: float | torch.Tensor, lam2: float | torch.Tensor, *,
    activation: str, temperature: float = 0.0,
    batch_rows: int | None = None, stats: SolveStats | None = None,
) -> list[ClosedFormLayer]:
    """All L + 1 closed-form layers from the prototypes (no gradients: see `proto_loss`)."""
    import torch

    with torch.no_grad():
        solves = _solve_all(Xp, Hp, Yp, lam1, lam2, activation=activation,
                            temperature=temperature, batch_rows=batch_rows, stats=stats)
    return [s.layer for s in solves]


def forward(X: torch.Tensor, layers: Sequence[ClosedFormLayer], activation: str) -> torch.Tensor:
    """Logits (n, k) of rows X~ (n, d'+1): [1, act(... act(X~ W1) ...)] W_{L+1}."""
    out = X
    for layer in layers[:-1]:
        out = layer(out, activation)
    return layers[-1](out)


@dataclass
class ProtoGradients:
    """Gradients of the training loss; None where not asked for."""

    Xp: torch.Tensor | None
    Hp: list[torch.Tensor | None]
    Yp: torch.Tensor | None
    lam1: torch.Tensor | None
    lam2: torch.Tensor | None


def loss_and_gradients(
    X: torch.Tensor, y: torch.Tensor,
    Xp: torch.Tensor, Hp: Sequence[torch.Tensor], Yp: torch.Tensor,
    lam1: float | torch.Tensor, lam2: float | torch.Tensor, *,
    lam3: float, activation: str, temperature: float = 0.0, stats: SolveStats | None = None,
    need_xp: bool = True, need_hp: bool = True, need_yp: bool = True, need_lam: bool = False,
) -> tuple[torch.Tensor, ProtoGradients]:
    """The training loss on rows X~ (n, d'+1), labels y (n,), and its gradients, by hand.

    loss = cross_entropy(logits, y) + lam3 sum_l |W_l|^2

    One forward pass keeps what the backward pass needs; the backward pass then runs the
    adjoint of each step in reverse, without an autograd graph (which cost about a fifth of
    each training step: `benchmarks/proto_pinv_glue.py`). `proto_loss` wraps this for autograd;
    gradcheck in the tests covers both.
    """
    import torch

    with torch.no_grad():
        n, depth = int(X.shape[0]), len(Hp)
        solves = _solve_all(Xp, Hp, Yp, lam1, lam2, activation=activation,
                            temperature=temperature, batch_rows=n, stats=stats)
        # Forward over the rows, keeping each layer's input, K, output and pre-activation.
        kept: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor,
                         torch.Tensor | None]] = []
        h = X
        for i, s in enumerate(solves):
            out, K, pre = s.layer.apply(h, activation if i < depth else None)
            kept.append((h, K, out, pre))
            h = out
        logits = h
        log_p = torch.log_softmax(logits, dim=1)
        loss = -log_p.gather(1, y[:, None]).mean()
        if lam3 > 0:
            loss = loss + lam3 * torch.stack([s.sq_norm() for s in solves]).sum()
        # d cross_entropy / d logits = (softmax - one_hot(y)) / n
        g = log_p.exp_()
        g.scatter_add_(1, y[:, None], torch.full((n, 1), -1.0, dtype=g.dtype, device=g.device))
        g.mul_(1.0 / n)

        # Backward over the rows: each layer's weight gradient, and the gradient it passes on.
        weight_grads: list[tuple[torch.Tensor | None, ...]] = [()] * len(solves)
        for i in range(len(solves) - 1, -1, -1):
            s, (x, K, _, _) = solves[i], kept[i]
            need_x = i > 0
            need_a = need_xp if i == 0 else need_hp
            layer = s.layer
            dx: torch.Tensor | None = None
            if layer.M is not None and K is not None and layer.protos is not None:
                # out = K M,  K = x a^T (+ 1):  dM = K^T g,  dK = g M^T,  da = dK^T x,  dx = dK a
                dM = K.T @ g
                dK = g @ layer.M.T
                da_rows = dK.T @ x if need_a else None
                dx = dK @ layer.protos if need_x else None
                weight_grads[i] = (dM, None, None, da_rows)
            elif layer.W is not None:
                # out = x W (+ b):  dW = x^T g,  db = 1^T g,  dx = g W^T
                if _is_skinny(layer.W):  # the orientation _product chose
                    dW = (g.T @ x).T
                else:
                    dW = x.T @ g
                db = g.sum(dim=0) if layer.b is not None else None
                dx = g @ layer.W.T if need_x else None
                weight_grads[i] = (None, dW, db, None)
            if dx is not None:
                _, _, prev_out, prev_pre = kept[i - 1]
                g = _activation_backward(activation, dx, prev_out, prev_pre)

        # Backward through the solves to the prototypes.
        grads = ProtoGradients(None, [None] * depth, None, None, None)
        for i, s in enumerate(solves):
            g_M, g_W, g_b, da_rows = weight_grads[i]
            need_a = need_xp if i == 0 else need_hp
            da, dB, dlam = s.backward(g_M, g_W, g_b, lam3, need_a, need_lam, da_rows)
            if i == 0:
                grads.Xp = da
            elif da is not None:
                # a = act(Hp_{i-1}) (the output, for relu/tanh/sigmoid; Hp itself for gelu)
                dHp = _activation_backward(activation, da, s.a, Hp[i - 1])
                prev = grads.Hp[i - 1]
                grads.Hp[i - 1] = dHp if prev is None else prev + dHp
            if i < depth:
                if need_hp:
                    prev = grads.Hp[i]
                    grads.Hp[i] = dB if prev is None else prev + dB
            elif need_yp:
                if temperature > 0:
                    # targets S = softmax(Yp / T):  dYp = S * (dB - <dB, S>_row) / T
                    S = s.B
                    grads.Yp = S * (dB - (dB * S).sum(dim=1, keepdim=True)) / temperature
                else:
                    grads.Yp = dB
            if dlam is not None:
                if i < depth:
                    grads.lam1 = dlam if grads.lam1 is None else grads.lam1 + dlam
                else:
                    grads.lam2 = dlam
    return loss, grads


@functools.cache
def _loss_function() -> Any:
    """`loss_and_gradients` as an autograd Function (built on first use: torch is imported
    lazily). The forward pass forms the gradients; the backward pass scales them."""
    import torch
    from torch.autograd.function import once_differentiable

    class ProtoLoss(torch.autograd.Function):
        @staticmethod
        def forward(
            ctx: Any, options: dict[str, Any], X: torch.Tensor, y: torch.Tensor,
            Xp: torch.Tensor, Yp: torch.Tensor, lam1: float | torch.Tensor,
            lam2: float | torch.Tensor, *Hp: torch.Tensor,
        ) -> torch.Tensor:
            need = ctx.needs_input_grad
            loss, grads = loss_and_gradients(
                X, y, Xp, list(Hp), Yp, lam1, lam2, need_xp=need[3], need_yp=need[4],
                need_lam=need[5] or need[6], need_hp=any(need[7:]), **options,
            )
            ctx.grads = grads
            return loss

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, dloss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            grads: ProtoGradients = ctx.grads
            need = ctx.needs_input_grad

            def scaled(t: torch.Tensor | None, wanted: bool) -> torch.Tensor | None:
                return t * dloss if t is not None and wanted else None

            return (None, None, None, scaled(grads.Xp, need[3]), scaled(grads.Yp, need[4]),
                    scaled(grads.lam1, need[5]), scaled(grads.lam2, need[6]),
                    *(scaled(g, w) for g, w in zip(grads.Hp, need[7:], strict=True)))

    return ProtoLoss


def proto_loss(
    X: torch.Tensor, y: torch.Tensor,
    Xp: torch.Tensor, Hp: Sequence[torch.Tensor], Yp: torch.Tensor,
    lam1: float | torch.Tensor, lam2: float | torch.Tensor, *,
    lam3: float, activation: str, temperature: float = 0.0, stats: SolveStats | None = None,
) -> torch.Tensor:
    """Training loss on rows X~ (n, d'+1), labels y (n,), given the prototypes; differentiable
    in Xp, Hp, Yp, lam1 and lam2 (tensors) through `loss_and_gradients`.

    loss = cross_entropy(logits, y) + lam3 sum_l |W_l|^2

    First derivatives only: the gradients are formed in the forward pass, so autograd sees
    them as constants and a second derivative (a Hessian) comes out as zero. Do not take one.
    """
    options = {"lam3": lam3, "activation": activation, "temperature": temperature,
               "stats": stats}
    loss: torch.Tensor = _loss_function().apply(options, X, y, Xp, Yp, lam1, lam2, *Hp)
    return loss


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def inverse_softplus(lam: float) -> float:
    """rho with softplus(rho) = lam (> 0)."""
    # softplus^-1(lam) = log(exp(lam) - 1) = lam + log(1 - exp(-lam))
    return lam + math.log(-math.expm1(-lam))


def gram_spectrum(A: torch.Tensor, ones_in: bool = False) -> tuple[float, float]:
    """Condition number and smallest singular value of A ([1, A] with ones_in), in float64.

    Both come from the eigenvalues of the smaller Gram matrix (Np x Np when A is wide):
    sigma_i = sqrt(eig_i). A rank-deficient A gives sigma_min 0 and an infinite condition.
    """
    import torch

    A64 = A.detach().double()
    if ones_in:
        A64 = _with_ones(A64)
    G = A64 @ A64.T if A64.shape[0] <= A64.shape[1] else A64.T @ A64
    eig = torch.linalg.eigvalsh(G)
    s_max = math.sqrt(max(float(eig[-1]), 0.0))
    s_min = math.sqrt(max(float(eig[0]), 0.0))
    return (s_max / s_min if s_min > 0 else math.inf), s_min


def _make_schedule(
    opt: torch.optim.Optimizer, kind: str, lr: float, total: int, warmup_frac: float
) -> torch.optim.lr_scheduler.LRScheduler:
    import torch

    if kind == "onecycle" and total >= 2:
        # Cosine rise from lr/25 to lr over 30% of the steps, then down to lr/25e4;
        # Adam's beta1 cycles between 0.95 and 0.85 the other way.
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    warm = round(warmup_frac * total) if kind == "cosine" else 0

    def factor(step: int) -> float:
        # Linear warm-up over `warm` steps, then cosine decay to 0 at the last step.
        if step < warm:
            return (step + 1) / warm
        span = max(total - warm, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warm, span) / span))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class ProtoPinvH(Method):
    """Prototypes Xp, Hp, Yp trained by Adam through closed-form ridge layers."""

    name: ClassVar[str] = "proto-pinv-h"
    summary: ClassVar[str] = (
        "prototype training with dual pseudo-inverse and optimised hidden activations "
        "(arXiv 2508.09787)"
    )
    hyperparams: ClassVar[tuple[HyperParam, ...]] = _hyperparams(train_hidden=True)
    train_hidden: ClassVar[bool] = True

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(params)
        self.projection: Projection | None = None
        self.Xp: torch.Tensor | None = None  # (Np, d'+1)
        self.Hp: list[torch.Tensor] = []  # L x (Np, h)
        self.Yp: torch.Tensor | None = None  # (Np, k)
        self.rho: torch.Tensor | None = None  # (2,) softplus(rho) = (lam1, lam2) if learn_lam
        self._Xt: torch.Tensor | None = None  # (N, d'+1) projected training rows, ones column
        self._y: torch.Tensor | None = None  # (N,)
        self._stats: SolveStats | None = None
        self._cache: list[ClosedFormLayer] | None = None
        self._final: dict[str, float] = {}
        self._worst: dict[str, float] = {}
        self.epochs_run = 0
        self.skipped_steps = 0  # Adam steps skipped for a non-finite gradient

    # -- set-up ---------------------------------------------------------------------------------

    def prepare(self, data: FitData, ctx: FitContext) -> None:
        """Fit the projection on train, project the training rows once, draw the prototypes."""
        import torch

        from protobench.methods.ridge import SolveStats

        data.check()
        p = self.params
        self.projection = fit_projection(data.X, data.y, data.n_classes, p["projection"],
                                         p["proj_dim"])
        Z = self.projection.apply(data.X)  # (N, d')
        Xt = torch.empty(Z.shape[0], Z.shape[1] + 1, dtype=Z.dtype, device=Z.device)
        Xt[:, :-1] = Z
        Xt[:, -1] = 1.0
        del Z
        self._Xt, self._y = Xt, data.y
        self._stats = SolveStats()
        self._init_prototypes(Xt, data.y, data.n_classes, ctx)
        self._cache = None

    def _init_prototypes(
        self, Xt: torch.Tensor, y: torch.Tensor, k: int, ctx: FitContext
    ) -> None:
        import torch

        p = self.params
        n_protos, h, depth = p["n_prototypes"], p["hidden"], p["depth"]
        gen = ctx.generator("init")
        dev, dtype = ctx.device, Xt.dtype
        # Balanced one-hot Yp: Np // k prototypes per class, the remainder to the first classes.
        labels = torch.arange(n_protos) % k
        labels, _ = labels.sort()
        Yp = torch.nn.functional.one_hot(labels, k).to(dtype)  # (Np, k)
        if p["init"] == "samples":
            # Stratified: each prototype starts at a random training row of its class.
            y_cpu = y.cpu()
            idx = torch.empty(n_protos, dtype=torch.long)
            for c in range(k):
                slots = (labels == c).nonzero().flatten()
                rows = (y_cpu == c).nonzero().flatten()
                if rows.numel() == 0:
                    rows = torch.arange(y_cpu.numel())
                picks = torch.randperm(rows.numel(), generator=gen)
                picks = picks.repeat(-(-slots.numel() // rows.numel()))[:slots.numel()]
                idx[slots] = rows[picks]
            Xp = Xt.index_select(0, idx.to(Xt.device)).to(device=dev)  # (Np, d'+1)
        else:
            # Normal draw with the training columns' mean and spread; bias column at 1.
            std, mean = torch.std_mean(Xt, dim=0)
            noise = torch.randn(n_protos, Xt.shape[1], generator=gen, dtype=dtype)
            Xp = mean + std * noise.to(dev)
            Xp[:, -1] = 1.0
        Hp = torch.randn(depth, n_protos, h, generator=gen, dtype=dtype)  # L x (Np, h)
        self.Xp = Xp.clone().to(dev).requires_grad_(True)
        self.Hp = [H.clone().to(dev).requires_grad_(self.train_hidden) for H in Hp]
        self.Yp = Yp.to(dev).requires_grad_(True)
        self.rho = None
        if p["learn_lam"]:
            rho = [inverse_softplus(p["lam1"]), inverse_softplus(p["lam2"])]
            self.rho = torch.tensor(rho, dtype=dtype, device=dev).requires_grad_(True)

    def _require_prepared(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.Xp is None or self.Yp is None or self._Xt is None or self._y is None:
            raise RuntimeError(f"{self.name}: prepare (or fit) must run first")
        return self.Xp, self.Yp, self._Xt, self._y

    def _lams(self) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        import torch

        if self.rho is None:
            return float(self.params["lam1"]), float(self.params["lam2"])
        lam = torch.nn.functional.softplus(self.rho)
        return lam[0], lam[1]

    def _gradients(
        self, X: torch.Tensor, y: torch.Tensor, stats: SolveStats | None
    ) -> torch.Tensor:
        """The loss on rows X, y; its gradient lands in each trainable tensor's `.grad`."""
        import torch

        Xp, Yp, _, _ = self._require_prepared()
        p = self.params
        with torch.no_grad():
            lam1, lam2 = self._lams()
        loss, grads = loss_and_gradients(
            X, y, Xp, self.Hp, Yp, lam1, lam2, lam3=p["lam3"], activation=p["activation"],
            temperature=p["temperature"], stats=stats, need_hp=self.train_hidden,
            need_lam=self.rho is not None,
        )
        # A gradient must have its parameter's layout: LAPACK solves return column-major
        # results, and the fused Adam step reads .grad as if laid out like the parameter.
        Xp.grad, Yp.grad = _contiguous(grads.Xp), _contiguous(grads.Yp)
        if self.train_hidden:
            for H, dH in zip(self.Hp, grads.Hp, strict=True):
                H.grad = _contiguous(dH)
        if self.rho is not None:
            zero = torch.zeros((), dtype=self.rho.dtype, device=self.rho.device)
            dlam = torch.stack([zero if grads.lam1 is None else grads.lam1,
                                zero if grads.lam2 is None else grads.lam2])
            # lam = softplus(rho):  d lam / d rho = sigmoid(rho)
            self.rho.grad = dlam * torch.sigmoid(self.rho.detach())
        return loss

    def _batch_size(self, n: int) -> int:
        size = int(self.params["batch_size"])
        return n if size == 0 else min(size, n)

    def warmup(self, data: FitData, ctx: FitContext) -> None:
        """One forward and backward pass on the first batch; prototypes and Adam untouched."""
        from protobench.methods.ridge import SolveStats

        if self._Xt is None:
            self.prepare(data, ctx)
        _, _, Xt, y = self._require_prepared()
        rows = self._batch_size(Xt.shape[0])
        self._gradients(Xt[:rows], y[:rows], SolveStats())
        for t in self._trainable():
            t.grad = None
        self._cache = None

    def _trainable(self) -> list[torch.Tensor]:
        Xp, Yp, _, _ = self._require_prepared()
        out = [Xp, Yp]
        if self.train_hidden:
            out += self.Hp
        if self.rho is not None:
            out.append(self.rho)
        return out

    # -- training -------------------------------------------------------------------------------

    def fit(self, data: FitData, ctx: FitContext) -> None:
        import torch

        if self._Xt is None:
            self.prepare(data, ctx)
        Xp, Yp, Xt, y = self._require_prepared()
        self._keep_start_prototypes()
        self.skipped_steps = 0
        p = self.params
        n = int(Xt.shape[0])
        rows = self._batch_size(n)
        steps = -(-n // rows)
        epochs = int(p["epochs"])
        decays: dict[float, list[torch.Tensor]] = {}
        decays.setdefault(float(p["wd_xp"]), []).append(Xp)
        decays.setdefault(float(p["wd_yp"]), []).append(Yp)
        if self.train_hidden:
            decays.setdefault(float(p["wd_hp"]), []).extend(self.Hp)
        if self.rho is not None:
            decays.setdefault(0.0, []).append(self.rho)
        # One parameter group per distinct weight decay: the fused step costs one kernel per
        # group, so equal decays (all 0 by default) share a group.
        groups = [{"params": ts, "weight_decay": wd} for wd, ts in decays.items()]
        opt = torch.optim.AdamW(groups, lr=p["lr"], fused=True)
        sched = _make_schedule(opt, p["schedule"], p["lr"], epochs * steps, p["warmup_frac"])
        gen = ctx.generator("shuffle")
        skipped_in_a_row = 0
        for epoch in range(1, epochs + 1):
            order = torch.randperm(n, generator=gen).to(ctx.device) if rows < n else None
            loss_sum = torch.zeros((), dtype=Xt.dtype, device=Xt.device)
            applied = 0  # steps whose gradient was applied
            for step in range(steps):
                if order is None:
                    Xb, yb = Xt, y
                else:
                    idx = order[step * rows:(step + 1) * rows]
                    Xb, yb = Xt.index_select(0, idx), y.index_select(0, idx)
                try:
                    loss = self._gradients(Xb, yb, self._stats)
                except SolveError:
                    # Only an Adam step that overflowed can have made the prototypes
                    # non-finite (non-finite gradients are never applied): say so if it did.
                    self._check_finite(epoch)
                    raise
                if self._finite_gradients():
                    opt.step()
                    loss_sum += loss.detach()
                    applied += 1
                    skipped_in_a_row = 0
                else:
                    # A non-finite gradient (a solve at the edge of float precision) is never
                    # applied: the step is skipped and counted, the prototypes stay finite.
                    self.skipped_steps += 1
                    skipped_in_a_row += 1
                    if skipped_in_a_row >= steps:
                        raise SolveError(
                            f"every step of a whole epoch (up to epoch {epoch}) had a non-finite "
                            f"gradient; raise lam1/lam2 (now {p['lam1']:g}/{p['lam2']:g}) or "
                            f"lower lr (now {p['lr']:g})"
                        )
                    with warnings.catch_warnings():  # the schedule moves on without a step
                        warnings.filterwarnings("ignore", message="Detected call of")
                        sched.step()
                    continue
                sched.step()
                self._cache = None
            self._check_finite(epoch)
            self.epochs_run = epoch
            diagnostics = self._diagnostics(float(loss_sum) / max(applied, 1))
            ctx.progress(epoch, epochs, "epoch")
            if ctx.checkpoint(epoch, diagnostics):
                break

    def _finite_gradients(self) -> bool:
        """Whether every gradient is finite: one fused sum and one sync (a sum that overflows
        counts as non-finite: such a step would throw the prototypes out of range anyway)."""
        import torch

        grads = [t.grad for t in self._trainable() if t.grad is not None]
        if not grads:
            return True
        with torch.no_grad():
            total = torch.stack([g.sum() for g in grads]).sum()
        return math.isfinite(float(total))

    def _check_finite(self, epoch: int) -> None:
        import torch

        Xp, Yp, _, _ = self._require_prepared()
        with torch.no_grad():
            total = Xp.sum() + Yp.sum()
            for t in [*self.Hp, *([] if self.rho is None else [self.rho])]:
                total = total + t.sum()
            if not bool(torch.isfinite(total)):
                raise SolveError(
                    f"non-finite prototypes at epoch {epoch}: the last Adam step diverged; "
                    f"lower lr (now {self.params['lr']:g}) or raise lam1/lam2"
                )

    def _diagnostics(self, mean_loss: float) -> dict[str, float]:
        """Conditioning of each prototype matrix a ridge layer solves with, and solve retries.

        cond_Xp / sigma_min_Xp describe Xp; cond_Hp<l> / sigma_min_Hp<l> describe [1, act(Hp_l)],
        the input matrix of layer l + 1. The Np x Np Gram matrices are re-formed in float64
        (about 1e7 flops): a float32 Gram cannot resolve sigma_min below ~3e-4 sigma_max.
        """
        import torch

        Xp, _, _, _ = self._require_prepared()
        act = activation_fn(self.params["activation"])
        out: dict[str, float] = {"train_loss": mean_loss}
        with torch.no_grad():
            mats = [("Xp", Xp, False)] + [
                (f"Hp{i + 1}", act(H), True) for i, H in enumerate(self.Hp)
            ]
            for key, A, ones_in in mats:
                cond, s_min = gram_spectrum(A, ones_in)
                out[f"cond_{key}"] = cond
                out[f"sigma_min_{key}"] = s_min
            if self.rho is not None:
                lam = torch.nn.functional.softplus(self.rho)
                out["lam1"], out["lam2"] = float(lam[0]), float(lam[1])
        out["solve_retries"] = float(self._stats.retries if self._stats else 0)
        out["skipped_steps"] = float(self.skipped_steps)
        self._final = dict(out)
        for key, value in out.items():
            if key.startswith("cond_"):
                self._worst[key] = max(value, self._worst.get(key, value))
            elif key.startswith("sigma_min_"):
                self._worst[key] = min(value, self._worst.get(key, value))
        return out

    # -- inference ------------------------------------------------------------------------------

    def _layers(self) -> list[ClosedFormLayer]:
        """Explicit weights from the current prototypes, cached until the next Adam step."""
        import torch

        if self._cache is None:
            Xp, Yp, _, _ = self._require_prepared()
            with torch.no_grad():
                lam1, lam2 = self._lams()
                layers = solve_prototypes(Xp, self.Hp, Yp, lam1, lam2,
                                          activation=self.params["activation"],
                                          temperature=self.params["temperature"],
                                          stats=self._stats)
            self._cache = layers
        return self._cache

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        import torch

        if self.projection is None:
            raise RuntimeError(f"{self.name}: fit must run before predict")
        layers = self._layers()
        act = activation_fn(self.params["activation"])
        with torch.no_grad():
            W1, _ = layers[0].weights()
            # X~ W1 = (X - mean) P W1[:d'] + W1[d']  (the ones column of X~ meets W1's last row)
            out = torch.addmm(W1[-1], self.projection.apply(X), W1[:-1])
            for layer in layers[1:]:
                out = layer(act(out))
        return out.contiguous()

    def trainable_parameters(self) -> int:
        return sum(int(t.numel()) for t in self._trainable())

    def stored_parameters(self) -> int:
        if self.projection is None:
            raise RuntimeError(f"{self.name}: fit must run before parameters are counted")
        total = self.projection.stored_values()
        for layer in self._layers():
            W, b = layer.weights()
            total += int(W.numel()) + (0 if b is None else int(b.numel()))
        return total

    def summary_diagnostics(self) -> dict[str, float]:
        out = dict(self._final)
        out.update({f"worst_{key}": value for key, value in self._worst.items()})
        out["epochs_run"] = float(self.epochs_run)
        if self.projection is not None and self.projection.out_dim is not None:
            # The width actually used: proj_dim is capped at the input width and, for PLS,
            # at the rank of the training rows.
            out["projected_width"] = float(self.projection.out_dim)
        return out

    # -- inspection (pictures kept with the run; see proto_pinv_pictures) ---------------------

    _start_prototypes: tuple[torch.Tensor, torch.Tensor] | None = None

    def _keep_start_prototypes(self) -> None:
        """Copy Xp and Yp as the fit starts them (two small device copies, no sync)."""
        Xp, Yp, _, _ = self._require_prepared()
        self._start_prototypes = (Xp.detach().clone(), Yp.detach().clone())

    def artifacts(self, data: FitData) -> dict[str, Any]:
        """The prototypes before and after training: arrays, pixel grid and 2-D map."""
        from protobench.methods.proto_pinv_pictures import prototype_artifacts

        end = None if self.Xp is None or self.Yp is None else (self.Xp, self.Yp)
        return prototype_artifacts(self.name, self.projection, self._start_prototypes, end,
                                   data, self.epochs_run)


class ProtoPinv(ProtoPinvH):
    """The ablation: hidden prototypes frozen at their random start; only Xp, Yp are trained."""

    name: ClassVar[str] = "proto-pinv"
    summary: ClassVar[str] = (
        "prototype training with dual pseudo-inverse, hidden prototypes frozen at random "
        "(ablation of arXiv 2508.09787)"
    )
    hyperparams: ClassVar[tuple[HyperParam, ...]] = _hyperparams(train_hidden=False)
    train_hidden: ClassVar[bool] = False
