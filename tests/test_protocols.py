"""The timing and accuracy protocols, checked with a fake clock and a scripted method."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from protobench.datasets.base import DatasetSplits
from protobench.harness.runner import (
    FAILED,
    FINISHED,
    RunConfig,
    RunInfo,
    method_params,
    run_one,
)
from protobench.protocols.accuracy import run_seed, summarise_accuracy, summarise_times
from protobench.protocols.timing import Clock, CurvePoint, device_sync, time_to_target
from tests.conftest import FakeClock, ScriptedMethod

CPU = torch.device("cpu")


def _info(cfg: RunConfig, **params: object) -> RunInfo:
    return RunInfo("scripted", cfg.dataset, 0, 123, method_params("scripted", params, None), cfg)


def _run(splits: DatasetSplits, cfg: RunConfig, sync: bool, **params: object):
    clock = FakeClock()
    ScriptedMethod.clock = clock
    result = run_one(_info(cfg, **params), splits, CPU,
                     clock=Clock(clock.now, clock.sync if sync else None))
    return result, clock


def test_clock_syncs_before_every_reading_when_given_a_sync() -> None:
    fake = FakeClock()
    clock = Clock(fake.now, fake.sync)
    for _ in range(3):
        clock.read()
    assert fake.log == ["sync", "read"] * 3


def test_no_sync_on_cpu_and_a_real_sync_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert device_sync(torch.device("cpu")) is None
    calls: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: calls.append(dev))
    sync = device_sync(torch.device("cuda", 0))
    assert sync is not None
    sync()
    assert calls == [torch.device("cuda", 0)]


def test_runner_syncs_at_every_clock_reading_on_an_async_device(
    scripted: type[ScriptedMethod], tiny_splits: DatasetSplits
) -> None:
    result, clock = _run(tiny_splits, RunConfig("tiny"), sync=True)
    assert result.status == FINISHED, result.error
    assert clock.reads > 10
    assert clock.syncs == clock.reads


def test_runner_never_syncs_on_cpu(
    scripted: type[ScriptedMethod], tiny_splits: DatasetSplits
) -> None:
    result, clock = _run(tiny_splits, RunConfig("tiny"), sync=False)
    assert result.status == FINISHED, result.error
    assert clock.syncs == 0 and clock.reads > 10


def test_evaluation_is_outside_fit_time_and_warmup_reported_apart(
    scripted: type[ScriptedMethod], tiny_splits: DatasetSplits
) -> None:
    result, _ = _run(tiny_splits, RunConfig("tiny"), sync=False, epochs=5)
    # 5 epochs at 1 s each; each validation pass costs 100 fake seconds, outside the fit.
    assert result.phases["fit"] == pytest.approx(5.0)
    assert result.phases["evaluation"] == pytest.approx(500.0)
    assert result.phases["warmup"] == pytest.approx(5.0)
    assert result.phases["preprocess"] == pytest.approx(3.0)
    assert result.phases["inference"] == pytest.approx(100.0)
    assert [p.fit_seconds for p in result.curve] == pytest.approx([1, 2, 3, 4, 5])


def test_time_to_target_is_the_first_checkpoint_that_reaches_it(
    scripted: type[ScriptedMethod], tiny_splits: DatasetSplits
) -> None:
    cfg = RunConfig("tiny", target=0.5)
    result, _ = _run(tiny_splits, cfg, sync=False, epochs=5, gain=0.2)
    accs = [p.val_accuracy for p in result.curve]
    first = next(i for i, a in enumerate(accs) if a >= 0.5)
    assert result.time_to_target == pytest.approx(result.curve[first].fit_seconds)
    assert first >= 1  # the target is not reached at the first checkpoint
    assert time_to_target([CurvePoint(1, 1.0, 0.3)], 0.9) is None


def test_time_budget_cuts_an_iterative_method_at_the_first_checkpoint_past_it(
    scripted: type[ScriptedMethod], tiny_splits: DatasetSplits
) -> None:
    result, _ = _run(tiny_splits, RunConfig("tiny", time_budget=2.5), sync=False, epochs=10)
    assert result.cut is True
    assert len(result.curve) == 3
    assert result.phases["fit"] == pytest.approx(3.0)


def test_eval_every_thins_checkpoints_and_final_score_is_still_taken(
    scripted: type[ScriptedMethod], tiny_splits: DatasetSplits
) -> None:
    result, _ = _run(tiny_splits, RunConfig("tiny", eval_every=2), sync=False, epochs=5)
    assert [p.epoch for p in result.curve] == [2, 4, 5]
    assert result.val_accuracy == result.curve[-1].val_accuracy


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("raise", "scripted: RuntimeError: scripted failure inside fit"),
        ("shape", r"plugin 'scripted' returned predictions of shape \(100, 2\)"),
        ("nan", "plugin 'scripted' returned non-finite scores"),
    ],
)
def test_plugin_faults_are_failed_runs_naming_the_plugin(
    scripted: type[ScriptedMethod], tiny_splits: DatasetSplits, fault: str, message: str
) -> None:
    import re

    result, _ = _run(tiny_splits, RunConfig("tiny"), sync=False, fail=fault)
    assert result.status == FAILED
    assert re.search(message, result.error), result.error


def test_tuning_runs_never_read_the_test_split(
    scripted: type[ScriptedMethod], tiny_splits: DatasetSplits
) -> None:
    result, _ = _run(tiny_splits, RunConfig("tiny", score_test=False), sync=False)
    assert result.status == FINISHED
    assert tiny_splits.test_reads == 0 and math.isnan(result.test_accuracy)
    _run(tiny_splits, RunConfig("tiny"), sync=False)
    assert tiny_splits.test_reads == 1


def test_seeds_are_derived_identically_in_separate_processes() -> None:
    code = (
        "from protobench.protocols.accuracy import run_seed;"
        "print([run_seed(0, 'mnist', m, r) for m in ('elm', 'mlp') for r in range(3)])"
    )
    outs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout
        for _ in range(2)
    ]
    assert outs[0] == outs[1]
    here = [run_seed(0, "mnist", m, r) for m in ("elm", "mlp") for r in range(3)]
    assert outs[0].strip() == str(here)
    assert len(set(here)) == 6
    assert run_seed(1, "mnist", "elm", 0) != run_seed(0, "mnist", "elm", 0)


def test_accuracy_summary_mean_std_and_t_interval() -> None:
    s = summarise_accuracy([0.97, 0.98, 0.99])
    assert s.mean == pytest.approx(0.98)
    assert s.std == pytest.approx(0.01)
    # t(0.975, 2) = 4.3027
    assert s.ci95 == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    with pytest.raises(ValueError, match="accuracies must be finite"):
        summarise_accuracy([0.9, math.nan])


def test_time_summary_counts_not_reached_as_infinite() -> None:
    s = summarise_times([1.0, 2.0, math.inf])
    assert s.median == 2.0
    assert math.isinf(summarise_times([1.0, math.inf, math.inf]).median)
    assert summarise_times([1.0, 2.0, 3.0, 4.0]).iqr == pytest.approx(1.5)
