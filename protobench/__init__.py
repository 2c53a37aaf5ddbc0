"""protobench: a benchmarking harness for fast, closed-form ways of training classifiers."""

from __future__ import annotations

__version__ = "0.1.0"
