"""Data sets for the harness: fetching verified raw files and loading fixed splits.

Importing this package is cheap: torch, torchvision, numpy and scikit-learn are imported only
when data is actually fetched or loaded.
"""

from __future__ import annotations

import logging

from protobench.datasets.base import DatasetSplits, Split
from protobench.datasets.catalog import DATASET_NAMES, default_data_dir
from protobench.datasets.fetching import fetch
from protobench.datasets.loading import load_splits

logger = logging.getLogger(__name__)

__all__ = [
    "DATASET_NAMES",
    "DatasetSplits",
    "Split",
    "default_data_dir",
    "fetch",
    "load_splits",
]
