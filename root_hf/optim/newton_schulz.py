"""Newton-Schulz orthogonalization: `G -> approximately U V^T` for `G = U S V^T`, batched over leading dims."""

from __future__ import annotations

import functools
from typing import Literal

import torch

from ..schedules import DEFAULT_SCHEDULE, Schedule, ScheduleSpec, get_schedule

__all__ = [
    "NS_DTYPES",
    "NS_METHODS",
    "NsDtype",
    "NsMethod",
    "cpu_has_native_bf16",
    "newton_schulz",
    "orthogonalize",
    "resolve_ns_dtype",
    "select_ns_method",
]

NsDtype = Literal["auto", "float32", "bfloat16", "float16", "float64"] | torch.dtype
NS_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}

# Forms of the Newton-Schulz iteration (`ns_method`): "auto" picks one of the other two per shape (`select_ns_method`).
NS_METHODS: tuple[str, ...] = ("auto", "standard", "gram")
NsMethod = Literal["auto", "standard", "gram"]


def resolve_ns_dtype(ns_dtype: NsDtype, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.dtype:
    """Map `ns_dtype` to a dtype.

    `"auto"`: float64 for float64 input `dtype` (a float64 run stays float64 end to end); else bfloat16 on CUDA
    (tensor cores) and on a CPU with native bfloat16 matrix instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16: see
    `cpu_has_native_bf16`), float32 elsewhere. Measured on an AMX CPU (docs/benchmarks.md): bfloat16 Newton-Schulz
    runs about 2-3x faster than float32, and its error against the exact polar factor stays within the schedule's own
    float32 error on the benchmark shapes.
    """
    if isinstance(ns_dtype, torch.dtype):
        if ns_dtype not in NS_DTYPES.values():
            raise ValueError(f"Invalid ns_dtype: {ns_dtype!r}. Must be 'auto' or one of {tuple(NS_DTYPES)}.")
        return ns_dtype
    if ns_dtype == "auto":
        wide = torch.promote_types(dtype, torch.float32)
        if wide == torch.float64:
            return wide
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return wide
    if ns_dtype not in NS_DTYPES:
        raise ValueError(f"Invalid ns_dtype: {ns_dtype!r}. Must be 'auto' or one of {tuple(NS_DTYPES)}.")
    return NS_DTYPES[ns_dtype]


# CPU feature flags (Linux /proc/cpuinfo) that give bfloat16 matmuls in hardware: AVX512-BF16 and AMX-BF16 (x86,
# Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later), BF16 (Armv8.6-A "Features").
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (read once from `/proc/cpuinfo`; False where absent).

    The answer depends on the machine only, never on timing, so every process of a run on the same hardware picks
    the same Newton-Schulz dtype.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return _has_bf16_flag(f.read())
    except OSError:
        return False


def _has_bf16_flag(cpuinfo: str) -> bool:
    """Whether a `/proc/cpuinfo` text lists a bfloat16 matrix feature (x86 `flags` or Arm `Features` lines)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & _BF16_CPU_FLAGS)


def newton_schulz(
    x: torch.Tensor, schedule: Schedule, method: Literal["standard", "gram"] = "standard"
) -> torch.Tensor:
    """Run the quintic iterations of `schedule` on `x` of shape `(batch, m, n)` or `(m, n)`, normalized.

    `method="gram"` computes the same map in its Gram form (`_gram_newton_schulz`: on the `k x k` Gram matrix, with
    restarts in half precision), iterating a tall matrix as its transpose in every dtype; the rest of this docstring
    describes the standard form.

    `x` may be overwritten. Each step is `X <- a X + (b A + c A^2) X` with `A = X X^T`, the Gram matrix on the
    short side. A tall matrix (`m > n`) is iterated as its transpose, the same map, and comes back as a transposed
    view, except in float32 / float64 when `x` is contiguous, where the map is computed as
    `X <- a X + X (b A + c A^2)` with `A = X^T X`. Why: on CPU, bfloat16 GEMMs with a transposed left operand
    (`X^T X`) run about 3x slower than the wide form (222 ms vs 79 ms for 5 steps on 12 x 1536 x 576, transpose copy
    included), while float32 GEMMs are layout-insensitive and the tall form saves the copy.

    The Gram matrix, the polynomial and the iterate live in buffers allocated once per call (fresh large buffers at
    every step cost 10-20% of the bfloat16 iteration on CPU). A batch of one runs as plain 2-D GEMMs: CPU `bmm`
    parallelizes over the batch, and a single 2048 x 5440 matrix took 374 ms as a batch of one vs 264 ms as `mm`.
    """
    tall = x.shape[-2] > x.shape[-1]
    if tall and (x.dtype in (torch.bfloat16, torch.float16) or x.mT.is_contiguous() or method == "gram"):
        return newton_schulz(x.mT.contiguous(), schedule, method).mT
    if not schedule:
        return x
    single = x.dim() == 3 and x.shape[0] == 1
    if single:
        x = x[0]
    if method == "gram":
        x = _gram_newton_schulz(x, schedule)
        return x.unsqueeze(0) if single else x
    mm, addmm = (torch.mm, torch.addmm) if x.dim() == 2 else (torch.bmm, torch.baddbmm)
    k = x.shape[-1] if tall else x.shape[-2]
    gram = x.new_empty((*x.shape[:-2], k, k))
    poly = torch.empty_like(gram)
    y = torch.empty_like(x)
    for a, b, c in schedule:
        if tall:  # float32 / float64 only (see above)
            mm(x.mT, x, out=gram)  # A = X^T X
            addmm(gram, gram, gram, beta=b, alpha=c, out=poly)  # b A + c A^2
            addmm(x, x, poly, beta=a, out=y)  # a X + X (b A + c A^2)
        else:
            mm(x, x.mT, out=gram)  # A = X X^T
            addmm(gram, gram, gram, beta=b, alpha=c, out=poly)
            addmm(x, poly, x, beta=a, out=y)  # a X + (b A + c A^2) X
        x, y = y, x
    return x.unsqueeze(0) if single else x


def orthogonalize(
    G: torch.Tensor,
    *,
    ns_coefficients: ScheduleSpec = DEFAULT_SCHEDULE,
    ns_steps: int = 5,
    eps: float = 1e-7,
    ns_dtype: NsDtype = "auto",
    out_dtype: torch.dtype | None = None,
    ns_method: NsMethod = "auto",
) -> torch.Tensor:
    r"""Approximate the polar factor $U V^\top$ of each matrix in `G` by Newton-Schulz iteration.

    `X_0 = G / (||G||_F + eps)` puts every singular value in `[0, 1]`; then `ns_steps` quintic steps with the
    coefficient schedule chosen for the matrix shape push them towards 1. Tensors with more than 2 dims are batches of
    matrices over the leading dims (use `G.reshape(G.shape[0], -1)` first for a conv weight).

    Args:
        G: tensor of shape `(..., m, n)`.
        ns_coefficients: schedule name, one `(a, b, c)` triple, or one triple per step (default: the package
            default schedule).
        ns_steps: number of Newton-Schulz steps (default: 5). `0` returns the normalized input.
        eps: added to the Frobenius norm before dividing (default: 1e-7, as `torch.optim.Muon`).
        ns_dtype: dtype of the iteration: `"auto"` (float64 for float64 input, else bfloat16 on CUDA and on CPUs
            with native bfloat16 matmul, else float32),
            `"float32"`, `"bfloat16"`, `"float16"`, `"float64"` or a `torch.dtype`. The norm is always taken
            in float32 or wider.
        out_dtype: dtype of the result (default: `G.dtype`).
        ns_method: form of the iteration: `"standard"`, `"gram"` (the same steps on the `k x k` Gram matrix) or
            `"auto"` (default: the cheaper one for the shape, dtype and device, see `select_ns_method`).

    Returns:
        Tensor of the shape of `G`. An all-zero matrix returns all zeros.

    Example:
        >>> G = torch.randn(64, 256)
        >>> X = orthogonalize(G, ns_coefficients="muon")
        >>> bool(torch.linalg.svdvals(X).max() < 1.21)
        True
    """
    if G.dim() < 2:
        raise ValueError(f"Invalid input of shape {tuple(G.shape)}: orthogonalize needs at least 2 dims (..., m, n).")
    m, n = G.shape[-2:]
    schedule = get_schedule(ns_coefficients, (m, n), ns_steps)
    x = G.reshape(-1, m, n)
    norm_dtype = torch.promote_types(x.dtype, torch.float32)
    dtype = resolve_ns_dtype(ns_dtype, G.device, norm_dtype)
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True, dtype=norm_dtype)
    x = (x.to(norm_dtype) / (norm + eps)).to(dtype)
    x = newton_schulz(x, schedule, select_ns_method(ns_method, (m, n), len(schedule), dtype, G.device.type))
    return x.to(out_dtype or G.dtype).reshape(G.shape)


def gram_flop_ratio(shape: tuple[int, int], steps: int, dtype: torch.dtype) -> float:
    """Multiply-adds of the Gram form over those of the standard form, for `steps` steps on one `m x n` matrix.

    With `k = min(m, n)`, `K = max(m, n)`, `T` steps and `s` segments (restarts + 1): standard `T (2 k^2 K + k^3)`;
    Gram `2 s k^2 K + (4 T - 3 s) k^3` (one `X X^T` and one `Q X` per segment; per step `R^2`, and `Q <- P Q` and
    `R <- P R P` except on the first / last step of a segment). Only the ratio `K / k` and `s` matter.
    """
    k, big = min(shape), max(shape)
    if steps == 0 or k == 0:
        return 1.0
    segments = len(gram_restarts(steps, dtype)) + 1
    gram = 2 * segments * k * k * big + (4 * steps - 3 * segments) * k**3
    return gram / (steps * (2 * k * k * big + k**3))


# `ns_method="auto"`: the Gram form runs when its FLOP ratio (`gram_flop_ratio`) is at most this, by (device type,
# iteration dtype); else the standard form. Measured with `python benchmarks/gram.py` (docs/benchmarks.md "Gram
# Newton-Schulz"; 2-core Xeon without native bfloat16, shared, load 11-16, interleaved medians): on CPU in float32 at
# 1 thread the time ratio follows the FLOP ratio within 0.05 (512 x 2048: 0.54 for 0.56 FLOPs; 576 x 1536: 0.68 for
# 0.71; 192 x 576: 0.67 for 0.66; 576 x 576: 1.31 for 1.27), so the Gram form runs wherever it saves 10% of the
# FLOPs. Other devices and dtypes (CUDA, CPU bfloat16) keep a margin for the k x k products running below the peak
# of the k x K ones: 0.8 (DeepSpeed's Gram Muon reports 2.1-2.3x on an A100 for 2048 x 11059, FLOP ratio 0.74 here
# in bfloat16); `bash benchmarks/gpu_check.sh` prints the CUDA table to measure it.
_GRAM_MAX_FLOP_RATIO: dict[tuple[str, torch.dtype], float] = {("cpu", torch.float32): 0.9}
_GRAM_DEFAULT_MAX_FLOP_RATIO = 0.8
# Below this many multiply-adds per `k^2 K` product a call is dominated by its fixed per-operation cost, and the
# Gram form has more operations: measured in float32 at 1 thread, 32 x 128 (2^17) ran 1.23x and 4 x 576 1.42x the
# standard form's time for FLOP ratios of 0.56 and 0.21, while 16 x 4096 (2^20) ran 0.46x.
_GRAM_MIN_WORK = 2**19


@functools.lru_cache(maxsize=4096)
def select_ns_method(
    ns_method: NsMethod, shape: tuple[int, int], steps: int, dtype: torch.dtype, device_type: str
) -> Literal["standard", "gram"]:
    """The form of the iteration for one matrix shape: `ns_method` itself unless `"auto"`, then the cheaper one.

    The rule is a pure function of the shape, the step count, the iteration dtype and the device type (no timing at
    run time, so every rank of a job picks the same form): the Gram form when one `k^2 K` product is at least
    `_GRAM_MIN_WORK` multiply-adds and its FLOP ratio (`gram_flop_ratio`) is at most the measured threshold of the
    device and dtype (`_GRAM_MAX_FLOP_RATIO`; the figures are in its comment and in docs/benchmarks.md). `ROOT`
    resolves it when a parameter is added, as the schedules.

    Raises:
        ValueError: for an `ns_method` outside `NS_METHODS`.
    """
    if ns_method not in NS_METHODS:
        raise ValueError(f"Invalid ns_method: {ns_method!r}. Must be one of {', '.join(NS_METHODS)}.")
    if ns_method != "auto":
        return ns_method  # type: ignore[return-value]
    if steps == 0 or min(shape) ** 2 * max(shape) < _GRAM_MIN_WORK:
        return "standard"
    limit = _GRAM_MAX_FLOP_RATIO.get((device_type, dtype), _GRAM_DEFAULT_MAX_FLOP_RATIO)
    return "gram" if gram_flop_ratio(shape, steps, dtype) <= limit else "standard"


def gram_restarts(steps: int, dtype: torch.dtype) -> frozenset[int]:
    """The steps before which the Gram form re-forms `X` and its Gram matrix from scratch (see `newton_schulz`)."""
    every = _GRAM_RESTART_EVERY.get(dtype, 0)
    return frozenset(range(every, steps, every)) if every else frozenset()


# Restart period of the Gram form by iteration dtype: before every this many-th step, X = Q X_s is formed and
# R = X X^T recomputed (0: never). Measured with `python benchmarks/gram.py --accuracy` (64 x 192, 192 x 576,
# 128 x 128; adaptive, Muon and Polar Express schedules; Gaussian, rank k/8 and 1e-6..1 log-spaced spectra; table in
# docs/benchmarks.md "Gram Newton-Schulz"): with no restart, bfloat16 outputs left the band on every low-rank and
# ill-conditioned input (largest singular value 2.3 to 1e8 for a band edge of 1.0-1.2) and float16 ones on most
# (up to 14.6); a restart every 3 steps kept float16 at the standard form's error and peak on all 27 cases, but
# not bfloat16 on the square matrix (peak 1.345 for a band edge of 1.124, Polar Express); every 2 steps kept
# bfloat16's peak within 0.003 of max(standard form's peak, band edge) and its error within 0.008 of the standard
# form's on all 27 cases. float32 / float64 need none (identical to the standard form to 1e-4 on every case).
_GRAM_RESTART_EVERY: dict[torch.dtype, int] = {torch.bfloat16: 2, torch.float16: 3, torch.float32: 0, torch.float64: 0}


def _gram_newton_schulz(x: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """The Gram form of `newton_schulz`: the same steps, iterated on the small `k x k` Gram matrix.

    With `R_t = X_t X_t^T` and `P_t = a_t I + b_t R_t + c_t R_t^2` (a polynomial in `R_t`, so it commutes with it),
    the standard step `X_{t+1} = P_t X_t` gives `X_t = Q_t X_s` with `Q_t = P_{t-1} ... P_s` and
    `R_{t+1} = P_t R_t P_t`: all `k x k` products (`k = min(m, n)`). `X` itself is formed only at a restart and at
    the end, `X = Q X_s`; a restart also recomputes `R = X X^T`, which drops the rounding error that `Q` and `R`
    gathered (both grow like the product of the `a_t` in the directions of small singular values). Per step the
    standard form costs `2 k^2 K + k^3` multiply-adds (`K = max(m, n)`), the Gram form `4 k^3` (3 on the first step
    of a segment, 1 on the last) plus `2 k^2 K` per segment. `x` is wide (`m <= n`): `newton_schulz` iterates a
    tall matrix as its transpose in every dtype for this form (one copy; the tall products `X^T X`, `X Q` ran 3x
    slower than the wide ones in float32 on CPU, 2478 ms vs 792 ms for 2048 x 512 vs 512 x 2048).
    """
    mm, addmm = (torch.mm, torch.addmm) if x.dim() == 2 else (torch.bmm, torch.baddbmm)
    restarts = gram_restarts(len(schedule), x.dtype)
    last = len(schedule) - 1
    q = None
    r = mm(x, x.mT)  # R_0 = X_0 X_0^T
    for t, (a, b, c) in enumerate(schedule):
        if t in restarts:
            x = mm(q, x)  # X_t = Q_t X_s
            q = None
            r = mm(x, x.mT)
        p = addmm(r, r, r, beta=b, alpha=c)  # b R + c R^2
        p.diagonal(dim1=-2, dim2=-1).add_(a)  # P_t = a I + b R + c R^2
        q = p if q is None else mm(p, q)  # Q_{t+1} = P_t Q_t (Q = P on the first step of a segment)
        if t < last and t + 1 not in restarts:
            r = mm(p, mm(r, p))  # R_{t+1} = P_t R_t P_t
    return mm(q, x)
