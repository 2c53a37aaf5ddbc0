"""The only place where method names map to classes.

Built-in methods are listed here by import path so that listing them does not import torch;
third-party packages add methods through the entry-point group `protobench.methods`, whose values
point at Method subclasses (`package.module:ClassName`).
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from protobench.errors import ConfigError

if TYPE_CHECKING:
    from protobench.harness.api import Method

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "protobench.methods"

BUILTIN_METHODS: dict[str, str] = {
    "proto-pinv-h": "protobench.methods.proto_pinv:ProtoPinvH",
    "proto-pinv": "protobench.methods.proto_pinv:ProtoPinv",
    "elm": "protobench.methods.elm:ExtremeLearningMachine",
    "rf-ridge": "protobench.methods.rf_ridge:RandomFeatureRidge",
    "mlp": "protobench.methods.mlp:BackpropMLP",
}

_extra: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Register a Method subclass at run time (tests, notebooks); usable as a decorator."""
    name = getattr(cls, "name", "")
    if not name or name != name.lower() or " " in name:
        raise ConfigError(f"method name must be a non-empty lowercase word, got {name!r}")
    if name in BUILTIN_METHODS or name in _extra:
        raise ConfigError(f"method {name!r} is already registered")
    _extra[name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method registered with `register` (built-ins stay)."""
    _extra.pop(name, None)


def _plugin_paths() -> dict[str, str]:
    paths: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN_METHODS:
            logger.warning("entry point %r ignored: the name is a built-in method", ep.name)
            continue
        paths[ep.name] = ep.value
    return paths


def method_names() -> list[str]:
    """Every registered method name, built-ins first in their fixed order."""
    names = list(BUILTIN_METHODS)
    names += sorted(set(_plugin_paths()) | set(_extra))
    return names


def get_method(name: str) -> type[Method]:
    """The class registered under `name`; unknown names list the valid ones."""
    from protobench.harness.api import Method

    if name in _extra:
        return _extra[name]
    path = BUILTIN_METHODS.get(name) or _plugin_paths().get(name)
    if path is None:
        raise ConfigError(
            f"unknown method {name!r}; valid methods: {', '.join(method_names())}"
        )
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"method {name!r} could not be loaded from {path!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"method {name!r} at {path!r} is not a protobench Method subclass")
    return cls


def resolve_method_list(spec: str) -> list[str]:
    """Turn `all` or a comma-separated list into method names, checking each."""
    if spec.strip() == "all":
        return method_names()
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise ConfigError("--methods needs 'all' or a comma-separated list of method names")
    valid = method_names()
    for name in names:
        if name not in valid:
            raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(valid)}")
    return list(dict.fromkeys(names))
