"""Newton-Schulz coefficient schedules.

A *schedule* is a tuple of per-step quintic coefficients ``((a_1, b_1, c_1), ..., (a_K, b_K, c_K))``. Step ``k`` maps
``X <- a_k X + b_k (X X^T) X + c_k (X X^T)^2 X``, which acts on every singular value ``x`` of ``X`` independently as
the scalar polynomial ``p_k(x) = a_k x + b_k x^3 + c_k x^5``. The quality of a schedule for a matrix shape is therefore
a property of the distribution of normalized singular values of that shape, and its *safety* is a property of the
composed polynomial ``p_K o ... o p_1`` on the whole interval ``[0, 1]`` (``X_0 = B / ||B||_F`` has all singular values
in ``[0, 1]``).

Named schedules:

- ``"adaptive"`` (the default): fitted per matrix shape and step count by :mod:`root_hf.optim.adaptive`, safe by
  construction: every output singular value stays in :data:`ADAPTIVE_BAND` ``= [0, 1.2]`` for every input, in float64
  and in simulated bfloat16. Common shapes ship in a table; others are fitted once (about 0.1-0.5 s) and cached in
  memory and on disk.
- ``"polar-express"``: Polar Express's per-step minimax coefficients (Amsel et al. 2025, arXiv 2505.16932), derived
  with the paper's method for ``ns_steps`` steps; the same for every shape.
- ``"muon"``: Muon's fixed triple at every step.
- ``"root-paper"``: the four per-shape triples published with ROOT, Muon's triple for every other shape. The
  (2048, 2048) triple is unsafe: its 5-step composition maps normalized singular values near 0.56 to about 3.3.
- ``"root-paper-safe"``: ``"root-paper"`` with every triple whose composition leaves :data:`SAFE_BAND` replaced by
  Muon's triple (today only the (2048, 2048) one).

Run ``python -m root_hf.coefficients --help`` to print schedules, their band and their predicted errors for given
shapes or for every matrix of a model config.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

__all__ = [
    "ADAPTIVE_BAND",
    "DEFAULT_SCHEDULE",
    "MUON_COEFFICIENTS",
    "ROOT_PAPER_TABLE",
    "SAFE_BAND",
    "SCHEDULE_NAMES",
    "Coefficients",
    "Schedule",
    "ScheduleSpec",
    "composed_polynomial",
    "get_schedule",
    "normalize_schedule_spec",
    "schedule_band",
    "shape_key",
]

Coefficients = tuple[float, float, float]
Schedule = tuple[Coefficients, ...]
# What users pass as ``ns_coefficients``: a schedule name, one triple (used at every step) or one triple per step.
ScheduleSpec = str | Coefficients | Sequence[Coefficients]

# Muon (Jordan et al. 2024), https://kellerjordan.github.io/posts/muon/ ; also torch.optim.Muon's default.
MUON_COEFFICIENTS: Coefficients = (3.4445, -4.7750, 2.0315)

# ROOT (He et al. 2025, arXiv 2511.20626), the authors' per-shape table; key = (min dim, max dim).
ROOT_PAPER_TABLE: dict[tuple[int, int], Coefficients] = {
    (2048, 2048): (3.4916, -4.8224, 2.1095),
    (2048, 3072): (3.4509, -4.5790, 1.9325),
    (2048, 8192): (2.9794, -3.6674, 1.6207),
    (2048, 16384): (3.1943, -3.8221, 1.5322),
}

# Every output singular value of a safe schedule stays in [0, SAFE_BAND[1]] for every input in [0, 1]. Muon's own
# 5-step composition peaks at 1.2024 (at x ~ 0.004), so 1.21 admits Muon and rejects the (2048, 2048) paper triple.
SAFE_BAND: tuple[float, float] = (0.0, 1.21)

# The band the "adaptive" schedules guarantee (root_hf issue 3), in float64 and in simulated bfloat16; see
# root_hf.optim.adaptive. Stricter than SAFE_BAND, which has to admit Muon's 1.2024.
ADAPTIVE_BAND: tuple[float, float] = (0.0, 1.2)

SCHEDULE_NAMES: tuple[str, ...] = ("adaptive", "polar-express", "muon", "root-paper", "root-paper-safe")
# The shape-adaptive schedule (root_hf issue 3): a guaranteed band and, in benchmarks/orthogonality.py, lower error
# than Muon and the ROOT table on every shape and spectrum measured (see docs/coefficients.md).
DEFAULT_SCHEDULE = "adaptive"

# Dense grid on [0, 1] used to check safety; 2**16 + 1 points resolves the narrow peaks of composed quintics.
_GRID_POINTS = 65537


def shape_key(shape: Sequence[int]) -> tuple[int, int]:
    """Return ``(min(m, n), max(m, n))`` for the 2-D view ``(shape[0], prod(shape[1:]))`` of a weight."""
    if len(shape) < 2:
        raise ValueError(f"Invalid shape: {tuple(shape)!r}. Newton-Schulz needs a matrix (at least 2 dims).")
    m = int(shape[0])
    n = math.prod(int(s) for s in shape[1:])
    return (min(m, n), max(m, n))


def _as_triple(value: Sequence[float]) -> Coefficients:
    triple = tuple(float(v) for v in value)
    if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
        raise ValueError(
            f"Invalid Newton-Schulz coefficients: {tuple(value)!r}. Must be three finite floats (a, b, c)."
        )
    return triple  # type: ignore[return-value]


def normalize_schedule_spec(spec: ScheduleSpec) -> str | Coefficients | Schedule:
    """Validate ``ns_coefficients`` and return a hashable, ``torch.load(weights_only=True)``-safe form.

    Returns the name for a named schedule, one triple for a fixed triple, or a tuple of triples for a per-step list.
    """
    if isinstance(spec, str):
        if spec not in SCHEDULE_NAMES:
            raise ValueError(
                f"Invalid ns_coefficients: {spec!r}. Must be one of {SCHEDULE_NAMES}, a triple (a, b, c) "
                "or a list of per-step triples."
            )
        return spec
    if not isinstance(spec, Sequence) or len(spec) == 0:
        raise ValueError(
            f"Invalid ns_coefficients: {spec!r}. Must be one of {SCHEDULE_NAMES}, a triple (a, b, c) "
            "or a list of per-step triples."
        )
    if all(isinstance(v, (int, float)) for v in spec):
        return _as_triple(spec)  # type: ignore[arg-type]
    return tuple(_as_triple(step) for step in spec)  # type: ignore[union-attr]


@functools.lru_cache(maxsize=4096)
def _named_schedule(name: str, key: tuple[int, int], ns_steps: int) -> Schedule:
    if name == "adaptive":
        from .adaptive import adaptive_schedule  # imported here: adaptive.py builds on this module

        return adaptive_schedule(key, ns_steps)
    if name == "polar-express":
        from .adaptive import polar_express_schedule

        return polar_express_schedule(ns_steps)
    if name == "muon":
        return (MUON_COEFFICIENTS,) * ns_steps
    triple = ROOT_PAPER_TABLE.get(key, MUON_COEFFICIENTS)
    schedule = (triple,) * ns_steps
    if name == "root-paper-safe" and schedule_band(schedule)[1] > SAFE_BAND[1]:
        schedule = (MUON_COEFFICIENTS,) * ns_steps
    return schedule


def get_schedule(spec: ScheduleSpec, shape: Sequence[int], ns_steps: int) -> Schedule:
    """Resolve ``ns_coefficients`` into one ``(a, b, c)`` triple per Newton-Schulz step for a matrix shape.

    Args:
        spec: a schedule name (see :data:`SCHEDULE_NAMES`), one triple used at every step, or one triple per step.
        shape: the weight's shape; tensors with more than 2 dims are viewed as ``(shape[0], -1)``.
        ns_steps: number of Newton-Schulz steps ``K``.

    Returns:
        A tuple of ``ns_steps`` triples.

    The first call for a shape may fit the ``"adaptive"`` schedule (shapes missing from the shipped table); every
    later call is a cache lookup, so calling this at every optimizer step is cheap.

    Example:
        >>> get_schedule("muon", (576, 1536), 2)
        ((3.4445, -4.775, 2.0315), (3.4445, -4.775, 2.0315))
        >>> len(get_schedule("adaptive", (16, 4096), 5))
        5
    """
    if not isinstance(ns_steps, int) or ns_steps < 0:
        raise ValueError(f"Invalid ns_steps: {ns_steps!r}. Must be an integer >= 0.")
    spec = normalize_schedule_spec(spec)
    if isinstance(spec, str):
        return _named_schedule(spec, shape_key(shape), ns_steps)
    if isinstance(spec[0], float):
        return (spec,) * ns_steps  # type: ignore[return-value]
    if len(spec) != ns_steps:
        raise ValueError(
            f"Invalid ns_coefficients: a per-step list of {len(spec)} triples does not match "
            f"ns_steps={ns_steps}. Pass exactly ns_steps triples, or one triple for every step."
        )
    return spec  # type: ignore[return-value]


def composed_polynomial(schedule: Schedule, x: torch.Tensor) -> torch.Tensor:
    """Apply the scalar polynomials of ``schedule`` in order to ``x`` (singular values in ``[0, 1]``)."""
    y = x
    for a, b, c in schedule:
        y2 = y * y
        y = y * (a + y2 * (b + c * y2))
    return y


@functools.lru_cache(maxsize=1024)
def schedule_band(schedule: Schedule, x_min: float = 0.0) -> tuple[float, float]:
    """Return ``(min, max)`` of the composed polynomial over ``[x_min, 1]`` on a dense float64 grid.

    The max over ``[0, 1]`` is the safety figure: no output singular value can exceed it, whatever the spectrum.
    The min over ``[x_min, 1]`` says how far singular values at least ``x_min`` are lifted towards 1.
    """
    x = torch.linspace(x_min, 1.0, _GRID_POINTS, dtype=torch.float64)
    y = composed_polynomial(schedule, x)
    return float(y.min()), float(y.max())
