"""Named artifacts a method hands the harness once a run is scored: pictures and arrays.

`Method.artifacts` returns {name: value}. The runner asks for them after the final scoring and
after reading the peak memory, with every clock stopped, and encodes them here into files that
the recorder stores with the run (MLflow artifacts under `inspection/`). Values:

- a matplotlib Figure: `<name>.png`;
- a numpy array: `<name>.npy`;
- a mapping of names to numpy arrays: `<name>.npz` (compressed).

Names are file stems: letters, digits, '_', '-' and '.', starting with a letter or digit.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

Artifact: TypeAlias = "Figure | np.ndarray | Mapping[str, np.ndarray]"

# The MLflow artifact folder of a run's inspection artifacts.
ARTIFACT_DIR = "inspection"
# The run tag listing the files stored there, so readers need not list every run's artifacts.
ARTIFACTS_TAG = "inspection_artifacts"
PNG_DPI = 120
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def encode_artifacts(named: Mapping[str, Artifact]) -> dict[str, bytes]:
    """{file name: bytes} for each named artifact; ValueError for a bad name or value type."""
    import numpy as np

    files: dict[str, bytes] = {}
    for name, value in named.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(
                f"artifact name must be a file stem of letters, digits, '_', '-' or '.' "
                f"(at most 100 characters), got {name!r}"
            )
        buffer = io.BytesIO()
        if isinstance(value, np.ndarray):
            np.save(buffer, value, allow_pickle=False)
            suffix = "npy"
        elif isinstance(value, Mapping):
            arrays = {str(k): _array(name, str(k), v) for k, v in value.items()}
            np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
            suffix = "npz"
        elif _is_figure(value):
            value.savefig(buffer, format="png", dpi=PNG_DPI, bbox_inches="tight")
            suffix = "png"
        else:
            raise ValueError(
                f"artifact {name!r} must be a matplotlib Figure, a numpy array or a mapping of "
                f"names to numpy arrays, got {type(value).__name__}"
            )
        files[f"{name}.{suffix}"] = buffer.getvalue()
    return files


def _array(name: str, key: str, value: Any) -> np.ndarray:
    import numpy as np

    if not isinstance(value, np.ndarray):
        raise ValueError(
            f"artifact {name!r}: entry {key!r} must be a numpy array, got {type(value).__name__}"
        )
    return value


def _is_figure(value: Any) -> bool:
    # matplotlib is imported only when a value is neither an array nor a mapping.
    from matplotlib.figure import Figure

    return isinstance(value, Figure)
