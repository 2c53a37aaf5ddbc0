"""How Proto-PINV+H behaves as its analytic stack gets deeper: L = 1, 2, 3, 4, 6 hidden layers.

    python benchmarks/depth_study.py [--depths 1,2,3,4,6] [--datasets mnist,fashion-mnist]
                                     [--seed 0] [--epochs N] [--threads N] [--out depth-study]

Every depth runs through the harness (the protocol of `bench run`: one seed, test accuracy on
the held-out test split) with the plugin's defaults and the same epoch budget, so only L
changes. Each hidden layer l has its own prototypes Hp_l and its own closed-form W_l; the
"worst condition number" is the largest, over training and over every prototype matrix a
layer solves with (Xp and each [1, act(Hp_l)]), of the per-epoch diagnostic the plugin records.
Prints a Markdown table and writes `<out>/depth_study.png` (accuracy and worst condition
number against depth, one line per data set) and `<out>/depth_study.csv`.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
from pathlib import Path
from typing import Any


def _depth_runs(dataset: str, depths: list[int], seed: int, epochs: int | None,
                threads: int | None, results_dir: Path) -> list[dict[str, Any]]:
    from protobench.harness.runner import RunConfig, plan_runs, run_benchmark
    from protobench.results.recorder import Recorder

    rows: list[dict[str, Any]] = []
    for depth in depths:
        config = RunConfig(dataset, base_seed=seed, epochs=epochs, threads=threads)
        plans = plan_runs(["proto-pinv-h"], config, {"proto-pinv-h": {"depth": depth}})
        [result] = run_benchmark(plans, observers=[Recorder(results_dir)])
        conds = [v for k, v in result.diagnostics.items() if k.startswith("worst_cond_")]
        rows.append({
            "dataset": dataset, "depth": depth, "status": result.status,
            "test_acc": 100 * result.test_accuracy, "val_acc": 100 * result.val_accuracy,
            "fit_s": result.fit_seconds, "trainable_params": result.trainable_params,
            "worst_cond": max(conds) if conds else math.nan,
            "worst_cond_Xp": result.diagnostics.get("worst_cond_Xp", math.nan),
            "solve_retries": result.diagnostics.get("solve_retries", math.nan),
            "error": result.error,
        })
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, cond_ax) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset and r["status"] == "FINISHED"]
        depths = [r["depth"] for r in mine]
        acc_ax.plot(depths, [r["test_acc"] for r in mine], marker="o", label=dataset)
        finite = [r for r in mine if math.isfinite(r["worst_cond"])]  # inf: singular
        cond_ax.plot([r["depth"] for r in finite], [r["worst_cond"] for r in finite],
                     marker="o", label=dataset)
    all_depths = sorted({r["depth"] for r in rows})
    for ax in (acc_ax, cond_ax):
        ax.set_xlabel("hidden layers L")
        ax.set_xticks(all_depths)
        ax.grid(alpha=0.3)
        ax.legend()
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.set_title("accuracy against depth")
    if any(line.get_xydata().size for line in cond_ax.get_lines()):
        cond_ax.set_yscale("log")
    cond_ax.set_ylabel("worst condition number (max over epochs and layers)")
    cond_ax.set_title("conditioning against depth")
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _depth_list(text: str) -> list[int]:
    try:
        depths = [int(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--depths must be whole numbers >= 1 separated by commas, got {text!r}") from None
    if any(d < 1 for d in depths):
        raise argparse.ArgumentTypeError(f"--depths must all be >= 1, got {text!r}")
    return depths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=_depth_list, default=[1, 2, 3, 4, 6],
                        help="hidden-layer counts L to run, comma-separated [default: 1,2,3,4,6]")
    parser.add_argument("--datasets", default="mnist,fashion-mnist",
                        help="comma-separated data sets [default: mnist,fashion-mnist]")
    parser.add_argument("--seed", type=int, default=0, help="base seed [default: 0]")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epoch budget for every depth (default: the plugin's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every run [default: all cores]")
    parser.add_argument("--out", type=Path, default=Path("depth-study"),
                        help="folder for depth_study.png and .csv [default: depth-study]")
    args = parser.parse_args()
    from protobench.errors import ProtobenchError

    results_dir = Path(tempfile.mkdtemp(prefix="protobench-depth-"))
    print(f"records (MLflow store of every run): {results_dir}")
    rows: list[dict[str, Any]] = []
    try:
        for dataset in args.datasets.split(","):
            rows += _depth_runs(dataset, args.depths, args.seed, args.epochs, args.threads,
                                results_dir)
    except ProtobenchError as exc:
        sys.exit(f"error: {exc}")
    args.out.mkdir(parents=True, exist_ok=True)

    print("\n| dataset | L | test acc % | val acc % | fit s | trainable params "
          "| worst cond (any layer) | worst cond Xp | solve retries |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["status"] != "FINISHED":
            print(f"| {r['dataset']} | {r['depth']} | {r['status']}: {r['error']} "
                  "| | | | | | |")
            continue
        print(f"| {r['dataset']} | {r['depth']} | {r['test_acc']:.2f} | {r['val_acc']:.2f} "
              f"| {r['fit_s']:.1f} | {r['trainable_params']:,} | {r['worst_cond']:.3g} "
              f"| {r['worst_cond_Xp']:.3g} | {r['solve_retries']:.0f} |")
    with (args.out / "depth_study.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, args.out / "depth_study.png")
    print(f"\nwrote {args.out / 'depth_study.png'} and {args.out / 'depth_study.csv'}")


if __name__ == "__main__":
    main()
