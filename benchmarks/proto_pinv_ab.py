"""Epoch time of proto-pinv-h now against an earlier git revision, paired in one process.

    python benchmarks/proto_pinv_ab.py REV [--rounds 12] [--dataset mnist]

On a shared machine, epoch times drift by tens of percent between processes minutes apart, so
two separate runs cannot tell a 10% change. This script loads `protobench/methods/
proto_pinv.py` as it was at REV (`git show`) next to the current one, prepares both with the
defaults on the same data, and alternates them (ABBA order): each round fits two epochs with
each and times the second. It prints both medians and the per-round ratios. Everything but
that one module (harness, ridge helper, projections) is the current code for both.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODULE = "protobench/methods/proto_pinv.py"


def _load_revision(rev: str, folder: Path) -> Any:
    """The proto_pinv module as it was at git revision `rev`, under another module name."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{rev}:{MODULE}"], cwd=root, capture_output=True,
                            text=True)
    if source.returncode != 0:
        raise SystemExit(f"cannot read {MODULE} at {rev!r}: {source.stderr.strip()}")
    path = folder / "proto_pinv_at_revision.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("proto_pinv_at_revision", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="git revision to compare with, e.g. HEAD~1")
    parser.add_argument("--rounds", type=int, default=12, help="paired rounds [default: 12]")
    parser.add_argument("--dataset", default="mnist", help="data set [default: mnist]")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    import torch

    import protobench.methods.proto_pinv as current
    from protobench.datasets import load_splits
    from protobench.harness.api import FitData
    from protobench.harness.context import RunContext
    from protobench.harness.runner import pinned_numerics

    splits = load_splits(args.dataset)
    data = FitData(X=splits.train.X, y=splits.train.y, n_classes=splits.n_classes,
                   image_shape=splits.image_shape)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp, pinned_numerics(None) as threads:
        earlier = _load_revision(args.rev, Path(tmp))
        methods = {}
        for name, module in ((args.rev, earlier), ("current", current)):
            method = module.ProtoPinvH({"epochs": 2})
            method.prepare(data, RunContext(cpu, 0))
            method.warmup(data, RunContext(cpu, 0))
            methods[name] = method
        times: dict[str, list[float]] = {name: [] for name in methods}
        for round_ in range(args.rounds):
            order = list(methods.items())
            for name, method in order if round_ % 2 == 0 else order[::-1]:
                ends: list[float] = []

                def mark(epoch: int, diagnostics: Any, ends: list[float] = ends) -> bool:
                    ends.append(time.perf_counter())
                    return False

                method.fit(data, RunContext(cpu, 0, on_checkpoint=mark))
                times[name].append(ends[1] - ends[0])

    print(f"proto-pinv-h defaults on {args.dataset}, {threads} threads, {args.rounds} rounds, "
          "second epoch of each fit:")
    for name, ts in times.items():
        print(f"  {name}: median {statistics.median(ts):.3f} s, "
              f"range {min(ts):.3f}-{max(ts):.3f} s")
    ratios = sorted(c / e for c, e in zip(times["current"], times[args.rev], strict=True))
    print(f"  current / {args.rev}, per round: median {statistics.median(ratios):.2f}, "
          f"range {ratios[0]:.2f}-{ratios[-1]:.2f}")


if __name__ == "__main__":
    main()
