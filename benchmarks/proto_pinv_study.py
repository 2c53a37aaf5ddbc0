"""Proto-PINV+H against its frozen-Hp ablation, its options, and every method's time to 97.5%.

    python benchmarks/proto_pinv_study.py [--seeds 3] [--skip-options] [--skip-race]
                                          [--skip-efficiency]

Everything but the efficiency figure runs through the harness (the same protocol as
`bench run`), on the CPU or the GPU the harness picks. Prints four tables:
1. proto-pinv-h and proto-pinv with defaults over N seeds on MNIST and Fashion-MNIST: mean, std,
   median fit seconds and trainable parameters, and the gap learning Hp buys;
2. one MNIST seed per option: PLS vs PCA, learnable lam vs fixed, L = 2 vs 1, temperature on;
3. each method's fit seconds to 97.5% MNIST validation accuracy, as found (no target);
4. the efficiency of default proto-pinv-h MNIST epochs: the matrix products an epoch does (each
   one recorded as torch dispatches it, forward and backward), their floating-point work over
   the epoch's wall time, against plain products of the same shapes timed in the same run,
   right after each epoch (paired rounds). The ratio is (time of the plain products) / (epoch
   time): 100% would mean that everything else (solves, activations, Adam, data shuffling,
   Python) costs nothing. A second row replays one step's products in the step's own order
   and operand layouts with nothing in between: the ceiling of the ratio for this sequence.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPTIONS: dict[str, dict[str, Any]] = {
    "defaults (pca, fixed lam, L=1, T=0)": {},
    "projection=pls": {"projection": "pls"},
    "learn_lam=true": {"learn_lam": True},
    "depth=2": {"depth": 2},
    "temperature=0.5": {"temperature": 0.5},
}


THREADS: int | None = None  # torch threads of every run (--threads); None: all cores


def _runs(methods: list[str], dataset: str, seeds: int, overrides: dict[str, dict[str, Any]],
          results_dir: Path, target: float | None = None) -> list[Any]:
    from protobench.harness.runner import RunConfig, plan_runs, run_benchmark
    from protobench.results.recorder import Recorder

    config = RunConfig(dataset, repeats=seeds, target=target, threads=THREADS)
    plans = plan_runs(methods, config, overrides)
    return run_benchmark(plans, observers=[Recorder(results_dir)])


MATMULS = ("mm", "addmm", "bmm", "baddbmm")


@dataclass(frozen=True)
class Product:
    """One matrix product (m, k) x (k, n) as dispatched, and whether each operand was a
    transposed view (column-major) rather than a row-major block."""

    m: int
    k: int
    n: int
    a_transposed: bool
    b_transposed: bool

    @property
    def flop(self) -> int:
        return 2 * self.m * self.k * self.n


def _is_transposed(t: Any) -> bool:
    return t.dim() == 2 and t.stride(0) == 1 and t.shape[1] > 1 and t.stride(1) != 1


def _record_products(fn: Any) -> list[Product]:
    """Every matrix product that `fn()` dispatches, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    products: list[Product] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            name = func.overloadpacket.__name__
            if name in MATMULS:
                a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
                batch = a.shape[0] if a.dim() == 3 else 1
                for _ in range(batch):
                    products.append(Product(int(a.shape[-2]), int(a.shape[-1]),
                                            int(b.shape[-1]), _is_transposed(a),
                                            _is_transposed(b)))
            return func(*args, **(kwargs or {}))

    with Recorder():
        fn()
    return products


def _operands(p: Product) -> tuple[Any, Any]:
    import torch

    a = torch.randn(p.k, p.m).T if p.a_transposed else torch.randn(p.m, p.k)
    b = torch.randn(p.n, p.k).T if p.b_transposed else torch.randn(p.k, p.n)
    return a, b


def _plain_products_seconds(products: list[Product]) -> float:
    """Time of plain float32 products of the same shapes, grouped by shape (each shape's
    products back to back) with contiguous row-major operands: the usual way to time them."""
    import time
    from collections import Counter

    import torch

    counts = Counter((p.m, p.k, p.n) for p in products)
    operands = {s: (torch.randn(s[0], s[1]), torch.randn(s[1], s[2])) for s in counts}
    out = {s: torch.empty(s[0], s[2]) for s in counts}
    started = time.perf_counter()
    for shape, count in counts.items():
        a, b = operands[shape]
        for _ in range(count):
            torch.mm(a, b, out=out[shape])
    return time.perf_counter() - started


def _in_order_seconds(step: list[Product], steps: int) -> float:
    """Time of one training step's products replayed `steps` times in the step's order, with
    its operand layouts, each product on its own operands, and nothing else in between."""
    import time

    operands = [_operands(p) for p in step]
    started = time.perf_counter()
    for _ in range(steps):
        for a, b in operands:
            a @ b
    return time.perf_counter() - started


def efficiency(rounds: int = 6) -> None:
    """Table 4: default proto-pinv-h MNIST epochs against plain products of their shapes.

    Paired rounds: after each epoch (the first is a warm-up), the plain products are timed
    once, right away, so that both sides of each ratio see the same state of a shared machine.
    The table gives the median over the rounds and the range.
    """
    import time

    import torch

    from protobench.datasets import load_splits
    from protobench.harness.api import FitData
    from protobench.harness.context import RunContext
    from protobench.harness.registry import get_method
    from protobench.harness.runner import pinned_numerics

    splits = load_splits("mnist")
    data = FitData(X=splits.train.X, y=splits.train.y, n_classes=splits.n_classes,
                   image_shape=splits.image_shape)
    cls = get_method("proto-pinv-h")
    cpu = torch.device("cpu")
    with pinned_numerics(None) as threads:
        # One epoch and one step, products recorded (slow under the recorder; not timed).
        counted = cls({"epochs": 1})
        counted.prepare(data, RunContext(cpu, 0))
        epoch_products = _record_products(lambda: counted.fit(data, RunContext(cpu, 0)))
        step_products = _record_products(lambda: counted.warmup(data, RunContext(cpu, 0)))
        flop = sum(p.flop for p in epoch_products)
        n = int(data.X.shape[0])
        steps = -(-n // (counted.params["batch_size"] or n))  # training steps per epoch

        # Paired rounds inside one fit: each epoch's wall time runs from the end of the
        # previous round's timing to the end of the epoch.
        epoch_s: list[float] = []
        plain_s: list[float] = []
        start = [0.0]

        def pair(epoch: int, diagnostics: Any) -> bool:
            ended = time.perf_counter()
            if epoch > 1:
                epoch_s.append(ended - start[0])
                plain_s.append(_plain_products_seconds(epoch_products))
            start[0] = time.perf_counter()
            return False

        timed = cls({"epochs": rounds + 1})
        timed.prepare(data, RunContext(cpu, 0))
        timed.warmup(data, RunContext(cpu, 0))
        timed.fit(data, RunContext(cpu, 0, on_checkpoint=pair))
        in_order_s = _in_order_seconds(step_products, steps)
        grouped_s = _plain_products_seconds(epoch_products)

    ratios = sorted(p / e for p, e in zip(plain_s, epoch_s, strict=True))
    epoch_med, plain_med = statistics.median(epoch_s), statistics.median(plain_s)
    print(f"\n| proto-pinv-h MNIST epoch, defaults, {threads} threads, {rounds} paired rounds "
          "| value |")
    print("|---|---|")
    print(f"| matrix products per epoch | {len(epoch_products):,} "
          f"({len({(p.m, p.k, p.n) for p in epoch_products})} distinct shapes) |")
    print(f"| their floating-point work | {flop / 1e9:.1f} GFLOP |")
    print(f"| epoch wall time, median | {epoch_med:.3f} s = {flop / epoch_med / 1e9:.1f} "
          "GFLOP/s |")
    print(f"| the same products, plain and contiguous, median | {plain_med:.3f} s "
          f"= {flop / plain_med / 1e9:.1f} GFLOP/s |")
    print(f"| one step's {len(step_products)} products in its order and layouts, "
          f"x {steps} steps, nothing else | {in_order_s:.3f} s "
          f"(ceiling {grouped_s / in_order_s:.0%} against {grouped_s:.3f} s plain) |")
    print(f"| efficiency: plain products time / epoch time, per round | "
          f"median {statistics.median(ratios):.0%}, range {ratios[0]:.0%}-{ratios[-1]:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--skip-options", action="store_true")
    parser.add_argument("--skip-race", action="store_true")
    parser.add_argument("--skip-efficiency", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true",
                        help="skip table 1 (the seeds on both data sets)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every harness run [default: all cores]")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    if not args.skip_efficiency:
        efficiency()
    results_dir = Path(tempfile.mkdtemp(prefix="protobench-study-"))
    print(f"records: {results_dir}")

    print("\n| dataset | method | test acc mean | std | median fit s | trainable params |")
    print("|---|---|---|---|---|---|")
    for dataset in () if args.skip_accuracy else ("mnist", "fashion-mnist"):
        results = _runs(["proto-pinv-h", "proto-pinv"], dataset, args.seeds, {}, results_dir)
        means: dict[str, float] = {}
        for method in ("proto-pinv-h", "proto-pinv"):
            rs = [r for r in results if r.info.method == method and r.status == "FINISHED"]
            accs = [100 * r.test_accuracy for r in rs]
            means[method] = statistics.fmean(accs)
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            fit = statistics.median(r.fit_seconds for r in rs)
            print(f"| {dataset} | {method} | {means[method]:.2f} | {std:.2f} | {fit:.1f} "
                  f"| {rs[0].trainable_params:,} |")
        print(f"| {dataset} | gap learning Hp buys | "
              f"{means['proto-pinv-h'] - means['proto-pinv']:+.2f} points | | | |")

    if not args.skip_options:
        print("\n| MNIST, seed 0, option | test acc | fit s | trainable params |")
        print("|---|---|---|---|")
        for label, params in OPTIONS.items():
            [r] = _runs(["proto-pinv-h"], "mnist", 1, {"proto-pinv-h": params}, results_dir)
            acc = f"{100 * r.test_accuracy:.2f}" if r.status == "FINISHED" else r.error
            print(f"| {label} | {acc} | {r.fit_seconds:.1f} | {r.trainable_params:,} |")

    if not args.skip_race:
        from protobench.harness.registry import method_names

        print("\n| method | fit s to 97.5% MNIST validation | final val acc | fit s |")
        print("|---|---|---|---|")
        for r in _runs(method_names()[:5], "mnist", 1, {}, results_dir, target=0.975):
            ttt = r.time_to_target
            reached = "not reached" if ttt is None or math.isinf(ttt) else f"{ttt:.1f}"
            print(f"| {r.info.method} | {reached} | {100 * r.val_accuracy:.2f} "
                  f"| {r.fit_seconds:.1f} |")


if __name__ == "__main__":
    main()
