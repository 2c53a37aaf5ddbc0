"""Random Fourier features with a ridge readout: an approximate Gaussian-kernel classifier.

    phi(x) = sqrt(2 / h) cos(x W + b),   W_ij ~ N(0, 2 gamma),   b_j ~ U(0, 2 pi)

so that E[phi(x) . phi(x')] = exp(-gamma |x - x'|^2) (Rahimi and Recht, 2007). The readout and
its chunked Gram accumulation are those of the ELM (`protobench.methods.elm`).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from protobench.harness.params import HyperParam
from protobench.methods.elm import RandomFeatureReadout

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class RandomFeatureRidge(RandomFeatureReadout):
    """Ridge regression on random Fourier features of the Gaussian kernel exp(-gamma |x-x'|^2)."""

    name = "rf-ridge"
    summary = "Random Fourier features of a Gaussian kernel, ridge readout in closed form"
    width_param = "features"
    hyperparams = (
        HyperParam("features", "int", 4000, "random Fourier features h",
                   low=1, high=65536, search=(500, 8000), log=True),
        HyperParam("gamma", "float", 0.01, "Gaussian kernel width exp(-gamma |x - x'|^2)",
                   low=0.0, low_open=True, search=(1e-3, 0.1), log=True),
        HyperParam("lam", "float", 1e-2, "ridge strength of the readout",
                   low=0.0, low_open=True, search=(1e-5, 10.0), log=True),
        HyperParam("chunk_size", "int", 4096, "rows per chunk of the Gram accumulation",
                   low=1, high=1_000_000),
    )

    def _draw(self, d: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        h, gamma = self.width, float(self.params["gamma"])
        W = torch.randn(d, h, generator=generator) * math.sqrt(2.0 * gamma)
        b = torch.rand(h, generator=generator) * (2.0 * math.pi)
        return W, b

    def _activate(self, Z: torch.Tensor) -> torch.Tensor:
        return Z.cos_().mul_(math.sqrt(2.0 / self.width))
