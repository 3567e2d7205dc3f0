"""ROOT: Robust Orthogonalized Optimizer (He et al. 2025, arXiv 2511.20626), the fast implementation.

Layers, as in ``torch.optim``: :class:`ROOT` validates hyperparameters and owns the state; the functional
:func:`root` and :func:`adamw` run one step of each branch on lists of tensors; the private kernels below them are pure
tensor code. :class:`root_hf.RootReference` is the slow, line-by-line specification this file is tested against.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch.optim.optimizer import Optimizer, ParamsT

from ..distributed import DistributedPlan, assign_owners, local_tensor, plan_for
from .clip import soft_threshold_clip_
from .coefficients import DEFAULT_SCHEDULE, ScheduleSpec, get_schedule, normalize_schedule_spec
from .orthogonalize import NsDtype, newton_schulz, resolve_ns_dtype
from .views import Block, MatrixView, ParamView, as_batch, normalize_matrix_split, normalize_matrix_view, param_view

__all__ = ["ADJUST_LR_FNS", "ROOT", "adamw", "adjusted_lr_ratio", "root"]

AdjustLrFn = Literal["match_rms_adamw", "original"] | None
ADJUST_LR_FNS = ("match_rms_adamw", "original", None)
NonfiniteGrads = Literal["raise", "skip", "ignore"]
NONFINITE_MODES = ("raise", "skip", "ignore")
_HALF = (torch.float16, torch.bfloat16)


def adjusted_lr_ratio(adjust_lr_fn: AdjustLrFn, shape: Iterable[int]) -> float:
    """Scale of the orthogonalized update for a weight whose 2-D view is ``(m, n)``.

    ``"match_rms_adamw"``: ``0.2 * sqrt(max(m, n))`` (Moonlight, Liu et al. 2025, arXiv 2502.16982): matches the update
    RMS of AdamW so lr and weight decay tuned for AdamW carry over. ``"original"``: ``sqrt(max(1, m / n))`` (Keller
    Jordan's Muon). ``None``: 1 (no adjustment; note that ``torch.optim.Muon`` reads ``None`` as ``"original"``).
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


def _state_dtype(param: torch.Tensor) -> torch.dtype:
    """Optimizer state is float32 for half-precision params, else the param's own dtype (float64 stays float64)."""
    return torch.float32 if param.dtype in _HALF else param.dtype


def _flat_param_error(shape: tuple[int, ...]) -> ValueError:
    return ValueError(
        f"ROOT received a parameter of shape {shape} in a use_root=True group, but it orthogonalizes matrices "
        "(2 or more dims). If your model has no such 1-D weights, the parameters were flattened by the training "
        "framework: FSDP1 (use_orig_params) and DeepSpeed ZeRO hand optimizers flat 1-D shards, on which "
        "orthogonalization is impossible. Use FSDP2 (fsdp_version=2) or DDP instead; for genuine 1-D parameters "
        "put them in a group with use_root=False (AdamW branch)."
    )


# --------------------------------------------------------------------------------------------------------------------
# Functional layer
# --------------------------------------------------------------------------------------------------------------------


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
    diagnostics: dict[str, list[torch.Tensor]] | None = None,
    process_group: Any = "auto",
) -> None:
    r"""One ROOT step on matrix params (functional API; see :class:`ROOT` for the algorithm).

    Each param holds one or more independent matrices (see :mod:`root_hf.optim.views`: ``matrix_view``,
    ``matrix_split``); matrices are bucketed by their shape ``(m, n)`` and each bucket is clipped and orthogonalized in
    one batched call, so a fused ``(E, out, in)`` expert tensor with ``matrix_view="batched"`` contributes ``E``
    matrices with their own threshold, schedule and scale. Under DDP (``process_group``, default: the initialized
    default group) and FSDP2 (``DTensor`` params) each matrix is clipped and orthogonalized by one owner rank only (see
    :mod:`root_hf.distributed`); ``"batched"`` FSDP2 params sharded on a leading dim hold whole matrices locally and
    are orthogonalized where they are. If ``diagnostics`` is a dict, per-matrix statistics are appended to it
    (``clip_fraction``, ``eps_over_rms``, ``update_rms``, ``ortho_error``); this costs one extra Gram matrix per group.
    """
    for p in params:
        if p.dim() < 2:
            raise _flat_param_error(tuple(p.shape))
    plan = plan_for(params, process_group)
    ortho = functools.partial(
        _orthogonalize_batch,
        clip_quantile=clip_quantile,
        ns_steps=ns_steps,
        ns_coefficients=ns_coefficients,
        eps=eps,
        ns_dtype=ns_dtype,
        lr=lr,
        adjust_lr_fn=adjust_lr_fn,
        diagnostics=diagnostics,
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
        g_loc = [local_tensor(grads[i]) for i in idx]
        b_loc = [local_tensor(momentum_buffers[i]) for i in idx]
        if weight_decay != 0:
            for p in p_loc:
                p.mul_(1 - lr * weight_decay)  # decoupled decay with the unscaled lr
        if plan.mode == "single":
            step(work_dtype=work_dtype).local(p_loc, g_loc, b_loc, matrix_view, matrix_split)
            continue
        out_dtype = _out_dtype(ns_steps, ns_dtype, device, work_dtype)
        if plan.mode == "ddp":
            step(work_dtype=work_dtype).ddp(plan, p_loc, g_loc, b_loc, matrix_view, matrix_split, out_dtype)
            continue
        # fsdp2: a "batched" tensor sharded on a leading (expert) dim holds whole matrices on each rank: no gather.
        whole = [j for j, i in enumerate(idx) if matrix_view == "batched" and params[i].dim() >= 3]
        rows = [j for j in range(len(idx)) if j not in set(whole)]
        s = step(work_dtype=work_dtype)
        if whole:
            s.local(
                [p_loc[j] for j in whole],
                [g_loc[j] for j in whole],
                [b_loc[j] for j in whole],
                matrix_view,
                matrix_split,
            )
        if rows:
            views = [param_view(params[idx[j]].shape, matrix_view, matrix_split) for j in rows]
            s.fsdp2_rows(
                plan, [p_loc[j] for j in rows], [g_loc[j] for j in rows], [b_loc[j] for j in rows], views, out_dtype
            )


def _momentum_direction_(g: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """Update ``buf`` in place to ``M_t = mu M_{t-1} + G_t``; return ``U_t`` (a new tensor, or ``buf`` itself)."""
    buf.mul_(momentum).add_(g)
    return torch.add(g, buf, alpha=momentum) if nesterov else buf  # U_t = G_t + mu M_t


def _out_dtype(ns_steps: int, ns_dtype: NsDtype, device: torch.device, work_dtype: torch.dtype) -> torch.dtype:
    return resolve_ns_dtype(ns_dtype, device, work_dtype) if ns_steps > 0 else work_dtype


class _Step:
    """The matrix work of one ROOT step on one (dtype, device) partition: single process, DDP or FSDP2 rows.

    Weight decay is already applied; each method updates the momentum buffers, computes ``U_t``, clips and
    orthogonalizes every independent matrix, and adds ``-lr * s(m, n) * X`` to its block of the param.
    """

    def __init__(
        self,
        *,
        momentum: float,
        nesterov: bool,
        ortho: Callable[..., torch.Tensor],
        lr: float,
        adjust_lr_fn: AdjustLrFn,
        work_dtype: torch.dtype,
    ) -> None:
        self.momentum, self.nesterov, self.ortho = momentum, nesterov, ortho
        self.lr, self.adjust_lr_fn, self.work_dtype = lr, adjust_lr_fn, work_dtype

    def _alpha(self, shape: tuple[int, int]) -> float:
        return -self.lr * adjusted_lr_ratio(self.adjust_lr_fn, shape)

    def local(
        self,
        p_loc: list[torch.Tensor],
        g_loc: list[torch.Tensor],
        b_loc: list[torch.Tensor],
        matrix_view: str,
        matrix_split: list[Any] | None,
    ) -> None:
        """Whole matrices on this rank: each same-shape bucket's ``U_t`` is written straight into one
        ``(batch, m, n)`` buffer, and its update is applied as soon as it is computed (no list of all updates)."""
        views = [param_view(p.shape, matrix_view, matrix_split) for p in p_loc]
        # a non-contiguous param (e.g. channels_last) is updated through a contiguous copy, written back at the end
        work = [p if p.is_contiguous() else p.contiguous() for p in p_loc]
        p3 = [as_batch(w, v) for w, v in zip(work, views, strict=True)]
        g3 = [as_batch(g, v) for g, v in zip(g_loc, views, strict=True)]
        b3 = [as_batch(b, v) for b, v in zip(b_loc, views, strict=True)]
        buckets: dict[tuple[int, int], list[tuple[int, Block]]] = defaultdict(list)
        for j, v in enumerate(views):
            b_loc[j].mul_(self.momentum).add_(g_loc[j])  # M_t = mu M_{t-1} + G_t
            for blk in v.blocks:
                if v.batch * blk.shape[0] * blk.shape[1] > 0:  # zero-size matrices: nothing to do
                    buckets[blk.shape].append((j, blk))
        for (m, n), entries in buckets.items():
            u = torch.empty(
                (sum(views[j].batch for j, _ in entries), m, n), dtype=self.work_dtype, device=b_loc[0].device
            )
            k = 0
            for j, blk in entries:
                out = u[k : k + views[j].batch]
                buf = b3[j][:, blk.rows, blk.cols]
                if self.nesterov:
                    torch.add(g3[j][:, blk.rows, blk.cols], buf, alpha=self.momentum, out=out)  # U_t = G_t + mu M_t
                else:
                    out.copy_(buf)
                k += views[j].batch
            x = self.ortho(u)
            alpha = self._alpha((m, n))
            k = 0
            for j, blk in entries:
                # mixed dtypes promote inside the in-place add
                p3[j][:, blk.rows, blk.cols].add_(x[k : k + views[j].batch], alpha=alpha)
                k += views[j].batch
            del u, x
        for p, w in zip(p_loc, work, strict=True):
            if w is not p:
                p.copy_(w)

    def ddp(
        self,
        plan: DistributedPlan,
        p_loc: list[torch.Tensor],
        g_loc: list[torch.Tensor],
        b_loc: list[torch.Tensor],
        matrix_view: str,
        matrix_split: list[Any] | None,
        out_dtype: torch.dtype,
    ) -> None:
        """DDP owner split: every independent matrix (an expert, a block) gets one owner, balanced by its NS FLOPs;
        owners clip and orthogonalize, one ``all_gather`` gives every rank every result (momentum stays replicated)."""
        views = [param_view(p.shape, matrix_view, matrix_split) for p in p_loc]
        work = [p if p.is_contiguous() else p.contiguous() for p in p_loc]
        p3 = [as_batch(w, v) for w, v in zip(work, views, strict=True)]
        g3 = [as_batch(g, v) for g, v in zip(g_loc, views, strict=True)]
        b3 = [as_batch(b, v) for b, v in zip(b_loc, views, strict=True)]
        units = [
            (j, e, blk)
            for j, v in enumerate(views)
            for blk in v.blocks
            if blk.shape[0] * blk.shape[1] > 0
            for e in range(v.batch)
        ]
        shapes = [blk.shape for _, _, blk in units]
        owners = assign_owners(shapes, plan.world_size)
        for j in range(len(views)):
            b_loc[j].mul_(self.momentum).add_(g_loc[j])  # M_t; U_t is only needed by the owner
        u = {}
        for q, (j, e, blk) in enumerate(units):
            if owners[q] == plan.rank:
                buf = b3[j][e, blk.rows, blk.cols]
                u[q] = torch.add(g3[j][e, blk.rows, blk.cols], buf, alpha=self.momentum) if self.nesterov else buf
        results = _orthogonalize_owned(u, {q: (_whole(shapes[q]),) for q in u}, self.ortho)
        device = b_loc[0].device if b_loc else torch.device("cpu")
        updates = plan.all_gather_results(shapes, owners, results, out_dtype, device)
        for (j, e, blk), x in zip(units, updates, strict=True):
            p3[j][e, blk.rows, blk.cols].add_(x, alpha=self._alpha(blk.shape))
        for p, w in zip(p_loc, work, strict=True):
            if w is not p:
                p.copy_(w)

    def fsdp2_rows(
        self,
        plan: DistributedPlan,
        p_loc: list[torch.Tensor],
        g_loc: list[torch.Tensor],
        b_loc: list[torch.Tensor],
        views: list[ParamView],
        out_dtype: torch.dtype,
    ) -> None:
        """FSDP2 row shards of ``(M, N)`` matrix views: one ``all_to_all`` sends each row shard of ``U_t`` to the
        matrix's owner, which clips and orthogonalizes every block of it; a second sends each rank its rows back."""
        shapes = [v.matrix for v in views]
        widths = [n for _, n in shapes]
        owners = assign_owners(shapes, plan.world_size)
        local_u = [
            _momentum_direction_(g.reshape(buf.shape[0], n), buf.view(buf.shape[0], n), self.momentum, self.nesterov)
            for g, buf, n in zip(g_loc, b_loc, widths, strict=True)
        ]
        device = b_loc[0].device
        counts = plan.row_counts([t.shape[0] for t in local_u], device)
        full_u = plan.gather_to_owners(local_u, widths, owners, counts)
        results = _orthogonalize_owned(full_u, {i: views[i].blocks for i in full_u}, self.ortho)
        updates = plan.scatter_from_owners(results, widths, owners, counts, out_dtype, device)
        for i, (p, x) in enumerate(zip(p_loc, updates, strict=True)):
            p2 = p.view(x.shape)
            start = sum(counts[r][i] for r in range(plan.rank))
            for blk in views[i].blocks:
                # this rank holds global rows [start, start + rows) of the (M, N) matrix view
                lo = max(blk.rows.start or 0, start) - start
                hi = min(blk.rows.stop if blk.rows.stop is not None else shapes[i][0], start + x.shape[0]) - start
                if hi > lo:
                    p2[lo:hi, blk.cols].add_(x[lo:hi, blk.cols], alpha=self._alpha(blk.shape))


def _whole(shape: tuple[int, int]) -> Block:
    return Block(slice(None), slice(None), shape)


def _orthogonalize_owned(
    u: dict[int, torch.Tensor], blocks: dict[int, tuple[Block, ...]], ortho: Callable[..., torch.Tensor]
) -> dict[int, torch.Tensor]:
    """Clip and orthogonalize every block of the full matrices this rank owns, batched by block shape."""
    buckets: dict[tuple[int, int], list[tuple[int, Block]]] = defaultdict(list)
    for j in sorted(u):
        for blk in blocks[j]:
            buckets[blk.shape].append((j, blk))
    results: dict[int, torch.Tensor] = {}
    for entries in buckets.values():
        x = ortho(torch.stack([u[j][blk.rows, blk.cols] for j, blk in entries]))
        for k, (j, blk) in enumerate(entries):
            if len(blocks[j]) == 1:
                results[j] = x[k]
            else:
                if j not in results:
                    results[j] = x.new_empty(u[j].shape)
                results[j][blk.rows, blk.cols] = x[k]
    return results


def _orthogonalize_batch(
    u: torch.Tensor,
    *,
    clip_quantile: float | None,
    ns_steps: int,
    ns_coefficients: ScheduleSpec,
    eps: float,
    ns_dtype: NsDtype,
    lr: float,
    adjust_lr_fn: AdjustLrFn,
    diagnostics: dict[str, list[torch.Tensor]] | None,
) -> torch.Tensor:
    """``U_t`` (batch, m, n) -> ``X_K``: clip (-> ``B_t``), normalize, cast to the NS dtype, Newton-Schulz.

    ``u`` is overwritten. Returns the batch in the NS dtype (the work dtype when ``ns_steps == 0``); tall matrices may
    come back as a transposed view (see :func:`~root_hf.optim.orthogonalize.newton_schulz`).
    """
    work_dtype = u.dtype
    m, n = u.shape[-2:]
    x = u
    if clip_quantile is not None:
        unclipped = u.clone() if diagnostics is not None else u
        thresh = soft_threshold_clip_(u, clip_quantile)  # B_t = U_t - O_t = clamp(U_t, -eps_t, eps_t), in place
        if diagnostics is not None:
            rms = unclipped.square().mean(dim=(1, 2)).sqrt()
            fraction = (unclipped.abs() > thresh.view(-1, 1, 1)).float().mean(dim=(1, 2))
            diagnostics["clip_fraction"].append(fraction)
            diagnostics["eps_over_rms"].append(thresh / rms.clamp(min=torch.finfo(rms.dtype).tiny))
    if ns_steps > 0:
        # Normalize in the work dtype (float32 or wider), then cast once: dividing a bfloat16 batch by a float32 norm
        # is a slow mixed-dtype broadcast on CPU (37 ms vs 3.4 ms on 12 x 1536 x 576), and rounding after the
        # division is the more accurate order.
        norm_dtype = torch.promote_types(work_dtype, torch.float32)
        norm = torch.linalg.vector_norm(u, dim=(1, 2), keepdim=True, dtype=norm_dtype)
        u.div_(norm + eps)  # X_0 = B_t / (||B_t||_F + eps)
        x = u.to(_out_dtype(ns_steps, ns_dtype, u.device, work_dtype))
        x = newton_schulz(x, get_schedule(ns_coefficients, (m, n), ns_steps))
    # else: orthogonalization off, the update is the (clipped) momentum itself
    if diagnostics is not None:
        scale = adjusted_lr_ratio(adjust_lr_fn, (m, n))
        diagnostics["update_rms"].append(lr * scale * x.float().square().mean(dim=(1, 2)).sqrt())
        diagnostics["ortho_error"].append(_ortho_error(x))
    return x


def _ortho_error(x: torch.Tensor) -> torch.Tensor:
    """``||X X^T - I||_F / sqrt(min(m, n))``: the RMS distance of the singular values' squares from 1."""
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
) -> None:
    """One AdamW step (Loshchilov & Hutter 2019), with the same arithmetic as ``torch.optim.AdamW(foreach=False)``.

    Half-precision params keep float32 moments; their update is computed in float32 and rounded once.
    """
    for p, g, m, v, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=False):
        step_t += 1
        half = p.dtype in _HALF
        w = p.float() if half else p
        g = g.float() if half else g
        if diagnostics is not None:
            before = w.clone()
        if weight_decay != 0:
            w.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
        w.addcdiv_(m, denom, value=-step_size)
        if diagnostics is not None:
            diagnostics["update_rms"].append((w - before).float().square().mean().sqrt().reshape(1))
        if half:
            p.copy_(w)


# --------------------------------------------------------------------------------------------------------------------
# Optimizer class
# --------------------------------------------------------------------------------------------------------------------

_ROOT_KEYS = (
    "momentum",
    "nesterov",
    "clip_quantile",
    "ns_steps",
    "ns_coefficients",
    "eps",
    "adjust_lr_fn",
    "ns_dtype",
    "matrix_view",
    "matrix_split",
)


def _validate_group(group: dict[str, Any]) -> None:
    lr, wd = group["lr"], group["weight_decay"]
    if isinstance(lr, torch.Tensor):
        raise ValueError("Invalid lr: a Tensor lr is not supported by ROOT. Pass a float.")
    if not (isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr)):
        raise ValueError(f"Invalid lr: {lr!r}. Must be a finite float >= 0.")
    if not (isinstance(wd, (int, float)) and wd >= 0 and math.isfinite(wd)):
        raise ValueError(f"Invalid weight_decay: {wd!r}. Must be a finite float >= 0.")
    if group["use_root"] not in (True, False, None):
        raise ValueError(f"Invalid use_root: {group['use_root']!r}. Must be True, False or None (by ndim).")
    mu = group["momentum"]
    if not (isinstance(mu, (int, float)) and 0 <= mu < 1):
        raise ValueError(f"Invalid momentum: {mu!r}. Must be a float in [0, 1).")
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"Invalid nesterov: {group['nesterov']!r}. Must be True or False.")
    q = group["clip_quantile"]
    if q is not None and not (isinstance(q, (int, float)) and 0 < q <= 1):
        raise ValueError(f"Invalid clip_quantile: {q!r}. Must be a float in (0, 1], or None to turn clipping off.")
    k = group["ns_steps"]
    if not (isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= 100):
        raise ValueError(f"Invalid ns_steps: {k!r}. Must be an integer in [0, 100] (0 turns orthogonalization off).")
    group["ns_coefficients"] = normalize_schedule_spec(group["ns_coefficients"])
    if not isinstance(group["ns_coefficients"], str) and not isinstance(group["ns_coefficients"][0], float):
        get_schedule(group["ns_coefficients"], (1, 1), k)  # a per-step list must have ns_steps entries
    if not (isinstance(group["eps"], (int, float)) and group["eps"] >= 0):
        raise ValueError(f"Invalid eps: {group['eps']!r}. Must be a float >= 0.")
    if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(f"Invalid adjust_lr_fn: {group['adjust_lr_fn']!r}. Must be one of {ADJUST_LR_FNS}.")
    ns_dtype = group["ns_dtype"]
    resolve_ns_dtype(ns_dtype, torch.device("cpu"))
    if isinstance(ns_dtype, torch.dtype):  # keep param_groups plain for torch.load(weights_only=True)
        group["ns_dtype"] = str(ns_dtype).removeprefix("torch.")
    group["matrix_view"] = normalize_matrix_view(group.get("matrix_view", "flatten"))
    group["matrix_split"] = normalize_matrix_split(group.get("matrix_split"))
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise ValueError(f"Invalid betas: {betas!r}. Must be two floats in [0, 1).")
    group["betas"] = tuple(float(b) for b in betas)
    if not (isinstance(group["adamw_eps"], (int, float)) and group["adamw_eps"] >= 0):
        raise ValueError(f"Invalid adamw_eps: {group['adamw_eps']!r}. Must be a float >= 0.")


class ROOT(Optimizer):
    r"""ROOT, the Robust Orthogonalized Optimizer: Muon with outlier suppression and shape-aware Newton-Schulz.

    Use it for the hidden weight matrices of a network, with the AdamW branch (inside the same optimizer) for
    everything else: one ``state_dict``, one LR scheduler and one ``GradScaler`` cover both. Without explicit groups,
    parameters with 2 or more dims take the ROOT branch and the rest AdamW. Token embeddings and LM heads are matrices
    but belong in the AdamW branch: pass them in a group with ``use_root=False`` (the Hugging Face integration does
    this by name). Do not use it where the training framework flattens parameters (FSDP1, DeepSpeed ZeRO): it raises.

    For each matrix :math:`W \in \mathbb{R}^{m \times n}` (tensors with more dims are viewed as
    ``(shape[0], -1)``) with gradient :math:`G_t`:

    .. math::
        \begin{aligned}
            M_t &= \mu M_{t-1} + G_t
                && \text{momentum (SGD-sum form)} \\
            U_t &= G_t + \mu M_t \ \text{(Nesterov)}\quad\text{or}\quad U_t = M_t \\
            \epsilon_t &= \mathrm{Quantile}_{q}\big(|U_t|\big)
                && \text{per-matrix threshold, } q = 0.90 \\
            O_t &= \mathrm{sign}(U_t) \odot \max(|U_t| - \epsilon_t, 0)
                && \text{outliers (soft-thresholding), discarded} \\
            B_t &= U_t - O_t = \mathrm{clamp}(U_t, -\epsilon_t, \epsilon_t)
                && \text{robust part} \\
            X_0 &= B_t / (\lVert B_t \rVert_F + \varepsilon), \quad
            X_{k} = a_k X_{k-1} + b_k A_{k-1} X_{k-1} + c_k A_{k-1}^2 X_{k-1}, \ A = X X^\top
                && \text{NS, } (a_k, b_k, c_k) \text{ chosen for } (m, n) \\
            W_t &= W_{t-1} (1 - \eta \lambda) - \eta \, s(m, n) \, X_K
                && s = 0.2 \sqrt{\max(m, n)} \text{ (matched RMS)}
        \end{aligned}

    Args:
        params: iterable of parameters, named parameters or param groups. A group may set ``use_root`` (True: ROOT
            branch, False: AdamW branch, None/absent: by ndim) and any hyperparameter below.
        lr (float): learning rate :math:`\eta` of both branches (default: 1e-3).
        weight_decay (float): decoupled weight decay :math:`\lambda`, applied as ``W *= 1 - lr * wd`` (default: 0.1).
        momentum (float): :math:`\mu` (default: 0.95).
        nesterov (bool): use :math:`U_t = G_t + \mu M_t` (default: True, as the authors' code).
        clip_quantile (float or None): quantile level :math:`q` of the soft-threshold; None turns outlier suppression
            off (default: 0.90, the paper's best percentile).
        ns_steps (int): Newton-Schulz steps :math:`K`; 0 turns orthogonalization off (default: 5).
        ns_coefficients: schedule name (``"adaptive"``: fitted for the matrix shape, every output singular value
            guaranteed in [0, 1.2]; ``"polar-express"``, ``"muon"``, ``"root-paper"``, ``"root-paper-safe"``), one
            ``(a, b, c)`` triple or one triple per step (default: ``"adaptive"``).
        eps (float): added to :math:`\lVert B_t \rVert_F` before normalizing (default: 1e-7).
        adjust_lr_fn (str or None): ``"match_rms_adamw"`` (:math:`0.2\sqrt{\max(m, n)}`), ``"original"``
            (:math:`\sqrt{\max(1, m/n)}`) or None (1) (default: ``"match_rms_adamw"``).
        ns_dtype: dtype of the Newton-Schulz iteration: ``"auto"`` (bfloat16 on CUDA, float32 on CPU),
            ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"float64"`` (default: ``"auto"``).
        betas (tuple[float, float]): AdamW branch :math:`(\beta_1, \beta_2)` (default: (0.9, 0.95)).
        adamw_eps (float): AdamW branch epsilon (default: 1e-8).
        nonfinite_grads (str): what a step does when a gradient holds inf or NaN: ``"raise"`` a ``FloatingPointError``
            (default), ``"skip"`` the whole step with a warning (nothing changes), or ``"ignore"`` (no check: saves one
            device sync per step; non-finite values then reach weights).
        process_group: DDP work splitting. ``"auto"`` (default): when ``torch.distributed`` is initialized with more
            than one rank at ``step()`` time, each matrix is clipped and orthogonalized by one rank and the results are
            all-gathered (the gradients must be identical on all ranks, as under DDP). A ``ProcessGroup`` restricts
            this to that group; ``None`` turns it off (every rank computes everything). FSDP2 ``DTensor`` params always
            use their mesh's group.

    State: ``momentum_buffer`` per ROOT matrix; ``step``, ``exp_avg``, ``exp_avg_sq`` per AdamW param. State is
    float32 for bfloat16/float16 params, also after :meth:`load_state_dict`.

    References:
        - ROOT: He et al., "ROOT: Robust Orthogonalized Optimizer for Neural Network Training",
          https://arxiv.org/abs/2511.20626
        - Muon: Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/
        - Matched-RMS scaling: Liu et al., "Muon is Scalable for LLM Training", https://arxiv.org/abs/2502.16982

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        >>> opt = ROOT(model.parameters(), lr=1e-3)
        >>> model(torch.randn(4, 8)).pow(2).mean().backward()
        >>> opt.step()
        >>> opt.zero_grad()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        clip_quantile: float | None = 0.90,
        ns_steps: int = 5,
        ns_coefficients: ScheduleSpec = DEFAULT_SCHEDULE,
        eps: float = 1e-7,
        adjust_lr_fn: AdjustLrFn = "match_rms_adamw",
        ns_dtype: NsDtype = "auto",
        betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        *,
        nonfinite_grads: NonfiniteGrads = "raise",
        process_group: Any = "auto",
    ) -> None:
        if nonfinite_grads not in NONFINITE_MODES:
            raise ValueError(f"Invalid nonfinite_grads: {nonfinite_grads!r}. Must be one of {NONFINITE_MODES}.")
        self.nonfinite_grads = nonfinite_grads
        self.process_group = process_group
        # Diagnostics: set ``collect_diagnostics = True`` before a step; that step fills ``last_diagnostics``.
        self.collect_diagnostics = False
        self.last_diagnostics: dict[str, float] = {}
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            clip_quantile=clip_quantile,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            eps=eps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
            betas=betas,
            adamw_eps=adamw_eps,
            use_root=None,
            matrix_view="flatten",
            matrix_split=None,
        )
        _validate_group(dict(defaults))
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; a group without ``use_root`` is split into a ROOT group (ndim >= 2) and an AdamW group."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}.")
        use_root = param_group.get("use_root", self.defaults["use_root"])
        if use_root is None:
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)

            def ndim(entry: Any) -> int:
                return (entry[1] if isinstance(entry, tuple) else entry).dim()

            for flag, members in (
                (True, [e for e in params if ndim(e) >= 2]),
                (False, [e for e in params if ndim(e) < 2]),
            ):
                if members:
                    self.add_param_group({**param_group, "params": members, "use_root": flag})
            return
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group(group)
        if group["use_root"]:
            for p in group["params"]:
                if p.dim() < 2:
                    raise _flat_param_error(tuple(p.shape))
                param_view(p.shape, group["matrix_view"], group["matrix_split"])  # split sizes must fit

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite_grads", "raise")
        self.__dict__.setdefault("process_group", "auto")
        self.__dict__.setdefault("collect_diagnostics", False)
        self.__dict__.setdefault("last_diagnostics", {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state; unlike ``torch.optim.Optimizer``, floating state keeps float32 for half-precision params."""
        saved_state = state_dict["state"]
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params, strict=False):
            if pid not in saved_state or p.dtype not in _HALF:
                continue
            for key, value in saved_state[pid].items():
                if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32)

    def _grads_finite(self) -> bool:
        """True if every gradient is finite; under FSDP2 the answer is agreed over the mesh (shards differ)."""
        with_grad = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not with_grad:
            return True
        local = [local_tensor(p.grad) for p in with_grad]
        norms = [
            torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)).reshape(1) for g in local
        ]
        finite = bool(torch.isfinite(torch.cat([n.to(norms[0]) for n in norms])).all())
        sharded = [p for p in with_grad if local_tensor(p) is not p]
        if sharded:
            finite = plan_for(sharded[:1]).all_true(finite, local[0].device)
        return finite

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.nonfinite_grads != "ignore" and not self._grads_finite():
            if self.nonfinite_grads == "raise":
                raise FloatingPointError(
                    "ROOT.step() received a non-finite gradient (inf or NaN); no parameter or state was changed. "
                    "Lower the learning rate, use gradient clipping or a GradScaler (which skips such steps), or "
                    "construct ROOT(..., nonfinite_grads='skip') to skip these steps with a warning."
                )
            warnings.warn("ROOT skipped a step with a non-finite gradient; nothing was changed.", stacklevel=2)
            return loss
        collect = self.collect_diagnostics
        diag: dict[str, dict[str, list[torch.Tensor]]] = {"root": defaultdict(list), "adamw": defaultdict(list)}
        for group in self.param_groups:
            params, grads = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise ValueError("ROOT does not support sparse gradients or complex parameters.")
                params.append(p)
                grads.append(p.grad)
            if not params:
                continue
            if group["use_root"]:
                bufs = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(
                            p, dtype=_state_dtype(p), memory_format=torch.contiguous_format
                        )
                    bufs.append(state["momentum_buffer"])
                root(
                    params,
                    grads,
                    bufs,
                    **{k: group[k] for k in _ROOT_KEYS},
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    diagnostics=diag["root"] if collect else None,
                    process_group=self.process_group,
                )
            else:
                exp_avgs, exp_avg_sqs, steps = [], [], []
                for p in params:
                    state = self.state[p]
                    if "step" not in state:
                        # float32 scalar tensor, as torch.optim.AdamW, so state dicts look the same.
                        state["step"] = torch.tensor(0.0, dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p, dtype=_state_dtype(p))
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=_state_dtype(p))
                    exp_avgs.append(local_tensor(state["exp_avg"]))
                    exp_avg_sqs.append(local_tensor(state["exp_avg_sq"]))
                    steps.append(state["step"])
                beta1, beta2 = group["betas"]
                adamw(  # elementwise: local shards of FSDP2 DTensors are enough
                    [local_tensor(p) for p in params],
                    [local_tensor(g) for g in grads],
                    exp_avgs,
                    exp_avg_sqs,
                    steps,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["adamw_eps"],
                    weight_decay=group["weight_decay"],
                    diagnostics=diag["adamw"] if collect else None,
                )
        if collect:
            self.last_diagnostics = {
                f"{branch}/{name}": float(torch.cat([v.float().cpu() for v in values]).mean())
                for branch, stats in diag.items()
                for name, values in stats.items()
            }
        return loss
