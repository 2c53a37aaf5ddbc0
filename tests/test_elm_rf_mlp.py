"""ELM, random-Fourier-feature ridge and the backprop MLP on tiny data."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch

from protobench.errors import ConfigError
from protobench.harness.api import FitData
from protobench.harness.context import RunContext
from protobench.methods.elm import (
    ACTIVATIONS,
    ExtremeLearningMachine,
    RandomFeatureReadout,
    accumulate_gram,
    solve_readout,
)
from protobench.methods.mlp import BackpropMLP
from protobench.methods.rf_ridge import RandomFeatureRidge
from protobench.methods.ridge import Form, ridge

CPU = torch.device("cpu")
READOUT_METHODS = [ExtremeLearningMachine, RandomFeatureRidge]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny problems gain nothing from threads, and spinning threads stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def blobs(n: int, d: int = 6, k: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64
          ) -> FitData:
    """Well separated Gaussian blobs in [0, 1]^d; `seed` draws the noise, not the centres."""
    centres = torch.rand(k, d, generator=torch.Generator().manual_seed(99), dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    X = (centres[y] + 0.05 * torch.randn(n, d, generator=g, dtype=dtype)).clamp(0, 1)
    return FitData(X=X, y=y, n_classes=k, image_shape=(d,))


def digits() -> tuple[FitData, torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits scaled to [0, 1], shuffled: 1200 rows to train, 597 to score."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = torch.randperm(len(bunch.target), generator=torch.Generator().manual_seed(0))
    X = torch.tensor(bunch.data, dtype=torch.float32)[order] / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)[order]
    data = FitData(X=X[:1200], y=y[:1200], n_classes=10, image_shape=(8, 8))
    return data, X[1200:], y[1200:]


def width_params(cls: type[RandomFeatureReadout], h: int, **extra: Any) -> dict[str, Any]:
    return {cls.width_param: h, **extra}


def fit(cls: type[Any], params: Mapping[str, Any], data: FitData, seed: int = 0) -> Any:
    method = cls(params)
    method.fit(data, RunContext(CPU, seed))
    return method


def centred_reference(H: torch.Tensor, data: FitData, lam: float, form: Form
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One unchunked ridge solve on centred features and one-hot targets."""
    Y = torch.nn.functional.one_hot(data.y, data.n_classes).to(H.dtype)
    mean_h, mean_y = H.mean(0), Y.mean(0)
    W = ridge(H - mean_h, Y - mean_y, lam, form=form)
    return W, mean_y - mean_h @ W


# Random-feature readouts (elm, rf-ridge)

@pytest.mark.parametrize("cls", READOUT_METHODS)
@pytest.mark.parametrize("chunk_size", [7, 13, 50, 1000])
def test_chunked_readout_matches_one_solve(cls: type[RandomFeatureReadout], chunk_size: int
                                           ) -> None:
    data = blobs(50)
    method = fit(cls, width_params(cls, 20, lam=0.3, chunk_size=chunk_size), data)
    assert method.summary_diagnostics()["dual_form"] == 0.0
    W_ref, b_ref = centred_reference(method.features(data.X), data, 0.3, "primal")
    torch.testing.assert_close(method.W_out, W_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(method.b_out, b_ref, rtol=1e-9, atol=1e-10)


def test_gram_accumulation_spans_several_blocks() -> None:
    # h = 1100 spans three column blocks of the upper-triangle accumulation, the last one short.
    g = torch.Generator().manual_seed(0)
    X = torch.rand(301, 5, generator=g, dtype=torch.float64)
    P = torch.randn(5, 1100, generator=g, dtype=torch.float64)
    Y = torch.nn.functional.one_hot(torch.arange(301) % 4, 4).double()
    sums = accumulate_gram(lambda Xc: torch.tanh(Xc @ P), X, Y, chunk_size=128)
    H = torch.tanh(X @ P)
    torch.testing.assert_close(sums.G, H.T @ H, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(sums.C, H.T @ Y, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(sums.s, H.sum(0), rtol=1e-12, atol=1e-10)
    assert sums.n == 301 and torch.equal(sums.t, Y.sum(0))


@pytest.mark.parametrize("cls", READOUT_METHODS)
def test_dual_form_matches_primal(cls: type[RandomFeatureReadout]) -> None:
    data = blobs(30)
    method = fit(cls, width_params(cls, 45, lam=0.1, chunk_size=8), data)
    assert method.summary_diagnostics()["dual_form"] == 1.0
    H = method.features(data.X)
    W_ref, b_ref = centred_reference(H, data, 0.1, "primal")
    torch.testing.assert_close(method.W_out, W_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(method.b_out, b_ref, rtol=1e-8, atol=1e-10)

    # The chunked primal accumulation reaches the same readout for the wide H as well.
    Y = torch.nn.functional.one_hot(data.y, data.n_classes).double()
    W_p, b_p = solve_readout(accumulate_gram(method.features, data.X, Y, 8), 0.1)
    torch.testing.assert_close(W_p, method.W_out, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(b_p, method.b_out, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("cls", READOUT_METHODS)
def test_readout_seeded(cls: type[RandomFeatureReadout]) -> None:
    data = blobs(64, dtype=torch.float32)
    params = width_params(cls, 32, chunk_size=10)
    first = fit(cls, params, data, seed=3).predict(data.X)
    again = fit(cls, params, data, seed=3).predict(data.X)
    other = fit(cls, params, data, seed=4).predict(data.X)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("cls", READOUT_METHODS)
@pytest.mark.parametrize("lam", [0, 0.0, -1e-3])
def test_nonpositive_lam_refused(cls: type[RandomFeatureReadout], lam: float) -> None:
    with pytest.raises(ConfigError, match=rf"{cls.name}\.lam must be in \(0, inf\], got"):
        cls({"lam": lam})


def test_unknown_activation_refused() -> None:
    with pytest.raises(ConfigError, match=r"elm\.activation must be .*relu, tanh, sigmoid, gelu"):
        ExtremeLearningMachine({"activation": "swish"})


@pytest.mark.parametrize("cls", READOUT_METHODS)
def test_readout_reports_progress_and_one_checkpoint(cls: type[RandomFeatureReadout]) -> None:
    data = blobs(50, dtype=torch.float32)
    progress: list[tuple[int, int, str]] = []
    ctx = RunContext(CPU, 0, on_progress=lambda d, t, u: progress.append((d, t, u)))
    cls(width_params(cls, 16, chunk_size=20)).fit(data, ctx)
    assert progress == [(1, 3, "chunk"), (2, 3, "chunk"), (3, 3, "chunk")]
    assert ctx.checkpoints == [1]
    assert cls.iterative is False


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_elm_fits_separable_blobs(activation: str) -> None:
    data = blobs(90, dtype=torch.float32)
    test = blobs(90, seed=1, dtype=torch.float32)
    method = fit(ExtremeLearningMachine, {"hidden": 40, "lam": 1e-2, "activation": activation},
                 data)
    accuracy = (method.predict(test.X).argmax(1) == test.y).float().mean()
    assert accuracy > 0.95


@pytest.mark.parametrize(("cls", "params"), [
    (ExtremeLearningMachine, {"hidden": 300}),
    (RandomFeatureRidge, {"features": 300, "gamma": 0.05}),
])
def test_readout_fits_digits(cls: type[RandomFeatureReadout], params: dict[str, Any]) -> None:
    data, X_test, y_test = digits()
    method = fit(cls, params, data)
    with torch.inference_mode():
        accuracy = (method.predict(X_test).argmax(1) == y_test).float().mean()
    assert accuracy > 0.9


@pytest.mark.parametrize("cls", READOUT_METHODS)
def test_readout_parameter_counts(cls: type[RandomFeatureReadout]) -> None:
    data = blobs(50, d=6, k=3)
    method = fit(cls, width_params(cls, 20), data)
    assert method.trainable_parameters() == (20 + 1) * 3
    assert method.stored_parameters() == 6 * 20 + 20 + (20 + 1) * 3
    assert method.predict(data.X[:0]).shape == (0, 3)


def test_counts_before_fit_refused() -> None:
    with pytest.raises(RuntimeError, match="known only after fit"):
        ExtremeLearningMachine().trainable_parameters()
    with pytest.raises(RuntimeError, match="predict called before fit"):
        RandomFeatureRidge().predict(torch.zeros(2, 3))


# Backprop MLP

MLP_SMALL = {"hidden": 64, "epochs": 10, "batch_size": 32, "lr": 1e-2}


def test_mlp_fits_digits() -> None:
    data, X_test, y_test = digits()
    method = fit(BackpropMLP, MLP_SMALL, data)
    with torch.inference_mode():
        accuracy = (method.predict(X_test).argmax(1) == y_test).float().mean()
    assert accuracy > 0.9
    assert method.epochs_run == 10


def test_mlp_warmup_changes_nothing() -> None:
    data = blobs(100, d=8, dtype=torch.float32)
    ctx = RunContext(CPU, 0)
    method = BackpropMLP(MLP_SMALL)
    method.warmup(data, ctx)
    weights = (method.W1, method.b1, method.W2, method.b2)
    fresh = BackpropMLP(MLP_SMALL)
    expected = fresh._init_weights(data, ctx)
    for w, e in zip(weights, expected, strict=True):
        assert w is not None and w.grad is None
        assert torch.equal(w, e)

    # A fit after warmup is the same as a fit without one.
    method.fit(data, ctx)
    fresh.fit(data, RunContext(CPU, 0))
    assert torch.equal(method.predict(data.X), fresh.predict(data.X))


def test_mlp_seeded() -> None:
    data = blobs(100, d=8, dtype=torch.float32)
    first = fit(BackpropMLP, MLP_SMALL, data, seed=5).predict(data.X)
    again = fit(BackpropMLP, MLP_SMALL, data, seed=5).predict(data.X)
    other = fit(BackpropMLP, MLP_SMALL, data, seed=6).predict(data.X)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_mlp_stops_when_checkpoint_says_so() -> None:
    data = blobs(100, d=8, dtype=torch.float32)
    method = BackpropMLP(MLP_SMALL)
    ctx = RunContext(CPU, 0, on_checkpoint=lambda epoch, diag: epoch >= 3)
    method.fit(data, ctx)
    assert method.epochs_run == 3
    assert ctx.checkpoints == [1, 2, 3]
    assert all("train_loss" in diag for diag in ctx.diagnostics)


def test_mlp_predicts_mid_fit_without_disturbing_it() -> None:
    data = blobs(100, d=8, dtype=torch.float32)
    method = BackpropMLP(MLP_SMALL)
    seen: list[torch.Tensor] = []

    def evaluate(epoch: int, diag: Mapping[str, float]) -> bool:
        with torch.inference_mode():
            seen.append(method.predict(data.X))
        return False

    method.fit(data, RunContext(CPU, 0, on_checkpoint=evaluate))
    plain = fit(BackpropMLP, MLP_SMALL, data)
    assert len(seen) == 10
    assert torch.equal(seen[-1], plain.predict(data.X))


def test_mlp_parameter_counts() -> None:
    data = blobs(40, d=8, k=3, dtype=torch.float32)
    method = fit(BackpropMLP, {"hidden": 16, "epochs": 1}, data)
    assert method.trainable_parameters() == 8 * 16 + 16 + 16 * 3 + 3
    assert method.stored_parameters() == method.trainable_parameters()


@pytest.mark.parametrize(("key", "value", "pattern"), [
    ("lr", 0, r"mlp\.lr must be in \(0, 10\], got 0"),
    ("epochs", 0, r"mlp\.epochs must be in \[1, 10000\], got 0"),
    ("activation", "elu", r"mlp\.activation must be .*one of relu, tanh, sigmoid, gelu"),
])
def test_mlp_bad_params_refused(key: str, value: Any, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        BackpropMLP({key: value})


def test_method_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import protobench.methods.elm, protobench.methods.rf_ridge, protobench.methods.mlp\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
