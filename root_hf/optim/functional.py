r"""ROOT's functional API: one step of each branch on lists of tensors (`root()`, `adamw()`), and its kernels.

Layers, as in `torch.optim`: `root_hf.optim.root.ROOT` validates hyperparameters, resolves schedules and owns the
state; the functions here run one step on lists of tensors and pick the execution (single process, DDP owner split,
FSDP2); the kernels under them (`root_hf.optim.clip`, `root_hf.optim.newton_schulz`) are pure tensor code.
`root_hf.RootReference` is the slow, line-by-line specification this file is tested against.

Per independent matrix $W \in \mathbb{R}^{m \times n}$ (see `root_hf.optim.views`) with gradient $G_t$:

$$
M_t = \mu M_{t-1} + G_t, \quad U_t = G_t + \mu M_t, \quad B_t = \mathrm{clamp}(U_t, -\epsilon_t, \epsilon_t),
\quad W_t = W_{t-1}(1 - \eta\lambda) - \eta\, s(m, n)\, \mathrm{NS}_K(B_t / (\lVert B_t \rVert_F + \varepsilon))
$$
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

from ..schedules import Schedule, ScheduleSpec, get_schedule
from .clip import soft_threshold_clip_
from .distributed import local_grad, local_tensor, plan_groups
from .hyperparams import ADJUST_LR_FNS
from .newton_schulz import NsDtype, NsMethod, newton_schulz, resolve_ns_dtype, select_ns_method
from .views import Block, MatrixView, ParamView, as_batch, param_view

__all__ = ["AdjustLrFn", "adamw", "adjusted_lr_ratio", "root"]

AdjustLrFn = Literal["match_rms_adamw", "original"] | None
_HALF = (torch.float16, torch.bfloat16)
# Largest batch of same-shape matrices clipped and orthogonalized in one call, in elements per intra-op thread
# (`torch.get_num_threads()`; an entry larger than this, e.g. a whole fused expert tensor, still runs, alone). The
# batch's U_t, its NS-dtype copy and the NS work buffers are the step's temporary memory. Measured on an Intel Xeon
# with AMX (ROOT step / torch.optim.Muon step, bf16 NS, interleaved medians; docs/benchmarks.md), batches of at most
# 2**22 / 2**21 / 2**20 elements: 6 SmolLM2-135M layers 1.30x / 1.19x / 1.20x at 1 thread and 0.82x / 0.77x / 1.04x
# at 2 threads; 2 Llama-3.2-1B layers 1.14x / 1.05x / 1.12x (1 thread), 1.02x / 1.00x / 0.97x (2 threads). Large
# batches thrash the caches of one core; batches of one matrix leave the other cores idle (bmm splits the batch).
# This is the CPU rule (a cache-size rule: 2**20 float32 entries, 4 MiB, per core); `batch_cap` picks it per device.
MAX_BATCH_ELEMENTS_PER_THREAD = 2**20
# On an accelerator the thread count says nothing (`torchrun` sets 1 thread: 64 matrices of 2048 x 2048 ran as 64
# Newton-Schulz calls): a batch is bounded by memory instead. Its temporaries are the work-dtype U_t (4 bytes each),
# the NS-dtype X and the Newton-Schulz buffers (A, A @ X, A @ A @ X and the next X: about 5 half-precision copies for
# a square matrix, 10 bytes); 32 bytes an entry over-counts them for float32 NS, and they may take 1/16 of the device
# memory: about 1.6e8 entries on an 80 GB GPU, so 64 matrices of 2048 x 2048 run in 2 calls instead of 64.
BATCH_BYTES_PER_ELEMENT = 32
BATCH_MEMORY_FRACTION = 1 / 16


def adjusted_lr_ratio(adjust_lr_fn: AdjustLrFn, shape: Iterable[int]) -> float:
    r"""Scale $s(m, n)$ of the orthogonalized update of an $m \times n$ matrix (`shape`: `(m, n)`, or a tensor shape
    viewed as `(shape[0], prod(shape[1:]))`).

    Args:
        adjust_lr_fn: `"match_rms_adamw"`: $0.2 \sqrt{\max(m, n)}$ (Moonlight, Liu et al. 2025, arXiv 2502.16982):
            matches the update RMS of AdamW so lr and weight decay tuned for AdamW carry over. `"original"`:
            $\sqrt{\max(1, m / n)}$ (Keller Jordan's Muon). `None`: 1 (note that `torch.optim.Muon` reads `None` as
            `"original"`).
        shape: the matrix shape.

    Returns:
        The scale.

    Raises:
        ValueError: for an unknown `adjust_lr_fn`.

    Example:
        >>> adjusted_lr_ratio("match_rms_adamw", (576, 1536))  # doctest: +ELLIPSIS
        7.83...
    """
    shape = tuple(shape)
    m, n = shape[0], math.prod(shape[1:])
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if adjust_lr_fn == "original":
        return math.sqrt(max(1.0, m / n))
    if adjust_lr_fn is None:
        return 1.0
    raise ValueError(f"Invalid adjust_lr_fn: {adjust_lr_fn!r}. Must be one of {ADJUST_LR_FNS}.")


def batch_cap(device: torch.device) -> int:
    """Largest batch of same-shape matrices (in entries) clipped and orthogonalized in one call on `device`.

    CPU: `MAX_BATCH_ELEMENTS_PER_THREAD * torch.get_num_threads()` (the cache rule measured in docs/benchmarks.md).
    An accelerator that reports its memory (CUDA, XPU): `BATCH_MEMORY_FRACTION` of it at `BATCH_BYTES_PER_ELEMENT`
    bytes an entry, whatever the thread count. Other devices (MPS): the CPU rule. An entry larger than the cap (a whole
    fused expert tensor) still runs, alone.
    """
    if device.type != "cpu":
        total = _device_memory(device.type, device.index)
        if total:
            return max(1, int(total * BATCH_MEMORY_FRACTION) // BATCH_BYTES_PER_ELEMENT)
    return MAX_BATCH_ELEMENTS_PER_THREAD * torch.get_num_threads()


@functools.lru_cache(maxsize=64)
def _device_memory(device_type: str, index: int | None) -> int:
    """Total memory of an accelerator in bytes, or 0 if its backend does not report it (read once per device)."""
    module = getattr(torch, device_type, None)
    props = getattr(module, "get_device_properties", None)
    if props is None:
        return 0
    try:
        return int(getattr(props(index if index is not None else module.current_device()), "total_memory", 0))
    except (RuntimeError, AssertionError, AttributeError):
        return 0


def _flat_param_error(shape: tuple[int, ...]) -> ValueError:
    return ValueError(
        f"ROOT received a parameter of shape {shape} on its ROOT branch (use_root=True), but it orthogonalizes "
        "matrices (2 or more dims). If your model has no such 1-D weights, the parameters were flattened by the "
        "training framework: FSDP1 (use_orig_params) and DeepSpeed ZeRO hand optimizers flat 1-D shards, on which "
        "orthogonalization is impossible. Use FSDP2 (fsdp_version=2) or DDP instead; for genuine 1-D parameters "
        "put them in a group with use_root=False (AdamW branch) or use_root=None (by ndim)."
    )


def root(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    clip_quantile: float | None,
    ns_steps: int,
    ns_coefficients: ScheduleSpec,
    eps: float,
    adjust_lr_fn: AdjustLrFn,
    ns_dtype: NsDtype,
    matrix_view: MatrixView = "flatten",
    matrix_split: list[Any] | None = None,
    schedules: Mapping[tuple[int, int], Schedule] | None = None,
    diagnostics: dict[str, list[torch.Tensor]] | None = None,
    process_group: Any = None,
    ns_method: NsMethod = "auto",
    ns_methods: Mapping[tuple[int, int, int, torch.dtype, str], str] | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    r"""One ROOT step on matrix params, in place (functional API; `ROOT` documents the algorithm).

    Each param holds one or more independent matrices (`root_hf.optim.views`: `matrix_view`, `matrix_split`);
    matrices are bucketed by their shape $(m, n)$ and each bucket is clipped and orthogonalized in one batched call,
    its update applied as soon as it is computed. A fused `(E, out, in)` expert tensor with `matrix_view="batched"`
    contributes `E` matrices with their own threshold, schedule and scale. The hyperparameters are not validated here
    (`ROOT` does that).

    Args:
        params: the matrix parameters (2 or more dims), plain tensors or FSDP2 `DTensor`s.
        grads: their gradients.
        momentum_buffers: their momentum $M$ (shape of the param; float32 for half-precision params), updated.
        lr: learning rate $\eta$.
        weight_decay: decoupled decay $\lambda$.
        momentum: $\mu$.
        nesterov: use $U_t = G_t + \mu M_t$ (else $U_t = M_t$).
        clip_quantile: quantile level $q$ of the outlier threshold, or None (no clipping).
        ns_steps: Newton-Schulz steps $K$ (0: no orthogonalization).
        ns_coefficients: the schedule spec, resolved per matrix shape unless `schedules` has that shape.
        eps: added to $\lVert B_t \rVert_F$.
        adjust_lr_fn: the scale $s(m, n)$ (see `adjusted_lr_ratio`).
        ns_dtype: dtype of the Newton-Schulz iteration.
        matrix_view: `"flatten"` or `"batched"`.
        matrix_split: None or `[axis, [size, ...]]`.
        schedules: resolved schedules by matrix shape (`ROOT` passes those it resolved when the params were added);
            a shape missing here is resolved through `get_schedule`'s cache.
        diagnostics: if a dict, per-matrix statistics are appended to it (`clip_fraction`, `eps_over_rms`,
            `update_rms`, `ortho_error`); costs one extra Gram matrix per bucket.
        process_group: None (default): every rank computes every matrix; `"default"` or a `ProcessGroup`: DDP owner
            split, each matrix clipped and orthogonalized by one rank, results all-gathered (only correct when the
            gradients are identical on all ranks). `DTensor` params (FSDP2, HSDP, TP, FSDP + TP) always use their
            mesh (`root_hf.optim.distributed`); a group may mix them with plain tensors, each planned on its own.
        ns_method: form of the iteration, `"standard"`, `"gram"` or `"auto"` (see
            `root_hf.optim.newton_schulz.select_ns_method`).
        ns_methods: the forms `"auto"` picked, by `(m, n, ns_steps, NS dtype, device type)` (`ROOT` passes those it
            resolved when the params were added); a key missing here is resolved through `select_ns_method`'s cache.
        found_inf: None, or a one-element float tensor (as `torch.optim`'s fused optimizers take it): where it is
            non-zero the step changes nothing (params and momentum keep their values), decided on the device without
            waiting for it; the work is done all the same.

    Raises:
        ValueError: for a param with fewer than 2 dims.
    """
    for p in params:
        if p.dim() < 2:
            raise _flat_param_error(tuple(p.shape))
    if any(p.numel() == 0 for p in params):  # zero-size params: nothing to do (global numel under FSDP2)
        keep = [i for i, p in enumerate(params) if p.numel() > 0]
        params, grads = [params[i] for i in keep], [grads[i] for i in keep]
        momentum_buffers = [momentum_buffers[i] for i in keep]
    keep = {}  # device -> 0-d bool tensor, True when the step applies (found_inf == 0)
    ortho = _Orthogonalizer(
        keep=keep,
        clip_quantile=clip_quantile,
        ns_steps=ns_steps,
        ns_coefficients=ns_coefficients,
        eps=eps,
        ns_dtype=ns_dtype,
        lr=lr,
        adjust_lr_fn=adjust_lr_fn,
        diagnostics=diagnostics,
        schedules=schedules or {},
        ns_method=ns_method,
        ns_methods=ns_methods or {},
    )
    step = functools.partial(
        _Step, momentum=momentum, nesterov=nesterov, ortho=ortho, lr=lr, adjust_lr_fn=adjust_lr_fn
    )
    # Partition by (work dtype, device) so that every collective below moves a single dtype.
    partitions: dict[tuple[torch.dtype, torch.device], list[int]] = defaultdict(list)
    for i, buf in enumerate(momentum_buffers):
        partitions[(buf.dtype, buf.device)].append(i)
    for (work_dtype, device), idx in partitions.items():
        p_loc = [local_tensor(params[i]) for i in idx]
        if found_inf is not None and device not in keep:
            keep[device] = found_inf.to(device).reshape(()) == 0  # device to device: no host sync
        if weight_decay != 0:
            # W <- W (1 - eta lambda): decoupled decay with the unscaled lr, one foreach op per param dtype
            _foreach_scale_(p_loc, 1 - lr * weight_decay, keep.get(device))
        # each param planned on its own (a group may mix DTensors and plain tensors, e.g. FSDP2 ignored_params)
        for plan, sub in plan_groups([params[i] for i in idx], process_group):
            js = [idx[k] for k in sub]
            p_sub = [p_loc[k] for k in sub]
            g_sub = [local_grad(params[i], grads[i]) for i in js]
            b_sub = [local_tensor(momentum_buffers[i]) for i in js]
            s = step(work_dtype=work_dtype)
            if plan.mode == "single":
                s.local(p_sub, g_sub, b_sub, matrix_view, matrix_split)
                continue
            out_dtype = _out_dtype(ns_steps, ns_dtype, device, work_dtype)
            if plan.mode == "ddp":
                plan.ddp_step(s, p_sub, g_sub, b_sub, matrix_view, matrix_split, out_dtype)
            else:
                plan.mesh_step(s, [params[i] for i in js], p_sub, g_sub, b_sub, matrix_view, matrix_split, out_dtype)


def _by_dtype(tensors: list[torch.Tensor], *others: list[torch.Tensor]) -> Iterable[tuple[list[torch.Tensor], ...]]:
    """`tensors` (and the parallel lists `others`) split by the dtype of `tensors`, for `torch._foreach_*` ops."""
    groups: dict[torch.dtype, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[t.dtype].append(i)
    for idx in groups.values():
        yield tuple([lst[i] for i in idx] for lst in (tensors, *others))


def _select(keep: torch.Tensor, value: float, other: float, dtype: torch.dtype) -> torch.Tensor:
    """`where(keep, value, other)` as a 0-d tensor of `dtype` (at least float32) on `keep`'s device.

    `torch.full` is a fill kernel (no host-to-device copy); the float32-or-wider dtype keeps the scalar as exact as a
    Python float would be: a 0-d float32 factor times a bfloat16 tensor is computed in float32.
    """
    dtype = torch.promote_types(dtype, torch.float32)
    return torch.where(keep, torch.full((), value, dtype=dtype, device=keep.device), other)


def _foreach_scale_(tensors: list[torch.Tensor], factor: float, keep: torch.Tensor | None) -> None:
    """`t *= factor` for every tensor, or `t *= where(keep, factor, 1)` (exactly `t` when `keep` is False)."""
    for (group,) in _by_dtype(tensors):
        torch._foreach_mul_(group, factor if keep is None else _select(keep, factor, 1.0, group[0].dtype))


def _momentum_(buf: torch.Tensor, g: torch.Tensor, momentum: float, keep: torch.Tensor | None = None) -> None:
    """`M_t = mu M_{t-1} + G_t` in place, in one pass (`mul_` then `add_` would read and write the buffer twice).

    With `keep` (a 0-d bool tensor), `M_t = where(keep, mu M_{t-1} + G_t, M_{t-1})`: a skipped step leaves the buffer
    bit for bit, also when `G_t` holds inf or NaN.
    """
    if keep is None:
        torch.add(g, buf, alpha=momentum, out=buf)
    else:
        torch.where(keep, torch.add(g, buf, alpha=momentum), buf, out=buf)


def _momentum_all_(
    bufs: list[torch.Tensor], grads: list[torch.Tensor], momentum: float, keep: torch.Tensor | None
) -> None:
    """`_momentum_` on every buffer: one pass each on CPU (where `torch._foreach_*` loops over the tensors anyway),
    two horizontally fused `torch._foreach_*` ops per dtype on an accelerator (as `torch.optim.SGD(foreach=True)`)."""
    if keep is not None or not bufs or bufs[0].device.type == "cpu":
        for buf, g in zip(bufs, grads, strict=True):
            _momentum_(buf, g, momentum, keep)
        return
    for b, g in _by_dtype(bufs, grads):
        torch._foreach_mul_(b, momentum)
        torch._foreach_add_(b, g)


def _momentum_direction_(
    g: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Update `buf` in place to `M_t = mu M_{t-1} + G_t`; return `U_t` (a new tensor, or `buf` itself)."""
    _momentum_(buf, g, momentum, keep)
    return torch.add(g, buf, alpha=momentum) if nesterov else buf  # U_t = G_t + mu M_t


def _out_dtype(ns_steps: int, ns_dtype: NsDtype, device: torch.device, work_dtype: torch.dtype) -> torch.dtype:
    return resolve_ns_dtype(ns_dtype, device, work_dtype) if ns_steps > 0 else work_dtype


class _Step:
    """The matrix work of one ROOT step on one (dtype, device) partition: single process, DDP or FSDP2 rows.

    Weight decay is already applied; each method updates the momentum buffers, computes `U_t`, clips and
    orthogonalizes every independent matrix, and adds `-lr * s(m, n) * X` to its block of the param.
    """

    def __init__(
        self,
        *,
        momentum: float,
        nesterov: bool,
        ortho: _Orthogonalizer,
        lr: float,
        adjust_lr_fn: AdjustLrFn,
        work_dtype: torch.dtype,
    ) -> None:
        self.momentum, self.nesterov, self.ortho = momentum, nesterov, ortho
        self.lr, self.adjust_lr_fn, self.work_dtype = lr, adjust_lr_fn, work_dtype

    def _alpha(self, shape: tuple[int, int]) -> float:
        return -self.lr * adjusted_lr_ratio(self.adjust_lr_fn, shape)

    # the hooks of the distributed paths (root_hf.optim.distributed)
    alpha = _alpha

    def momentum_(self, buf: torch.Tensor, g: torch.Tensor) -> None:
        """`M_t = mu M_{t-1} + G_t` in place (unchanged on a skipped step, see `found_inf`)."""
        _momentum_(buf, g, self.momentum, self.ortho.keep.get(buf.device))

    def direction(self, g: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """`U_t` from the updated buffer `M_t`: `G_t + mu M_t` (Nesterov) or `M_t` itself."""
        return torch.add(g, buf, alpha=self.momentum) if self.nesterov else buf

    def local(
        self,
        p_loc: list[torch.Tensor],
        g_loc: list[torch.Tensor],
        b_loc: list[torch.Tensor],
        matrix_view: str,
        matrix_split: list[Any] | None,
    ) -> None:
        """Whole matrices on this rank: each same-shape bucket's `U_t` is written straight into one
        `(batch, m, n)` buffer, and its update is applied as soon as it is computed (no list of all updates)."""
        views = [param_view(p.shape, matrix_view, matrix_split) for p in p_loc]
        # a non-contiguous param (e.g. channels_last) is updated through a contiguous copy, written back at the end
        work = [p if p.is_contiguous() else p.contiguous() for p in p_loc]
        p3 = [as_batch(w, v) for w, v in zip(work, views, strict=True)]
        device = b_loc[0].device
        # M_t first, then the batch views: a non-contiguous buffer's view is a copy, which must hold M_t, not M_{t-1}
        _momentum_all_(b_loc, g_loc, self.momentum, self.ortho.keep.get(device))
        g3 = [as_batch(g, v) for g, v in zip(g_loc, views, strict=True)]
        b3 = [as_batch(b, v) for b, v in zip(b_loc, views, strict=True)]
        buckets: dict[tuple[int, int], list[tuple[int, Block]]] = defaultdict(list)
        for j, v in enumerate(views):
            for blk in v.blocks:
                if v.batch * blk.shape[0] * blk.shape[1] > 0:  # zero-size matrices: nothing to do
                    buckets[blk.shape].append((j, blk))
        for (m, n), entries in _chunks(buckets, views, batch_cap(device)):
            u = self._stack_direction(entries, views, g3, b3, (m, n), device)
            x = self.ortho.prepare(u)
            del u  # the work-dtype U_t batch goes before Newton-Schulz allocates (the step's peak temporary memory)
            x = self.ortho.iterate(x, (m, n))
            alpha = self._alpha((m, n))
            k = 0
            for j, blk in entries:
                # mixed dtypes promote inside the in-place add
                p3[j][:, blk.rows, blk.cols].add_(x[k : k + views[j].batch], alpha=alpha)
                k += views[j].batch
            del x
        for p, w in zip(p_loc, work, strict=True):
            if w is not p:
                p.copy_(w)

    def _stack_direction(
        self,
        entries: list[tuple[int, Block]],
        views: list[ParamView],
        g3: list[torch.Tensor],
        b3: list[torch.Tensor],
        shape: tuple[int, int],
        device: torch.device,
    ) -> torch.Tensor:
        """`U_t` of every matrix of one bucket chunk, written straight into one `(batch, m, n)` buffer."""
        u = torch.empty((sum(views[j].batch for j, _ in entries), *shape), dtype=self.work_dtype, device=device)
        k = 0
        for j, blk in entries:
            out = u[k : k + views[j].batch]
            buf = b3[j][:, blk.rows, blk.cols]
            if self.nesterov:
                torch.add(g3[j][:, blk.rows, blk.cols], buf, alpha=self.momentum, out=out)  # U_t = G_t + mu M_t
            else:
                out.copy_(buf)
            k += views[j].batch
        return u


def _chunks(
    buckets: dict[tuple[int, int], list[tuple[int, Block]]], views: list[ParamView], limit: int
) -> Iterable[tuple[tuple[int, int], list[tuple[int, Block]]]]:
    """Each bucket cut into consecutive runs of at most `limit` elements (`batch_cap`; at least one entry each)."""
    for (m, n), entries in buckets.items():
        run: list[tuple[int, Block]] = []
        size = 0
        for j, blk in entries:
            elements = views[j].batch * m * n
            if run and size + elements > limit:
                yield (m, n), run
                run, size = [], 0
            run.append((j, blk))
            size += elements
        if run:
            yield (m, n), run


class _Orthogonalizer:
    """`U_t` (batch, m, n) -> `X_K`: clip (-> `B_t`), normalize, cast to the NS dtype, Newton-Schulz.

    Two stages, so that a caller can drop its `U_t` batch between them: `prepare` clips and normalizes `u` in place
    and returns the NS input (a new tensor unless the NS dtype is the work dtype; a tall half-precision batch comes
    back transposed, `(batch, n, m)`, see `root_hf.optim.newton_schulz.newton_schulz`); `iterate` runs the schedule
    and returns the `(batch, m, n)` result in the NS dtype (the work dtype when `ns_steps == 0`), possibly a transposed
    view. Calling the object runs both.
    """

    def __init__(
        self,
        *,
        keep: dict[torch.device, torch.Tensor] | None = None,
        clip_quantile: float | None,
        ns_steps: int,
        ns_coefficients: ScheduleSpec,
        eps: float,
        ns_dtype: NsDtype,
        lr: float,
        adjust_lr_fn: AdjustLrFn,
        diagnostics: dict[str, list[torch.Tensor]] | None,
        schedules: Mapping[tuple[int, int], Schedule],
        ns_method: NsMethod = "standard",
        ns_methods: Mapping[tuple[int, int, int, torch.dtype, str], str] | None = None,
    ) -> None:
        self.clip_quantile, self.ns_steps, self.ns_coefficients = clip_quantile, ns_steps, ns_coefficients
        self.eps, self.ns_dtype, self.lr, self.adjust_lr_fn = eps, ns_dtype, lr, adjust_lr_fn
        self.diagnostics, self.schedules = diagnostics, schedules
        self.ns_method, self.ns_methods = ns_method, ns_methods or {}
        self.keep = {} if keep is None else keep  # device -> 0-d bool: False zeroes X_K (a skipped step)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return self.iterate(self.prepare(u), tuple(u.shape[-2:]))

    def prepare(self, u: torch.Tensor) -> torch.Tensor:
        work_dtype = u.dtype
        m, n = u.shape[-2:]
        diagnostics = self.diagnostics
        if self.clip_quantile is not None:
            unclipped = u.clone() if diagnostics is not None else None
            # B_t = U_t - O_t = clamp(U_t, -eps_t, eps_t), in place
            thresh = soft_threshold_clip_(u, self.clip_quantile)
            if unclipped is not None:
                rms = unclipped.square().mean(dim=(1, 2)).sqrt()
                fraction = (unclipped.abs() > thresh.view(-1, 1, 1)).float().mean(dim=(1, 2))
                diagnostics["clip_fraction"].append(fraction)
                diagnostics["eps_over_rms"].append(thresh / rms.clamp(min=torch.finfo(rms.dtype).tiny))
                del unclipped
        # Normalize in the work dtype (float32 or wider), then cast once: dividing a bfloat16 batch by a float32 norm
        # is a slow mixed-dtype broadcast on CPU (37 ms vs 3.4 ms on 12 x 1536 x 576), and rounding after the
        # division is the more accurate order.
        norm_dtype = torch.promote_types(work_dtype, torch.float32)
        norm = torch.linalg.vector_norm(u, dim=(1, 2), keepdim=True, dtype=norm_dtype)
        u.div_(norm + self.eps)  # X_0 = B_t / (||B_t||_F + eps)
        if self.ns_steps == 0:
            return u  # orthogonalization off: X_K = X_0, the normalized (clipped) momentum, as orthogonalize()
        x = u.to(_out_dtype(self.ns_steps, self.ns_dtype, u.device, work_dtype))
        if m > n and x.dtype in _HALF:
            # iterated as its transpose (see newton_schulz); transposed here, so the untransposed copy is freed before
            # the iteration allocates its buffers
            x = x.mT.contiguous()
        return x

    def iterate(self, x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        m, n = shape
        if self.ns_steps > 0:
            schedule = self.schedules.get((m, n))
            if schedule is None:
                schedule = get_schedule(self.ns_coefficients, (m, n), self.ns_steps)
            transposed = x.shape[-2:] != (m, n)
            method = self.ns_method
            if method == "auto":
                key = (m, n, self.ns_steps, x.dtype, x.device.type)
                method = self.ns_methods.get(key) or select_ns_method("auto", (m, n), *key[2:])
            x = newton_schulz(x, schedule, method)
            if transposed:
                x = x.mT
        keep = self.keep.get(x.device)
        if keep is not None:
            # a skipped step adds exactly zero: X_K of a non-finite U_t is inf / NaN, and 0 * NaN is NaN
            x.masked_fill_(keep.logical_not(), 0.0)
        if self.diagnostics is not None:
            scale = adjusted_lr_ratio(self.adjust_lr_fn, (m, n))
            self.diagnostics["update_rms"].append(self.lr * scale * x.float().square().mean(dim=(1, 2)).sqrt())
            self.diagnostics["ortho_error"].append(_ortho_error(x))
        return x


def _ortho_error(x: torch.Tensor) -> torch.Tensor:
    """`||X X^T - I||_F / sqrt(min(m, n))`: the RMS distance of the singular values' squares from 1."""
    x = x.float()
    gram = x.mT @ x if x.shape[-2] > x.shape[-1] else x @ x.mT
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.matrix_norm(gram - eye) / math.sqrt(gram.shape[-1])


def adamw(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    diagnostics: dict[str, list[torch.Tensor]] | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    r"""One AdamW step (Loshchilov & Hutter 2019), in place: `torch._foreach_*` ops per device and dtype (CPU: runs).

    $$
    m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \quad
    W_t = W_{t-1}(1 - \eta\lambda) - \eta \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}
    $$

    The step count stays a tensor on the param's device and the bias corrections are computed there (as
    `torch.optim.AdamW(capturable=True)`): the step never waits for the device. The values match
    `torch.optim.AdamW(foreach=False)` to float32 rounding (the bias corrections are float32 device scalars, and the
    step size is folded into the denominator). Half-precision params keep float32 moments; their update is computed
    in float32 and rounded once.

    Args:
        params: the parameters (local shards under FSDP2: everything here is elementwise).
        grads: their gradients.
        exp_avgs: first moments $m$, updated.
        exp_avg_sqs: second moments $v$, updated.
        state_steps: one float32 scalar tensor per param, on the param's device, the step count $t$, incremented.
        lr: learning rate $\eta$.
        beta1: $\beta_1$.
        beta2: $\beta_2$.
        eps: $\epsilon$.
        weight_decay: decoupled decay $\lambda$.
        diagnostics: if a dict, each param's update RMS is appended under `update_rms`.
        found_inf: None, or a one-element float tensor: where it is non-zero the step changes nothing (params, moments
            and step counts keep their values, also for non-finite gradients), decided on the device.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype)].append(i)
    chunks = [
        (device, dtype, chunk)
        for (device, dtype), idx in groups.items()
        for chunk in (_cache_chunks(idx, params) if device.type == "cpu" else [idx])
    ]
    for device, dtype, idx in chunks:
        p = [params[i] for i in idx]
        g = [grads[i] for i in idx]
        m = [exp_avgs[i] for i in idx]
        v = [exp_avg_sqs[i] for i in idx]
        steps = [state_steps[i] for i in idx]
        keep = None if found_inf is None else found_inf.to(device).reshape(()) == 0
        if keep is not None:
            g = [torch.where(keep, t, 0.0) for t in g]  # a skipped step sees zero gradients (0 * NaN would be NaN)
        half = dtype in _HALF
        if half:
            g = [t.float() for t in g]
        w = [t.float() for t in p] if half else p
        before = [t.clone() for t in w] if diagnostics is not None else None
        torch._foreach_add_(steps, 1.0 if keep is None else keep.float())  # t <- t + 1
        if weight_decay != 0:
            _foreach_scale_(w, 1 - lr * weight_decay, keep)
        if keep is None:
            torch._foreach_lerp_(m, g, 1 - beta1)
            torch._foreach_mul_(v, beta2)
        else:  # a skipped step: weight 0 and factor 1 leave m and v bit for bit (g is 0 there)
            torch._foreach_lerp_(m, g, [_select(keep, 1 - beta1, 0.0, m[0].dtype)] * len(m))
            torch._foreach_mul_(v, _select(keep, beta2, 1.0, v[0].dtype))
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)
        if lr == 0:  # nothing to add (and no division by lr below)
            _finish_adamw(p, w, before, half, diagnostics)
            continue
        # W += m / ((sqrt(v) / sqrt(bc2) + eps) / s) with s = -lr / bc1, as sqrt(v) * a + b: 4 passes, as torch's
        # foreach AdamW. a and b come from the step counts stacked into one vector (a handful of ops whatever the
        # number of params), t at least 1 so that a skipped first step divides by no zero.
        t = torch.stack(steps).clamp_(min=1.0)
        if dtype == torch.float64:
            t = t.double()  # float64 params: float64 bias corrections
        bc1 = torch.pow(beta1, t).sub_(1.0)  # beta1^t - 1 = -(1 - beta1^t)
        bc2 = torch.pow(beta2, t).neg_().add_(1.0).sqrt_()  # sqrt(1 - beta2^t)
        a = bc1.div(bc2).div_(lr)  # a = 1 / (sqrt(bc2) s)
        b = bc1.mul_(eps / lr)  # b = eps / s
        if keep is not None:  # a skipped step: denominator -inf, update -0
            a = torch.where(keep, a, 0.0)
            b = torch.where(keep, b, -math.inf)
        denom = torch._foreach_sqrt(v)
        torch._foreach_mul_(denom, a.unbind())
        torch._foreach_add_(denom, b.unbind())
        torch._foreach_addcdiv_(w, m, denom)
        _finish_adamw(p, w, before, half, diagnostics)


# On the CPU a `torch._foreach_*` op is a loop over its tensors: each of the ~8 passes of the AdamW update would sweep
# every param before the next pass starts, evicting the caches between them. The lists are cut into runs of at most
# this many entries (1 MiB of float32 per state tensor, each run at least one param), so that small params still share
# ops and a large one stays in cache across the passes (same cache rule as MAX_BATCH_ELEMENTS_PER_THREAD).
ADAMW_CPU_CHUNK_ELEMENTS = 2**18


def _cache_chunks(idx: list[int], params: list[torch.Tensor]) -> list[list[int]]:
    chunks: list[list[int]] = []
    size = 0
    for i in idx:
        n = params[i].numel()
        if not chunks or size + n > ADAMW_CPU_CHUNK_ELEMENTS:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += n
    return chunks


def _finish_adamw(
    p: list[torch.Tensor],
    w: list[torch.Tensor],
    before: list[torch.Tensor] | None,
    half: bool,
    diagnostics: dict[str, list[torch.Tensor]] | None,
) -> None:
    """The update RMS diagnostics, and the float32 work copies of half-precision params rounded back into them."""
    if before is not None and diagnostics is not None:
        for after, prev in zip(w, before, strict=True):
            diagnostics["update_rms"].append((after - prev).float().square().mean().sqrt().reshape(1))
    if half:
        torch._foreach_copy_(p, w)
