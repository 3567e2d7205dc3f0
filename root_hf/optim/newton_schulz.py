"""Newton-Schulz orthogonalization: `G -> approximately U V^T` for `G = U S V^T`, batched over leading dims."""

from __future__ import annotations

import functools
from typing import Literal

import torch

from ..schedules import DEFAULT_SCHEDULE, Schedule, ScheduleSpec, get_schedule

__all__ = ["NS_DTYPES", "NsDtype", "cpu_has_native_bf16", "newton_schulz", "orthogonalize", "resolve_ns_dtype"]

NsDtype = Literal["auto", "float32", "bfloat16", "float16", "float64"] | torch.dtype
NS_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


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


def newton_schulz(x: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Run the quintic iterations of `schedule` on `x` of shape `(batch, m, n)` or `(m, n)`, normalized.

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
    if tall and (x.dtype in (torch.bfloat16, torch.float16) or x.mT.is_contiguous()):
        return newton_schulz(x.mT.contiguous(), schedule).mT
    if not schedule:
        return x
    single = x.dim() == 3 and x.shape[0] == 1
    if single:
        x = x[0]
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
    x = newton_schulz(x, schedule)
    return x.to(out_dtype or G.dtype).reshape(G.shape)
