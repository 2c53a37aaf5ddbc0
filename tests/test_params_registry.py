"""Hyperparameter parsing and the method registry."""

from __future__ import annotations

import pytest

from protobench.errors import ConfigError
from protobench.harness import registry
from protobench.harness.params import HyperParam, parse_assignments, resolve_params
from protobench.harness.runner import RunConfig, plan_runs
from tests.conftest import ScriptedMethod

LAM = HyperParam("lam1", "float", 1e-2, "ridge", low=0, high=1e3, low_open=True,
                 search=(1e-4, 1.0), log=True)
ACT = HyperParam("activation", "choice", "relu", "act", choices=("relu", "tanh"))
EPOCHS = HyperParam("epochs", "int", 10, "epochs", low=1, high=1000)
FLAG = HyperParam("learn_lam", "bool", False, "flag")


def test_values_parse_from_strings() -> None:
    got = resolve_params("m", [LAM, ACT, EPOCHS, FLAG],
                         {"lam1": "0.5", "activation": "tanh", "epochs": "3", "learn_lam": "yes"})
    assert got == {"lam1": 0.5, "activation": "tanh", "epochs": 3, "learn_lam": True}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"lam1": "-1"}, r"m\.lam1 must be in \(0, 1000\], got -1\.0"),
        ({"lam1": "0"}, r"m\.lam1 must be in \(0, 1000\], got 0\.0"),
        ({"lam1": "nan"}, r"m\.lam1 must be a finite number"),
        ({"lam1": "abc"}, r"m\.lam1 must be a number in \(0, 1000\], got 'abc'"),
        ({"activation": "foo"}, r"m\.activation must be a value in one of relu, tanh"),
        ({"epochs": "2.5"}, r"m\.epochs must be an integer in \[1, 1000\], got '2\.5'"),
        ({"epochs": "0"}, r"m\.epochs must be in \[1, 1000\], got 0"),
        ({"learn_lam": "maybe"}, r"m\.learn_lam must be a boolean"),
        ({"lr": "1"}, r"unknown hyperparameter m\.lr; m takes: activation, epochs"),
    ],
)
def test_bad_values_are_refused_naming_parameter_and_range(given: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_params("m", [LAM, ACT, EPOCHS, FLAG], given)


def test_set_assignments() -> None:
    assert parse_assignments(["proto-pinv-h.lam1=1e-3", "elm.hidden=10"]) == {
        "proto-pinv-h": {"lam1": "1e-3"}, "elm": {"hidden": "10"}}
    with pytest.raises(ConfigError, match="--set expects METHOD.KEY=VALUE"):
        parse_assignments(["lam1=3"])


def test_registry_knows_builtins_and_refuses_unknown_names() -> None:
    assert registry.method_names()[:5] == ["proto-pinv-h", "proto-pinv", "elm", "rf-ridge", "mlp"]
    with pytest.raises(ConfigError, match="unknown method 'nope'; valid methods: proto-pinv-h"):
        registry.get_method("nope")
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        registry.resolve_method_list("elm,nope")
    assert registry.resolve_method_list("elm, mlp,elm") == ["elm", "mlp"]


def test_register_refuses_duplicates_and_bad_names(scripted: type[ScriptedMethod]) -> None:
    with pytest.raises(ConfigError, match="method 'scripted' is already registered"):
        registry.register(ScriptedMethod)

    class Bad(ScriptedMethod):
        name = "Bad Name"

    with pytest.raises(ConfigError, match="must be a non-empty lowercase word"):
        registry.register(Bad)


def test_plan_runs_derives_seeds_and_checks_set_targets(scripted: type[ScriptedMethod]) -> None:
    cfg = RunConfig("tiny", repeats=2, epochs=3)
    plans = plan_runs(["scripted"], cfg, {})
    assert [p.repeat for p in plans] == [0, 1]
    assert plans[0].seed != plans[1].seed
    assert plans[0].params["epochs"] == 3
    with pytest.raises(ConfigError, match="--set names method 'elm', which is not among"):
        plan_runs(["scripted"], cfg, {"elm": {"lam": "1"}})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "tpu"}, "--device must be auto, cpu or cuda"),
        ({"repeats": 0}, "--seeds must be >= 1"),
        ({"time_budget": -1.0}, "--time-budget must be > 0"),
        ({"target": 1.5}, r"--target must be an accuracy in \(0, 1\]"),
    ],
)
def test_run_config_refuses_bad_rules(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig("tiny", **kwargs)
