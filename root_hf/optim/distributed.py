"""Distributed execution of ROOT's Newton-Schulz step: DDP work splitting and DTensor params on any device mesh.

Newton-Schulz needs whole matrices: orthogonalizing each shard of a sharded matrix on its own is wrong (measured
relative error 0.43 against the dense result). And under data parallelism every replica holds the same gradients, so
repeating every matrix's Newton-Schulz on every rank wastes the work of all replicas but one. Both cases are solved the
same way: every independent matrix (an expert of a fused `(E, out, in)` tensor and a block of a `matrix_split` count
as one each) gets one *owner* rank, chosen by longest-processing-time-first over its Newton-Schulz FLOPs; only the
owner clips and orthogonalizes it (so the quantile threshold is the unsharded one); the result is sent back to the
ranks that hold a piece of it.

- DDP owner split (plain tensors, `process_group="default"` or a `ProcessGroup` of world size > 1; only correct when
  the gradients are identical on all ranks, as under DDP): each rank orthogonalizes the matrices it owns, then one
  `all_gather` gives every rank every result, bitwise identical on all ranks. `process_group=None` turns it off.
- `DTensor` params (FSDP2, HSDP, tensor parallel, FSDP + TP: any mesh whose placements are `Replicate` or `Shard(d)`,
  `_StridedShard` included, several mesh dims possibly sharding the same tensor dim): every rank's piece of every
  matrix is computed from the global shape, the mesh and the placements (no communication); one `all_to_all` over the
  mesh sends each piece of `U_t` to the matrix's owner (from the holder nearest to it in the mesh: within its replica
  under HSDP), a second sends every holder of a piece, replicas included, its piece of the result. A matrix that some
  ranks hold whole (experts sharded on the expert dim) is owned by one of them and needs no gather; one held whole by
  every rank of the mesh needs neither.
- The layout (pieces, owners, split sizes) depends only on the shapes, the mesh and the placements: it is computed
  once per layout and cached, so a steady step makes no host sync here.

Everything elementwise (momentum, weight decay, the update, the AdamW branch) runs on the local shards.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .views import Block, ParamView, as_batch, param_view

__all__ = ["DistributedPlan", "assign_owners", "local_grad", "local_tensor", "ns_cost", "plan_for", "plan_groups"]

# A selection along one dim: a contiguous range (a `slice` with start and stop) or an index tensor (CPU, int64).
Sel = slice | torch.Tensor


def _dtensor_type() -> type | None:
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def _is_dtensor(t: torch.Tensor) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def _shard_like(placement: Any) -> bool:
    """`Shard(d)` or `_StridedShard(d)` (FSDP on top of tensor parallelism on the same tensor dim)."""
    return placement.is_shard() or hasattr(placement, "split_factor")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a `DTensor` (sharing storage, so in-place updates reach the param), else `t` itself."""
    return t.to_local() if _is_dtensor(t) else t


def local_grad(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The local shard of `grad`, laid out as `param` (a gradient with other placements, e.g. `Partial`, is
    redistributed first), else `grad` itself."""
    if _is_dtensor(grad) and _is_dtensor(param) and tuple(grad.placements) != tuple(param.placements):
        grad = grad.redistribute(param.device_mesh, param.placements)
    return local_tensor(grad)


def ns_cost(shape: tuple[int, int]) -> int:
    """FLOPs of one Newton-Schulz step on an `m x n` matrix: `~2 k^2 (2 K + k)`, `k = min(m, n)`, `K = max(m, n)`."""
    return 2 * min(shape) ** 2 * (2 * max(shape) + min(shape))


def assign_owners(
    shapes: list[tuple[int, int]],
    world_size: int,
    candidates: Sequence[Sequence[int] | None] | None = None,
    initial_loads: Sequence[int] | None = None,
) -> list[int]:
    """Owner rank of each `(m, n)` matrix, balancing Newton-Schulz FLOPs (longest-processing-time-first greedy).

    Args:
        shapes: the matrices' shapes.
        world_size: the ranks to balance over.
        candidates: per matrix, the ranks allowed to own it (None: any rank), e.g. the ranks that hold it whole.
        initial_loads: FLOPs the ranks already own (the groups planned before this one), else zeros.

    Returns:
        One owner per matrix. It depends only on the arguments, so every rank computes the same one.
    """
    cands = None if candidates is None else tuple(map(_tuple, candidates))
    loads = tuple(initial_loads) if initial_loads is not None else (0,) * world_size
    return list(_assign_owners(tuple(shapes), world_size, cands, loads))


def _tuple(c: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if c is None else tuple(c)


@functools.lru_cache(maxsize=256)
def _assign_owners(
    shapes: tuple[tuple[int, int], ...],
    world_size: int,
    candidates: tuple[tuple[int, ...] | None, ...] | None,
    initial_loads: tuple[int, ...],
) -> tuple[int, ...]:
    cost = [ns_cost(s) for s in shapes]
    load = list(initial_loads)
    owners = [0] * len(shapes)
    everyone = range(world_size)
    for i in sorted(range(len(shapes)), key=lambda i: (-cost[i], i)):
        allowed = (candidates[i] if candidates is not None else None) or everyone
        rank = min(allowed, key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += cost[i]
    return tuple(owners)


# -- selections ------------------------------------------------------------------------------------------------------


def _compact(idx: torch.Tensor) -> Sel:
    """An index tensor as a `slice` when it is a contiguous ascending range."""
    n = idx.numel()
    if n == 0:
        return slice(0, 0)
    first = int(idx[0])
    if bool((idx == torch.arange(first, first + n)).all()):
        return slice(first, first + n)
    return idx


def _sel_len(s: Sel) -> int:
    return s.stop - s.start if isinstance(s, slice) else s.numel()


def _sel_tensor(s: Sel) -> torch.Tensor:
    return torch.arange(s.start, s.stop) if isinstance(s, slice) else s


def _intersect(sel: Sel, lo: int, hi: int) -> tuple[Sel, Sel]:
    """Of the global indices `sel` (held locally in that order), those in `[lo, hi)`: their local positions and their
    positions relative to `lo`."""
    if isinstance(sel, slice):
        a, b = max(sel.start, lo), min(sel.stop, hi)
        if b <= a:
            return slice(0, 0), slice(0, 0)
        return slice(a - sel.start, b - sel.start), slice(a - lo, b - lo)
    inside = ((sel >= lo) & (sel < hi)).nonzero().view(-1)
    return _compact(inside), _compact(sel[inside] - lo)


def _take(x: torch.Tensor, rows: Sel, cols: Sel) -> torch.Tensor:
    """`x[rows][:, cols]` of a 2-D tensor (a view when both are ranges)."""
    x = x[rows] if isinstance(rows, slice) else x.index_select(0, rows.to(x.device))
    return x[:, cols] if isinstance(cols, slice) else x.index_select(1, cols.to(x.device))


def _put(x: torch.Tensor, rows: Sel, cols: Sel, value: torch.Tensor) -> None:
    """`x[rows][:, cols] = value` of a 2-D tensor."""
    if isinstance(rows, slice) and isinstance(cols, slice):
        x[rows, cols].copy_(value)
    else:
        r, c = _sel_tensor(rows).to(x.device), _sel_tensor(cols).to(x.device)
        x.index_put_((r.view(-1, 1), c.view(1, -1)), value.to(x.dtype))


# -- layouts ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Region:
    """The part of a param's `(batch, M, N)` view held by one rank: global batch, row and column indices."""

    batch: Sel
    rows: Sel
    cols: Sel

    @property
    def numel(self) -> int:
        return _sel_len(self.batch) * _sel_len(self.rows) * _sel_len(self.cols)


def _dim_indices(size: int, dim: int, mesh_shape: tuple[int, ...], coord: tuple[int, ...], placements) -> torch.Tensor:
    """Global indices along tensor dim `dim` held at mesh coordinate `coord`, in local order: each `Shard(dim)` (or
    `_StridedShard(dim)`) placement splits them as torch itself does, mesh dims left to right."""
    idx = torch.arange(size)
    for mesh_dim, placement in enumerate(placements):
        if _shard_like(placement) and placement.dim == dim:
            shards, _ = placement._split_tensor(
                idx.view([1] * dim + [-1]), mesh_shape[mesh_dim], with_padding=False, contiguous=False
            )
            idx = shards[coord[mesh_dim]].reshape(-1) if coord[mesh_dim] < len(shards) else idx[:0]
    return idx


def _region(shape: tuple[int, ...], view: ParamView, batched: bool, per_dim: list[torch.Tensor]) -> _Region:
    """Map per-tensor-dim global indices onto the `(batch, M, N)` view of `matrix_view`."""

    def combine(dims: range) -> torch.Tensor:  # row-major flattening of several dims' index sets
        flat = torch.zeros(1, dtype=torch.int64)
        for d in dims:
            flat = (flat.view(-1, 1) * shape[d] + per_dim[d].view(1, -1)).view(-1)
        return flat

    nd = len(shape)
    if batched:
        return _Region(_compact(combine(range(nd - 2))), _compact(per_dim[nd - 2]), _compact(per_dim[nd - 1]))
    return _Region(slice(0, 1), _compact(per_dim[0]), _compact(combine(range(1, nd))))


@dataclass
class _Piece:
    """One rank's part of one unit (an independent matrix): where it sits in the local `(batch, M, N)` tensor of
    param `param` (batch index `local_batch`, `local_rows` x `local_cols`) and in the unit (`unit_rows` x
    `unit_cols`)."""

    unit: int
    param: int
    local_batch: int
    local_rows: Sel
    local_cols: Sel
    unit_rows: Sel
    unit_cols: Sel
    numel: int


@dataclass
class _MeshLayout:
    """The cached plan of one step on a list of DTensor params of one mesh, seen from one rank."""

    units: list[tuple[int, int, Block]]  # (param, global batch index, block)
    owners: list[int]  # group rank of each unit's owner
    gather_send: list[list[_Piece]]  # per destination rank (never this rank): pieces of local U_t to send
    gather_recv: list[list[_Piece]]  # per source rank (never this rank): pieces of owned units to receive
    gather_self: list[_Piece]  # pieces of owned units held here
    scatter_send: list[list[_Piece]]  # per destination rank: pieces of owned results to send (the receiver's piece)
    scatter_recv: list[list[_Piece]]  # per source (owner) rank: pieces of results to receive and apply
    scatter_self: list[_Piece]  # pieces of owned results applied here
    gather_needed: bool  # any rank sends anything in the gather (else the collective is skipped everywhere)
    scatter_needed: bool
    loads: list[int]  # Newton-Schulz FLOPs owned by each rank (for the docs and tests)


def _mesh_group(mesh: Any) -> tuple[Any, list[int]]:
    """A process group over every rank of `mesh`, and the group rank of each flat mesh coordinate."""
    if mesh.ndim == 1:
        group = mesh.get_group()
    elif mesh.size() == dist.get_world_size():
        group = dist.group.WORLD
    else:
        group = mesh._flatten().get_group()
    global_ranks = mesh.mesh.reshape(-1).tolist()
    return group, [dist.get_group_rank(group, r) for r in global_ranks]


def _mesh_layout(
    key: tuple, mesh: Any, rank: int, group_ranks: tuple[int, ...], initial_loads: list[int]
) -> _MeshLayout:
    """Compute the plan for the params described by `key` (per param: global shape, placements, view, split), owners
    balanced on top of `initial_loads` (per group rank)."""
    mesh_shape = tuple(mesh.shape)
    coords = list(itertools.product(*(range(s) for s in mesh_shape)))  # row-major, as mesh.mesh.reshape(-1)
    world = len(group_ranks)
    units: list[tuple[int, int, Block]] = []
    regions: list[list[_Region]] = []  # [param][flat coordinate]
    for j, (shape, placements, view_name, split) in enumerate(key):
        view = param_view(shape, view_name, None if split is None else [split[0], list(split[1])])
        regions.append(
            [
                _region(
                    shape,
                    view,
                    view_name == "batched",
                    [_dim_indices(s, d, mesh_shape, c, placements) for d, s in enumerate(shape)],
                )
                for c in coords
            ]
        )
        units += [(j, e, blk) for e in range(view.batch) for blk in view.blocks if blk.shape[0] * blk.shape[1] > 0]

    def piece(q: int, k: int) -> _Piece | None:
        j, e, blk = units[q]
        reg = regions[j][k]
        if isinstance(reg.batch, slice):
            if not reg.batch.start <= e < reg.batch.stop:
                return None
            lb = e - reg.batch.start
        else:
            hit = (reg.batch == e).nonzero().view(-1)
            if hit.numel() == 0:
                return None
            lb = int(hit[0])
        m_all, n_all = key[j][0][-2:] if key[j][2] == "batched" else (key[j][0][0], math.prod(key[j][0][1:]))
        r0 = blk.rows.start or 0
        c0 = blk.cols.start or 0
        lr, ur = _intersect(reg.rows, r0, blk.rows.stop if blk.rows.stop is not None else m_all)
        lc, uc = _intersect(reg.cols, c0, blk.cols.stop if blk.cols.stop is not None else n_all)
        numel = _sel_len(lr) * _sel_len(lc)
        return _Piece(q, j, lb, lr, lc, ur, uc, numel) if numel > 0 else None

    pieces = [[piece(q, k) for k in range(len(coords))] for q in range(len(units))]
    # candidates: the ranks that hold the unit whole (no gather needed), else every rank
    shapes = [blk.shape for _, _, blk in units]
    candidates = []
    for q, shape in enumerate(shapes):
        whole = [k for k, p in enumerate(pieces[q]) if p is not None and p.numel == shape[0] * shape[1]]
        candidates.append(tuple(whole) or None)
    initial = [initial_loads[group_ranks[k]] for k in range(len(coords))]
    owners_k = assign_owners(shapes, len(coords), candidates, initial)  # flat mesh coordinates

    def distance(a: int, b: int) -> tuple[int, int]:
        return (sum(x != y for x, y in zip(coords[a], coords[b], strict=True)), b)

    me = group_ranks.index(rank)
    layout = _MeshLayout(
        units=units,
        owners=[group_ranks[k] for k in owners_k],
        gather_send=[[] for _ in range(world)],
        gather_recv=[[] for _ in range(world)],
        gather_self=[],
        scatter_send=[[] for _ in range(world)],
        scatter_recv=[[] for _ in range(world)],
        scatter_self=[],
        gather_needed=False,
        scatter_needed=False,
        loads=[0] * world,
    )
    for q, o in enumerate(owners_k):
        layout.loads[group_ranks[o]] += ns_cost(shapes[q])
        held = [k for k, p in enumerate(pieces[q]) if p is not None]
        # gather: one holder per distinct piece, the nearest to the owner in the mesh (the owner itself if it can)
        by_piece: dict[tuple, list[int]] = defaultdict(list)
        for k in held:
            p = pieces[q][k]
            by_piece[(_key(p.unit_rows), _key(p.unit_cols))].append(k)
        for holders in by_piece.values():
            src = min(holders, key=lambda k: distance(o, k))
            if src != o:
                layout.gather_needed = True
            if me == o and src == o:
                layout.gather_self.append(pieces[q][o])
            elif me == o:
                layout.gather_recv[group_ranks[src]].append(pieces[q][src])
            elif me == src:
                layout.gather_send[group_ranks[o]].append(pieces[q][src])
        # scatter: every holder gets its piece of the result
        for k in held:
            if k != o:
                layout.scatter_needed = True
            if me == o and k == o:
                layout.scatter_self.append(pieces[q][o])
            elif me == o:
                layout.scatter_send[group_ranks[k]].append(pieces[q][k])
            elif me == k:
                layout.scatter_recv[group_ranks[o]].append(pieces[q][k])
    return layout


def _key(s: Sel) -> tuple:
    return (s.start, s.stop) if isinstance(s, slice) else tuple(s.tolist())


@dataclass
class _DdpLayout:
    """The cached plan of a DDP owner split: units, owners, and where each result lies in the gathered buffer."""

    units: list[tuple[int, int, Block]]
    owners: list[int]
    offsets: list[int]  # offset of each unit's result in the all-gathered buffer
    width: int  # per-rank width of the all-gathered buffer
    loads: list[int]


def _ddp_layout(key: tuple, world: int, initial_loads: list[int]) -> _DdpLayout:
    units: list[tuple[int, int, Block]] = []
    for j, (shape, view_name, split) in enumerate(key):
        view = param_view(shape, view_name, None if split is None else [split[0], list(split[1])])
        units += [(j, e, blk) for e in range(view.batch) for blk in view.blocks if blk.shape[0] * blk.shape[1] > 0]
    shapes = [blk.shape for _, _, blk in units]
    owners = assign_owners(shapes, world, None, initial_loads)
    sizes = [m * n for m, n in shapes]
    per_rank = [0] * world
    offsets = [0] * len(units)
    loads = [0] * world
    for q, r in enumerate(owners):
        offsets[q] = per_rank[r]
        per_rank[r] += sizes[q]
        loads[r] += ns_cost(shapes[q])
    width = max(per_rank)
    offsets = [o + owners[q] * width for q, o in enumerate(offsets)]
    return _DdpLayout(units, owners, offsets, width, loads)


def _split_key(split: Any) -> tuple | None:
    return None if split is None else (int(split[0]), tuple(int(s) for s in split[1]))


def _local_batch(t: torch.Tensor, view_name: str) -> torch.Tensor:
    """A local tensor (a shard, possibly empty) as `(batch, M, N)`: `"batched"` keeps the last two dims."""
    if view_name == "batched":
        return t.reshape(math.prod(t.shape[:-2]), t.shape[-2], t.shape[-1])
    return t.reshape(1, t.shape[0], math.prod(t.shape[1:]))


class _Adder:
    """Collects `target += alpha * x` updates and applies them in bulk (`torch._foreach_add_` per alpha)."""

    def __init__(self) -> None:
        self.pending: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = defaultdict(lambda: ([], []))

    def add(self, target: torch.Tensor, rows: Sel, cols: Sel, x: torch.Tensor, alpha: float) -> None:
        if isinstance(rows, slice) and isinstance(cols, slice):
            targets, updates = self.pending[alpha]
            targets.append(target[rows, cols])
            updates.append(x)
        else:  # strided index sets (never in the layouts accelerate builds): one indexed accumulate
            r, c = _sel_tensor(rows).to(target.device), _sel_tensor(cols).to(target.device)
            target.index_put_((r.view(-1, 1), c.view(1, -1)), (x * alpha).to(target.dtype), accumulate=True)

    def flush(self) -> None:
        for alpha, (targets, updates) in self.pending.items():
            if targets[0].dtype == updates[0].dtype and all(t.dtype == targets[0].dtype for t in targets):
                torch._foreach_add_(targets, updates, alpha=alpha)
            else:  # mixed dtypes (half params, float32 NS): the in-place add promotes
                for t, u in zip(targets, updates, strict=True):
                    t.add_(u, alpha=alpha)
        self.pending.clear()


class DistributedPlan:
    """How one ROOT step on a list of matrices is spread over ranks.

    Attributes:
        mode: `"single"` (every rank computes everything), `"ddp"` (owner split of plain tensors over `group`) or
            `"fsdp2"` (DTensor params on a device mesh: FSDP2, HSDP, tensor parallel, FSDP + TP).
        group: the process group (None for `"single"`; for a mesh, a group over all its ranks).
        rank, world_size: this process's rank in `group` and the group size.
        mesh: the `DeviceMesh` of `"fsdp2"` plans, else None.
    """

    def __init__(self, mode: str, group: Any = None, mesh: Any = None) -> None:
        self.mode = mode
        self.mesh = mesh
        self.group_ranks: tuple[int, ...] = ()
        if mesh is not None:
            group, ranks = _mesh_group(mesh)
            self.group_ranks = tuple(ranks)
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self._layouts: dict[tuple, Any] = {}  # layout key -> cached plan of one step
        self._loads = [0] * self.world_size  # NS FLOPs owned per rank over the cached layouts

    def owner_loads(self, params: list[torch.Tensor], matrix_view: str, matrix_split: Any) -> list[int]:
        """Newton-Schulz FLOPs per step owned by each rank of the group, for `params` under this plan."""
        if self.mode == "fsdp2":
            return list(self._mesh_layout(params, matrix_view, matrix_split).loads)
        if self.mode == "ddp":
            return list(self._ddp_layout(params, matrix_view, matrix_split).loads)
        views = [param_view(p.shape, matrix_view, matrix_split) for p in params]
        return [sum(ns_cost(b.shape) * v.batch for v in views for b in v.blocks)]

    def _mesh_layout(self, params: list[torch.Tensor], matrix_view: str, matrix_split: Any) -> _MeshLayout:
        split = _split_key(matrix_split)
        key = tuple((tuple(p.shape), tuple(p.placements), matrix_view, split) for p in params)
        layout = self._layouts.get(key)
        if layout is None:
            layout = _mesh_layout(key, self.mesh, self.rank, self.group_ranks, self._loads)
            self._remember(key, layout)
        return layout

    def _ddp_layout(self, params: list[torch.Tensor], matrix_view: str, matrix_split: Any) -> _DdpLayout:
        split = _split_key(matrix_split)
        key = tuple((tuple(p.shape), matrix_view, split) for p in params)
        layout = self._layouts.get(key)
        if layout is None:
            layout = _ddp_layout(key, self.world_size, self._loads)
            self._remember(key, layout)
        return layout

    def _remember(self, key: tuple, layout: Any) -> None:
        """Cache a layout; later layouts (the next param groups) are balanced on top of its loads. Every rank plans
        the same groups in the same order, so they all compute the same owners."""
        self._layouts[key] = layout
        self._loads = [a + b for a, b in zip(self._loads, layout.loads, strict=True)]

    # -- DDP: every rank has full U; owners orthogonalize; one all_gather of the results ----------------------------
    def ddp_step(
        self,
        step: Any,
        p_loc: list[torch.Tensor],
        g_loc: list[torch.Tensor],
        b_loc: list[torch.Tensor],
        matrix_view: str,
        matrix_split: Any,
        out_dtype: torch.dtype,
    ) -> None:
        """Momentum on every rank (replicated), clip + Newton-Schulz of owned matrices, `all_gather`, bulk add."""
        layout = self._ddp_layout(p_loc, matrix_view, matrix_split)
        views = [param_view(p.shape, matrix_view, matrix_split) for p in p_loc]
        work = [p if p.is_contiguous() else p.contiguous() for p in p_loc]
        p3 = [as_batch(w, v) for w, v in zip(work, views, strict=True)]
        g3 = [as_batch(g, v) for g, v in zip(g_loc, views, strict=True)]
        b3 = [as_batch(b, v) for b, v in zip(b_loc, views, strict=True)]
        for g, b in zip(g_loc, b_loc, strict=True):
            step.momentum_(b, g)  # M_t on every rank; U_t is only needed by the owner
        device = b_loc[0].device
        send = torch.empty(layout.width, dtype=out_dtype, device=device)
        base = self.rank * layout.width
        owned: dict[tuple[int, int], list[int]] = defaultdict(list)
        for q, (_, _, blk) in enumerate(layout.units):
            if layout.owners[q] == self.rank:
                owned[blk.shape].append(q)
        for shape, qs in owned.items():
            u = torch.stack(
                [
                    step.direction(g3[j][e, blk.rows, blk.cols], b3[j][e, blk.rows, blk.cols])
                    for j, e, blk in (layout.units[q] for q in qs)
                ]
            )
            x = step.ortho(u)
            for k, q in enumerate(qs):
                o = layout.offsets[q] - base
                send[o : o + shape[0] * shape[1]].view(shape).copy_(x[k])
        recv = torch.empty(self.world_size * layout.width, dtype=out_dtype, device=device)
        dist.all_gather_into_tensor(recv, send, group=self.group)
        adder = _Adder()
        for q, (j, e, blk) in enumerate(layout.units):
            m, n = blk.shape
            o = layout.offsets[q]
            adder.add(p3[j][e], blk.rows, blk.cols, recv[o : o + m * n].view(m, n), step.alpha(blk.shape))
        adder.flush()
        for p, w in zip(p_loc, work, strict=True):
            if w is not p:
                p.copy_(w)

    # -- DTensor params on a mesh: pieces -> owners -> pieces --------------------------------------------------------
    def mesh_step(
        self,
        step: Any,
        params: list[torch.Tensor],
        p_loc: list[torch.Tensor],
        g_loc: list[torch.Tensor],
        b_loc: list[torch.Tensor],
        matrix_view: str,
        matrix_split: Any,
        out_dtype: torch.dtype,
    ) -> None:
        """Momentum and `U_t` on the local shards; one `all_to_all` of the pieces of `U_t` to the owners, whole-matrix
        clip + Newton-Schulz there (batched by shape), one `all_to_all` of the result pieces back, bulk add."""
        layout = self._mesh_layout(params, matrix_view, matrix_split)
        device = b_loc[0].device
        work_dtype = b_loc[0].dtype
        work = [p if p.is_contiguous() else p.contiguous() for p in p_loc]
        p3 = [_local_batch(w, matrix_view) for w in work]
        for g, b in zip(g_loc, b_loc, strict=True):
            step.momentum_(b, g)  # M_t, on the local shard
        u3 = [_local_batch(step.direction(g, b), matrix_view) for g, b in zip(g_loc, b_loc, strict=True)]
        send = [
            _take(u3[pc.param][pc.local_batch], pc.local_rows, pc.local_cols).reshape(-1)
            for dest in layout.gather_send
            for pc in dest
        ]
        send_splits = [sum(pc.numel for pc in dest) for dest in layout.gather_send]
        recv_splits = [sum(pc.numel for pc in src) for src in layout.gather_recv]
        recv = torch.empty(sum(recv_splits), dtype=work_dtype, device=device)
        if layout.gather_needed:
            send_buf = torch.cat(send) if send else torch.empty(0, dtype=work_dtype, device=device)
            dist.all_to_all_single(recv, send_buf, recv_splits, send_splits, group=self.group)
        # the owned units, assembled into one (count, m, n) buffer per shape
        slot: dict[int, tuple[tuple[int, int], int]] = {}
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for q, (_, _, blk) in enumerate(layout.units):
            if layout.owners[q] == self.rank:
                slot[q] = (blk.shape, counts[blk.shape])
                counts[blk.shape] += 1
        full = {shape: torch.empty((c, *shape), dtype=work_dtype, device=device) for shape, c in counts.items()}
        for pc in layout.gather_self:
            shape, k = slot[pc.unit]
            _put(
                full[shape][k],
                pc.unit_rows,
                pc.unit_cols,
                _take(u3[pc.param][pc.local_batch], pc.local_rows, pc.local_cols),
            )
        offset = 0
        for src in layout.gather_recv:
            for pc in src:
                shape, k = slot[pc.unit]
                piece = recv[offset : offset + pc.numel].view(_sel_len(pc.unit_rows), _sel_len(pc.unit_cols))
                _put(full[shape][k], pc.unit_rows, pc.unit_cols, piece)
                offset += pc.numel
        del recv, send
        results = {shape: step.ortho(u) for shape, u in full.items()}  # clip, normalize, Newton-Schulz
        del full
        adder = _Adder()

        def result(pc: _Piece) -> torch.Tensor:
            shape, k = slot[pc.unit]
            return _take(results[shape][k], pc.unit_rows, pc.unit_cols)

        for pc in layout.scatter_self:
            shape, _ = slot[pc.unit]
            adder.add(p3[pc.param][pc.local_batch], pc.local_rows, pc.local_cols, result(pc), step.alpha(shape))
        send_splits = [sum(pc.numel for pc in dest) for dest in layout.scatter_send]
        recv_splits = [sum(pc.numel for pc in src) for src in layout.scatter_recv]
        if layout.scatter_needed:
            chunks = [result(pc).to(out_dtype).reshape(-1) for dest in layout.scatter_send for pc in dest]
            send_buf = torch.cat(chunks) if chunks else torch.empty(0, dtype=out_dtype, device=device)
            recv = torch.empty(sum(recv_splits), dtype=out_dtype, device=device)
            dist.all_to_all_single(recv, send_buf, recv_splits, send_splits, group=self.group)
            offset = 0
            for src in layout.scatter_recv:
                for pc in src:
                    piece = recv[offset : offset + pc.numel].view(_sel_len(pc.local_rows), _sel_len(pc.local_cols))
                    adder.add(
                        p3[pc.param][pc.local_batch],
                        pc.local_rows,
                        pc.local_cols,
                        piece,
                        step.alpha(layout.units[pc.unit][2].shape),
                    )
                    offset += pc.numel
        adder.flush()
        for p, w in zip(p_loc, work, strict=True):
            if w is not p:
                p.copy_(w)

    def any_(self, flag: torch.Tensor) -> torch.Tensor:
        """Logical OR of a one-element tensor (bool or number, nonzero = True) over the group, as a bool tensor on
        its device: no host sync (for a device-side non-finite check agreed over the mesh)."""
        t = flag.detach().reshape(1).to(torch.float32)
        if self.group is not None:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t[0] > 0


def _check_placements(p: torch.Tensor) -> None:
    for placement in p.placements:
        if not (placement.is_replicate() or _shard_like(placement)):
            raise NotImplementedError(
                f"ROOT supports DTensor params whose placements are Replicate or Shard(d) on every mesh dim (FSDP2, "
                f"HSDP, tensor parallel, FSDP + TP); got {tuple(p.placements)} on a mesh of shape "
                f"{tuple(p.device_mesh.shape)}."
            )


def _mesh_plan(mesh: Any) -> DistributedPlan:
    """One plan per mesh, by value (FSDP2 gives the params of each module an equal but distinct mesh object), within
    the current default process group (an equal mesh built after a new `init_process_group` gets a new plan)."""
    return _cached_mesh_plan(mesh, dist.group.WORLD)


@functools.lru_cache(maxsize=64)
def _cached_mesh_plan(mesh: Any, world: Any) -> DistributedPlan:
    return DistributedPlan("fsdp2", mesh=mesh)


def plan_groups(params: list[torch.Tensor], process_group: Any = None) -> list[tuple[DistributedPlan, list[int]]]:
    """Plan each parameter on its own: DTensor params by their mesh (one plan per mesh), plain tensors by
    `process_group` (DDP owner split, or every rank computes them). A group may mix both (FSDP2 `ignored_params`).

    Returns:
        `(plan, indices into params)` pairs, DTensor meshes first in the order of their first param, then plain
        tensors; every index once.
    """
    by_mesh: dict[Any, list[int]] = {}
    plain: list[int] = []
    for i, p in enumerate(params):
        if _is_dtensor(p):
            _check_placements(p)
            by_mesh.setdefault(p.device_mesh, []).append(i)
        else:
            plain.append(i)
    out = [(_mesh_plan(mesh), idx) for mesh, idx in by_mesh.items()]
    if plain:
        out.append((_plain_plan(process_group), plain))
    return out


def _plain_plan(process_group: Any) -> DistributedPlan:
    if process_group is None or not (dist.is_available() and dist.is_initialized()):
        return DistributedPlan("single")
    group = dist.group.WORLD if isinstance(process_group, str) else process_group  # "default"
    if dist.get_world_size(group) <= 1:
        return DistributedPlan("single")
    return _ddp_plan(group)


@functools.lru_cache(maxsize=16)
def _ddp_plan(group: Any) -> DistributedPlan:
    return DistributedPlan("ddp", group)


def plan_for(params: list[torch.Tensor], process_group: Any = None) -> DistributedPlan:
    """The plan that splits the most work for `params`: the mesh of their first DTensor if any (`"fsdp2"`), else
    `"ddp"` if `process_group` names a group of more than one rank in an initialized `torch.distributed`, else
    `"single"`. `plan_groups` plans each param; this summary names the strategy and the group that diagnostics and
    the non-finite check are reduced over.

    Args:
        params: the ROOT-branch params of the step.
        process_group: None: no DDP work split; `"default"`: torch.distributed's default group; or a `ProcessGroup`.

    Raises:
        NotImplementedError: for DTensor placements other than Replicate and Shard (e.g. Partial).
    """
    plans = plan_groups(params, process_group)
    return plans[0][0] if plans else DistributedPlan("single")
