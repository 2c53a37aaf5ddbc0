"""The one place seeds and random generators come from."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_SEED_MODULUS = 2**63 - 1


def derive_seed(base_seed: int, *parts: object) -> int:
    """A seed fixed by `base_seed` and `parts` (e.g. dataset, method, repeat), stable everywhere.

    Python's hash() is salted per process, so a cryptographic digest of the text is used instead.
    """
    text = "\x1f".join([str(base_seed), *(str(p) for p in parts)])
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % _SEED_MODULUS


def make_generator(seed: int, stream: str = "") -> torch.Generator:
    """A CPU generator for `seed` and `stream`; draws happen on the CPU so every device agrees."""
    import torch

    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed(seed, stream) if stream else seed)
    return generator
