"""Five-method MNIST comparison on a CUDA device: one command for a quick GPU check.

    python benchmarks/gpu_quick.py [--dataset mnist] [--results DIR]

Refuses to run without CUDA (the CPU comparison is `bench run --methods all`). On a GPU the whole
run takes well under 5 minutes; the table printed is the harness's own.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--results", default="bench-results-gpu")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_quick: no CUDA device here; run `bench run --methods all` for the CPU",
              file=sys.stderr)
        return 2
    from protobench.cli import main as bench

    bench.main(
        ["run", "--methods", "all", "--dataset", args.dataset, "--device", "cuda",
         "--target", "0.975", "--results", args.results],
        standalone_mode=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
