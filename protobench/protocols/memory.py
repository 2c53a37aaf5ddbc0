"""Peak memory of one run: resident set size on the CPU, allocator high-water mark on CUDA."""

from __future__ import annotations

import logging
import resource
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak(device: torch.device) -> None:
    """Start a new high-water mark so the next reading covers one run only."""
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return
    # Writing 5 to clear_refs resets the kernel's VmHWM (Linux 4.0+); elsewhere the reading
    # stays the process-lifetime peak, which `peak_scope` says.
    try:
        _CLEAR_REFS.write_text("5", encoding="ascii")
    except OSError:
        logger.debug("cannot reset the RSS high-water mark; reporting the process peak")


def peak_megabytes(device: torch.device) -> float:
    """Peak memory since the last reset, in MiB."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _STATUS.read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_kind(device: torch.device) -> str:
    """What `peak_megabytes` measures on `device`, for the record."""
    return "cuda_max_allocated" if device.type == "cuda" else "process_rss_hwm"
