"""What a proto-pinv-h training step costs beyond its matrix products: three ways to form it.

    python benchmarks/proto_pinv_glue.py [--epochs 8] [--compile]

Times epochs of the default MNIST-sized configuration (Np = 150, h = 512, d'+1 = 401, k = 10,
batches of 1000 rows, 55 steps per epoch, relu, one hidden layer, lam3 > 0) on random data of
those shapes, the variants alternating epoch by epoch so that all see the same state of a
shared machine:

1. the plugin's step, `proto_pinv.loss_and_gradients`: every adjoint written out, for any
   depth, activation, form and option, with no autograd graph;
2. autograd through the plain formula (the same forms: explicit inverse for the first layer,
   Cholesky solve for the output layer, kernel form of the first layer);
3. a step hand-written for this one configuration only, with the fewest elementwise passes:
   how much is left for generality to cost.

All end in the same fused AdamW step. The script first checks that the gradients agree, then
prints each variant's epoch times, their ratio to the plugin's, and each one's efficiency as
`proto_pinv_study.py` defines it: plain products of the epoch's shapes, timed after each
round, over the epoch's wall time. With `--compile`, a fourth variant runs the hand-written
step through `torch.compile` (its compile time is printed apart and not counted).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from proto_pinv_study import _plain_products_seconds, _record_products

NP, HIDDEN, WIDTH, CLASSES, ROWS, STEPS = 150, 512, 401, 10, 1000, 55
LAM1 = LAM2 = 1e-2
LAM3 = 1e-4


def hand_written_step(Xb: Any, yb: Any, Xp: Any, Hp: Any, Yp: Any) -> tuple[Any, ...]:
    """Gradients of the default proto-pinv-h loss with respect to Xp, Hp and Yp, by hand.

    Forward: M1 = (Xp Xp^T + lam1 I)^-1 Hp; Z = relu((Xb Xp^T) M1); a = relu(Hp);
    M2 = (a a^T + 1 + lam2 I)^-1 Yp; W2 = a^T M2, b2 = 1^T M2; logits = Z W2 + b2;
    loss = cross_entropy + lam3 (<M1, Hp - lam1 M1> + |W2|^2 + |b2|^2).
    """
    import torch

    n = Xb.shape[0]
    G1 = Xp @ Xp.T
    G1.diagonal().add_(LAM1)
    L1, info1 = torch.linalg.cholesky_ex(G1)
    a = torch.relu(Hp)
    G2 = a @ a.T
    G2.add_(1.0)
    G2.diagonal().add_(LAM2)
    L2, info2 = torch.linalg.cholesky_ex(G2)
    if int(info1) or int(info2):
        raise RuntimeError("a Gram matrix is not positive definite")
    P1 = torch.cholesky_inverse(L1)
    M1 = P1 @ Hp
    K = Xb @ Xp.T
    Z = K @ M1
    Z.relu_()
    M2 = torch.cholesky_solve(Yp, L2)
    W2 = (M2.T @ a).T
    b2 = M2.sum(dim=0)
    logits = (W2.T @ Z.T).T + b2
    # d cross_entropy / d logits = (softmax - one_hot) / n
    dlog = torch.softmax(logits, dim=1)
    dlog.scatter_add_(1, yb[:, None], torch.full((n, 1), -1.0))
    dlog.mul_(1.0 / n)
    dW2 = (dlog.T @ Z).T.add_(W2, alpha=2 * LAM3)
    db2 = dlog.sum(dim=0).add_(b2, alpha=2 * LAM3)
    dZ = torch.ops.aten.threshold_backward(dlog @ W2.T, Z, 0.0)
    dM1 = torch.addmm(Hp, K.T, dZ, beta=LAM3).add_(M1, alpha=-2 * LAM3 * LAM1)
    dK = dZ @ M1.T
    dXp = dK.T @ Xb
    dB1 = P1 @ dM1
    dG1 = dB1 @ M1.T
    dXp.sub_((dG1 + dG1.T) @ Xp)
    dHp = dB1.add_(M1, alpha=LAM3)
    dM2 = torch.addmm(db2.expand(NP, CLASSES), a, dW2)
    da = M2 @ dW2.T
    dYp = torch.cholesky_solve(dM2, L2)
    dG2 = dYp @ M2.T
    da.sub_((dG2 + dG2.T) @ a)
    dHp.add_(torch.ops.aten.threshold_backward(da, a, 0.0))
    return dXp, dHp, dYp


def plugin_step(Xb: Any, yb: Any, Xp: Any, Hp: Any, Yp: Any) -> tuple[Any, ...]:
    """The same gradients as the plugin's training step forms them (any depth, activation,
    form and option: `proto_pinv.loss_and_gradients`)."""
    from protobench.methods.proto_pinv import loss_and_gradients

    _, grads = loss_and_gradients(Xb, yb, Xp, [Hp], Yp, LAM1, LAM2, lam3=LAM3,
                                  activation="relu")
    return grads.Xp, grads.Hp[0], grads.Yp


def autograd_step(Xb: Any, yb: Any, Xp: Any, Hp: Any, Yp: Any) -> tuple[Any, ...]:
    """The same gradients through autograd of the plain formula (explicit inverse for the
    first layer, Cholesky solve for the output layer, kernel form of the first layer)."""
    import torch

    Xp, Hp, Yp = (t.detach().requires_grad_(True) for t in (Xp, Hp, Yp))
    eye = torch.eye(NP)
    M1 = torch.cholesky_inverse(torch.linalg.cholesky(Xp @ Xp.T + LAM1 * eye)) @ Hp
    a = torch.relu(Hp)
    M2 = torch.cholesky_solve(Yp, torch.linalg.cholesky(a @ a.T + 1 + LAM2 * eye))
    W2, b2 = a.T @ M2, M2.sum(dim=0)
    logits = torch.relu((Xb @ Xp.T) @ M1) @ W2 + b2
    penalty = (M1 * (Hp - LAM1 * M1)).sum() + (W2 * W2).sum() + (b2 * b2).sum()
    loss = torch.nn.functional.cross_entropy(logits, yb) + LAM3 * penalty
    return tuple(torch.autograd.grad(loss, (Xp, Hp, Yp)))


def _problem(seed: int = 0) -> tuple[Any, ...]:
    import torch

    g = torch.Generator().manual_seed(seed)
    X = 0.3 * torch.randn(STEPS * ROWS, WIDTH, generator=g)
    X[:, -1] = 1.0
    y = torch.randint(0, CLASSES, (STEPS * ROWS,), generator=g)
    Xp = X[:NP].clone()
    Hp = torch.randn(NP, HIDDEN, generator=g)
    Yp = torch.nn.functional.one_hot(torch.arange(NP) % CLASSES, CLASSES).float()
    return X, y, Xp, Hp, Yp


def _epoch_timer(step: Callable[..., tuple[Any, ...]], problem: tuple[Any, ...]
                 ) -> Callable[[], float]:
    """A function that trains one epoch with `step` and AdamW and returns its wall seconds."""
    import torch

    X, y, Xp0, Hp0, Yp0 = problem
    params = [t.clone() for t in (Xp0, Hp0, Yp0)]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    gen = torch.Generator().manual_seed(1)

    def epoch() -> float:
        order = torch.randperm(X.shape[0], generator=gen)
        started = time.perf_counter()
        for s in range(STEPS):
            idx = order[s * ROWS:(s + 1) * ROWS]
            grads = step(X.index_select(0, idx), y.index_select(0, idx), *params)
            for p, g in zip(params, grads, strict=True):
                p.grad = g.contiguous()  # the fused Adam step expects the parameter's layout
            opt.step()
        return time.perf_counter() - started

    return epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="timed epochs of each variant")
    parser.add_argument("--compile", action="store_true",
                        help="also time the hand-written step under torch.compile")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    import torch

    from protobench.harness.runner import pinned_numerics

    with pinned_numerics(None) as threads:
        problem = _problem()
        X, y, Xp, Hp, Yp = problem
        ref = autograd_step(X[:ROWS], y[:ROWS], Xp, Hp, Yp)
        for step in (plugin_step, hand_written_step):
            mine = step(X[:ROWS], y[:ROWS], Xp, Hp, Yp)
            for name, r, m in zip(("Xp", "Hp", "Yp"), ref, mine, strict=True):
                rel = float((r - m).norm() / r.norm())
                print(f"{step.__name__}: gradient of {name} within {rel:.1e} of autograd's")
                if rel > 1e-4:
                    raise SystemExit(f"{step.__name__}: the gradient of {name} disagrees")

        variants: dict[str, Callable[[], float]] = {
            "plugin": _epoch_timer(plugin_step, problem),
            "autograd of the formula": _epoch_timer(autograd_step, problem),
            "hand-written for this configuration": _epoch_timer(hand_written_step, problem),
        }
        if args.compile:
            compiled = torch.compile(hand_written_step, dynamic=False)
            started = time.perf_counter()
            _epoch_timer(compiled, problem)()
            print(f"torch.compile: first epoch, compile included, "
                  f"{time.perf_counter() - started:.1f} s")
            variants["hand-written, torch.compile"] = _epoch_timer(compiled, problem)
        # The products of the plugin's epoch (19 per step), timed plain.
        step_products = _record_products(lambda: plugin_step(X[:ROWS], y[:ROWS], Xp, Hp, Yp))
        epoch_products = step_products * STEPS
        for run in variants.values():
            run()  # warm-up epoch
        times: dict[str, list[float]] = {name: [] for name in variants}
        plain: list[float] = []
        for _ in range(args.epochs):
            for name, run in variants.items():
                times[name].append(run())
            plain.append(_plain_products_seconds(epoch_products))

    base = statistics.median(times["plugin"])
    flop = sum(p.flop for p in epoch_products)
    print(f"\nan epoch: {len(epoch_products):,} products, {flop / 1e9:.1f} GFLOP; "
          f"timed plain after each round: median {statistics.median(plain):.3f} s")
    print(f"\n| variant ({threads} threads, {args.epochs} alternating rounds) "
          "| median epoch s | range | vs plugin | efficiency (plain / epoch, per round) |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        ratios = sorted(p / t for p, t in zip(plain, ts, strict=True))
        print(f"| {name} | {med:.3f} | {min(ts):.3f}-{max(ts):.3f} | {med / base:.0%} "
              f"| median {statistics.median(ratios):.0%}, "
              f"range {ratios[0]:.0%}-{ratios[-1]:.0%} |")


if __name__ == "__main__":
    main()
