"""Proto-PINV+H against its frozen-Hp ablation, its options, and every method's time to 97.5%.

    python benchmarks/proto_pinv_study.py [--seeds 3] [--skip-options] [--skip-race]

Everything runs through the harness (the same protocol as `bench run`), on the CPU or the GPU the
harness picks. Prints three tables:
1. proto-pinv-h and proto-pinv with defaults over N seeds on MNIST and Fashion-MNIST: mean, std,
   median fit seconds and trainable parameters, and the gap learning Hp buys;
2. one MNIST seed per option: PLS vs PCA, learnable lam vs fixed, L = 2 vs 1, temperature on;
3. each method's fit seconds to 97.5% MNIST validation accuracy, as found (no target).
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


def _runs(methods: list[str], dataset: str, seeds: int, overrides: dict[str, dict[str, Any]],
          results_dir: Path, target: float | None = None) -> list[Any]:
    from protobench.harness.runner import RunConfig, plan_runs, run_benchmark
    from protobench.results.recorder import Recorder

    config = RunConfig(dataset, repeats=seeds, target=target)
    plans = plan_runs(methods, config, overrides)
    return run_benchmark(plans, observers=[Recorder(results_dir)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--skip-options", action="store_true")
    parser.add_argument("--skip-race", action="store_true")
    args = parser.parse_args()
    results_dir = Path(tempfile.mkdtemp(prefix="protobench-study-"))
    print(f"records: {results_dir}")

    print("\n| dataset | method | test acc mean | std | median fit s | trainable params |")
    print("|---|---|---|---|---|---|")
    for dataset in ("mnist", "fashion-mnist"):
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
