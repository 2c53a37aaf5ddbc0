"""Extreme learning machine, and the random-feature ridge readout it shares with rf-ridge.

A random-feature classifier maps inputs through a fixed random layer H = f(X W + b) and fits
only a linear readout by ridge regression on one-hot targets. The readout has an unpenalised
intercept: features and targets are centred, so the ridge strength shrinks the weights only.

Primal form (N >= h): H^T H and H^T Y are accumulated over chunks of rows, so memory stays
O(h^2) whatever the number of rows, then centred and solved in float64. Dual form (h > N): H
is materialised (N is small) and the N x N kernel system is solved instead. Subclasses only
choose the feature map.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from protobench.harness.api import FitContext, FitData, Method
from protobench.harness.params import HyperParam

if TYPE_CHECKING:
    import torch

    from protobench.methods.ridge import SolveStats

logger = logging.getLogger(__name__)

ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "sigmoid", "gelu")

# Width of the column blocks in which the upper triangle of H^T H is accumulated: computing
# only the blocks on and above the diagonal does about half the work of a full H^T H.
_GRAM_BLOCK = 512


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise nonlinearity `name`; the returned function may work in place."""
    import torch

    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "relu": torch.relu_,
        "tanh": torch.tanh_,
        "sigmoid": torch.sigmoid_,
        "gelu": torch.nn.functional.gelu,
    }
    if name not in table:
        from protobench.errors import ConfigError

        raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return table[name]


@dataclass
class GramSums:
    """Sufficient statistics of the ridge readout, accumulated over chunks of rows."""

    G: torch.Tensor  # (h, h) H^T H
    C: torch.Tensor  # (h, k) H^T Y
    s: torch.Tensor  # (h,) column sums of H
    t: torch.Tensor  # (k,) column sums of Y
    n: int


def _add_gram_upper_(G: torch.Tensor, H: torch.Tensor) -> None:
    """G += H^T H on and above the diagonal blocks only; the blocks below stay untouched."""
    h = H.shape[1]
    for a0 in range(0, h, _GRAM_BLOCK):
        a1 = min(a0 + _GRAM_BLOCK, h)
        G[a0:a1, a0:].addmm_(H[:, a0:a1].T, H[:, a0:])


def _mirror_upper_(G: torch.Tensor) -> None:
    """Copy the blocks above the diagonal blocks to below them, making G symmetric."""
    h = G.shape[0]
    for a0 in range(0, h, _GRAM_BLOCK):
        a1 = min(a0 + _GRAM_BLOCK, h)
        G[a1:, a0:a1] = G[a0:a1, a1:].T


def accumulate_gram(
    features: Callable[[torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    Y: torch.Tensor,
    chunk_size: int,
    on_chunk: Callable[[int, int], None] | None = None,
) -> GramSums:
    """Sum the readout's statistics over chunks of `chunk_size` rows of X (N, d), Y (N, k)."""
    import torch

    n = int(X.shape[0])
    n_chunks = -(-n // chunk_size)
    G = C = s = torch.empty(0)
    for i in range(n_chunks):
        rows = slice(i * chunk_size, min((i + 1) * chunk_size, n))
        H = features(X[rows])  # (chunk, h)
        if i == 0:
            h = H.shape[1]
            G = torch.zeros(h, h, dtype=H.dtype, device=H.device)
            C = torch.zeros(h, Y.shape[1], dtype=H.dtype, device=H.device)
            s = torch.zeros(h, dtype=H.dtype, device=H.device)
        _add_gram_upper_(G, H)
        C.addmm_(H.T, Y[rows])
        s.add_(H.sum(dim=0))
        if on_chunk is not None:
            on_chunk(i + 1, n_chunks)
    _mirror_upper_(G)
    return GramSums(G=G, C=C, s=s, t=Y.sum(dim=0), n=n)


def solve_readout(
    sums: GramSums, lam: float, stats: SolveStats | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Readout weights (h, k) and intercept (k,) from accumulated sums, solved in float64."""
    from protobench.methods.ridge import solve_spd

    n = sums.n
    G, s, t = sums.G.double(), sums.s.double(), sums.t.double()
    # Centre features and targets, so that the intercept is not penalised:
    #   Gc = G - s s^T / n,   Cc = C - s t^T / n
    #   (Gc + lam I) W = Cc,   bias = t / n - (s / n)^T W
    G.addr_(s, s, alpha=-1.0 / n)
    Cc = sums.C.double().addr_(s, t, alpha=-1.0 / n)
    W = solve_spd(G, Cc, lam, stats, what="readout ridge system")
    return W, t / n - (s / n) @ W


def dual_readout(
    H: torch.Tensor, Y: torch.Tensor, lam: float, stats: SolveStats | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Readout weights (h, k) and intercept (k,) from materialised H (N, h), Y (N, k), N < h."""
    from protobench.methods.ridge import ridge

    H, Y = H.double(), Y.double()
    mean_h, mean_y = H.mean(dim=0), Y.mean(dim=0)
    # With Hc = H - mean_h, Yc = Y - mean_y:
    #   W = Hc^T (Hc Hc^T + lam I)^-1 Yc,   bias = mean_y - mean_h^T W
    W = ridge(H - mean_h, Y - mean_y, lam, form="dual", stats=stats, what="readout dual system")
    return W, mean_y - mean_h @ W


class RandomFeatureReadout(Method):
    """A fixed random layer H = f(X W + b) and a ridge readout fitted in closed form.

    Subclasses declare the width parameter's name, draw (W, b) and apply f.
    """

    iterative: ClassVar[bool] = False
    width_param: ClassVar[str]

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(params)
        self.W: torch.Tensor | None = None  # (d, h)
        self.b: torch.Tensor | None = None  # (h,)
        self.W_out: torch.Tensor | None = None  # (h, k)
        self.b_out: torch.Tensor | None = None  # (k,)
        self._stats: SolveStats | None = None
        self._form = ""

    @property
    def width(self) -> int:
        return int(self.params[self.width_param])

    @abstractmethod
    def _draw(self, d: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random W (d, h) and b (h,) in float32 on the CPU."""

    @abstractmethod
    def _activate(self, Z: torch.Tensor) -> torch.Tensor:
        """The feature map f applied to Z = X W + b (may overwrite Z)."""

    def features(self, X: torch.Tensor) -> torch.Tensor:
        """H = f(X W + b) for X (n, d); returns (n, h)."""
        if self.W is None or self.b is None:
            raise RuntimeError(f"{self.name}: fit must run before the features are used")
        import torch

        return self._activate(torch.addmm(self.b, X, self.W))

    def fit(self, data: FitData, ctx: FitContext) -> None:
        import torch

        from protobench.methods.ridge import SolveStats, choose_form

        # Fixed random layer, drawn on the CPU so that every device sees the same values.
        W, b = self._draw(data.n_features, ctx.generator("features"))
        self.W = W.to(device=ctx.device, dtype=data.X.dtype)
        self.b = b.to(device=ctx.device, dtype=data.X.dtype)
        self._stats = SolveStats()
        Y = torch.nn.functional.one_hot(data.y, data.n_classes).to(data.X.dtype)  # (N, k)
        lam = float(self.params["lam"])

        # Readout: primal with chunked Gram accumulation, dual when h exceeds the row count.
        self._form = choose_form(data.n_samples, self.width)
        if self._form == "primal":
            sums = accumulate_gram(
                self.features, data.X, Y, int(self.params["chunk_size"]),
                on_chunk=lambda done, total: ctx.progress(done, total, "chunk"),
            )
            W_out, b_out = solve_readout(sums, lam, self._stats)
        else:
            W_out, b_out = dual_readout(self.features(data.X), Y, lam, self._stats)
            ctx.progress(1, 1, "chunk")
        self.W_out = W_out.to(data.X.dtype)
        self.b_out = b_out.to(data.X.dtype)
        logger.debug("%s: %s readout with h=%d", self.name, self._form, self.width)
        ctx.checkpoint(1)

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        if self.W_out is None or self.b_out is None:
            raise RuntimeError(f"{self.name}: predict called before fit")
        import torch

        chunk = int(self.params["chunk_size"])
        parts = [
            torch.addmm(self.b_out, self.features(X[i : i + chunk]), self.W_out)
            for i in range(0, int(X.shape[0]), chunk)
        ]
        if not parts:
            return X.new_zeros(0, int(self.W_out.shape[1]))
        return torch.cat(parts)

    def trainable_parameters(self) -> int:
        if self.W_out is None or self.b_out is None:
            raise RuntimeError(f"{self.name}: parameter counts are known only after fit")
        return int(self.W_out.numel() + self.b_out.numel())

    def stored_parameters(self) -> int:
        if self.W is None or self.b is None:
            raise RuntimeError(f"{self.name}: parameter counts are known only after fit")
        return int(self.W.numel() + self.b.numel()) + self.trainable_parameters()

    def summary_diagnostics(self) -> dict[str, float]:
        if self._stats is None:
            return {}
        return {
            "solve_retries": float(self._stats.retries),
            "dual_form": float(self._form == "dual"),
        }


class ExtremeLearningMachine(RandomFeatureReadout):
    """ELM: H = act(X W + b) with every entry of W (d, h) and b (h,) drawn from N(0, scale^2 / d).

    Biases as small as the weights keep the features driven by the input: on MNIST, biases of
    unit size cost about a point of accuracy. With relu, H scales with `scale`, so only
    lam / scale^2 matters; the bounded activations depend on `scale` itself.
    """

    name = "elm"
    summary = "Extreme learning machine: random hidden layer, ridge readout in closed form"
    width_param = "hidden"
    hyperparams = (
        HyperParam("hidden", "int", 4000, "hidden units h (random features)",
                   low=1, high=65536, search=(500, 8000), log=True),
        HyperParam("lam", "float", 1.0, "ridge strength of the readout",
                   low=0.0, low_open=True, search=(1e-3, 1e3), log=True),
        HyperParam("activation", "choice", "relu", "hidden nonlinearity",
                   choices=ACTIVATIONS, search=ACTIVATIONS),
        HyperParam("scale", "float", 1.0, "random weights and biases ~ N(0, scale^2 / d)",
                   low=0.0, low_open=True, search=(0.3, 10.0), log=True),
        HyperParam("chunk_size", "int", 4096, "rows per chunk of the Gram accumulation",
                   low=1, high=1_000_000),
    )

    def _draw(self, d: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        h, scale = self.width, float(self.params["scale"])
        std = scale / math.sqrt(d)
        W = torch.randn(d, h, generator=generator) * std
        b = torch.randn(h, generator=generator) * std
        return W, b

    def _activate(self, Z: torch.Tensor) -> torch.Tensor:
        return activation(str(self.params["activation"]))(Z)
