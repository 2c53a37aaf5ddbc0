"""What the harness costs: the same fit through the full protocol and as a bare loop.

    python benchmarks/harness_overhead.py [--method proto-pinv-h] [--dataset mnist] [--rounds 2]

Both paths build the same method with the same seed on the same data. The bare loop calls
prepare, warmup and fit with a context that has no hooks, timing fit with perf_counter. The
harness path is `run_one` with the MLflow recorder attached: checkpoints pause its clock and
evaluate on the validation split, and everything is recorded. The overhead printed is the
harness's fit time (its clock, evaluation excluded) over the bare fit time, the median of
alternating rounds so that drift on a shared machine hits both paths alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="proto-pinv-h")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from protobench.datasets import load_splits
    from protobench.harness.api import FitData
    from protobench.harness.context import RunContext
    from protobench.harness.registry import get_method
    from protobench.harness.runner import (
        RunConfig,
        pinned_numerics,
        plan_runs,
        resolve_device,
        run_one,
    )
    from protobench.results.recorder import Recorder

    splits = load_splits(args.dataset)
    device = resolve_device("auto")
    config = RunConfig(args.dataset, base_seed=args.seed)
    [info] = plan_runs([args.method], config, {})
    results_dir = Path(tempfile.mkdtemp(prefix="protobench-overhead-"))
    recorder = Recorder(results_dir)

    def bare() -> float:
        with pinned_numerics(None):
            data = FitData(splits.train.X.to(device), splits.train.y.to(device),
                           splits.n_classes, splits.image_shape)
            method = get_method(args.method)(info.params)
            ctx = RunContext(device, info.seed)
            method.prepare(data, ctx)
            method.warmup(data, ctx)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            method.fit(data, ctx)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

    bare_times: list[float] = []
    harness_times: list[float] = []
    accuracies: list[float] = []
    for round_ in range(args.rounds):
        bare_times.append(bare())
        result = run_one(info, splits, device, [recorder])
        if result.status != "FINISHED":
            raise SystemExit(f"harness run failed: {result.error}")
        harness_times.append(result.phases["fit"])
        accuracies.append(result.test_accuracy)
        print(f"round {round_}: bare fit {bare_times[-1]:.3f} s, "
              f"harness fit {harness_times[-1]:.3f} s "
              f"(+ evaluation {result.phases['evaluation']:.3f} s outside the clock), "
              f"test accuracy {result.test_accuracy:.4f}")
    bare_med = statistics.median(bare_times)
    harness_med = statistics.median(harness_times)
    print(f"{args.method} on {args.dataset} ({device}, {torch.get_num_threads()} threads): "
          f"median bare fit {bare_med:.3f} s, median harness fit {harness_med:.3f} s")
    print(f"harness overhead ratio: {harness_med / bare_med:.4f} "
          f"({100 * (harness_med / bare_med - 1):+.2f}%)")


if __name__ == "__main__":
    main()
