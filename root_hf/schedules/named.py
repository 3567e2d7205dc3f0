r"""Named Newton-Schulz coefficients (Muon, ROOT paper, Polar Express), the composed polynomial and its safety band.

A *schedule* is a tuple of per-step quintic coefficients $((a_1, b_1, c_1), \dots, (a_K, b_K, c_K))$. Step $k$ maps
$X \leftarrow a_k X + b_k (X X^T) X + c_k (X X^T)^2 X$, which acts on every singular value $x$ of $X$ independently as
the scalar polynomial $p_k(x) = a_k x + b_k x^3 + c_k x^5$. The *safety* of a schedule is a property of the composed
polynomial $f = p_K \circ \dots \circ p_1$ on the whole interval $[0, 1]$ ($X_0 = B / \lVert B \rVert_F$ has all its
singular values in $[0, 1]$): a schedule is safe when $f([0, 1]) \subset$ `SAFE_BAND`, whatever the spectrum.

References:
    - Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024),
      https://kellerjordan.github.io/posts/muon/
    - He et al., "ROOT: Robust Orthogonalized Optimizer for Neural Network Training", https://arxiv.org/abs/2511.20626
    - Amsel, Persson, Musco, Gower, "The Polar Express: Optimal Matrix Sign Methods and Their Application to the
      Muon Algorithm", https://arxiv.org/abs/2505.16932
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ADAPTIVE_BAND",
    "CUSHION",
    "MUON_COEFFICIENTS",
    "POLAR_EXPRESS_LOWER",
    "POLAR_EXPRESS_SAFETY",
    "ROOT_PAPER_TABLE",
    "SAFE_BAND",
    "Coefficients",
    "Schedule",
    "ScheduleCheck",
    "check_schedule",
    "check_schedule_safe",
    "composed_polynomial",
    "minimax_quintic",
    "muon_schedule",
    "polar_express_schedule",
    "root_paper_schedule",
    "schedule_band",
    "shape_key",
    "simulate_bf16",
]

Coefficients = tuple[float, float, float]
Schedule = tuple[Coefficients, ...]

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
# root_hf.schedules.fit. Stricter than SAFE_BAND, which has to admit Muon's 1.2024.
ADAPTIVE_BAND: tuple[float, float] = (0.0, 1.2)

# Smallest fit-interval ratio rho = l / u a step may use, which bounds how steep a step may be: Polar Express's
# "cushion" (Amsel et al. 2025, arXiv 2505.16932); with it our derivation reproduces their published first step.
CUSHION = 0.02407327424182761
# Polar Express defaults (Amsel et al. 2025, arXiv 2505.16932): lower edge l = 1e-3 of the normalized spectrum and a
# safety factor 1.01 (`p(x / 1.01)`) on the steps of their released list but its last.
POLAR_EXPRESS_LOWER = 1e-3
POLAR_EXPRESS_SAFETY = 1.01
# The authors' released schedule has 8 polynomials and divides all but the last by the safety factor.
_PE_SAFE_STEPS = 7

# Dense grid on [0, 1] used to check safety; 2**16 + 1 points resolves the narrow peaks of composed quintics.
_GRID_POINTS = 65537
# Elementwise work is split into chunks below torch's intra-op grain size (at::internal::GRAIN_SIZE = 32768), so
# that it runs on the calling thread: thread hand-offs cost more than these small ops, and the process-wide thread
# count is never touched.
_CHUNK = 32768


def shape_key(shape: Sequence[int]) -> tuple[int, int]:
    """Return the orientation-free key of a weight's matrix view.

    Args:
        shape: the weight's shape; its 2-D view is `(shape[0], prod(shape[1:]))`.

    Returns:
        `(min(m, n), max(m, n))` of that view.

    Raises:
        ValueError: if `shape` has fewer than 2 dimensions.

    Example:
        >>> shape_key((64, 4, 4))
        (16, 64)
    """
    if len(shape) < 2:
        raise ValueError(f"Invalid shape: {tuple(shape)!r}. Newton-Schulz needs a matrix (at least 2 dims).")
    m = int(shape[0])
    n = math.prod(int(s) for s in shape[1:])
    return (min(m, n), max(m, n))


def composed_polynomial(schedule: Schedule, x: torch.Tensor) -> torch.Tensor:
    """Apply the scalar polynomials of a schedule in order to singular values.

    Args:
        schedule: one `(a, b, c)` triple per step.
        x: singular values (any shape), normally in $[0, 1]$.

    Returns:
        $f(x) = p_K(\\dots p_1(x))$, elementwise, same shape and dtype as `x`.
    """
    y = x
    for a, b, c in schedule:
        y2 = y * y
        y = y * (a + y2 * (b + c * y2))
    return y


def _grid_range(fn, x_min: float = 0.0) -> tuple[float, float]:
    """(min, max) of an elementwise function over a dense float64 grid of `[x_min, 1]`, chunked (see `_CHUNK`)."""
    x = torch.linspace(x_min, 1.0, _GRID_POINTS, dtype=torch.float64)
    lo, hi = math.inf, -math.inf
    for part in x.split(_CHUNK):
        y = fn(part)
        if not bool(torch.isfinite(y).all()):
            return math.nan, math.nan
        lo, hi = min(lo, float(y.min())), max(hi, float(y.max()))
    return lo, hi


@functools.lru_cache(maxsize=1024)
def schedule_band(schedule: Schedule, x_min: float = 0.0) -> tuple[float, float]:
    """Range of the composed polynomial over $[x_\\min, 1]$ on a dense float64 grid (65537 points).

    The max over $[0, 1]$ is the safety figure: no output singular value can exceed it, whatever the spectrum. The
    min over $[x_\\min, 1]$ says how far singular values of at least $x_\\min$ are lifted towards 1.

    Args:
        schedule: one `(a, b, c)` triple per step (a tuple, so that it can be cached).
        x_min: lower edge of the interval (default 0).

    Returns:
        `(min, max)`; both NaN when the polynomial overflows on the grid.

    Example:
        >>> lo, hi = schedule_band((MUON_COEFFICIENTS,) * 5)
        >>> round(hi, 4)
        1.2024
    """
    return _grid_range(lambda x: composed_polynomial(schedule, x), x_min)


def check_schedule_safe(schedule: Schedule, band: tuple[float, float] = SAFE_BAND) -> None:
    """Refuse a schedule whose composed polynomial leaves a safe band on $[0, 1]$.

    Args:
        schedule: one `(a, b, c)` triple per step.
        band: the accepted `(low, high)` range of the output singular values (default `SAFE_BAND`, which admits
            Muon's 1.2024).

    Raises:
        ValueError: naming the schedule, the range it reaches and the band, when it leaves the band or overflows.

    Example:
        >>> check_schedule_safe(((100.0, -200.0, 100.0),) * 5)
        Traceback (most recent call last):
        ...
        ValueError: Invalid ns_coefficients: ((100.0, -200.0, 100.0), ...) is unsafe: ...
    """
    schedule = tuple(tuple(float(v) for v in step) for step in schedule)
    lo, hi = schedule_band(schedule)  # type: ignore[arg-type]
    if math.isfinite(lo) and math.isfinite(hi) and band[0] - 1e-12 <= lo and hi <= band[1]:
        return
    shown = repr(schedule) if len(set(schedule)) > 1 or len(schedule) < 2 else f"({schedule[0]!r}, ...)"
    reached = "overflows" if not math.isfinite(hi) else f"maps [0, 1] to [{lo:.5g}, {hi:.5g}]"
    raise ValueError(
        f"Invalid ns_coefficients: {shown} is unsafe: its composed polynomial over {len(schedule)} steps "
        f"{reached}, outside the safe band [{band[0]}, {band[1]}] (a singular value above {band[1]} or below "
        f"{band[0]} is amplified instead of orthogonalized). Use a named schedule such as 'adaptive' or 'muon', or "
        "coefficients whose composition stays in that band."
    )


def simulate_bf16(schedule: Schedule, x: torch.Tensor) -> torch.Tensor:
    """The composed polynomial as bfloat16 Newton-Schulz computes it on one singular value: every product rounded.

    Mirrors the bfloat16 Newton-Schulz kernel: $A = X X^T$, $P = b A + c A^2$ and $X = a X + P X$ are each rounded
    to bfloat16 (matmuls accumulate in float32, their outputs are bfloat16).

    Args:
        schedule: one `(a, b, c)` triple per step.
        x: singular values in $[0, 1]$.

    Returns:
        The simulated outputs, float64 holding bfloat16 values.
    """

    def rnd(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).to(torch.float64)

    y = rnd(x.to(torch.float64))
    for a, b, c in schedule:
        gram = rnd(y * y)
        poly = rnd(b * gram + c * gram * gram)
        y = rnd(a * y + poly * y)
    return y


@dataclass(frozen=True)
class ScheduleCheck:
    """Range of the composed polynomial over $[0, 1]$ in float64 and in simulated bfloat16, against a band.

    Attributes:
        min_float64: smallest output in float64.
        max_float64: largest output in float64.
        min_bf16: smallest output in simulated bfloat16.
        max_bf16: largest output in simulated bfloat16.
        band: the `(low, high)` band checked against.
    """

    min_float64: float
    max_float64: float
    min_bf16: float
    max_bf16: float
    band: tuple[float, float]

    @property
    def ok(self) -> bool:
        """True when all four figures are finite and inside the band."""
        lo, hi = self.band
        values = (self.min_float64, self.max_float64, self.min_bf16, self.max_bf16)
        return all(math.isfinite(v) and lo <= v <= hi for v in values)


@functools.lru_cache(maxsize=1024)
def check_schedule(schedule: Schedule, band: tuple[float, float] = ADAPTIVE_BAND) -> ScheduleCheck:
    """Evaluate a schedule on a dense grid of $[0, 1]$ (65537 points) in float64 and in simulated bfloat16.

    Args:
        schedule: one `(a, b, c)` triple per step (a tuple).
        band: the band to check against (default `ADAPTIVE_BAND`).

    Returns:
        A `ScheduleCheck`; its `ok` says whether both ranges lie in the band.

    Example:
        >>> check_schedule(polar_express_schedule(5)).ok
        True
    """
    schedule = tuple(schedule)
    lo64, hi64 = _grid_range(lambda x: composed_polynomial(schedule, x))
    lo16, hi16 = _grid_range(lambda x: simulate_bf16(schedule, x))
    return ScheduleCheck(lo64, hi64, lo16, hi16, tuple(band))


def _solve4(rows: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting in Python floats (bit-reproducible, no BLAS)."""
    a = [[*row, r] for row, r in zip(rows, rhs, strict=True)]
    n = len(a)
    for col in range(n):
        piv = max(range(col, n), key=lambda i: abs(a[i][col]))
        a[col], a[piv] = a[piv], a[col]
        for i in range(col + 1, n):
            f = a[i][col] / a[col][col]
            for j in range(col, n + 1):
                a[i][j] -= f * a[col][j]
    sol = [0.0] * n
    for i in range(n - 1, -1, -1):
        sol[i] = (a[i][n] - sum(a[i][j] * sol[j] for j in range(i + 1, n))) / a[i][i]
    return sol


@functools.lru_cache(maxsize=4096)
def minimax_quintic(rho: float) -> tuple[Coefficients, float]:
    """The odd quintic $q(x) = a x + b x^3 + c x^5$ minimizing $\\max_{x \\in [\\rho, 1]} |q(x) - 1|$, and that error.

    Remez exchange: $q - 1$ equioscillates at $\\rho < x_1 < x_2 < 1$ with signs $-, +, -, +$; the interior points
    are the critical points of $q$ (roots of $a + 3 b x^2 + 5 c x^4$, a quadratic in $x^2$). $q$ increases on
    $[0, x_1]$, so $q([0, 1]) = [0, 1 + E]$.

    Args:
        rho: lower edge of the interval, in $(0, 1]$.

    Returns:
        `((a, b, c), E)`.

    Raises:
        ValueError: if `rho` is not a float in $(0, 1]$.

    Example:
        >>> (a, b, c), err = minimax_quintic(0.5)
        >>> round(a + b + c - 1, 12) == round(err, 12)
        True
    """
    if not (isinstance(rho, (int, float)) and 0.0 < rho <= 1.0):
        raise ValueError(f"Invalid rho: {rho!r}. Must be a float in (0, 1].")
    rho = float(rho)
    if rho > 1.0 - 1e-6:
        # The interval shrinks to {1}: the flat quintic with q(1) = 1, q'(1) = q''(1) = 0 (Newton-Schulz's own).
        return (15 / 8, -10 / 8, 3 / 8), 0.0
    width = 1.0 - rho
    x1, x2 = rho + 0.25 * width, rho + 0.75 * width  # Chebyshev points of the interval, exact as rho -> 1
    a = b = c = err = 0.0
    for _ in range(100):
        nodes = [rho, x1, x2, 1.0]
        signs = [1.0, -1.0, 1.0, -1.0]  # q(node) + sign * E = 1: q(rho) = 1 - E, q(x1) = 1 + E, ...
        a, b, c, err = _solve4([[x, x**3, x**5, s] for x, s in zip(nodes, signs, strict=True)], [1.0] * 4)
        disc = 9 * b * b - 20 * a * c
        if c <= 0 or disc <= 0:
            break
        z1 = (-3 * b - math.sqrt(disc)) / (10 * c)
        z2 = (-3 * b + math.sqrt(disc)) / (10 * c)
        n1, n2 = math.sqrt(max(z1, 0.0)), math.sqrt(max(z2, 0.0))
        if not rho < n1 < n2 < 1.0:
            break
        done = max(abs(n1 - x1), abs(n2 - x2)) < 1e-15
        x1, x2 = n1, n2
        if done:
            break
    return (a, b, c), abs(err)


def muon_schedule(ns_steps: int) -> Schedule:
    """Muon's fixed triple at every step (Jordan et al. 2024).

    Args:
        ns_steps: number of Newton-Schulz steps $K$.

    Returns:
        `(MUON_COEFFICIENTS,) * ns_steps`.
    """
    return (MUON_COEFFICIENTS,) * ns_steps


def root_paper_schedule(key: tuple[int, int], ns_steps: int, safe: bool = False) -> Schedule:
    """The ROOT paper's triple for a shape key (Muon's for shapes the paper has none for), at every step.

    Args:
        key: `(min dim, max dim)` of the matrix (see `shape_key`).
        ns_steps: number of Newton-Schulz steps $K$.
        safe: replace a triple whose $K$-step composition leaves `SAFE_BAND` by Muon's (today only the
            (2048, 2048) one, whose 5-step composition maps singular values near 0.56 to about 3.3).

    Returns:
        One triple per step.
    """
    schedule = (ROOT_PAPER_TABLE.get(key, MUON_COEFFICIENTS),) * ns_steps
    if safe and schedule_band(schedule)[1] > SAFE_BAND[1]:
        schedule = muon_schedule(ns_steps)
    return schedule


@functools.lru_cache(maxsize=64)
def polar_express_schedule(ns_steps: int, lower: float = POLAR_EXPRESS_LOWER) -> Schedule:
    """Polar Express per-step coefficients, derived here with the paper's method (Amsel et al. 2025, Algorithm 1).

    Greedy: step $k$ takes the minimax quintic on $[\\max(l_k, \\text{CUSHION} \\cdot u_k), u_k]$, rescales it so
    that $p(l_k)$ and $p(u_k)$ are centred on 1, and maps the interval to $[p(l_k), 2 - p(l_k)]$. As in the authors'
    release (eight polynomials, all but the last divided by the safety factor), steps 1-7 become $p(x / 1.01)$; step
    8 and later keep $p$. Before the safety factor, our first step with `lower=1e-3` is (8.287212018145622,
    -23.595886519098816, 17.30038731253092), the published one to 14 digits.

    Args:
        ns_steps: number of steps $K$; the first $K$ steps of the greedy sequence.
        lower: lower edge $l$ of the normalized spectrum the schedule is designed for (default 1e-3, the paper's).

    Returns:
        One triple per step.

    Raises:
        ValueError: if `ns_steps` is not an integer >= 0 or `lower` is not in $(0, 1)$.
    """
    if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or ns_steps < 0:
        raise ValueError(f"Invalid ns_steps: {ns_steps!r}. Must be an integer >= 0.")
    if not 0.0 < lower < 1.0:
        raise ValueError(f"Invalid lower: {lower!r}. Must be a float in (0, 1).")
    lo, hi = lower, 1.0
    steps: list[Coefficients] = []
    for _ in range(ns_steps):
        (a, b, c), _ = minimax_quintic(max(lo / hi, CUSHION))
        a, b, c = a / hi, b / hi**3, c / hi**5
        p_lo = lo * (a + lo * lo * (b + c * lo * lo))
        p_hi = hi * (a + hi * hi * (b + c * hi * hi))
        scale = 2.0 / (p_lo + p_hi)
        a, b, c = a * scale, b * scale, c * scale
        steps.append((a, b, c))
        lo = lo * (a + lo * lo * (b + c * lo * lo))
        hi = 2.0 - lo
    s = POLAR_EXPRESS_SAFETY
    return tuple((a / s, b / s**3, c / s**5) if k < _PE_SAFE_STEPS else (a, b, c) for k, (a, b, c) in enumerate(steps))
