"""What ROOT's owner split costs and saves at 64 GPUs: a model of its traffic and Newton-Schulz work (no GPU needed).

Usage:
    python benchmarks/distributed_sim.py            # Llama-3.1-8B and -70B on 8 nodes x 8 H100, HSDP and FSDP + TP
    python benchmarks/distributed_sim.py --quick    # Llama-3.1-8B only
    python benchmarks/distributed_sim.py --tokens 4194304 --mfu 0.4 --matmul-efficiency 0.7 --gram-restarts 2

Pure arithmetic (standard library only; no torch, no torch.distributed): it prints its assumptions, then Markdown
tables. For each model, layout and design it reports, per optimizer step and per rank, the bytes ROOT sends and
receives beyond what the same run with AdamW sends, the Newton-Schulz FLOPs of the busiest rank against the mean rank,
and the time both take at the stated link bandwidths and matmul rate.

What ROOT adds. AdamW's own traffic (FSDP's parameter all-gathers, the gradient reduce-scatter and, under HSDP, the
all-reduce over replicas) is the same with ROOT: ROOT's momentum, weight decay, update and its AdamW branch are
elementwise on the local shards. ROOT adds only the Newton-Schulz round trip of each hidden matrix: the shards of
`U_t` travel to the matrix's owner (in the work dtype: float32, 4 bytes, since the 0.90-quantile clip needs the
whole float32 matrix) and the orthogonalized result travels back (in the Newton-Schulz dtype: bfloat16 on GPUs,
2 bytes). The once-per-layout row-count exchange and the few-byte reductions of the diagnostics are left out.

Cluster and layouts (mesh dims in accelerate's `ParallelismConfig` order `dp_replicate, dp_shard, cp, sp, tp`,
row-major, so the last dim is the 8 GPUs of a node): rank `node * 8 + local`.
- HSDP 8 x 8: `dp_replicate` 8 across the nodes, `dp_shard` 8 within a node. Every matrix is row-sharded (`Shard(0)`,
  `torch.chunk` sizes) over the 8 GPUs of a node, the same shards in every node (after the all-reduce over replicas).
- FSDP 8 x TP 8: `dp_shard` 8 across the nodes, `tp` 8 within a node, Llama's tensor-parallel plan (q, k, v, gate,
  up colwise `Shard(0)`; o, down rowwise `Shard(1)`), FSDP's `Shard(0)` on each TP shard: every rank holds a distinct
  1/64 of every matrix; nothing is replicated.

Designs:
- owner split: one owner per matrix over all 64 ranks, owners balanced greedily by Newton-Schulz FLOPs
  (longest-processing-time first, `root_hf.optim.distributed.assign_owners`' algorithm: matrices in decreasing cost,
  ties by index, each to the least-loaded rank, ties to the lowest rank; costs of the standard form, as the code
  balances today; the other forms are evaluated on that same assignment).
  HSDP: an all-to-all gathers the 8 row shards from the owner's node to the owner (NVLink); the owner clips and
  orthogonalizes; a second all-to-all sends every holder of a piece its rows of the result, the GPUs of the owner's
  node (NVLink) and the same rows' holders in the other replicas (network) alike: the collectives of root_hf's mesh
  path (issue 23). `hsdp_owner_split(..., relay=True)` models the alternative (results within the node, then an
  all-gather over the replicate dim): the same bytes in total, and for these models the same per rank (node-mates
  own the same shapes). FSDP + TP: one all-to-all over all 64 ranks gathers the 64 pieces to the owner (7 over
  NVLink, 56 over the network) and one sends them back.
- HSDP owner split per replica group of g nodes (the second table; g = 8 is the owner split above, g = 1 is the
  split within each node only, every replica repeating every matrix): trades Newton-Schulz FLOPs against network
  bytes.
- gather everywhere: every rank all-gathers every full `U_t` and orthogonalizes every matrix itself (no scatter: each
  rank keeps its rows). HSDP: an all-gather over the shard dim (NVLink). FSDP + TP: an all-gather over the FSDP dim
  (network) then over the TP dim (NVLink), the cheapest order for the network.
Transfers are modelled point to point (an all-to-all or all-gather as its sends): a transfer between GPUs of one node
uses NVLink, any other the sender's and the receiver's network port (one per GPU); a gather to the owner moves the
(n-1)/n of the matrix it does not hold into the owner, the scatter back the same.

Time: per phase, the busiest rank's `max(sent, received) / bandwidth` for NVLink plus the same for the network (links
are full duplex; NVLink and network not overlapped with each other); Newton-Schulz time = the busiest rank's FLOPs /
(bf16 dense peak x `--matmul-efficiency`). No latency, no overlap with the backward pass: the network and NVLink
figures are bandwidth bounds, the FLOP figures are lower bounds at peak rate. The training step estimate is
6 x params x tokens / (GPUs x MFU x peak).

Newton-Schulz FLOPs of an `m x n` matrix, `k = min(m, n)`, `K = max(m, n)`, 5 quintic steps
`X <- a X + (b A + c A^2) X`, `A = X X^T`:
- standard form: per step `X X^T` (2 k^2 K), `A^2` (2 k^3), `(b A + c A^2) X` (2 k^2 K): 5 (4 k^2 K + 2 k^3);
- Gram form (Gram Newton-Schulz, https://tridao.me/blog/2026/gram-newton-schulz/, being added as `ns_method`):
  `R = X X^T` (2 k^2 K) once; per step `P = a I + b R + c R^2` (2 k^3 for `R^2`), `Q <- P Q` (2 k^3; free on the first
  step after a (re)start, where `Q = I`), `R <- P R P` (4 k^3; not after the last step); at the end `X <- Q X`
  (2 k^2 K). A restart after step t re-forms `X <- Q X`, `R = X X^T` (4 k^2 K) and sets `Q = I`; default one restart
  after step 2 (DeepSpeed's Gram Muon restarts at iteration 2 for half precision, microsoft/DeepSpeed PR #7953).
  With that restart: 8 k^2 K + 28 k^3 (vs 20 k^2 K + 10 k^3): cheaper from K > 1.5 k. Dense GEMM FLOPs both; a
  symmetric (SYRK) kernel would halve the Gram products.
- auto: the cheaper of the two per matrix by these FLOPs (what `ns_method="auto"` aims at; its rule is set by
  measured times). The tables show standard / auto.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

# --------------------------------------------------------------------------------------------------------------------
# Assumptions, each with its source
# --------------------------------------------------------------------------------------------------------------------

# NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: BF16 Tensor Core 1,979 TFLOPS "with sparsity"; dense is half.
H100_BF16_DENSE_FLOPS = 989.4e12
# NVIDIA H100 datasheet: NVLink 900 GB/s per GPU (fourth-generation NVLink, both directions together) -> 450 GB/s
# each way.
NVLINK_BYTES_PER_S = 450e9
# NVIDIA ConnectX-7 datasheet: 400 Gb/s per port; NVIDIA DGX H100 user guide: eight ConnectX-7 400 Gb/s InfiniBand /
# Ethernet ports for the compute fabric, one per GPU -> 50 GB/s each way per GPU.
NETWORK_BYTES_PER_S = 400e9 / 8
# The Llama 3 Herd of Models (arXiv 2407.21783), Table 4: 38-43% BF16 model FLOPs utilization on H100s.
MFU = 0.40
# Tokens per optimizer step (global batch): an assumption, 128 sequences of 8,192 tokens.
TOKENS_PER_STEP = 128 * 8192
NODES, GPUS_PER_NODE = 8, 8
NS_STEPS = 5  # ROOT's default ns_steps (root_hf/optim/hyperparams.py)
GATHER_BYTES = 4  # U_t shards to the owner: the float32 work dtype (momentum is float32 for bfloat16 params)
SCATTER_BYTES = 2  # results back: the Newton-Schulz dtype, bfloat16 on CUDA (ns_dtype="auto")
ADAMW_BYTES = 2  # FSDP2 param all-gather and gradient reduction in bf16 (accelerate sets reduce_dtype = param_dtype)
GB = 1e9


@dataclass(frozen=True)
class Llama:
    """A Llama-architecture decoder (no biases, untied embeddings, RMSNorm weights only)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    published_params: float  # the size in the model's name (Meta's model card)

    def matrices(self) -> list[tuple[str, int, int, str]]:
        """ROOT's hidden matrices `(name, out, in, tp_style)` in layer order (route_parameters: one matrix each)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        layer = [("q_proj", q, h, "colwise"), ("k_proj", kv, h, "colwise"), ("v_proj", kv, h, "colwise"),
                 ("o_proj", h, q, "rowwise"), ("gate_proj", i, h, "colwise"), ("up_proj", i, h, "colwise"),
                 ("down_proj", h, i, "rowwise")]  # fmt: skip
        return [(f"layers.{j}.{name}", m, n, tp) for j in range(self.layers) for name, m, n, tp in layer]

    def adamw_params(self) -> int:
        """Parameters on ROOT's AdamW branch: token embeddings, LM head, RMSNorm weights."""
        return 2 * self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden

    def params(self) -> int:
        return sum(m * n for _, m, n, _ in self.matrices()) + self.adamw_params()


# Hugging Face config.json of meta-llama/Llama-3.1-8B and meta-llama/Llama-3.1-70B.
LLAMA_8B = Llama("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128, 128256, 8e9)
LLAMA_70B = Llama("Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128, 128256, 70e9)


# --------------------------------------------------------------------------------------------------------------------
# Newton-Schulz FLOPs and owners
# --------------------------------------------------------------------------------------------------------------------


def ns_flops_standard(m: int, n: int, steps: int = NS_STEPS) -> int:
    """Dense FLOPs of `steps` quintic steps on an `m x n` matrix: `steps * (4 k^2 K + 2 k^3)`."""
    k, big = min(m, n), max(m, n)
    return steps * (4 * k * k * big + 2 * k**3)


def ns_flops_gram(m: int, n: int, steps: int = NS_STEPS, restarts: Sequence[int] = (2,)) -> int:
    """Dense FLOPs of the Gram form: iterate `(Q, R)` on the `k x k` Gram matrix, restart after the given steps."""
    k, big = min(m, n), max(m, n)
    flops = 2 * k * k * big  # R = X X^T
    q_is_identity = True
    for t in range(1, steps + 1):
        flops += 2 * k**3  # R^2 in P = a I + b R + c R^2
        if not q_is_identity:
            flops += 2 * k**3  # Q <- P Q
        q_is_identity = False
        if t == steps:
            break
        if t in restarts:
            flops += 4 * k * k * big  # X <- Q X; R = X X^T
            q_is_identity = True
        else:
            flops += 4 * k**3  # R <- P R P
    return flops + 2 * k * k * big  # X <- Q X


def lpt_owners(costs: Sequence[int], ranks: int) -> list[int]:
    """Owner of each matrix: longest processing time first (decreasing cost, ties by index; least-loaded rank, ties to
    the lowest rank), as `root_hf.optim.distributed.assign_owners`."""
    heap = [(0, r) for r in range(ranks)]  # (load, rank): the heap's minimum is the least-loaded, lowest rank
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (load + costs[i], rank))
    return owners


def chunks(length: int, parts: int) -> list[int]:
    """Sizes of `torch.chunk(range(length), parts)` padded with empty chunks to `parts` (FSDP2's `Shard` sizes)."""
    size = -(-length // parts)
    return [max(0, min(size, length - i * size)) for i in range(parts)]


# --------------------------------------------------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Traffic:
    """Bytes one collective phase moves, per rank: sent and received over NVLink and over the network."""

    ranks: int
    gpus_per_node: int
    nv_sent: list[float] = field(init=False)
    nv_recv: list[float] = field(init=False)
    net_sent: list[float] = field(init=False)
    net_recv: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.nv_sent, self.nv_recv, self.net_sent, self.net_recv = ([0.0] * self.ranks for _ in range(4))

    def move(self, src: int, dst: int, nbytes: float) -> None:
        if src == dst or nbytes == 0:
            return
        if src // self.gpus_per_node == dst // self.gpus_per_node:
            self.nv_sent[src] += nbytes
            self.nv_recv[dst] += nbytes
        else:
            self.net_sent[src] += nbytes
            self.net_recv[dst] += nbytes

    def seconds(self, nvlink: float, network: float) -> float:
        """The busiest rank's time: full-duplex links, NVLink then network."""
        return max(
            max(self.nv_sent[r], self.nv_recv[r]) / nvlink + max(self.net_sent[r], self.net_recv[r]) / network
            for r in range(self.ranks)
        )


@dataclass
class Design:
    """One way to run ROOT's Newton-Schulz step on a layout: its phases' traffic and each rank's FLOPs."""

    phases: dict[str, Traffic]
    flops: dict[str, list[int]]  # form ("std", "gram", "auto") -> per-rank Newton-Schulz FLOPs (the same owners)

    def per_rank(self, attr: str) -> list[float]:
        """Per-rank sum over the phases of one of `Traffic`'s byte lists."""
        lists = [getattr(p, attr) for p in self.phases.values()]
        return [sum(values) for values in zip(*lists, strict=True)]


def _flops(owned: dict[int, list[int]], ranks: int, costs: dict[str, list[int]]) -> dict[str, list[int]]:
    """Per-rank FLOPs of each form: the sum of the costs of the matrices each rank owns."""
    return {form: [sum(cost[i] for i in owned.get(r, ())) for r in range(ranks)] for form, cost in costs.items()}


def hsdp_owner_split(mats: list[tuple[str, int, int, str]], costs: dict[str, list[int]], nodes: int, gpus: int,
                     group_nodes: int, relay: bool = False) -> Design:  # fmt: skip
    """HSDP (replicas = nodes, shards = GPUs of a node): owners over the `group_nodes * gpus` ranks of each replica
    group; one all-to-all gathers the row shards from the owner's node. Results: `relay=False`, one all-to-all from the
    owner to every holder of a piece, replicas included (root_hf's mesh path, issue 23); `relay=True`, an all-to-all
    within the owner's node, then an all-gather over the replica group (each GPU forwards its rows)."""
    if nodes % group_nodes:
        raise ValueError(f"Invalid group_nodes: {group_nodes!r}. Must divide the node count {nodes}.")
    ranks = nodes * gpus
    gather, scatter, replicas = (Traffic(ranks, gpus) for _ in range(3))
    group_owners = lpt_owners(costs["std"], group_nodes * gpus)
    owned: dict[int, list[int]] = {}
    for first_node in range(0, nodes, group_nodes):
        for i, (_, m, n, _) in enumerate(mats):
            owner = first_node * gpus + group_owners[i]
            owned.setdefault(owner, []).append(i)
            node = owner // gpus
            for s, rows in enumerate(chunks(m, gpus)):
                holder = node * gpus + s
                gather.move(holder, owner, rows * n * GATHER_BYTES)
                scatter.move(owner, holder, rows * n * SCATTER_BYTES)
                for peer in range(first_node, first_node + group_nodes):
                    if peer != node:
                        (replicas if relay else scatter).move(
                            holder if relay else owner, peer * gpus + s, rows * n * SCATTER_BYTES
                        )
    phases = {"gather": gather, "scatter": scatter} | ({"replicas": replicas} if relay else {})
    return Design(phases, _flops(owned, ranks, costs))


def _distinct(mats: Sequence[tuple[str, int, int, str]]) -> dict[tuple[int, int, str], int]:
    """`{(out, in, tp_style): count}`: traffic that does not depend on the owner is computed once per shape."""
    counts: dict[tuple[int, int, str], int] = {}
    for _, m, n, style in mats:
        counts[(m, n, style)] = counts.get((m, n, style), 0) + 1
    return counts


def hsdp_gather_everywhere(mats: list[tuple[str, int, int, str]], costs: dict[str, list[int]], nodes: int,
                           gpus: int) -> Design:  # fmt: skip
    """HSDP: every rank all-gathers every matrix over the shard dim (its node) and orthogonalizes all of them."""
    ranks = nodes * gpus
    gather = Traffic(ranks, gpus)
    for (m, n, _), count in _distinct(mats).items():
        for node in range(nodes):
            for s, rows in enumerate(chunks(m, gpus)):
                for peer in range(gpus):
                    gather.move(node * gpus + s, node * gpus + peer, count * rows * n * GATHER_BYTES)
    everything = list(range(len(mats)))
    return Design({"gather": gather}, _flops(dict.fromkeys(range(ranks), everything), ranks, costs))


@functools.cache
def tp_pieces(m: int, n: int, tp_style: str, fsdp: int, tp: int) -> tuple[tuple[int, ...], ...]:
    """`pieces[f][t]`: elements of an `m x n` matrix on rank (FSDP f, TP t): TP colwise `Shard(0)` / rowwise
    `Shard(1)`, then FSDP's `Shard(0)` on the TP shard."""
    if tp_style == "colwise":
        by_tp = [chunks(tp_rows, fsdp) for tp_rows in chunks(m, tp)]  # [t][f] rows
        return tuple(tuple(by_tp[t][f] * n for t in range(tp)) for f in range(fsdp))
    rows = chunks(m, fsdp)
    return tuple(tuple(rows[f] * cols for cols in chunks(n, tp)) for f in range(fsdp))


def fsdp_tp_owner_split(mats: list[tuple[str, int, int, str]], costs: dict[str, list[int]], nodes: int,
                        gpus: int) -> Design:  # fmt: skip
    """FSDP (nodes) x TP (GPUs of a node): one all-to-all over all ranks gathers the pieces to the owner, one sends
    them back."""
    ranks = nodes * gpus
    gather, scatter = Traffic(ranks, gpus), Traffic(ranks, gpus)
    owners = lpt_owners(costs["std"], ranks)
    owned: dict[int, list[int]] = {}
    for i, (_, m, n, style) in enumerate(mats):
        owned.setdefault(owners[i], []).append(i)
        for f, row in enumerate(tp_pieces(m, n, style, nodes, gpus)):
            for t, elements in enumerate(row):
                gather.move(f * gpus + t, owners[i], elements * GATHER_BYTES)
                scatter.move(owners[i], f * gpus + t, elements * SCATTER_BYTES)
    return Design({"gather": gather, "scatter": scatter}, _flops(owned, ranks, costs))


def fsdp_tp_gather_everywhere(mats: list[tuple[str, int, int, str]], costs: dict[str, list[int]], nodes: int,
                              gpus: int) -> Design:  # fmt: skip
    """FSDP x TP: every rank all-gathers every matrix, over the FSDP dim (network) then over the TP dim (NVLink)."""
    ranks = nodes * gpus
    over_fsdp, over_tp = Traffic(ranks, gpus), Traffic(ranks, gpus)
    for (m, n, style), count in _distinct(mats).items():
        pieces = tp_pieces(m, n, style, nodes, gpus)
        for f in range(nodes):
            for t in range(gpus):
                tp_shard = sum(pieces[g][t] for g in range(nodes))
                for peer in range(nodes):
                    over_fsdp.move(f * gpus + t, peer * gpus + t, count * pieces[f][t] * GATHER_BYTES)
                for peer in range(gpus):
                    over_tp.move(f * gpus + t, f * gpus + peer, count * tp_shard * GATHER_BYTES)
    everything = list(range(len(mats)))
    flops = _flops(dict.fromkeys(range(ranks), everything), ranks, costs)
    return Design({"all-gather over FSDP": over_fsdp, "all-gather over TP": over_tp}, flops)


# --------------------------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assumptions:
    matmul_flops: float = H100_BF16_DENSE_FLOPS
    matmul_efficiency: float = 1.0
    nvlink: float = NVLINK_BYTES_PER_S
    network: float = NETWORK_BYTES_PER_S
    tokens: int = TOKENS_PER_STEP
    mfu: float = MFU
    nodes: int = NODES
    gpus_per_node: int = GPUS_PER_NODE
    ns_steps: int = NS_STEPS
    gram_restarts: tuple[int, ...] = (2,)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def train_step_seconds(self, model: Llama) -> float:
        """6 x params x tokens / (GPUs x MFU x peak)."""
        return 6 * model.params() * self.tokens / (self.gpus * self.mfu * self.matmul_flops)


FORMS = {"std": "standard", "gram": "Gram", "auto": "cheaper of the two per matrix"}


def ns_costs(mats: Sequence[tuple[str, int, int, str]], a: Assumptions) -> dict[str, list[int]]:
    """Newton-Schulz FLOPs of each matrix in each form; "auto" picks the cheaper form per matrix (by FLOPs)."""
    std = [ns_flops_standard(m, n, a.ns_steps) for _, m, n, _ in mats]
    gram = [ns_flops_gram(m, n, a.ns_steps, a.gram_restarts) for _, m, n, _ in mats]
    return {"std": std, "gram": gram, "auto": [min(x, y) for x, y in zip(std, gram, strict=True)]}


def row(model: Llama, layout: str, design_name: str, design: Design, a: Assumptions) -> dict[str, object]:
    """The table's figures for one design (bytes: the busiest rank of each column; times: the busiest rank)."""
    comm = sum(p.seconds(a.nvlink, a.network) for p in design.phases.values())
    rate = a.matmul_flops * a.matmul_efficiency
    out: dict[str, object] = {"model": model.name, "layout": layout, "design": design_name, "comm_s": comm}
    for attr in ("nv_sent", "nv_recv", "net_sent", "net_recv"):
        values = design.per_rank(attr)
        out[f"{attr}_max"], out[f"{attr}_total"] = max(values), sum(values)
    for form, flops in design.flops.items():
        out[f"flops_{form}_max"], out[f"flops_{form}_total"] = max(flops), sum(flops)
        out[f"busiest_over_mean_{form}"] = max(flops) / (sum(flops) / len(flops))
        out[f"ns_{form}_s"] = max(flops) / rate
        out[f"total_{form}_s"] = comm + max(flops) / rate
        out[f"step_share_{form}"] = out[f"total_{form}_s"] / a.train_step_seconds(model)
    return out


def simulate(model: Llama, a: Assumptions) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """(main rows, HSDP replica-group rows) for one model."""
    mats = model.matrices()
    costs = ns_costs(mats, a)
    nodes, gpus = a.nodes, a.gpus_per_node
    hsdp, fsdp_tp = f"HSDP {nodes} x {gpus}", f"FSDP {nodes} x TP {gpus}"
    rows = [
        row(model, hsdp, "owner split", hsdp_owner_split(mats, costs, nodes, gpus, nodes), a),
        row(model, hsdp, "owner split within each node (replicas repeat)",
            hsdp_owner_split(mats, costs, nodes, gpus, 1), a),
        row(model, hsdp, "gather everywhere", hsdp_gather_everywhere(mats, costs, nodes, gpus), a),
        row(model, fsdp_tp, "owner split", fsdp_tp_owner_split(mats, costs, nodes, gpus), a),
        row(model, fsdp_tp, "gather everywhere", fsdp_tp_gather_everywhere(mats, costs, nodes, gpus), a),
    ]  # fmt: skip
    groups = [g for g in range(1, nodes + 1) if nodes % g == 0]
    group_rows = [
        row(model, hsdp, f"replica groups of {g}", hsdp_owner_split(mats, costs, nodes, gpus, g), a) for g in groups
    ]
    return rows, group_rows


def adamw_traffic(model: Llama, a: Assumptions) -> dict[str, dict[str, float]]:
    """AdamW's own parameter / gradient traffic per rank and step (both optimizers pay it; for scale only).

    HSDP: parameter all-gather over the shard dim in the forward and again in the backward pass
    (`reshard_after_forward=True`), gradient reduce-scatter over the shard dim (NVLink), all-reduce of the gradient
    shard over the replicate dim (network, ring: 2 (R-1)/R of it each way). FSDP + TP: the same all-gathers and
    reduce-scatter over the FSDP dim (network) of each rank's TP shard; TP's activation traffic (NVLink, grows with the
    tokens) is not counted. Bytes received; a ring sends as much.
    """
    p, r, s, b = model.params(), a.nodes, a.gpus_per_node, ADAMW_BYTES
    hsdp_nv = (2 + 1) * (s - 1) / s * p * b
    hsdp_net = 2 * (r - 1) / r * p / s * b
    tp_net = (2 + 1) * (r - 1) / r * p / s * b
    return {
        f"HSDP {r} x {s}": {"nv": hsdp_nv, "net": hsdp_net, "s": hsdp_nv / a.nvlink + hsdp_net / a.network},
        f"FSDP {r} x TP {s}": {"nv": 0.0, "net": tp_net, "s": tp_net / a.network},
    }


# --------------------------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------------------------


def _gb(x: object) -> str:
    return f"{float(x) / GB:.2f}"  # type: ignore[arg-type]


def _ms(x: object) -> str:
    return f"{1e3 * float(x):.1f}"  # type: ignore[arg-type]


def main_table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| model | layout | design | NVLink sent / recv (GB) | network sent / recv (GB) | comm (ms) "
        "| NS TFLOP, busiest rank, std / auto | busiest / mean rank (std) | NS (ms), std / auto "
        "| ROOT's extra (ms), std / auto | share of the training step, std / auto |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = {k: float(v) for k, v in r.items() if not isinstance(v, str)}  # type: ignore[arg-type]
        lines.append(
            f"| {r['model']} | {r['layout']} | {r['design']} | {_gb(f['nv_sent_max'])} / {_gb(f['nv_recv_max'])} "
            f"| {_gb(f['net_sent_max'])} / {_gb(f['net_recv_max'])} | {_ms(f['comm_s'])} "
            f"| {f['flops_std_max'] / 1e12:.1f} / {f['flops_auto_max'] / 1e12:.1f} | {f['busiest_over_mean_std']:.3f} "
            f"| {_ms(f['ns_std_s'])} / {_ms(f['ns_auto_s'])} | {_ms(f['total_std_s'])} / {_ms(f['total_auto_s'])} "
            f"| {100 * f['step_share_std']:.1f}% / {100 * f['step_share_auto']:.1f}% |"
        )
    return "\n".join(lines)


def group_table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| model | replica group (nodes) | network recv (GB) | comm (ms) | NS (ms), std / auto "
        "| ROOT's extra (ms), std / auto |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = str(r["design"]).rsplit(" ", 1)[-1]
        lines.append(
            f"| {r['model']} | {g} | {_gb(r['net_recv_max'])} | {_ms(r['comm_s'])} "
            f"| {_ms(r['ns_std_s'])} / {_ms(r['ns_auto_s'])} | {_ms(r['total_std_s'])} / {_ms(r['total_auto_s'])} |"
        )
    return "\n".join(lines)


def shape_table(models: Sequence[Llama], a: Assumptions) -> str:
    """Newton-Schulz GFLOP per matrix of each distinct shape, both forms."""
    lines = [
        "| model | shape (out x in) | matrices | std GFLOP | Gram GFLOP | Gram / std |",
        "|---|---|---|---|---|---|",
    ]
    for model in models:
        counts: dict[tuple[int, int], int] = {}
        for _, m, n, _ in model.matrices():
            counts[(m, n)] = counts.get((m, n), 0) + 1
        for (m, n), count in counts.items():
            std, gram = ns_flops_standard(m, n, a.ns_steps), ns_flops_gram(m, n, a.ns_steps, a.gram_restarts)
            lines.append(
                f"| {model.name} | {m} x {n} | {count} | {std / 1e9:,.0f} | {gram / 1e9:,.0f} | {gram / std:.2f} |"
            )
    return "\n".join(lines)


def assumptions_text(a: Assumptions, models: Sequence[Llama]) -> str:
    eff = "" if a.matmul_efficiency == 1 else f" x efficiency {a.matmul_efficiency:g}"
    lines = [
        f"- cluster: {a.nodes} nodes x {a.gpus_per_node} H100 SXM = {a.gpus} GPUs; rank = node * "
        f"{a.gpus_per_node} + local GPU",
        f"- matmul: {a.matmul_flops / 1e12:.1f} TFLOP/s bf16 dense{eff} (NVIDIA H100 datasheet, SXM: 1,979 with "
        "sparsity)",
        f"- NVLink: {a.nvlink / GB:.0f} GB/s each way per GPU (NVIDIA H100 datasheet: 900 GB/s NVLink 4, both ways)",
        f"- network: {a.network / GB:.0f} GB/s each way per GPU (NVIDIA ConnectX-7 datasheet: 400 Gb/s per port; "
        "DGX H100 user guide: one ConnectX-7 per GPU)",
        f"- bytes per element: {GATHER_BYTES} to the owner (float32 U_t), {SCATTER_BYTES} back (bfloat16 result); "
        f"AdamW's FSDP traffic {ADAMW_BYTES} (bf16)",
        f"- Newton-Schulz: {a.ns_steps} quintic steps; Gram form restarts after step(s) "
        f"{list(a.gram_restarts) or 'none'}",
        f"- training step: 6 x params x {a.tokens:,} tokens / ({a.gpus} GPUs x MFU {a.mfu:g} x peak) (MFU: Llama 3 "
        "paper, arXiv 2407.21783, Table 4: 38-43%)",
    ]
    for m in models:
        mats = m.matrices()
        root = sum(x * y for _, x, y, _ in mats)
        mem = 3 * 4 * m.params() / a.gpus_per_node  # float32 params, grads, momentum / AdamW moments, sharded 8 ways
        lines.append(
            f"- {m.name}: {m.params() / 1e9:.2f} B params ({len(mats)} ROOT matrices, {root / 1e9:.2f} B elements; "
            f"AdamW branch {m.adamw_params() / 1e9:.2f} B), training step {a.train_step_seconds(m):.2f} s; HSDP "
            f"shards 8 ways: ~{mem / GB:.0f} GB of float32 params, grads and optimizer state per GPU"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Llama-3.1-8B only")
    parser.add_argument("--tokens", type=int, default=TOKENS_PER_STEP, help="tokens per optimizer step")
    parser.add_argument("--mfu", type=float, default=MFU, help="model FLOPs utilization of the training step")
    parser.add_argument("--matmul-efficiency", type=float, default=1.0, help="fraction of peak Newton-Schulz reaches")
    parser.add_argument("--gram-restarts", type=int, nargs="*", default=[2], help="Gram form restarts after steps")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON after the tables")
    args = parser.parse_args(argv)
    a = Assumptions(
        matmul_efficiency=args.matmul_efficiency, tokens=args.tokens, mfu=args.mfu,
        gram_restarts=tuple(args.gram_restarts),
    )  # fmt: skip
    models = (LLAMA_8B,) if args.quick else (LLAMA_8B, LLAMA_70B)
    print("Assumptions (pure arithmetic: no figure depends on this machine)\n" + assumptions_text(a, models))
    rows: list[dict[str, object]] = []
    groups: list[dict[str, object]] = []
    for model in models:
        main_rows, group_rows = simulate(model, a)
        rows += main_rows
        groups += group_rows
    print("\nNewton-Schulz FLOPs per matrix\n" + shape_table(models, a))
    print("\nROOT's traffic and Newton-Schulz work beyond AdamW's, per step, busiest rank\n" + main_table(rows))
    print("\nHSDP: owners spread over replica groups of g nodes (g = 1: every node repeats every matrix)\n"
          + group_table(groups))  # fmt: skip
    adamw = {m.name: adamw_traffic(m, a) for m in models}
    lines = [
        "| model | layout | NVLink recv (GB) | network recv (GB) | time at the link rates (ms) |",
        "|---|---|---|---|---|",
    ]
    for name, layouts in adamw.items():
        for layout, t in layouts.items():
            lines.append(f"| {name} | {layout} | {_gb(t['nv'])} | {_gb(t['net'])} | {_ms(t['s'])} |")
    print("\nFor scale: AdamW's own parameter / gradient traffic per rank and step (both optimizers pay it)\n"
          + "\n".join(lines))  # fmt: skip
    out = {"assumptions": asdict(a), "rows": rows, "groups": groups, "adamw": adamw}
    if args.json:
        print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
