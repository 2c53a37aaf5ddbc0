"""Hyperparameter declarations: type, default, valid range and the range tuning searches."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from protobench.errors import ConfigError

Kind = Literal["int", "float", "bool", "choice"]
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class HyperParam:
    """One hyperparameter of a method.

    `low`/`high` bound the valid values (`low_open` makes the lower bound strict, as for a ridge
    strength that must be > 0). `search` is the range tuning draws from: `(low, high)` for numbers
    (log-uniform when `log`), a tuple of values for choices, None when tuning leaves it alone.
    """

    name: str
    kind: Kind
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[Any, ...] | None = None
    search: tuple[Any, ...] | None = None
    log: bool = False

    def describe_range(self) -> str:
        """Human-readable valid range, as used in error messages and `bench list`."""
        if self.kind == "choice":
            return "one of " + ", ".join(str(c) for c in self.choices or ())
        if self.kind == "bool":
            return "true or false"
        left = "(" if self.low_open else "["
        low = "-inf" if self.low is None else _fmt(self.low)
        high = "inf" if self.high is None else _fmt(self.high)
        return f"{left}{low}, {high}]"

    def parse(self, raw: Any, owner: str) -> Any:
        """Convert `raw` (a string from the CLI or a Python value) and check it is allowed."""
        label = f"{owner}.{self.name}"
        value = self._convert(raw, label)
        self._check(value, label)
        return value

    def _convert(self, raw: Any, label: str) -> Any:
        try:
            if self.kind == "bool":
                if isinstance(raw, bool):
                    return raw
                text = str(raw).strip().lower()
                if text in _TRUE:
                    return True
                if text in _FALSE:
                    return False
                raise ValueError(raw)
            if self.kind == "int":
                if isinstance(raw, bool):
                    raise ValueError(raw)
                if isinstance(raw, float) and not raw.is_integer():
                    raise ValueError(raw)
                return int(str(raw).strip()) if isinstance(raw, str) else int(raw)
            if self.kind == "float":
                if isinstance(raw, bool):
                    raise ValueError(raw)
                return float(raw)
            return self._convert_choice(raw)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{label} must be {self._kind_word()} in {self.describe_range()}, got {raw!r}"
            ) from None

    def _convert_choice(self, raw: Any) -> Any:
        for choice in self.choices or ():
            if raw == choice or str(raw).strip() == str(choice):
                return choice
        raise ValueError(raw)

    def _check(self, value: Any, label: str) -> None:
        if self.kind not in ("int", "float"):
            return
        allowed = self.describe_range()
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{label} must be a finite number in {allowed}, got {value!r}")
        too_low = self.low is not None and (
            value <= self.low if self.low_open else value < self.low
        )
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            raise ConfigError(f"{label} must be in {allowed}, got {value!r}")

    def _kind_word(self) -> str:
        return {"int": "an integer", "float": "a number", "bool": "a boolean"}.get(
            self.kind, "a value"
        )


def _fmt(x: float) -> str:
    return f"{x:g}"


def resolve_params(
    owner: str, specs: Sequence[HyperParam], given: Mapping[str, Any]
) -> dict[str, Any]:
    """Defaults overlaid with `given`, each value parsed and checked; unknown keys are refused."""
    by_name = {p.name: p for p in specs}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        raise ConfigError(
            f"unknown hyperparameter {owner}.{unknown[0]}; {owner} takes: "
            + ", ".join(sorted(by_name))
        )
    resolved = {p.name: p.default for p in specs}
    for key, raw in given.items():
        resolved[key] = by_name[key].parse(raw, owner)
    return resolved


def parse_assignments(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """Parse `--set METHOD.KEY=VALUE` items into {method: {key: raw value}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        method, dot, key = target.strip().rpartition(".")
        if not sep or not dot or not method or not key:
            raise ConfigError(
                f"--set expects METHOD.KEY=VALUE (e.g. proto-pinv-h.lam1=0.01), got {item!r}"
            )
        out.setdefault(method, {})[key] = value.strip()
    return out
