r"""Shape-adaptive Newton-Schulz schedules: fitted per matrix shape, safe by construction.

Newton-Schulz acts on every normalized singular value :math:`x \in [0, 1]` of :math:`X_0 = B / \lVert B \rVert_F`
independently (SPEC section 2), so a schedule for a shape is a 1-D design problem: find odd quintics
:math:`p_1, \dots, p_K` whose composition :math:`f = p_K \circ \dots \circ p_1` maps the singular values that matrices
of that shape produce as close to 1 as possible, while :math:`f([0, 1]) \subset [0, 1.2]` holds for *every* input.

**Construction (safe by design).** Let :math:`q_\rho` be the odd quintic that minimizes
:math:`\max_{x \in [\rho, 1]} |q(x) - 1|` (Remez; error :math:`E_\rho`). It is increasing on :math:`[0, \rho]`
and stays in :math:`[1 - E_\rho, 1 + E_\rho]` on :math:`[\rho, 1]`, so :math:`q_\rho([0, 1]) = [0, 1 + E_\rho]`.
Step :math:`k` uses :math:`p_k(x) = q_{\rho_k}(x / U_k)` with :math:`U_1 = 1 + \delta` and
:math:`U_{k+1} = (1 + E_{\rho_k})(1 + \delta)`. Every value a step can receive, a rounding overshoot of up to
:math:`\delta` per step included, lies in :math:`[0, U_k]`, hence :math:`f([0, 1]) \subset [0, 1 + E_{\rho_K}]`.
Requiring :math:`(1 + E_{\rho_K})(1 + \delta) \le 1.2` makes every such schedule safe whatever the
:math:`\rho_k`; Polar Express (Amsel et al. 2025) works in the same way with :math:`\rho_k` set by the image of one
fixed lower edge.

**Fit (shape-adaptive).** The per-step lower edges :math:`\rho_k` are the only free parameters. They are chosen by
coordinate descent on a log grid to minimize, over several spectrum families of the shape (Marchenko-Pastur for
Gaussian matrices, low-rank plus noise, a single spike plus noise, power laws :math:`\sigma_i \propto i^{-1}` and
:math:`i^{-1/2}`), the mean relative Frobenius error divided by that of the shape-agnostic Polar Express schedule, plus
a hinge penalty on every family where it is worse than Polar Express. Fitting a single spectrum is what made earlier
fits diverge on other spectra (SPEC section 2); here safety never depends on the spectra, only accuracy does.

**Check.** Every fitted schedule is evaluated on a dense grid of :math:`[0, 1]` in float64 and in simulated bfloat16
arithmetic; a schedule that leaves :data:`ADAPTIVE_BAND` there is refused and replaced by Polar Express (or Muon).

Resolution order for a shape: the shipped table (:mod:`root_hf.optim.schedule_table`), the in-memory cache, the
on-disk cache (``$ROOT_HF_CACHE/ns_schedules``, else ``$XDG_CACHE_HOME/root_hf/ns_schedules``, else
``~/.cache/root_hf/ns_schedules``; ``ROOT_HF_CACHE=""`` turns it off), then a fit (about 0.1-0.5 s on one CPU core).

References:
    - Amsel, Persson, Musco, Gower, "The Polar Express: Optimal Matrix Sign Methods and Their Application to the
      Muon Algorithm", https://arxiv.org/abs/2505.16932
    - He et al., "ROOT: Robust Orthogonalized Optimizer for Neural Network Training", https://arxiv.org/abs/2511.20626
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .coefficients import ADAPTIVE_BAND, MUON_COEFFICIENTS, Coefficients, Schedule, composed_polynomial, shape_key

__all__ = [
    "ADAPTIVE_BAND",
    "FAMILY_NAMES",
    "FITTER_VERSION",
    "FitResult",
    "ScheduleCheck",
    "adaptive_schedule",
    "cache_dir",
    "check_schedule",
    "clear_memory_cache",
    "fit_schedule",
    "minimax_quintic",
    "polar_express_schedule",
    "schedule_errors",
    "schedule_source",
    "simulate_bf16",
    "spectrum_families",
    "table_schedule",
]

# Relative rounding overshoot of a singular value that each step tolerates (our choice: bf16 rounding of the iterate
# perturbs singular values by about 2^-9 relative per product; Polar Express uses the same 1.01 safety factor).
ROUNDING_MARGIN = 0.01
# Smallest fit-interval ratio rho = l / u a step may use, which bounds how steep a step may be: Polar Express's
# "cushion" (Amsel et al. 2025, arXiv 2505.16932); with it our derivation reproduces their published first step.
CUSHION = 0.02407327424182761
# Polar Express defaults (Amsel et al. 2025, arXiv 2505.16932): lower edge l = 1e-3 of the normalized spectrum and a
# safety factor 1.01 (``p(x / 1.01)``) on the steps of their released list but its last.
POLAR_EXPRESS_LOWER = 1e-3
POLAR_EXPRESS_SAFETY = 1.01
# The authors' released schedule has 8 polynomials and divides all but the last by the safety factor.
_PE_SAFE_STEPS = 7
# Bump when the construction, the families or the objective change: it keys the on-disk cache and the shipped table.
FITTER_VERSION = 1

# Grid of fit-interval ratios rho (log-spaced from CUSHION to 1): 128 levels, ratio 1.03 between neighbours.
_N_RHO = 128
# Spectrum families (our design, see the module docstring): name -> (kind, parameter, signal energy).
_FAMILIES: dict[str, tuple[str, float, float]] = {
    "gaussian": ("gaussian", 0.0, 0.0),
    "low-rank": ("low-rank", 1 / 64, 0.9),  # rank max(1, m/64) carrying 90% of the energy, Gaussian noise
    "spike": ("low-rank", 0.0, 0.5),  # rank 1 carrying 50% of the energy, Gaussian noise
    "power-1": ("power", 1.0, 0.0),  # sigma_i ~ 1/i (the heavy tail of SPEC section 2)
    "power-0.5": ("power", 0.5, 0.0),  # sigma_i ~ 1/sqrt(i)
}
FAMILY_NAMES: tuple[str, ...] = tuple(_FAMILIES)
# Representative points per family (quantiles or log-spaced indices): enough for 3 significant digits of the error.
_POINTS = 128
# Of which geometric bins resolving the lowest quantiles (the smallest singular values).
_TAIL_BINS = 32
# Below this many rows the Gaussian family is sampled (fixed seed) instead of taken from Marchenko-Pastur quantiles:
# at least _SAMPLED_VALUES singular values, from at most _SAMPLE_BUDGET random numbers (about 0.05 s).
_MP_MIN_ROWS = 256
_SAMPLED_VALUES = 512
_SAMPLE_BUDGET = 1 << 21
# Weight of the hinge penalty on families where the fit is worse than Polar Express (our choice: with 1 and 5
# families, one family may end up worse by a relative d only if the other four together gain more than 6 d).
_HINGE = 1.0
# Reference errors are floored at this in the ratios, so that spectra every schedule solves do not dominate the fit.
_ERROR_FLOOR = 1e-4
# Dense grid on [0, 1] for the safety check (as coefficients._GRID_POINTS).
_CHECK_POINTS = 65537


# --------------------------------------------------------------------------------------------------------------------
# Minimax quintics
# --------------------------------------------------------------------------------------------------------------------


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
    """The odd quintic ``q(x) = a x + b x^3 + c x^5`` minimizing ``max |q(x) - 1|`` over ``[rho, 1]``, and that error.

    Remez exchange: ``q - 1`` equioscillates at ``rho < x_1 < x_2 < 1`` with signs ``-, +, -, +``; the interior points
    are the critical points of ``q`` (roots of ``a + 3 b x^2 + 5 c x^4``, a quadratic in ``x^2``). ``q`` increases on
    ``[0, x_1]``, so ``q([0, 1]) = [0, 1 + E]``.

    Args:
        rho: lower edge of the interval, in ``(0, 1]``.

    Returns:
        ``((a, b, c), E)``.

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


@functools.lru_cache(maxsize=1)
def _rho_grid() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rho levels, quintic coefficients (N, 3), errors E (N,)) on the log grid from CUSHION to 1, float64."""
    rhos = torch.logspace(math.log10(CUSHION), 0.0, _N_RHO, dtype=torch.float64)
    rhos[-1] = 1.0
    fits = [minimax_quintic(float(r)) for r in rhos]
    coeffs = torch.tensor([f[0] for f in fits], dtype=torch.float64)
    errs = torch.tensor([f[1] for f in fits], dtype=torch.float64)
    return rhos, coeffs, errs


@functools.lru_cache(maxsize=64)
def polar_express_schedule(ns_steps: int, lower: float = POLAR_EXPRESS_LOWER) -> Schedule:
    """Polar Express per-step coefficients, derived here with the paper's method (Amsel et al. 2025, Algorithm 1).

    Greedy: step ``k`` takes the minimax quintic on ``[max(l_k, CUSHION * u_k), u_k]``, rescales it so that ``p(l_k)``
    and ``p(u_k)`` are centred on 1, and maps the interval to ``[p(l_k), 2 - p(l_k)]``. As in the authors' release
    (eight polynomials, all but the last divided by the safety factor), steps 1-7 become ``p(x / 1.01)``; step 8 and
    later keep ``p``. Before the safety factor, our first step with ``lower=1e-3`` is (8.287212018145622,
    -23.595886519098816, 17.30038731253092), the published one to 14 digits.

    Args:
        ns_steps: number of steps ``K``; the first ``K`` steps of the greedy sequence.
        lower: lower edge ``l`` of the normalized spectrum the schedule is designed for (default 1e-3, the paper's).
    """
    if not isinstance(ns_steps, int) or ns_steps < 0:
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


# --------------------------------------------------------------------------------------------------------------------
# Spectrum families
# --------------------------------------------------------------------------------------------------------------------


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (numpy.interp) for increasing ``xp``."""
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    t = torch.where(x1 > x0, (x - x0) / (x1 - x0), torch.zeros_like(x))
    return f0 + t * (f1 - f0)


def _quantile_bins(m: int, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability levels (bin midpoints) and weights (bin widths) that represent m singular values by ``points``.

    Uniform bins, except that the lowest one is split geometrically down to ``1 / m`` (the smallest singular value):
    the smallest singular values decide the error of square-ish shapes, where the spectrum reaches down to 0.
    """
    if m <= points:
        return (torch.arange(m, dtype=torch.float64) + 0.5) / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    uniform = points - _TAIL_BINS
    tail = torch.logspace(-math.log10(m), -math.log10(uniform), _TAIL_BINS, dtype=torch.float64)
    body = torch.linspace(0.0, 1.0, uniform + 1, dtype=torch.float64)[2:]
    edges = torch.cat([torch.zeros(1, dtype=torch.float64), tail, body])
    return (edges[1:] + edges[:-1]) / 2, edges[1:] - edges[:-1]


def _marchenko_pastur_quantiles(beta: float, levels: torch.Tensor) -> torch.Tensor:
    """Quantiles at ``levels`` of the singular values of ``G / sqrt(n)``, ``G`` an m x n standard Gaussian, m <= n.

    Marchenko-Pastur (``beta = m / n``): the squared singular values have density
    ``sqrt((l+ - t)(t - l-)) / (2 pi beta t)`` on ``[l-, l+] = [(1 - sqrt(beta))^2, (1 + sqrt(beta))^2]``, integrated
    on a cosine grid that resolves both edges.
    """
    lo, hi = 1.0 - math.sqrt(beta), 1.0 + math.sqrt(beta)
    theta = torch.linspace(0.0, math.pi, 4097, dtype=torch.float64)
    s = lo + (hi - lo) * (1.0 - torch.cos(theta)) / 2
    mid = (s[1:] + s[:-1]) / 2
    t = mid * mid
    density = torch.sqrt(((hi * hi - t) * (t - lo * lo)).clamp(min=0.0)) / (math.pi * beta * mid)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(density * (s[1:] - s[:-1]), 0)])
    return _interp(levels, cdf / cdf[-1], s)


def _gaussian_singular_values(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of m x n Gaussian matrices (m <= n), scaled to mean square 1, as weighted quantiles.

    Large ``m``: Marchenko-Pastur quantiles. Small ``m`` (where a finite matrix spreads well beyond the
    Marchenko-Pastur edges): singular values of sampled matrices with a fixed seed, so the fit stays deterministic.
    """
    count = -(-_SAMPLED_VALUES // m)
    if m >= _MP_MIN_ROWS or count * m * n > _SAMPLE_BUDGET:
        levels, weights = _quantile_bins(m, _POINTS)
        return _marchenko_pastur_quantiles(m / n, levels), weights
    g = torch.Generator().manual_seed(0)
    mats = torch.randn(count, m, n, generator=g, dtype=torch.float64)
    s = torch.linalg.eigvalsh(mats @ mats.mT).clamp(min=0.0)  # squared singular values
    s = (s / s.mean(dim=1, keepdim=True)).sqrt().flatten().sort().values
    if len(s) <= _POINTS:
        return s, torch.full_like(s, 1.0 / len(s))
    levels, weights = _quantile_bins(len(s), _POINTS)
    return _interp(levels, (torch.arange(len(s), dtype=torch.float64) + 0.5) / len(s), s), weights


def _power_law(m: int, alpha: float, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sigma_i = i^-alpha`` for i = 1..m, as at most ``points`` representatives (log-spaced indices) with counts."""
    if m <= points:
        idx = torch.arange(1, m + 1, dtype=torch.float64)
        return idx.pow(-alpha), torch.ones(m, dtype=torch.float64)
    edges = torch.unique(torch.round(torch.logspace(0.0, math.log10(m + 1), points + 1, dtype=torch.float64)))
    counts = edges[1:] - edges[:-1]
    centre = (edges[1:] + edges[:-1] - 1) / 2  # middle index of each [edge, next edge) block
    return centre.pow(-alpha), counts


def _family_points(kind: str, param: float, energy: float, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Representative singular values (before normalization) and their weights (summing to 1) for one family."""
    if kind == "power":
        x, counts = _power_law(m, param, _POINTS)
        return x, counts / counts.sum()
    noise, noise_w = _gaussian_singular_values(m, n)
    if kind == "gaussian":
        return noise, noise_w
    rank = max(1, round(m * param))
    if rank >= m:
        return torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    # Signal: `energy` of the Frobenius energy on the singular values of A B^T, A (m x rank) and B (n x rank) Gaussian
    # (sampled, fixed seed; they spread around their mean). Noise: the rest, Gaussian (E[noise^2] = 1 per value).
    signal = _low_rank_singular_values(m, n, rank)
    signal_w = torch.full_like(signal, 1.0 / len(signal))
    if len(signal) > _POINTS:
        levels, signal_w = _quantile_bins(len(signal), _POINTS)
        signal = _interp(levels, (torch.arange(rank, dtype=torch.float64) + 0.5) / rank, signal)
    signal = signal * math.sqrt(energy / rank)
    noise = noise * math.sqrt((1.0 - energy) / (m - rank))
    x = torch.cat([signal, noise])
    w = torch.cat([signal_w * rank / m, noise_w * (m - rank) / m])
    return x, w


def _low_rank_singular_values(m: int, n: int, rank: int) -> torch.Tensor:
    """Sorted singular values of ``A B^T`` (A: m x rank, B: n x rank, standard Gaussian), scaled to mean square 1."""
    g = torch.Generator().manual_seed(1)
    r_a = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[1]
    r_b = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[1]
    s = torch.linalg.eigvalsh((r_a @ r_b.mT) @ (r_a @ r_b.mT).mT).clamp(min=0.0)  # A B^T = Q_A (R_A R_B^T) Q_B^T
    return (s / s.mean()).sqrt().sort().values


def spectrum_families(shape: Sequence[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Normalized singular values of the fitting families for a matrix shape: name -> (values, weights).

    Values are the singular values of ``B / ||B||_F`` (in ``[0, 1]``); weights sum to 1, so the relative Frobenius
    error of a schedule ``f`` on a family is ``sqrt(sum(w * (f(x) - 1)^2))``. The tensors are shared: do not modify.

    Example:
        >>> x, w = spectrum_families((16, 4096))["gaussian"]
        >>> round(float(16 * (w * x * x).sum()), 6)
        1.0
    """
    return _spectrum_families(shape_key(shape))


@functools.lru_cache(maxsize=256)
def _spectrum_families(key: tuple[int, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    m, n = key
    families = {}
    for name, (kind, param, energy) in _FAMILIES.items():
        x, w = _family_points(kind, param, energy, m, n)
        x = x / torch.sqrt(m * (w * x * x).sum())  # sum over all m singular values of x^2 = 1
        families[name] = (x.clamp(max=1.0), w)
    return families


def schedule_errors(schedule: Schedule, shape: Sequence[int]) -> dict[str, float]:
    """Predicted relative Frobenius error ``||NS(B) - U V^T||_F / ||U V^T||_F`` of a schedule on each family."""
    out = {}
    for name, (x, w) in spectrum_families(shape).items():
        y = composed_polynomial(tuple(schedule), x)
        out[name] = float(torch.sqrt((w * (y - 1.0) ** 2).sum()))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Safety check
# --------------------------------------------------------------------------------------------------------------------


def simulate_bf16(schedule: Schedule, x: torch.Tensor) -> torch.Tensor:
    """The composed polynomial as bfloat16 Newton-Schulz computes it on one singular value: every product rounded.

    Mirrors :func:`root_hf.optim.orthogonalize.newton_schulz` in bfloat16: ``A = X X^T``, ``P = b A + c A^2`` and
    ``X = a X + P X`` each rounded to bfloat16 (matmuls accumulate in float32, their outputs are bfloat16).
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
    """Range of the composed polynomial over ``[0, 1]`` in float64 and in simulated bfloat16, against a band."""

    min_float64: float
    max_float64: float
    min_bf16: float
    max_bf16: float
    band: tuple[float, float]

    @property
    def ok(self) -> bool:
        lo, hi = self.band
        values = (self.min_float64, self.max_float64, self.min_bf16, self.max_bf16)
        return all(math.isfinite(v) and lo <= v <= hi for v in values)


@functools.lru_cache(maxsize=1024)
def check_schedule(schedule: Schedule, band: tuple[float, float] = ADAPTIVE_BAND) -> ScheduleCheck:
    """Evaluate a schedule on a dense grid of ``[0, 1]`` (65537 points) in float64 and in simulated bfloat16.

    Example:
        >>> check_schedule(polar_express_schedule(5)).ok
        True
    """
    x = torch.linspace(0.0, 1.0, _CHECK_POINTS, dtype=torch.float64)
    y64 = composed_polynomial(tuple(schedule), x)
    y16 = simulate_bf16(tuple(schedule), x)
    return ScheduleCheck(float(y64.min()), float(y64.max()), float(y16.min()), float(y16.max()), tuple(band))


# --------------------------------------------------------------------------------------------------------------------
# Fit
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitResult:
    """A fitted schedule with its provenance and predicted errors."""

    shape: tuple[int, int]
    ns_steps: int
    schedule: Schedule
    # Fit-interval ratios rho_k of the construction and their levels on the grid (empty for a fallback).
    rhos: tuple[float, ...]
    levels: tuple[int, ...]
    # "fit", or "fallback:polar-express" / "fallback:muon" when the fit failed its check.
    source: str
    errors: dict[str, float] = field(default_factory=dict)
    reference_errors: dict[str, float] = field(default_factory=dict)
    check: ScheduleCheck | None = None


def _schedule_from_levels(levels: Sequence[int]) -> tuple[Schedule, tuple[float, ...]]:
    rhos, coeffs, errs = _rho_grid()
    steps = []
    bound = 1.0 + ROUNDING_MARGIN
    for i in levels:
        a, b, c = (float(v) for v in coeffs[i])
        steps.append((a / bound, b / bound**3, c / bound**5))
        bound = (1.0 + float(errs[i])) * (1.0 + ROUNDING_MARGIN)
    return tuple(steps), tuple(float(rhos[i]) for i in levels)


def _objective(
    levels: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, ref: torch.Tensor, start: int, y0: torch.Tensor
) -> torch.Tensor:
    """Objective for a batch of level vectors ``(C, K)`` that agree before step ``start`` (whose output is ``y0``)."""
    _, coeffs, errs = _rho_grid()
    n_cand, n_steps = levels.shape
    y = y0.expand(n_cand, -1)
    if start == 0:
        bound = torch.full((n_cand,), 1.0 + ROUNDING_MARGIN, dtype=torch.float64)
    else:
        bound = ((1.0 + errs[levels[:, start - 1]]) * (1.0 + ROUNDING_MARGIN)).to(torch.float64)
    for k in range(start, n_steps):
        abc = coeffs[levels[:, k]]
        z = y / bound[:, None]
        z2 = z * z
        y = z * (abc[:, 0:1] + z2 * (abc[:, 1:2] + abc[:, 2:3] * z2))
        bound = (1.0 + errs[levels[:, k]]) * (1.0 + ROUNDING_MARGIN)
    fam_err = torch.sqrt(((y - 1.0) ** 2) @ weights)  # (C, F)
    ratio = fam_err / ref
    value = ratio.mean(dim=1) + _HINGE * torch.relu(ratio - 1.0).sum(dim=1)
    value = torch.round(value * 1e9) / 1e9  # ties (within 1e-9) go to the first candidate: deterministic everywhere
    feasible = bound <= ADAPTIVE_BAND[1]  # bound after the last step = (1 + E_K)(1 + margin)
    return torch.where(feasible, value, torch.full_like(value, math.inf))


def _prefix(levels: Sequence[int], x: torch.Tensor, stop: int) -> torch.Tensor:
    schedule, _ = _schedule_from_levels(levels[:stop])
    return composed_polynomial(schedule, x)


def _coordinate_descent(levels: list[int], x, weights, ref) -> tuple[list[int], float]:
    n_steps = len(levels)
    grid = torch.arange(_N_RHO)
    best = float(_objective(torch.tensor([levels]), x, weights, ref, 0, x)[0])
    for _ in range(8):
        improved = False
        for k in range(n_steps):
            cand = torch.tensor(levels).repeat(_N_RHO, 1)
            cand[:, k] = grid
            values = _objective(cand, x, weights, ref, k, _prefix(levels, x, k))
            i = int(torch.argmin(values))
            if float(values[i]) < best:
                best, levels, improved = float(values[i]), cand[i].tolist(), True
        if not improved:
            break
    return levels, best


def _starts(ns_steps: int) -> list[list[int]]:
    """Deterministic starting points of the coordinate descent (grid levels per step)."""
    top = _N_RHO - 1
    tails = [
        [round(0.6 * top), round(0.8 * top)],  # lift with the steepest steps, then converge
        [round(0.3 * top), round(0.65 * top)],
        [round(0.5 * top), round(0.8 * top)],
    ]
    heads = [0, 0, round(0.5 * top)]  # the last start suits narrow spectra (LoRA factors)
    return [
        ([head] * ns_steps + tail)[-ns_steps:] if ns_steps >= 2 else tail[-1:]
        for head, tail in zip(heads, tails, strict=True)
    ]


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch on one intra-op thread: the fit is thousands of small ops, which multithreading only slows down
    (measured: 12 s instead of 0.5 s per fit with 2 threads on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_schedule(shape: Sequence[int], ns_steps: int) -> FitResult:
    """Fit the adaptive schedule of a matrix shape (no caches; deterministic). See the module docstring.

    Args:
        shape: the weight's shape (viewed as ``(shape[0], prod(shape[1:]))``; orientation does not matter).
        ns_steps: number of Newton-Schulz steps ``K`` (0 gives the empty schedule).

    Returns:
        A :class:`FitResult`; its ``schedule`` passed :func:`check_schedule` against :data:`ADAPTIVE_BAND`, or it is
        a fallback (``source`` says which).

    Example:
        >>> result = fit_schedule((16, 4096), 5)
        >>> result.errors["gaussian"] < 0.01 and result.check.ok
        True
    """
    if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or ns_steps < 0:
        raise ValueError(f"Invalid ns_steps: {ns_steps!r}. Must be an integer >= 0.")
    key = shape_key(shape)
    if min(key) < 1:
        raise ValueError(f"Invalid shape: {tuple(shape)!r}. Every dimension must be >= 1.")
    with _single_threaded():
        return _fit(key, ns_steps)


def _fit(key: tuple[int, int], ns_steps: int) -> FitResult:
    reference = polar_express_schedule(ns_steps)
    ref_errors = schedule_errors(reference, key)
    if ns_steps == 0:
        return FitResult(key, 0, (), (), (), "fit", schedule_errors((), key), ref_errors, check_schedule(()))
    families = spectrum_families(key)
    x = torch.cat([v for v, _ in families.values()])
    weights = torch.zeros(len(x), len(families), dtype=torch.float64)
    offset = 0
    for j, (v, w) in enumerate(families.values()):
        weights[offset : offset + len(v), j] = w
        offset += len(v)
    ref = torch.tensor([max(ref_errors[name], _ERROR_FLOOR) for name in families], dtype=torch.float64)
    best_levels, best_value = None, math.inf
    for start in _starts(ns_steps):
        levels, value = _coordinate_descent(start, x, weights, ref)
        if value < best_value:
            best_levels, best_value = levels, value
    if best_levels is not None:
        schedule, rhos = _schedule_from_levels(best_levels)
        check = check_schedule(schedule)
        if check.ok:
            errors = schedule_errors(schedule, key)
            return FitResult(key, ns_steps, schedule, rhos, tuple(best_levels), "fit", errors, ref_errors, check)
    return _fallback(key, ns_steps, ref_errors)


def _fallback(key: tuple[int, int], ns_steps: int, ref_errors: dict[str, float]) -> FitResult:
    for source, schedule in (
        ("fallback:polar-express", polar_express_schedule(ns_steps)),
        ("fallback:muon", (MUON_COEFFICIENTS,) * ns_steps),
    ):
        check = check_schedule(schedule)
        if check.ok:
            return FitResult(
                key, ns_steps, schedule, (), (), source, schedule_errors(schedule, key), ref_errors, check
            )
    schedule = (MUON_COEFFICIENTS,) * ns_steps  # Muon peaks at 1.2024: outside ADAPTIVE_BAND, inside SAFE_BAND
    check = check_schedule(schedule)
    errors = schedule_errors(schedule, key)
    return FitResult(key, ns_steps, schedule, (), (), "fallback:muon", errors, ref_errors, check)


# --------------------------------------------------------------------------------------------------------------------
# Table, memory cache, disk cache
# --------------------------------------------------------------------------------------------------------------------


def cache_dir() -> Path | None:
    """Directory of the on-disk schedule cache, or None when turned off (``ROOT_HF_CACHE=""``)."""
    root = os.environ.get("ROOT_HF_CACHE")
    if root is not None:
        return Path(root).expanduser() / "ns_schedules" if root.strip() else None
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "root_hf" / "ns_schedules"


def _cache_file(directory: Path, key: tuple[int, int], ns_steps: int) -> Path:
    return directory / f"adaptive-v{FITTER_VERSION}-{key[0]}x{key[1]}-k{ns_steps}.json"


def _read_cache(key: tuple[int, int], ns_steps: int) -> Schedule | None:
    directory = cache_dir()
    if directory is None:
        return None
    try:
        data = json.loads(_cache_file(directory, key, ns_steps).read_text())
        if data.get("version") != FITTER_VERSION or tuple(data["shape"]) != key or data["ns_steps"] != ns_steps:
            return None
        schedule = tuple(tuple(float(v) for v in step) for step in data["schedule"])
        if len(schedule) != ns_steps or any(len(step) != 3 for step in schedule):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # A cache file is untrusted input: use it only if it passes the same check as a fresh fit.
    return schedule if check_schedule(schedule).ok else None  # type: ignore[return-value]


def _write_cache(result: FitResult) -> None:
    directory = cache_dir()
    if directory is None:
        return
    payload = {
        "version": FITTER_VERSION,
        "shape": list(result.shape),
        "ns_steps": result.ns_steps,
        "source": result.source,
        "rhos": list(result.rhos),
        "levels": list(result.levels),
        "schedule": [list(step) for step in result.schedule],
        "errors": result.errors,
    }
    tmp = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file in the same directory, then rename: readers never see a partial file, and
        # concurrent writers of the same entry write identical content (the fit is deterministic).
        with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".tmp-", suffix=".json", delete=False) as f:
            tmp = f.name
            json.dump(payload, f, indent=1)
        os.chmod(tmp, 0o644)  # NamedTemporaryFile creates 0600; a cache shared through ROOT_HF_CACHE must be readable
        os.replace(tmp, _cache_file(directory, result.shape, result.ns_steps))
        tmp = None
    except OSError:
        pass  # the cache is an optimization, never a requirement (read-only home, full disk, ...)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def table_schedule(shape: Sequence[int], ns_steps: int) -> Schedule | None:
    """The shipped schedule of a shape (:mod:`root_hf.optim.schedule_table`), or None if the table has none."""
    from .schedule_table import TABLE_FITTER_VERSION, TABLE_LEVELS, TABLE_NS_STEPS

    key = shape_key(shape)
    if TABLE_FITTER_VERSION != FITTER_VERSION or ns_steps != TABLE_NS_STEPS or key not in TABLE_LEVELS:
        return None
    return _schedule_from_levels(TABLE_LEVELS[key])[0]


def schedule_source(shape: Sequence[int], ns_steps: int) -> str:
    """Where :func:`adaptive_schedule` would take a shape's schedule from now: "table", "disk cache" or "fit"."""
    key = shape_key(shape)
    if table_schedule(key, ns_steps) is not None:
        return "table"
    return "disk cache" if _read_cache(key, ns_steps) is not None else "fit"


@functools.lru_cache(maxsize=4096)
def _resolve(key: tuple[int, int], ns_steps: int) -> Schedule:
    shipped = table_schedule(key, ns_steps)
    if shipped is not None:
        return shipped
    cached = _read_cache(key, ns_steps)
    if cached is not None:
        return cached
    result = fit_schedule(key, ns_steps)
    _write_cache(result)
    return result.schedule


def adaptive_schedule(shape: Sequence[int], ns_steps: int) -> Schedule:
    """The adaptive schedule of a shape: shipped table, then memory cache, then disk cache, then a fit (cached).

    Example:
        >>> len(adaptive_schedule((2048, 8192), 5))
        5
    """
    if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or ns_steps < 0:
        raise ValueError(f"Invalid ns_steps: {ns_steps!r}. Must be an integer >= 0.")
    key = shape_key(shape)
    if min(key) < 1:
        raise ValueError(f"Invalid shape: {tuple(shape)!r}. Every dimension must be >= 1.")
    return _resolve(key, ns_steps)


def clear_memory_cache() -> None:
    """Forget every schedule resolved in this process (the disk cache and the table are untouched)."""
    from . import coefficients

    _resolve.cache_clear()
    coefficients._named_schedule.cache_clear()  # get_schedule's own memo sits in front of _resolve
