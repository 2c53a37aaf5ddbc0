"""The environment record every run carries: hardware, library versions and the harness commit."""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.machine()


@functools.lru_cache(maxsize=1)
def harness_commit() -> str:
    """The git commit of the protobench checkout, with '+dirty' for local changes."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return "unknown"
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _blas() -> str:
    import torch

    config = str(torch.__config__.show())
    match = re.search(r"BLAS_INFO=(\w+)", config)
    lapack = re.search(r"LAPACK_INFO=(\w+)", config)
    parts = [f"blas={match.group(1)}" if match else "blas=unknown"]
    if lapack:
        parts.append(f"lapack={lapack.group(1)}")
    return ",".join(parts)


@functools.lru_cache(maxsize=4)
def _static_record() -> dict[str, str]:
    import torch

    from protobench import __version__

    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": str(os.cpu_count() or 0),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda or "none"),
        "blas": _blas(),
        "protobench": __version__,
        "git_commit": harness_commit(),
    }


def environment_record(device: torch.device) -> dict[str, str]:
    """What a reader needs to reproduce or discount a timing, as flat string fields."""
    import torch

    record = dict(_static_record())
    record["device"] = str(device)
    record["threads"] = str(torch.get_num_threads())
    record["matmul_precision"] = torch.get_float32_matmul_precision()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record["gpu_name"] = props.name
        record["gpu_memory_gb"] = f"{props.total_memory / 2**30:.1f}"
    else:
        record["gpu_name"] = "none"
    return record
