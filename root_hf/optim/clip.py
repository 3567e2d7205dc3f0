"""Outlier suppression: the per-matrix quantile threshold and the soft-threshold clip (ROOT, Eq. for O_t and B_t).

The paper splits the momentum `U` into outliers `O = sign(U) * max(|U| - eps, 0)` (the proximal operator of the
L1 norm) and a robust part `B = U - O`, which is exactly `clamp(U, -eps, eps)`; `O` is discarded. `eps` is the
`q`-quantile of `|U|` over the entries of that matrix, recomputed at every step.

Cost: an exact quantile needs a sort or selection over every entry (`kthvalue` on a 1536 x 576 matrix costs more than
a Newton-Schulz matmul, and `torch.quantile` refuses more than 2**24 entries). Matrices with more than
`QUANTILE_SAMPLE_SIZE` entries use the quantile of a fixed pseudo-random sample of that many entries instead, drawn
with replacement by a generator seeded with the number of entries: building it costs O(sample) time and memory
(0.3 ms and 128 KiB for any matrix size; a permutation of all entries took 57 s and 1.9 GB for 8192 x 28672). The
sample depends only on the number of entries, so every rank, every step and every resumed run computes the same
`eps` (the relative error of the 0.90 quantile of a Gaussian-like matrix is about 0.7%).

Zero entries: if at least a fraction `q` of the entries are exactly zero (a sparse or partly dead gradient), the
plain quantile is 0 and the clip would zero the whole matrix. In that case the threshold is the `q`-quantile of the
*non-zero* entries instead; for a matrix without exact zeros (the generic case) nothing changes. When a sampled matrix
is so sparse that its sample holds no non-zero entry at all (fewer than about 1 entry in 16384 is non-zero), its
outliers cannot be told from the sample, and the threshold is its largest `|U|`: such a matrix is not clipped, and a
matrix with a non-zero entry is never clipped to zero. That maximum is one pass over each sampled matrix, computed for
every sampled batch and selected on the device, so that the step never waits for the device to learn which case
applies (an exact quantile of the non-zero entries needs that answer first, or a full sort every step). An all-zero
matrix gets `eps = 0` and stays zero.
"""

from __future__ import annotations

import math

import torch

__all__ = ["QUANTILE_SAMPLE_SIZE", "quantile_threshold", "soft_threshold_clip_"]

# 16k entries: the quantile of a fixed sample this size costs ~0.3 ms on the project's 2-core CPU (SPEC section 3).
QUANTILE_SAMPLE_SIZE = 16384

_sample_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _sample_indices(numel: int, size: int, device: torch.device) -> torch.Tensor:
    """A fixed, sorted sample of `size` indices in `range(numel)` (with replacement), the same on every process.

    O(size) time and memory whatever `numel` is: `size` draws of a CPU generator seeded with `numel` (deterministic
    across processes and runs), cached per `(numel, size, device)`.
    """
    key = (numel, size, device)
    idx = _sample_cache.get(key)
    if idx is None:
        generator = torch.Generator().manual_seed(numel)
        idx = torch.randint(numel, (size,), generator=generator).sort().values.to(device)
        _sample_cache[key] = idx
    return idx


def quantile_threshold(u: torch.Tensor, q: float, sample_size: int = QUANTILE_SAMPLE_SIZE) -> torch.Tensor:
    """Per-matrix threshold `eps = Quantile_q(|U|)` for a batch of matrices.

    Args:
        u: tensor of shape `(batch, ...)`; each leading slice is one matrix.
        q: quantile level in `(0, 1]`.
        sample_size: matrices with more entries than this use a fixed pseudo-random sample of this many entries.

    Returns:
        Tensor of shape `(batch,)` in `u`'s dtype, linearly interpolated like `torch.quantile`.
    """
    flat = u.reshape(u.shape[0], -1)
    numel = flat.shape[1]
    sampled = numel > sample_size
    if sampled:
        flat = flat.index_select(1, _sample_indices(numel, sample_size, flat.device))
    a = flat.abs()
    n = a.shape[1]
    # Only order statistics at or above floor(q (n - 1)) are ever needed: a top-k of the upper tail is ~5x cheaper than
    # a full sort. top[:, j] is the ascending order statistic n - 1 - j.
    base = q * (n - 1)
    lo_min = math.floor(base)
    top = a.topk(n - lo_min, dim=1).values
    # Exact zeros sort first; if they reach the quantile, take the quantile over the non-zero tail instead.
    zeros = (a == 0).sum(dim=1, keepdim=True).to(a.dtype)
    pos = torch.where(zeros > lo_min, zeros + q * (n - 1 - zeros), torch.full_like(zeros, base)).clamp_(0, n - 1)
    lo = pos.floor()
    hi = (lo + 1).clamp_(max=n - 1)
    below = top.gather(1, (n - 1 - lo).long())
    above = top.gather(1, (n - 1 - hi).long())
    eps = torch.lerp(below, above, pos - lo).squeeze(1)
    if sampled:
        # The sample may hold no non-zero entry of some matrix (e.g. 50 non-zeros in 2048 x 2048): no clipping for
        # that matrix (eps = max |U|, 0 only for an all-zero matrix), selected on the device (no host sync).
        low, high = torch.aminmax(u.reshape(u.shape[0], -1), dim=1)  # one pass, no |U| copy
        eps = torch.where(eps == 0, torch.maximum(high, low.neg()).to(eps.dtype), eps)
    return eps


def soft_threshold_clip_(u: torch.Tensor, q: float, sample_size: int = QUANTILE_SAMPLE_SIZE) -> torch.Tensor:
    """Replace each matrix of the batch `u` by its robust part `B = U - O = clamp(U, -eps, eps)`, in place.

    Returns the per-matrix thresholds `eps` (shape `(batch,)`).
    """
    eps = quantile_threshold(u, q, sample_size)
    bound = eps.view(-1, *([1] * (u.dim() - 1)))
    # Two in-place passes against the broadcast bound instead of clamp(u, -bound, bound): a tensor-bounded clamp has no
    # vectorized CPU kernel (8.8 ms vs 1.5 ms on 12 x 1536 x 576 float32, 2 cores; 23 ms when writing into a buffer of
    # another dtype). Same values, since eps >= 0.
    torch.minimum(u, bound, out=u)
    torch.maximum(u, bound.neg(), out=u)
    return eps
