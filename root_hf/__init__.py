"""root_hf: the ROOT optimizer (Robust Orthogonalized Optimizer, arXiv 2511.20626) for PyTorch and Hugging Face.

``import root_hf`` needs only torch: the Hugging Face pieces listed in ``_LAZY`` load on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from .optim import ROOT, RootReference, get_schedule, orthogonalize, schedule_band

__version__ = "0.1.0"

# Public names that live in modules needing optional dependencies: name -> module, imported on first access.
_LAZY: dict[str, str] = {}

__all__ = ["ROOT", "RootReference", "__version__", "get_schedule", "orthogonalize", "schedule_band"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'root_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
