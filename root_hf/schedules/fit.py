r"""The adaptive fitter: a safe Newton-Schulz schedule for a matrix shape the shipped table does not hold.

Newton-Schulz acts on every normalized singular value $x \in [0, 1]$ of $X_0 = B / \lVert B \rVert_F$ independently,
so a schedule for a shape is a 1-D design problem: find odd quintics $p_1, \dots, p_K$ whose composition
$f = p_K \circ \dots \circ p_1$ maps the singular values that matrices of that shape produce as close to 1 as possible,
while $f([0, 1]) \subset [0, 1.2]$ holds for *every* input.

**Construction (safe by design).** Let $q_\rho$ be the odd quintic that minimizes $\max_{x \in [\rho, 1]} |q(x) - 1|$
(Remez, `minimax_quintic`; error $E_\rho$). It is increasing on $[0, \rho]$ and stays in $[1 - E_\rho, 1 + E_\rho]$ on
$[\rho, 1]$, so $q_\rho([0, 1]) = [0, 1 + E_\rho]$. Step $k$ uses $p_k(x) = q_{\rho_k}(x / U_k)$ with
$U_1 = 1 + \delta$ and $U_{k+1} = (1 + E_{\rho_k})(1 + \delta)$. Every value a step can receive, a rounding overshoot
of up to $\delta$ per step included, lies in $[0, U_k]$, hence $f([0, 1]) \subset [0, 1 + E_{\rho_K}]$. Requiring
$(1 + E_{\rho_K})(1 + \delta) \le 1.2$ makes every such schedule safe whatever the $\rho_k$; Polar Express
(Amsel et al. 2025) works in the same way with $\rho_k$ set by the image of one fixed lower edge.

**Fit (shape-adaptive).** The per-step lower edges $\rho_k$ are the only free parameters. They are chosen by
coordinate descent on a log grid to minimize, over several spectrum families of the shape (Marchenko-Pastur for
Gaussian matrices, low-rank plus noise, a single spike plus noise, power laws $\sigma_i \propto i^{-1}$ and
$i^{-1/2}$), the mean relative Frobenius error divided by that of the shape-agnostic Polar Express schedule, plus a
hinge penalty on every family where it is worse than Polar Express. Safety never depends on the spectra, only
accuracy does.

**Check.** Every fitted schedule is evaluated on a dense grid of $[0, 1]$ in float64 and in simulated bfloat16
arithmetic; a schedule that leaves `ADAPTIVE_BAND` there is refused and replaced by Polar Express (or Muon).

**Side effects: none.** The fit is a pure function of `(shape, ns_steps)`: random spectra come from local
`torch.Generator`s with fixed seeds, ties are broken towards the first candidate, no file is read or written and the
process-wide thread count is never changed (elementwise work is chunked below torch's intra-op grain size instead, so
it runs on the calling thread). Every rank of a multi-process run therefore computes the same triples.

References:
    - Amsel, Persson, Musco, Gower, "The Polar Express: Optimal Matrix Sign Methods and Their Application to the
      Muon Algorithm", https://arxiv.org/abs/2505.16932
    - He et al., "ROOT: Robust Orthogonalized Optimizer for Neural Network Training", https://arxiv.org/abs/2511.20626
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .named import (
    _CHUNK,
    ADAPTIVE_BAND,
    CUSHION,
    MUON_COEFFICIENTS,
    Schedule,
    ScheduleCheck,
    check_schedule,
    composed_polynomial,
    minimax_quintic,
    polar_express_schedule,
    shape_key,
)

__all__ = [
    "FAMILY_NAMES",
    "FITTER_VERSION",
    "ROUNDING_MARGIN",
    "FitResult",
    "fit_schedule",
    "schedule_errors",
    "schedule_from_levels",
    "spectrum_families",
]

# Relative rounding overshoot of a singular value that each step tolerates (our choice: bf16 rounding of the iterate
# perturbs singular values by about 2^-9 relative per product; Polar Express uses the same 1.01 safety factor).
ROUNDING_MARGIN = 0.01
# Bump when the construction, the families or the objective change: the shipped table records the version it was
# generated with (root_hf.schedules.table.TABLE_FITTER_VERSION) and is used only when the two agree.
FITTER_VERSION = 2

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
# Above this many random numbers ((m + n) * rank), the low-rank factors' triangular factors are drawn directly
# (Bartlett decomposition: the same distribution from rank^2 numbers instead of (m + n) * rank, and no QR).
_LOW_RANK_BUDGET = 1 << 19
# Largest eigenvalue problem solved there (MKL runs bigger ones multithreaded: 0.2-1 s on a loaded 2-core machine
# for 128 x 128, against under 1 ms at 64 x 64 on the calling thread).
_LOW_RANK_SOLVE = 64
# Weight of the hinge penalty on families where the fit is worse than Polar Express (our choice: with 1 and 5
# families, one family may end up worse by a relative d only if the other four together gain more than 6 d).
_HINGE = 1.0
# Reference errors are floored at this in the ratios, so that spectra every schedule solves do not dominate the fit.
_ERROR_FLOOR = 1e-4


@functools.lru_cache(maxsize=1)
def _rho_grid() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rho levels, quintic coefficients (N, 3), errors E (N,)) on the log grid from CUSHION to 1, float64."""
    rhos = torch.logspace(math.log10(CUSHION), 0.0, _N_RHO, dtype=torch.float64)
    rhos[-1] = 1.0
    fits = [minimax_quintic(float(r)) for r in rhos]
    coeffs = torch.tensor([f[0] for f in fits], dtype=torch.float64)
    errs = torch.tensor([f[1] for f in fits], dtype=torch.float64)
    return rhos, coeffs, errs


# --------------------------------------------------------------------------------------------------------------------
# Spectrum families
# --------------------------------------------------------------------------------------------------------------------


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (numpy.interp) for increasing `xp`."""
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    t = torch.where(x1 > x0, (x - x0) / (x1 - x0), torch.zeros_like(x))
    return f0 + t * (f1 - f0)


def _quantile_bins(m: int, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability levels (bin midpoints) and weights (bin widths) that represent m singular values by `points`.

    Uniform bins, except that the lowest one is split geometrically down to `1 / m` (the smallest singular value):
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
    """Quantiles at `levels` of the singular values of `G / sqrt(n)`, `G` an m x n standard Gaussian, m <= n.

    Marchenko-Pastur (`beta = m / n`): the squared singular values have density
    `sqrt((l+ - t)(t - l-)) / (2 pi beta t)` on `[l-, l+] = [(1 - sqrt(beta))^2, (1 + sqrt(beta))^2]`, integrated
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


@functools.lru_cache(maxsize=16)
def _gaussian_singular_values(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of m x n Gaussian matrices (m <= n), scaled to mean square 1, as weighted quantiles.

    Large `m`: Marchenko-Pastur quantiles. Small `m` (where a finite matrix spreads well beyond the
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
    """`sigma_i = i^-alpha` for i = 1..m, as at most `points` representatives (log-spaced indices) with counts."""
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
    """Sorted singular values of `A B^T` (A: m x rank, B: n x rank, standard Gaussian), scaled to mean square 1.

    `A B^T = Q_A (R_A R_B^T) Q_B^T`, so only the triangular factors matter. Small factors are sampled and reduced by
    QR; large ones (more than `_LOW_RANK_BUDGET` numbers) draw `R` directly by the Bartlett decomposition: `R_ii` is
    chi-distributed with `rows - i` degrees of freedom (i = 0, 1, ...), `R_ij` (j > i) standard normal, which is the
    distribution of QR's `R` up to signs, from `rank^2` numbers instead of `(m + n) rank`. There, a rank above
    `_LOW_RANK_SOLVE` is represented by `_LOW_RANK_SOLVE` singular values of the same aspect ratios
    (`rank / m`, `rank / n`), whose law they follow: small eigenvalue problems stay on the calling thread.
    """
    if rank == 1:
        return torch.ones(1, dtype=torch.float64)  # one singular value, scaled to mean square 1: exactly 1
    g = torch.Generator().manual_seed(1)
    if (m + n) * rank <= _LOW_RANK_BUDGET:
        r_a = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[1]
        r_b = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[1]
    else:
        solve = min(rank, _LOW_RANK_SOLVE)
        r_a, r_b = (_bartlett_factor(max(solve, round(rows * solve / rank)), solve, g) for rows in (m, n))
    s = torch.linalg.eigvalsh((r_a @ r_b.mT) @ (r_a @ r_b.mT).mT).clamp(min=0.0)
    return (s / s.mean()).sqrt().sort().values


def _bartlett_factor(rows: int, rank: int, g: torch.Generator) -> torch.Tensor:
    """The triangular factor `R` of a `rows x rank` standard Gaussian matrix, drawn directly (Bartlett)."""
    dof = torch.arange(rows, rows - rank, -1, dtype=torch.float64)
    diag = (2.0 * torch._standard_gamma(dof / 2.0, generator=g)).sqrt()  # chi_k = sqrt(2 Gamma(k / 2, 1))
    upper = torch.randn(rank, rank, generator=g, dtype=torch.float64).triu(1)
    return upper + torch.diag(diag)


def spectrum_families(shape: Sequence[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Normalized singular values of the fitting families for a matrix shape: name -> (values, weights).

    Values are the singular values of `B / ||B||_F` (in `[0, 1]`); weights sum to 1, so the relative Frobenius
    error of a schedule `f` on a family is `sqrt(sum(w * (f(x) - 1)^2))`. The tensors are shared: do not modify.

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
    """Predicted relative Frobenius error `||NS(B) - U V^T||_F / ||U V^T||_F` of a schedule on each family."""
    out = {}
    for name, (x, w) in spectrum_families(shape).items():
        y = composed_polynomial(tuple(schedule), x)
        out[name] = float(torch.sqrt((w * (y - 1.0) ** 2).sum()))
    return out


@dataclass(frozen=True)
class FitResult:
    """A fitted schedule with its provenance and predicted errors.

    Attributes:
        shape: the shape key `(min dim, max dim)`.
        ns_steps: number of steps $K$.
        schedule: one `(a, b, c)` triple per step.
        rhos: fit-interval ratios $\\rho_k$ of the construction (empty for a fallback).
        levels: their indices on the grid (empty for a fallback).
        source: "fit", or "fallback:polar-express" / "fallback:muon" when the fit failed its check.
        errors: predicted relative error of `schedule` per spectrum family.
        reference_errors: the same for Polar Express, the reference of the objective.
        check: the band check of `schedule`.
    """

    shape: tuple[int, int]
    ns_steps: int
    schedule: Schedule
    rhos: tuple[float, ...]
    levels: tuple[int, ...]
    source: str
    errors: dict[str, float] = field(default_factory=dict)
    reference_errors: dict[str, float] = field(default_factory=dict)
    check: ScheduleCheck | None = None


def schedule_from_levels(levels: Sequence[int]) -> tuple[Schedule, tuple[float, ...]]:
    """The schedule of the construction for given grid levels of the per-step fit intervals.

    Args:
        levels: one index into the grid of fit-interval ratios $\\rho$ per step (0 = `CUSHION`, 127 = 1).

    Returns:
        `(schedule, rhos)`: the per-step triples $p_k(x) = q_{\\rho_k}(x / U_k)$ and the ratios $\\rho_k$.
    """
    rhos, coeffs, errs = _rho_grid()
    steps = []
    bound = 1.0 + ROUNDING_MARGIN
    for i in levels:
        a, b, c = (float(v) for v in coeffs[i])
        steps.append((a / bound, b / bound**3, c / bound**5))
        bound = (1.0 + float(errs[i])) * (1.0 + ROUNDING_MARGIN)
    return tuple(steps), tuple(float(rhos[i]) for i in levels)


def _objective(
    levels: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    segments: Sequence[tuple[int, int]],
    ref: torch.Tensor,
    start: int,
    y0: torch.Tensor,
) -> torch.Tensor:
    """Objective for a batch of level vectors `(C, K)` that agree before step `start` (whose output is `y0`).

    `x` holds every family's points back to back (`segments` gives each family's slice) and `w` their weights. The
    candidates are evaluated in chunks of fewer than `_CHUNK` elements, so that every op runs on the calling thread.
    """
    per = max(1, _CHUNK // len(x))
    parts = [
        _objective_chunk(levels[i : i + per], w, segments, ref, start, y0) for i in range(0, levels.shape[0], per)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _objective_chunk(
    levels: torch.Tensor,
    w: torch.Tensor,
    segments: Sequence[tuple[int, int]],
    ref: torch.Tensor,
    start: int,
    y0: torch.Tensor,
) -> torch.Tensor:
    _, coeffs, errs = _rho_grid()
    n_cand, n_steps = levels.shape
    y = y0.expand(n_cand, -1)
    # Only step `start` differs between candidates: the steps after it use plain floats (the same IEEE operations).
    fixed = levels[0].tolist()
    margin = 1.0 + ROUNDING_MARGIN
    bound = margin if start == 0 else (1.0 + float(errs[fixed[start - 1]])) * margin
    abc = coeffs[levels[:, start]]
    z = y / bound
    z2 = z * z
    y = z * (abc[:, 0:1] + z2 * (abc[:, 1:2] + abc[:, 2:3] * z2))
    bound_c = (1.0 + errs[levels[:, start]]) * margin  # per candidate
    for k in range(start + 1, n_steps):
        a, b, c = (float(v) for v in coeffs[fixed[k]])
        z = y / (bound_c[:, None] if k == start + 1 else bound)
        z2 = z * z
        y = z * (a + z2 * (b + c * z2))
        bound = (1.0 + float(errs[fixed[k]])) * margin
    if start < n_steps - 1:
        bound_c = torch.full((n_cand,), bound, dtype=torch.float64)
    bound = bound_c
    sq = (y - 1.0) ** 2 * w
    fam_err = torch.stack([sq[:, lo:hi].sum(dim=1) for lo, hi in segments], dim=1).sqrt()  # (C, F)
    ratio = fam_err / ref
    value = ratio.mean(dim=1) + _HINGE * torch.relu(ratio - 1.0).sum(dim=1)
    value = torch.round(value * 1e9) / 1e9  # ties (within 1e-9) go to the first candidate: deterministic everywhere
    feasible = bound <= ADAPTIVE_BAND[1]  # bound after the last step = (1 + E_K)(1 + margin)
    return torch.where(feasible, value, torch.full_like(value, math.inf))


def _prefix(levels: Sequence[int], x: torch.Tensor, stop: int) -> torch.Tensor:
    schedule, _ = schedule_from_levels(levels[:stop])
    return composed_polynomial(schedule, x)


def _coordinate_descent(levels: list[int], x, w, segments, ref) -> tuple[list[int], float]:
    """Scan each step's level over the grid in turn, others fixed, until a sweep improves nothing (at most 8).

    Two shortcuts leave the result unchanged: a scan whose inputs are those of its previous scan (no level changed
    since) is skipped, since it would pick the same level again; the last step only scans the levels that keep the
    band (`bound <= ADAPTIVE_BAND[1]`), the others being infeasible (objective infinite) anyway.
    """
    n_steps = len(levels)
    grid = torch.arange(_N_RHO)
    _, _, errs = _rho_grid()
    last_grid = grid[(1.0 + errs) * (1.0 + ROUNDING_MARGIN) <= ADAPTIVE_BAND[1]]
    best = float(_objective(torch.tensor([levels]), x, w, segments, ref, 0, x)[0])
    last_change = -1  # index of the scan that last changed a level (-1: the start)
    for sweep in range(8):
        improved = False
        for k in range(n_steps):
            scan = sweep * n_steps + k
            if scan >= n_steps and last_change <= scan - n_steps:
                continue  # nothing changed since this step's previous scan
            levels_k = last_grid if k == n_steps - 1 else grid
            cand = torch.tensor(levels).repeat(len(levels_k), 1)
            cand[:, k] = levels_k
            values = _objective(cand, x, w, segments, ref, k, _prefix(levels, x, k))
            i = int(torch.argmin(values))
            if float(values[i]) < best:
                best, levels, improved, last_change = float(values[i]), cand[i].tolist(), True, scan
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


def fit_schedule(shape: Sequence[int], ns_steps: int) -> FitResult:
    """Fit the adaptive schedule of a matrix shape (no caches; deterministic). See the module docstring.

    Args:
        shape: the weight's shape (viewed as `(shape[0], prod(shape[1:]))`; orientation does not matter).
        ns_steps: number of Newton-Schulz steps `K` (0 gives the empty schedule).

    Returns:
        A `FitResult`; its `schedule` passed `check_schedule` against `ADAPTIVE_BAND`, or it is
        a fallback (`source` says which).

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
    return _fit(key, ns_steps)


def _fit(key: tuple[int, int], ns_steps: int) -> FitResult:
    reference = polar_express_schedule(ns_steps)
    ref_errors = schedule_errors(reference, key)
    if ns_steps == 0:
        return FitResult(key, 0, (), (), (), "fit", schedule_errors((), key), ref_errors, check_schedule(()))
    families = spectrum_families(key)
    x = torch.cat([v for v, _ in families.values()])
    w = torch.cat([weight for _, weight in families.values()])
    ends = torch.tensor([len(v) for v, _ in families.values()]).cumsum(0).tolist()
    segments = list(zip([0, *ends[:-1]], ends, strict=True))
    ref = torch.tensor([max(ref_errors[name], _ERROR_FLOOR) for name in families], dtype=torch.float64)
    best_levels, best_value = None, math.inf
    for start in _starts(ns_steps):
        levels, value = _coordinate_descent(start, x, w, segments, ref)
        if value < best_value:
            best_levels, best_value = levels, value
    if best_levels is not None:
        schedule, rhos = schedule_from_levels(best_levels)
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
