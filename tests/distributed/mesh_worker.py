"""Run under `torchrun --standalone --nproc_per_node 4 mesh_worker.py OUT_DIR`: ROOT on the meshes accelerate builds.

One process group, several layouts in turn, each built the way accelerate's `ParallelismConfig.build_device_mesh`
builds its mesh (dim names and order `dp_replicate, dp_shard, tp`; FSDP on `mesh[fsdp_dim_names]`) and tensor
parallelism applied by transformers' own `apply_tensor_parallelism` with the model's `tp_plan`:

- `hsdp`: `ParallelismConfig(dp_replicate_size=2, dp_shard_size=2)`, `fully_shard` on `("dp_replicate",
  "dp_shard_cp")`: params `(Replicate, Shard(0))`; the batch split over the 4 data-parallel ranks.
- `tp`: `ParallelismConfig(dp_replicate_size=2, tp_size=2)` mesh, colwise / rowwise plan on `mesh["tp"]`: params
  `Shard(0)` / `Shard(1)` on the 1-D tp mesh, norms plain; both tp pairs train on the whole batch.
- `fsdp_tp`: `ParallelismConfig(dp_shard_size=2, tp_size=2)`, TP on `mesh["tp"]` then `fully_shard` on
  `mesh["dp_shard_cp"]`: TP params become `(_StridedShard(0), Shard(0))` / `(Shard(0), Shard(1))` on the 2-D mesh,
  the other params `Shard(0)` on the 1-D dp mesh (two meshes in one step).

For each layout and each model (a tiny Llama with uneven sizes, a tiny Qwen3-MoE with fused experts and split
blocks): 3 steps against the dense single-process run on the whole batch; zero host syncs in `step()` from
step 2 on; then a DCP save / load into a fresh model and 2 more steps, compared bitwise with the uninterrupted run.
Plus a group that mixes FSDP2 DTensors and plain (`ignored_params`) tensors, in both orders. Rank 0 writes
OUT_DIR/result.json.
"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate.parallelism_config import ParallelismConfig
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.distributed.tensor_parallel import apply_tensor_parallelism

import root_hf.optim.functional as root_module
from root_hf import ROOT
from root_hf.optim import distributed as rdist
from tests.distributed.fsdp2_worker import CONFIG, MOE_CONFIG, moe_param_groups, param_groups
from tests.host_syncs import count_host_syncs

LAYOUTS = {
    "hsdp": dict(dp_replicate_size=2, dp_shard_size=2),
    "tp": dict(dp_replicate_size=2, tp_size=2),
    "fsdp_tp": dict(dp_shard_size=2, tp_size=2),
}
# 8 processes (not in CI): HSDP x TP on a 3-D mesh, whose 2-D FSDP mesh spans half of the world
LAYOUTS_8 = {"hsdp_tp": dict(dp_replicate_size=2, dp_shard_size=2, tp_size=2)}
OPT = dict(lr=0.02, ns_dtype="float32", weight_decay=0.1)


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**CONFIG))
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**MOE_CONFIG))


def groups(model: torch.nn.Module, kind: str) -> list[dict]:
    return param_groups(model) if kind == "llama" else moe_param_groups(model)


def prepare(model: torch.nn.Module, layout: str, pc: ParallelismConfig, mesh) -> torch.nn.Module:
    """What accelerate + transformers do to the model under this ParallelismConfig."""
    if pc.tp_enabled:
        model._mesh_manager = None
        apply_tensor_parallelism(model, mesh["tp"], model._expand_parallel_plan(model._tp_plan))
    if pc.dp_shard_enabled:
        fsdp_mesh = mesh[tuple(pc.fsdp_dim_names)]
        for layer in model.model.layers:
            fully_shard(layer, mesh=fsdp_mesh)
        fully_shard(model, mesh=fsdp_mesh)
    return model


def data_parallel(pc: ParallelismConfig, mesh) -> tuple[int, int]:
    """(rank, size) of this process among the ranks that get different data."""
    if not pc.dp_shard_enabled:
        return 0, 1
    dp = mesh["dp"] if pc.dp_replicate_enabled else mesh["dp_shard"]
    return dp.get_local_rank(), dp.size()


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if isinstance(p, DTensor) else p


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((full(x) - full(y)).abs().max().item() for x, y in zip(a.parameters(), b.parameters(), strict=True))


class Counter:
    """Counts the matrices this rank orthogonalizes (Newton-Schulz batch sizes)."""

    def __init__(self) -> None:
        self.original = root_module.newton_schulz
        self.matrices = 0

    def __call__(self, x, schedule, *args, **kwargs):  # the form (ns_method) passes through
        self.matrices += x.shape[0]
        return self.original(x, schedule, *args, **kwargs)


def local_shards_match_the_index_maps(model: torch.nn.Module) -> bool:
    """Every DTensor's local shard equals the global tensor at the indices ROOT computes for this rank."""
    for p in model.parameters():
        if not isinstance(p, DTensor):
            continue
        mesh = p.device_mesh
        coord = tuple(mesh.get_coordinate())
        idx = [rdist._dim_indices(s, d, tuple(mesh.shape), coord, p.placements) for d, s in enumerate(p.shape)]
        whole = p.full_tensor()
        expected = whole[torch.meshgrid(*idx, indexing="ij")] if whole.numel() else whole
        if not torch.equal(expected, p.to_local()):
            return False
    return True


def run(layout: str, kind: str, out_dir: str) -> dict:
    pc = ParallelismConfig(**{**LAYOUTS, **LAYOUTS_8}[layout])
    mesh = pc.build_device_mesh("cpu")
    dp_rank, dp_size = data_parallel(pc, mesh)
    counter = Counter()
    dense = build(kind)
    initial = copy.deepcopy(dense)
    sharded = prepare(copy.deepcopy(dense), layout, pc, mesh)
    opt_dense = ROOT(groups(dense, kind), **OPT)
    opt = ROOT(groups(sharded, kind), **OPT)
    vocab = CONFIG["vocab_size"]
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, vocab, (4, 12), generator=g) for _ in range(5)]
    syncs_here: list[str] = []
    syncs_all = 0

    def step(model, optimizer, ids, count_syncs: bool = False):
        nonlocal syncs_all
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        if count_syncs:
            with count_host_syncs() as syncs:
                optimizer.step()
            syncs_all += len(syncs.calls)
            syncs_here.extend(f"{n} at {w}" for n, w in syncs.calls)
        else:
            optimizer.step()

    for k, ids in enumerate(data[:3]):
        root_module.newton_schulz = counter
        step(sharded, opt, ids.chunk(dp_size)[dp_rank], count_syncs=k > 0)
        root_module.newton_schulz = counter.original
        step(dense, opt_dense, ids)
    dense_diff = max_diff(sharded, dense)
    on_root = {id(p) for group in opt.param_groups if group.get("use_root") is not False for p in group["params"]}
    root_diff = max(
        (full(x) - y).abs().max().item()
        for x, y in zip(sharded.parameters(), dense.parameters(), strict=True)
        if id(x) in on_root and x.dim() >= 2
    )
    worst = max(
        ((full(x) - y).abs().max().item(), name)
        for (name, x), y in zip(sharded.named_parameters(), dense.parameters(), strict=True)
    )[1]
    strategy = opt.distributed_strategy
    loads: dict[str, list[int]] = {}  # NS FLOPs per step owned by each rank, summed over the groups, per mesh
    for group in opt.param_groups:
        use_root = group.get("use_root")
        root_params = [p for p in group["params"] if (use_root if use_root is not None else p.dim() >= 2)]
        for plan, idx in rdist.plan_groups(root_params):
            if plan.mode == "fsdp2":
                per_rank = plan.owner_loads([root_params[i] for i in idx], group["matrix_view"], group["matrix_split"])
                mesh_name = str(tuple(plan.mesh.mesh_dim_names or ()))
                total = loads.setdefault(mesh_name, [0] * len(per_rank))
                loads[mesh_name] = [a + b for a, b in zip(total, per_rank, strict=True)]

    ckpt = f"{out_dir}/ckpt_{layout}_{kind}"
    dcp.save(
        {"model": get_model_state_dict(sharded), "optim": get_optimizer_state_dict(sharded, opt)}, checkpoint_id=ckpt
    )
    restored = prepare(copy.deepcopy(initial), layout, pc, mesh)
    opt_restored = ROOT(groups(restored, kind), **OPT)
    state = {"model": get_model_state_dict(restored), "optim": get_optimizer_state_dict(restored, opt_restored)}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(restored, state["model"])
    set_optimizer_state_dict(restored, opt_restored, state["optim"])
    after_load_diff = max_diff(sharded, restored)
    for ids in data[3:]:
        step(sharded, opt, ids.chunk(dp_size)[dp_rank])
        step(restored, opt_restored, ids.chunk(dp_size)[dp_rank])
    resume_diff = max_diff(sharded, restored)
    index_maps_ok = local_shards_match_the_index_maps(sharded)
    plan = rdist.plan_for([p for p in sharded.parameters() if isinstance(p, DTensor)])
    with count_host_syncs() as syncs:  # the device-side agreement: only the last rank of the mesh raises the flag
        raised = plan.any_(torch.tensor(plan.rank == plan.world_size - 1))
        quiet = plan.any_(torch.tensor(False))
    any_ok = bool(raised) and not bool(quiet) and not [c for c in syncs.calls if "distributed.py" in c[1]]
    placements = sorted({str(tuple(p.placements)) for p in sharded.parameters() if isinstance(p, DTensor)})
    return {
        "dense_diff": dense_diff,
        "worst_param": worst,
        "root_dense_diff": root_diff,
        "after_load_diff": after_load_diff,
        "resume_diff": resume_diff,
        "matrices": counter.matrices,
        "steady_step_syncs": syncs_here,
        "syncs_total": syncs_all,
        "strategy": strategy,
        "loads": loads,
        "index_maps_ok": index_maps_ok,
        "any_ok": any_ok,
        "placements": placements,
        "uneven": any(
            isinstance(p, DTensor) and any(rdist._shard_like(s) and p.shape[s.dim] % 2 for s in p.placements)
            for p in sharded.parameters()
        ),
    }


def run_hf_layer(layout: str, out_dir: str) -> dict:
    """What the Hugging Face layer hands ROOT under `TrainingArguments(parallelism_config=...)`: the handler's
    `create_root_optimizer` on the model as accelerate prepares it (accelerate itself refuses a parallelism_config on
    CPU), 2 steps against the same handler on the dense model."""
    from transformers import TrainingArguments

    from root_hf.integrations.transformers import check_root_compatible, create_root_optimizer

    pc = ParallelismConfig(**LAYOUTS[layout])
    mesh = pc.build_device_mesh("cpu")
    dp_rank, dp_size = data_parallel(pc, mesh)
    common = dict(optim="root", learning_rate=0.02, weight_decay=0.1, optim_args="ns_dtype=float32", report_to=[])
    args = TrainingArguments(output_dir=f"{out_dir}/hf_{layout}", parallelism_config=pc, **common)
    check_root_compatible(args)
    dense = build("llama")
    sharded = prepare(copy.deepcopy(dense), layout, pc, mesh)
    opt = create_root_optimizer(sharded, args)
    opt_dense = create_root_optimizer(dense, args, process_group=None)
    g = torch.Generator().manual_seed(5)
    for ids in [torch.randint(0, CONFIG["vocab_size"], (4, 12), generator=g) for _ in range(2)]:
        for model, optimizer, batch in ((sharded, opt, ids.chunk(dp_size)[dp_rank]), (dense, opt_dense, ids)):
            optimizer.zero_grad()
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
    root_params = [p for group in opt.param_groups if group.get("use_root") is not False for p in group["params"]]
    return {
        "dense_diff": max_diff(sharded, dense),
        "strategy": opt.distributed_strategy,
        "root_dtensors": sum(isinstance(p, DTensor) for p in root_params if p.dim() >= 2),
        "routing": opt.routing_summary,
    }


def run_mixed_group(order: str) -> float:
    """One ROOT group with an FSDP2-sharded Linear and an ignored (plain) one, whose gradient is averaged by hand;
    returns the max diff against one process on the whole batch."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(3)
    dense = torch.nn.Sequential(torch.nn.Linear(24, 18, bias=False), torch.nn.Linear(18, 10, bias=False))
    sharded = copy.deepcopy(dense)
    fully_shard(sharded, mesh=mesh, ignored_params={sharded[1].weight})
    params = [sharded[0].weight, sharded[1].weight]
    dense_params = [dense[0].weight, dense[1].weight]
    if order == "plain_first":
        params, dense_params = params[::-1], dense_params[::-1]
    opt = ROOT([{"params": params, "use_root": True}], **OPT)
    opt_dense = ROOT([{"params": dense_params, "use_root": True}], **OPT)
    g = torch.Generator().manual_seed(4)
    rank, world = dist.get_rank(), dist.get_world_size()
    for _ in range(2):
        x = torch.randn(world * 2, 24, generator=g)
        for model, optimizer, batch in ((sharded, opt, x.chunk(world)[rank]), (dense, opt_dense, x)):
            optimizer.zero_grad()
            model(batch).square().mean().backward()
            if model is sharded:  # the ignored layer's gradient is this rank's own: average it, as DDP would
                dist.all_reduce(sharded[1].weight.grad, op=dist.ReduceOp.AVG)
            optimizer.step()
    return max_diff(sharded, dense)


def main() -> None:
    out_dir = sys.argv[1]
    known = {**LAYOUTS, **LAYOUTS_8}
    only = [x for x in sys.argv[2].split(",") if x in known] if len(sys.argv) > 2 else list(LAYOUTS)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {}
    for layout in only:
        for kind in ("llama", "moe"):
            results[f"{layout}/{kind}"] = run(layout, kind, out_dir)
        if layout in LAYOUTS:
            results[f"hf/{layout}"] = run_hf_layer(layout, out_dir)
    for order in ("dtensor_first", "plain_first"):
        try:
            results[f"mixed/{order}"] = run_mixed_group(order)
        except Exception as e:  # reported to the test, which names the failure
            results[f"mixed/{order}"] = repr(e)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(f"{out_dir}/result.json", "w") as f:
            json.dump(gathered, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Results are written and the group destroyed; skip the interpreter's teardown (see fsdp2_worker.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
