"""Proto-PINV+H against its frozen-Hp ablation, its options, and every method's time to 97.5%.

    python benchmarks/proto_pinv_study.py [--seeds 3] [--skip-options] [--skip-race]
                                          [--skip-efficiency]

Everything but the efficiency figure runs through the harness (the same protocol as
`bench run`), on the CPU or the GPU the harness picks. Prints four tables:
1. proto-pinv-h and proto-pinv with defaults over N seeds on MNIST and Fashion-MNIST: mean, std,
   median fit seconds and trainable parameters, and the gap learning Hp buys;
2. one MNIST seed per option: PLS vs PCA, learnable lam vs fixed, L = 2 vs 1, temperature on;
3. each method's fit seconds to 97.5% MNIST validation accuracy, as found (no target);
4. the efficiency of one default proto-pinv-h MNIST epoch: the matrix products it does (each
   one recorded as torch dispatches it, forward and backward), their floating-point work over
   the epoch's wall time, against plain products of the same shapes timed in the same run.
   The ratio is (time of the plain products) / (epoch time): 100% would mean that everything
   else (solves, activations, Adam, data shuffling, Python) costs nothing.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
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


def _record_products(fn: Any) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matrix product that `fn()` dispatches, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes: list[tuple[int, int, int]] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            name = func.overloadpacket.__name__
            if name in MATMULS:
                a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
                batch = a.shape[0] if a.dim() == 3 else 1
                for _ in range(batch):
                    shapes.append((int(a.shape[-2]), int(a.shape[-1]), int(b.shape[-1])))
            return func(*args, **(kwargs or {}))

    with Recorder():
        fn()
    return shapes


def _plain_products_seconds(shapes: list[tuple[int, int, int]], repeats: int = 5) -> float:
    """Best-of-`repeats` time of plain float32 products of `shapes` (contiguous operands)."""
    import time
    from collections import Counter

    import torch

    counts = Counter(shapes)
    operands = {s: (torch.randn(s[0], s[1]), torch.randn(s[1], s[2])) for s in counts}
    out = {s: torch.empty(s[0], s[2]) for s in counts}
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        for shape, count in counts.items():
            a, b = operands[shape]
            for _ in range(count):
                torch.mm(a, b, out=out[shape])
        best = min(best, time.perf_counter() - started)
    return best


def efficiency(epochs: int = 4) -> None:
    """Table 4: one default proto-pinv-h MNIST epoch against plain products of its shapes."""
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
    with pinned_numerics(None) as threads:
        # One epoch, products recorded (slow under the recorder; not timed).
        counted = cls({"epochs": 1})
        counted.prepare(data, RunContext(torch.device("cpu"), 0))
        shapes = _record_products(lambda: counted.fit(data, RunContext(torch.device("cpu"), 0)))
        flop = sum(2 * m * k * n for m, k, n in shapes)

        # The same epochs timed: the wall time between consecutive epoch ends.
        ends: list[float] = []

        def mark(epoch: int, diagnostics: Any) -> bool:
            ends.append(time.perf_counter())
            return False

        timed = cls({"epochs": epochs})
        timed.prepare(data, RunContext(torch.device("cpu"), 0))
        timed.warmup(data, RunContext(torch.device("cpu"), 0))
        ctx = RunContext(torch.device("cpu"), 0, on_checkpoint=mark)
        started = time.perf_counter()
        timed.fit(data, ctx)
        epoch_times = [b - a for a, b in zip([started, *ends[:-1]], ends, strict=True)]
        epoch_s = statistics.median(epoch_times[1:] or epoch_times)
        plain_s = _plain_products_seconds(shapes)

    print(f"\n| proto-pinv-h MNIST epoch, defaults, {threads} threads | value |")
    print("|---|---|")
    print(f"| matrix products per epoch | {len(shapes):,} "
          f"({len(set(shapes))} distinct shapes) |")
    print(f"| their floating-point work | {flop / 1e9:.1f} GFLOP |")
    print(f"| epoch wall time (median of epochs 2-{epochs}) | {epoch_s:.3f} s "
          f"= {flop / epoch_s / 1e9:.1f} GFLOP/s |")
    print(f"| the same products, plain and contiguous | {plain_s:.3f} s "
          f"= {flop / plain_s / 1e9:.1f} GFLOP/s |")
    reference = _plain_products_seconds([(1000, 401, 512)] * 20) / 20
    print(f"| one 1000x401 by 401x512 product | {2 * 1000 * 401 * 512 / reference / 1e9:.1f} "
          "GFLOP/s |")
    print(f"| efficiency: epoch throughput / plain throughput | {plain_s / epoch_s:.0%} |")


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
