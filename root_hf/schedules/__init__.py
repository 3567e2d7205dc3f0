"""Newton-Schulz coefficient schedules: names, the shipped table, the adaptive fitter and one resolution cache.

A *schedule* is one quintic `(a, b, c)` triple per Newton-Schulz step. What users pass as `ns_coefficients` (a
`ScheduleSpec`) is resolved for a matrix shape by `get_schedule`:

- `"adaptive"` (the default, `DEFAULT_SCHEDULE`): fitted per matrix shape and step count, safe by construction
  (every output singular value stays in `ADAPTIVE_BAND` = [0, 1.2] for every input, in float64 and in simulated
  bfloat16). Shapes of common models ship as literal triples in `root_hf.schedules.table`; any other shape is fitted
  once per process by `root_hf.schedules.fit` (pure, deterministic, no files, no global state).
- `"polar-express"`: Polar Express's per-step minimax coefficients (Amsel et al. 2025), the same for every shape.
- `"muon"`: Muon's fixed triple at every step.
- `"root-paper"`: the four per-shape triples published with ROOT, Muon's for every other shape. Its (2048, 2048)
  triple is unsafe (resolving it warns); kept to reproduce the paper.
- `"root-paper-safe"`: `"root-paper"` with every triple whose composition leaves `SAFE_BAND` replaced by Muon's.
- One triple (used at every step) or one triple per step: refused with a `ValueError` when its composed polynomial
  leaves `SAFE_BAND` on [0, 1] (see `check_schedule_safe`).

`get_schedule` is meant to be called when a parameter is added to an optimizer, not in `step()`: the first call for
an off-table shape runs the fit (tens of milliseconds); later calls are lookups in one in-memory cache.

The command line `python -m root_hf.schedules show|model|table` prints schedules, their band and predicted errors,
and regenerates the table.

Example:
    >>> from root_hf.schedules import get_schedule
    >>> get_schedule("muon", (576, 1536), 2)
    ((3.4445, -4.775, 2.0315), (3.4445, -4.775, 2.0315))
    >>> len(get_schedule("adaptive", (37, 91), 5))  # off the table: fitted once, then cached
    5
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

from . import table as _table
from .fit import FAMILY_NAMES, FITTER_VERSION, FitResult, fit_schedule, schedule_errors, spectrum_families
from .named import (
    ADAPTIVE_BAND,
    MUON_COEFFICIENTS,
    ROOT_PAPER_TABLE,
    SAFE_BAND,
    Coefficients,
    Schedule,
    ScheduleCheck,
    check_schedule,
    check_schedule_safe,
    composed_polynomial,
    minimax_quintic,
    muon_schedule,
    polar_express_schedule,
    root_paper_schedule,
    schedule_band,
    shape_key,
    simulate_bf16,
)

__all__ = [
    "ADAPTIVE_BAND",
    "DEFAULT_SCHEDULE",
    "FAMILY_NAMES",
    "FITTER_VERSION",
    "MUON_COEFFICIENTS",
    "ROOT_PAPER_TABLE",
    "SAFE_BAND",
    "SCHEDULE_NAMES",
    "Coefficients",
    "FitResult",
    "Schedule",
    "ScheduleCheck",
    "ScheduleName",
    "ScheduleSpec",
    "adaptive_schedule",
    "check_schedule",
    "check_schedule_safe",
    "clear_cache",
    "composed_polynomial",
    "fit_schedule",
    "get_schedule",
    "minimax_quintic",
    "normalize_schedule_spec",
    "polar_express_schedule",
    "schedule_band",
    "schedule_errors",
    "schedule_source",
    "shape_key",
    "simulate_bf16",
    "spectrum_families",
    "table_schedule",
]

ScheduleName = Literal["adaptive", "polar-express", "muon", "root-paper", "root-paper-safe"]
# What users pass as `ns_coefficients`: a schedule name, one triple (used at every step) or one triple per step.
ScheduleSpec = str | Coefficients | Sequence[Coefficients]

SCHEDULE_NAMES: tuple[str, ...] = ("adaptive", "polar-express", "muon", "root-paper", "root-paper-safe")
# The shape-adaptive schedule (root_hf issue 3): a guaranteed band and, in benchmarks/orthogonality.py, lower error
# than Muon and the ROOT table on every shape and spectrum measured (see docs/coefficients.md).
DEFAULT_SCHEDULE = "adaptive"

_SPEC_HELP = f"Must be one of {SCHEDULE_NAMES}, a triple (a, b, c) or a list of per-step triples."


def _as_triple(value: Sequence[float]) -> Coefficients:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
        raise ValueError(
            f"Invalid Newton-Schulz coefficients: {tuple(value)!r}. Must be three finite floats (a, b, c)."
        )
    return triple  # type: ignore[return-value]


def normalize_schedule_spec(spec: ScheduleSpec) -> str | Coefficients | Schedule:
    """Validate `ns_coefficients` and return a hashable, `torch.load(weights_only=True)`-safe form.

    Args:
        spec: a schedule name, one triple or a sequence of per-step triples.

    Returns:
        The name for a named schedule, one tuple of floats for a triple, or a tuple of triples for a per-step list.

    Raises:
        ValueError: naming the value and the accepted forms.

    Example:
        >>> normalize_schedule_spec([(3, -3.2, 1.2)])
        ((3.0, -3.2, 1.2),)
    """
    if isinstance(spec, str):
        if spec not in SCHEDULE_NAMES:
            raise ValueError(f"Invalid ns_coefficients: {spec!r}. {_SPEC_HELP}")
        return spec
    if not isinstance(spec, Sequence) or len(spec) == 0:
        raise ValueError(f"Invalid ns_coefficients: {spec!r}. {_SPEC_HELP}")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec):
        return _as_triple(spec)  # type: ignore[arg-type]
    if any(isinstance(step, (str, bytes)) or not isinstance(step, Sequence) for step in spec):
        raise ValueError(f"Invalid ns_coefficients: {spec!r}. {_SPEC_HELP}")
    return tuple(_as_triple(step) for step in spec)  # type: ignore[union-attr]


def _check_steps(ns_steps: int) -> None:
    if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or ns_steps < 0:
        raise ValueError(f"Invalid ns_steps: {ns_steps!r}. Must be an integer >= 0.")


def table_schedule(shape: Sequence[int], ns_steps: int) -> Schedule | None:
    """The shipped `"adaptive"` schedule of a shape (`root_hf.schedules.table`), or None if the table has none.

    Args:
        shape: the weight's shape (any orientation; more than 2 dims are viewed as `(shape[0], -1)`).
        ns_steps: number of Newton-Schulz steps; the table holds `TABLE_NS_STEPS` (5) only.

    Returns:
        The table's triples, or None for another step count, another shape or a table generated by another fitter
        version.
    """
    key = shape_key(shape)
    if _table.TABLE_FITTER_VERSION != FITTER_VERSION or ns_steps != _table.TABLE_NS_STEPS:
        return None
    return _table.TABLE.get(key)


def schedule_source(shape: Sequence[int], ns_steps: int) -> Literal["table", "memory", "fit"]:
    """Where `get_schedule("adaptive", shape, ns_steps)` takes its result from now.

    Args:
        shape: the weight's shape.
        ns_steps: number of Newton-Schulz steps.

    Returns:
        "table" (shipped), "memory" (fitted earlier in this process) or "fit" (the next call fits).
    """
    key = shape_key(shape)
    if table_schedule(key, ns_steps) is not None:
        return "table"
    return "memory" if ("adaptive", key, ns_steps) in _CACHE else "fit"


# The one cache of resolved schedules: (normalized spec, shape key, ns_steps) -> schedule. Explicit coefficients do
# not depend on the shape and use the key (0, 0). A lost race between threads computes the same value twice.
_CACHE: dict[tuple[str | Coefficients | Schedule, tuple[int, int], int], Schedule] = {}


def adaptive_schedule(shape: Sequence[int], ns_steps: int) -> Schedule:
    """The `"adaptive"` schedule of a shape: the shipped table, else a fit (cached in memory by `get_schedule`).

    Args:
        shape: the weight's shape.
        ns_steps: number of Newton-Schulz steps.

    Returns:
        One triple per step.

    Raises:
        ValueError: for a negative or non-integer step count or a shape with fewer than 2 dims.

    Example:
        >>> len(adaptive_schedule((2048, 8192), 5))
        5
    """
    return get_schedule("adaptive", shape, ns_steps)


def _resolve(spec: str | Coefficients | Schedule, key: tuple[int, int], ns_steps: int) -> Schedule:
    """Look `(spec, key, ns_steps)` up in `_CACHE`, computing and storing it on a miss."""
    cached = _CACHE.get((spec, key, ns_steps))
    if cached is None:
        cached = _CACHE[(spec, key, ns_steps)] = _compute(spec, key, ns_steps)
    return cached


def _compute(spec: str | Coefficients | Schedule, key: tuple[int, int], ns_steps: int) -> Schedule:
    if spec == "adaptive":
        shipped = table_schedule(key, ns_steps)
        if shipped is not None:
            return shipped
        if key[0] == 0:  # a zero-size matrix has no singular values: any safe schedule does, take Polar Express
            return polar_express_schedule(ns_steps)
        return fit_schedule(key, ns_steps).schedule
    if spec == "polar-express":
        return polar_express_schedule(ns_steps)
    if spec == "muon":
        return muon_schedule(ns_steps)
    if spec in ("root-paper", "root-paper-safe"):
        schedule = root_paper_schedule(key, ns_steps, safe=spec == "root-paper-safe")
        lo, hi = schedule_band(schedule)
        if hi > SAFE_BAND[1]:
            warnings.warn(
                f"ns_coefficients='root-paper' for a {key[0]} x {key[1]} matrix maps singular values in [0, 1] to "
                f"[{lo:.3g}, {hi:.3g}], outside the safe band [{SAFE_BAND[0]}, {SAFE_BAND[1]}]; kept to reproduce "
                "the paper. Use 'root-paper-safe' or 'adaptive' to train.",
                UserWarning,
                stacklevel=5,
            )
        return schedule
    schedule = (spec,) * ns_steps if isinstance(spec[0], float) else spec
    check_schedule_safe(schedule)  # type: ignore[arg-type]
    return schedule  # type: ignore[return-value]


def get_schedule(spec: ScheduleSpec, shape: Sequence[int], ns_steps: int) -> Schedule:
    """Resolve `ns_coefficients` into one `(a, b, c)` triple per Newton-Schulz step for a matrix shape.

    Call it when a parameter is added to an optimizer: the first call for a shape missing from the shipped table fits
    the `"adaptive"` schedule (a pure, deterministic computation: no files, no global state); every later call is a
    lookup in one in-memory cache.

    Args:
        spec: a schedule name (see `SCHEDULE_NAMES`), one triple used at every step, or one triple per step.
        shape: the weight's shape; tensors with more than 2 dims are viewed as `(shape[0], prod(shape[1:]))`.
        ns_steps: number of Newton-Schulz steps $K$.

    Returns:
        A tuple of `ns_steps` triples.

    Raises:
        ValueError: for an unknown name, malformed or non-finite coefficients, a per-step list whose length is not
            `ns_steps`, an invalid step count or shape, or explicit coefficients whose composed polynomial leaves
            `SAFE_BAND` (the message names the band).

    Example:
        >>> get_schedule("muon", (576, 1536), 2)
        ((3.4445, -4.775, 2.0315), (3.4445, -4.775, 2.0315))
        >>> len(get_schedule("adaptive", (16, 4096), 5))
        5
    """
    _check_steps(ns_steps)
    spec = normalize_schedule_spec(spec)
    if isinstance(spec, str):
        return _resolve(spec, shape_key(shape), ns_steps)
    if not isinstance(spec[0], float) and len(spec) != ns_steps:
        raise ValueError(
            f"Invalid ns_coefficients: a per-step list of {len(spec)} triples does not match "
            f"ns_steps={ns_steps}. Pass exactly ns_steps triples, or one triple for every step."
        )
    return _resolve(spec, (0, 0), ns_steps)


def clear_cache() -> None:
    """Forget every schedule resolved in this process (the shipped table is untouched)."""
    _CACHE.clear()
