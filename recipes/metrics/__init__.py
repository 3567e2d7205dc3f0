"""The recipe's and the benchmarks' metrics as local `evaluate` modules: loaded from this folder, never downloaded.

`evaluate.load("name")` fetches a module from the Hugging Face Hub; a path to a module file loads it from disk,
offline. `load("exact_match")` is `evaluate.load` on this folder's `exact_match.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
METRICS = ("accuracy", "exact_match", "token_accuracy")


def load(name: str) -> Any:
    """The local `evaluate` module `name` (one of `METRICS`), loaded offline from its file in this folder."""
    if name not in METRICS:
        raise ValueError(f"Invalid metric: {name!r}. Must be one of {METRICS}.")
    import evaluate

    return evaluate.load(str(HERE / f"{name}.py"))
