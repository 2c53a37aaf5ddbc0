"""Looking inside runs: the inverse projection, run artifacts, conditioning and heat maps.

The report-level checks (figures drawn from a store seeded by real runs and a real grid study,
and the HTML in a headless browser) live in test_report.py, which seeds one store for both.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import torch

from protobench.datasets.base import DatasetSplits
from protobench.errors import ConfigError
from protobench.harness import registry
from protobench.harness.api import FitData
from protobench.harness.artifacts import ARTIFACT_DIR, ARTIFACTS_TAG, encode_artifacts
from protobench.harness.runner import RunConfig, plan_runs, run_benchmark, run_one
from protobench.methods.projection import fit_projection
from protobench.protocols.timing import Clock
from protobench.results.inspection import (
    conditioning_figure,
    conditioning_runs,
    grid_studies,
    heatmap_figure,
)
from protobench.results.prototype_pictures import embedding_figure, grid_figure
from protobench.results.recorder import Recorder
from tests.conftest import FakeClock, ScriptedMethod
from tests.pixel_data import pixel_splits

TINY = {"n_prototypes": 12, "hidden": 24, "proj_dim": 16, "epochs": 2, "batch_size": 80}


# The inverse projection -----------------------------------------------------------------------


def _digits64() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return torch.from_numpy(bunch.data / 16.0), torch.from_numpy(bunch.target).long()


def test_inverse_pca_maps_a_projected_image_back_to_its_pca_reconstruction() -> None:
    from sklearn.decomposition import PCA

    X, y = _digits64()  # float64 throughout
    proj = fit_projection(X, y, 10, "pca", 20)
    assert proj.components is not None and proj.components.dtype == torch.float64
    rows = X[:25]
    back = proj.inverse(proj.apply(rows))
    reference = PCA(n_components=20, svd_solver="full").fit(X.numpy())
    expected = reference.inverse_transform(reference.transform(rows.numpy()))
    assert back.dtype == torch.float64 and back.shape == rows.shape
    assert np.abs(back.numpy() - expected).max() < 1e-4
    # Not the identity: 20 of 64 directions lose part of each image.
    assert np.abs(back.numpy() - rows.numpy()).max() > 1e-2


def test_inverse_pls_is_the_least_squares_inverse_through_the_weights() -> None:
    X, y = _digits64()
    proj = fit_projection(X, y, 10, "pls", 12)
    assert proj.components is not None and proj.mean is not None
    Z = proj.apply(X[:40])
    back = proj.inverse(Z)
    # Its image projects to the same scores, and it is mean + the orthogonal projection of
    # x - mean onto span(P): the nearest point to x with those scores.
    assert torch.allclose(proj.apply(back), Z, atol=1e-9)
    Q, _ = torch.linalg.qr(proj.components)
    expected = proj.mean + (X[:40] - proj.mean) @ Q @ Q.T
    assert torch.allclose(back, expected, atol=1e-9)


def test_inverse_of_no_projection_is_the_identity_and_shapes_are_checked() -> None:
    X, y = _digits64()
    assert torch.equal(fit_projection(X, y, 10, "none", 5).inverse(X[:3]), X[:3])
    proj = fit_projection(X.float(), y, 10, "pca", 8)
    assert proj.inverse(torch.zeros(2, 8)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"Z must have shape \(N, 8\) to invert a pca "
                                         r"projection, got \(2, 7\)"):
        proj.inverse(torch.zeros(2, 7))


# Artifacts: encoding, and where the runner asks for them ----------------------------------------


def test_artifacts_encode_figures_arrays_and_array_mappings() -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    files = encode_artifacts({"pic": fig, "one": np.arange(3), "many": {"a": np.ones(2)}})
    assert sorted(files) == ["many.npz", "one.npy", "pic.png"]
    assert files["pic.png"].startswith(b"\x89PNG")
    assert np.load(io.BytesIO(files["one.npy"])).tolist() == [0, 1, 2]
    with np.load(io.BytesIO(files["many.npz"])) as npz:
        assert npz["a"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="artifact name must be a file stem.*got '../x'"):
        encode_artifacts({"../x": np.zeros(1)})
    with pytest.raises(ValueError, match="artifact 'bad' must be a matplotlib Figure, a numpy "
                                         "array or a mapping.*got list"):
        encode_artifacts({"bad": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="artifact 'm': entry 'k' must be a numpy array"):
        encode_artifacts({"m": {"k": 3}})  # type: ignore[dict-item]


class PicturingMethod(ScriptedMethod):
    """A scripted method whose artifacts hook costs fake time, or fails when told to."""

    name: ClassVar[str] = "picturing"
    artifact_cost = 1000.0
    seen: ClassVar[list[int]] = []

    def artifacts(self, data: FitData) -> dict[str, Any]:
        self.seen.append(data.n_samples)
        self._spend(self.artifact_cost)
        if self.params["gain"] == 0.5:
            raise RuntimeError("cannot draw")
        return {"curve": np.linspace(0, 1, 4)}


def test_artifacts_are_made_outside_every_timed_phase_and_never_fail_a_run(
    tiny_splits: DatasetSplits, results_dir: Path,
) -> None:
    registry.register(PicturingMethod)
    clock = FakeClock()
    PicturingMethod.clock = clock
    PicturingMethod.seen = []
    try:
        recorder = Recorder(results_dir)
        [plan] = plan_runs(["picturing"], RunConfig("tiny"), {})
        good = run_one(plan, tiny_splits, torch.device("cpu"), [recorder],
                       clock=Clock(clock.now))
        [plan] = plan_runs(["picturing"], RunConfig("tiny"), {"picturing": {"gain": 0.5}})
        bad = run_one(plan, tiny_splits, torch.device("cpu"), [recorder],
                      clock=Clock(clock.now))
    finally:
        registry.unregister(PicturingMethod.name)
        PicturingMethod.clock = None
    # The hook ran once per run on the training rows, and its 1000 fake seconds are in no
    # phase: every phase is far shorter.
    assert PicturingMethod.seen == [60, 60]
    for result in (good, bad):
        assert result.status == "FINISHED"
        assert result.phases and max(result.phases.values()) < 1000, result.phases
    assert sorted(good.artifacts) == ["curve.npy"] and good.artifact_error == ""
    assert bad.artifacts == {} and bad.artifact_error == "RuntimeError: cannot draw"

    client = recorder.client
    assert good.run_id is not None and bad.run_id is not None
    stored = [f.path for f in client.list_artifacts(good.run_id, ARTIFACT_DIR)]
    assert stored == [f"{ARTIFACT_DIR}/curve.npy"]
    assert client.get_run(good.run_id).data.tags[ARTIFACTS_TAG] == "curve.npy"
    bad_tags = client.get_run(bad.run_id).data.tags
    assert bad_tags["artifact_error"] == "RuntimeError: cannot draw"
    assert ARTIFACTS_TAG not in bad_tags and client.list_artifacts(bad.run_id, ARTIFACT_DIR) == []


def test_a_tiny_proto_pinv_h_run_keeps_its_prototype_pictures(results_dir: Path) -> None:
    splits = pixel_splits(n_train=150)
    recorder = Recorder(results_dir)
    plans = plan_runs(["proto-pinv-h"], RunConfig("pix", device="cpu", threads=1),
                      {"proto-pinv-h": TINY})
    [result] = run_benchmark(plans, observers=[recorder], splits=splits)
    assert result.status == "FINISHED", result.error
    assert result.artifact_error == ""
    assert sorted(result.artifacts) == ["prototype_embedding.png", "prototype_grid.png",
                                        "prototypes.npz"]
    assert result.run_id is not None
    stored = sorted(f.path for f in recorder.client.list_artifacts(result.run_id, ARTIFACT_DIR))
    assert stored == [f"{ARTIFACT_DIR}/{name}" for name in sorted(result.artifacts)]

    with np.load(io.BytesIO(result.artifacts["prototypes.npz"]), allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    n_protos = TINY["n_prototypes"]
    assert arrays["images_start"].shape == arrays["images_end"].shape == (n_protos, 784)
    assert arrays["z_start"].shape == (n_protos, 16)
    assert arrays["labels_start"].tolist() == sorted(np.arange(n_protos) % 3)
    assert str(arrays["method"]) == "proto-pinv-h" and str(arrays["projection"]) == "pca"
    assert int(arrays["epochs"]) == 2 and arrays["image_shape"].tolist() == [28, 28]
    # Stratified sample of real rows, 50 per class.
    assert np.bincount(arrays["sample_labels"]).tolist() == [50, 50, 50]
    # Training moved the prototypes; each start prototype is (the reconstruction of) a row of
    # its own class: its picture correlates best with that class's mean image.
    assert not np.allclose(arrays["z_start"], arrays["z_end"])
    means = np.stack([splits.train.X[splits.train.y == c].mean(0).numpy() for c in range(3)])
    best = np.argmax(np.corrcoef(arrays["images_start"], means)[:n_protos, n_protos:], axis=1)
    assert best.tolist() == arrays["labels_start"].tolist()


# Figures from arrays and tables ---------------------------------------------------------------


def _arrays(k: int = 3, n: int = 9, side: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    d = side * side
    labels = np.arange(n) % k
    return {
        "images_start": rng.random((n, d)), "images_end": rng.random((n, d)),
        "labels_start": labels, "labels_end": np.where(labels == 2, 0, labels),
        "z_start": rng.random((n, 5)), "z_end": rng.random((n, 5)),
        "sample_z": rng.random((30, 5)), "sample_labels": np.arange(30) % k,
        "image_shape": np.asarray([1, side, side]), "n_classes": np.asarray(k),
        "epochs": np.asarray(4), "method": np.asarray("m"), "projection": np.asarray("pca"),
    }


def test_prototype_grid_and_embedding_name_their_rows_axes_and_scale() -> None:
    arrays = _arrays()
    fig = grid_figure(arrays)
    assert fig is not None
    start, end, bar = fig.axes
    # One row per class, named with its count; class 2 lost its prototypes to class 0.
    assert [t.get_text() for t in start.get_yticklabels()] == ["0 (3)", "1 (3)", "2 (3)"]
    assert [t.get_text() for t in end.get_yticklabels()] == ["0 (6)", "1 (3)", "2 (0)"]
    assert start.get_title() == "at fit start (epoch 0)"
    assert end.get_title() == "after training (epoch 4)"
    assert "up to 6 per class" in end.get_xlabel()
    assert bar.get_ylabel() == "pixel intensity (0 = background, 1 = ink)"
    # The mosaic holds 3 rows of 6x6 tiles, NaN where a class has fewer prototypes.
    mosaic = end.get_images()[0].get_array()
    assert mosaic.shape == (3 * 8 - 2, 6 * 8 - 2)
    assert np.ma.getmaskarray(mosaic)[2 * 8:, :].all()  # class 2's row is empty

    assert end.get_images()[0].colorbar.extend == "neither"
    # Trained prototypes may leave the inputs' range [0, 1]: clipped, and the bar says so.
    wide = grid_figure({**arrays, "images_end": 2 * arrays["images_end"] - 0.5})
    assert wide is not None and wide.axes[1].get_images()[0].colorbar.extend == "both"

    assert grid_figure({**arrays, "image_shape": np.asarray([5, 7])}) is None  # not 36 pixels

    emb = embedding_figure(arrays, "pca")
    left, right = emb.axes
    assert left.get_xlabel().startswith("PC 1 (pixel-intensity units, ")
    assert left.get_ylabel().startswith("PC 2 (")
    labels = [t.get_text() for t in right.get_legend().get_texts()]
    assert labels == ["training row (30 sampled)", "prototype", "class 0", "class 1",
                      "class 2"]
    with pytest.raises(ConfigError, match="embedding must be one of pca, tsne, got 'umap'"):
        embedding_figure(arrays, "umap")


def test_tsne_embedding_is_a_choice() -> None:
    fig = embedding_figure(_arrays(n=6), "tsne")
    assert fig.axes[0].get_xlabel() == "t-SNE 1 (arbitrary units)"


def _steps(rows: list[tuple[str, int, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"run_id": "r1", "key": k, "step": s, "value": v} for k, s, v in rows],
                        columns=["run_id", "key", "step", "value"])


def test_conditioning_figure_marks_rank_deficient_epochs_and_reads_accuracy_on_the_right(
) -> None:
    runs = pd.DataFrame([
        {"run_id": "r1", "method": "proto-pinv-h", "seed": 3, "kind": "run",
         "status": "FINISHED", "non_finite_metrics": "diag_cond_Xp",
         "diag_cond_Xp": math.nan, "diag_sigma_min_Xp": 0.0, "diag_cond_Hp1": 20.0,
         "diag_sigma_min_Hp1": 2.0, "diag_worst_cond_Xp": math.nan},
        {"run_id": "r2", "method": "elm", "seed": 3, "kind": "run", "status": "FINISHED",
         "non_finite_metrics": "", "diag_cond_Xp": math.nan, "diag_sigma_min_Xp": math.nan,
         "diag_cond_Hp1": math.nan, "diag_sigma_min_Hp1": math.nan,
         "diag_worst_cond_Xp": math.nan},
    ])
    assert conditioning_runs(runs) == {"r1": ["Xp", "Hp1"]}
    steps = _steps([("diag_cond_Xp", 1, 1e3), ("diag_cond_Xp", 2, 1e7),
                    ("diag_sigma_min_Xp", 1, 1e-2), ("diag_sigma_min_Xp", 2, 1e-6),
                    ("diag_sigma_min_Xp", 3, 0.0),
                    ("diag_cond_Hp1", 1, 20.0), ("diag_cond_Hp1", 2, 21.0),
                    ("diag_cond_Hp1", 3, 22.0), ("diag_sigma_min_Hp1", 1, 2.0),
                    ("diag_sigma_min_Hp1", 2, 2.0), ("diag_sigma_min_Hp1", 3, 2.0)])
    curve = pd.DataFrame({"run_id": "r1", "step": [1, 3], "fit_seconds": [1.0, 3.0],
                          "val_accuracy": [0.5, 0.75]})
    fig = conditioning_figure(runs.iloc[0], ["Xp", "Hp1"], steps, curve, "pix")
    top, bottom, top_acc, bottom_acc = fig.axes
    assert top.get_yscale() == "log" and bottom.get_yscale() == "log"
    assert top.get_ylabel() == "condition number σmax/σmin\n(log scale)"
    assert bottom.get_xlabel() == "epoch"
    assert top_acc.get_ylabel() == "validation accuracy (%)"
    assert top_acc.lines[0].get_ydata().tolist() == [50.0, 75.0]
    # Epoch 3 of Xp: sigma_min 0, so a marker at each panel's edge instead of a point.
    edge = [line for line in top.lines if line.get_marker() == "^"]
    assert len(edge) == 1 and edge[0].get_xdata().tolist() == [3]
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert legend == ["Xp (input prototypes)", "[1, act(Hp1)] (hidden layer 1)",
                      "validation accuracy (right axis)",
                      "σmin = 0 (rank-deficient):\ncondition number infinite"]
    # A narrow range stays on a linear axis.
    narrow = conditioning_figure(runs.iloc[0], ["Hp1"], steps, curve, "pix")
    assert narrow.axes[0].get_yscale() == "linear"
    assert narrow.axes[0].get_ylabel() == "condition number σmax/σmin"


def _study_runs() -> pd.DataFrame:
    """A 2 x 2 x 2 grid study with known accuracies, a pruned and a failed trial, and a
    study over continuous ranges (no heat map)."""
    rows: list[dict[str, Any]] = [
        {"run_id": "S", "run_name": "study-g", "kind": "study", "method": "m",
         "status": "FINISHED", "parent_run_id": "", "trial_state": "",
         "search.a": "{1, 2}", "search.b": "{0.1, 0.2}", "search.c": "{x, y}"},
        {"run_id": "T", "run_name": "study-tpe", "kind": "study", "method": "m",
         "status": "FINISHED", "parent_run_id": "", "trial_state": "",
         "search.a": "[1, 2]", "search.b": "[0.1, 0.2] log", "search.c": ""},
    ]
    accuracy = {(1, 0.1, "x"): 0.50, (1, 0.2, "x"): 0.60, (2, 0.1, "x"): 0.70,
                (2, 0.2, "x"): 0.90, (1, 0.1, "y"): 0.55, (1, 0.2, "y"): 0.65,
                (2, 0.1, "y"): 0.75}
    for i, ((a, b, c), acc) in enumerate(accuracy.items()):
        rows.append({"run_id": f"t{i}", "kind": "trial", "parent_run_id": "S",
                     "status": "FINISHED", "trial_state": "COMPLETE", "hp.a": a, "hp.b": b,
                     "hp.c": c, "val_accuracy": acc})
    rows.append({"run_id": "p", "kind": "trial", "parent_run_id": "S", "status": "FINISHED",
                 "trial_state": "PRUNED", "hp.a": 2, "hp.b": 0.2, "hp.c": "y",
                 "val_accuracy": 0.99})
    rows.append({"run_id": "f", "kind": "trial", "parent_run_id": "S", "status": "FAILED",
                 "trial_state": "FAIL", "hp.a": 2, "hp.b": 0.2, "hp.c": "y",
                 "val_accuracy": math.nan})
    rows.append({"run_id": "dup", "kind": "trial", "parent_run_id": "S",
                 "status": "FINISHED", "trial_state": "COMPLETE", "hp.a": 1, "hp.b": 0.1,
                 "hp.c": "x", "val_accuracy": 0.40})
    return pd.DataFrame(rows)


def test_heat_maps_hold_the_other_parameters_at_the_best_trial() -> None:
    [study] = grid_studies(_study_runs())  # the continuous study is no grid
    assert (study.name, study.params) == ("g", ["a", "b", "c"])
    assert sorted(study.trials["run_id"]) == ["dup", "t0", "t1", "t2", "t3", "t4", "t5", "t6"]
    fig = heatmap_figure(study, "pix")
    assert fig is not None
    ab, ac, bc, bar = fig.axes
    assert bar.get_ylabel() == "validation accuracy (%)"

    def cells(ax: Any) -> list[str]:
        return [t.get_text() for t in ax.texts]

    # a x b at c = x (the best trial's c): rows a = 1, 2; columns b = 0.1, 0.2; (1, 0.1, x)
    # was run twice: the mean of 50% and 40%.
    assert (ab.get_ylabel(), ab.get_xlabel()) == ("a", "b")
    assert [t.get_text() for t in ab.get_xticklabels()] == ["0.1", "0.2"]
    assert [t.get_text() for t in ab.get_yticklabels()] == ["1", "2"]
    assert cells(ab) == ["45.0", "60.0", "70.0", "90.0"]
    assert ab.get_title() == "a × b\n(best c=x)"
    # a x c at b = 0.2: (2, 0.2, y) has only pruned and failed trials.
    assert cells(ac) == ["60.0", "65.0", "90.0", "n/a"]
    # b x c at a = 2.
    assert cells(bc) == ["70.0", "75.0", "90.0", "n/a"]
    # The best cell is boxed in each panel.
    box = ab.patches[0]
    assert box.get_xy() == (0.5, 0.5)

    one = grid_studies(_study_runs().drop(columns=["search.b", "search.c"]))[0]
    assert one.params == ["a"] and heatmap_figure(one, "pix") is None
