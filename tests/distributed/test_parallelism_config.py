"""Fast checks (one process, no process group) of the mesh support: the index maps against torch's own shard offsets,
the owner assignment, and what the Hugging Face layer accepts or refuses under a `ParallelismConfig`."""

import itertools

import pytest
import torch

from root_hf.optim import distributed as rdist

placement_types = pytest.importorskip("torch.distributed.tensor.placement_types")
Replicate, Shard, _StridedShard = placement_types.Replicate, placement_types.Shard, placement_types._StridedShard

# (global shape, mesh shape, placements): FSDP, HSDP, TP colwise / rowwise, FSDP + TP (as fully_shard builds it on a
# TP-sharded param: `_StridedShard` on the FSDP dim), several mesh dims on one tensor dim; uneven sizes throughout.
LAYOUTS = [
    ((75, 40), (4,), (Shard(0),)),
    ((101, 40), (2, 2), (Replicate(), Shard(0))),
    ((75, 40), (2,), (Shard(1),)),
    ((75, 41), (2, 2), (_StridedShard(0, split_factor=2), Shard(0))),
    ((40, 75), (2, 2), (Shard(0), Shard(1))),
    ((7, 75, 40), (2, 2), (Shard(0), Shard(0))),
    ((3, 48, 40), (2, 2), (Shard(0), Replicate())),
]


@pytest.mark.parametrize(("shape", "mesh_shape", "placements"), LAYOUTS)
def test_index_maps_match_torch_local_shapes_and_offsets(shape, mesh_shape, placements):
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    covered = torch.zeros(shape, dtype=torch.int64)
    for coord in itertools.product(*(range(n) for n in mesh_shape)):
        idx = [rdist._dim_indices(s, d, mesh_shape, coord, placements) for d, s in enumerate(shape)]
        local_shape, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), placements)
        assert tuple(len(i) for i in idx) == tuple(local_shape)
        for i, o in zip(idx, offset, strict=True):
            assert len(i) == 0 or int(i[0]) == o
        if all(len(i) for i in idx):
            covered[torch.meshgrid(*idx, indexing="ij")] += 1
    # every element is held by as many ranks as the Replicate dims multiply
    replicas = 1
    for n, p in zip(mesh_shape, placements, strict=True):
        replicas *= n if p.is_replicate() else 1
    assert bool((covered == replicas).all())


def test_owners_stay_among_the_candidates_and_balance_flops():
    shapes = [(576, 1536)] * 3 + [(576, 576)] * 5 + [(192, 576)] * 4
    candidates = [(0, 1)] * 3 + [None] * 9
    owners = rdist.assign_owners(shapes, 4, candidates)
    assert all(o in (0, 1) for o in owners[:3])
    assert owners == rdist.assign_owners(list(shapes), 4, list(candidates))
    loads = [sum(rdist.ns_cost(s) for s, o in zip(shapes, owners, strict=True) if o == r) for r in range(4)]
    # the 3 large matrices must sit on ranks 0 and 1 (2 + 1): the busiest rank carries the forced 2, nothing more
    assert max(loads) == 2 * rdist.ns_cost((576, 1536))
    assert max(loads[1:]) / min(loads[1:]) < 1.4


def test_plain_tensors_are_planned_single_without_a_process_group():
    plans = rdist.plan_groups([torch.zeros(3, 3), torch.zeros(4, 2)])
    assert [(plan.mode, idx) for plan, idx in plans] == [("single", [0, 1])]


def _args(tmp_path, **pc_kwargs):
    accelerate = pytest.importorskip("accelerate.parallelism_config")
    transformers = pytest.importorskip("transformers")
    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        optim="root",
        report_to=[],
        parallelism_config=accelerate.ParallelismConfig(**pc_kwargs),
    )


@pytest.mark.parametrize(
    "pc_kwargs",
    [
        dict(dp_replicate_size=2, dp_shard_size=2),
        dict(tp_size=2),
        dict(dp_shard_size=2, tp_size=2),
        dict(dp_replicate_size=2, dp_shard_size=2, tp_size=2),
        dict(dp_shard_size=2, cp_size=2),
    ],
)
def test_the_hf_layer_accepts_every_mesh_a_parallelism_config_builds(tmp_path, pc_kwargs):
    from root_hf.integrations.transformers import check_root_compatible

    check_root_compatible(_args(tmp_path, **pc_kwargs))


def test_deepspeed_sequence_parallelism_is_refused_naming_context_parallelism(tmp_path):
    from root_hf.integrations.transformers import check_root_compatible

    with pytest.raises(ValueError, match=r"cp_size > 1, cp_backend='torch'"):
        check_root_compatible(_args(tmp_path, sp_size=2, sp_backend="deepspeed"))


def test_the_accelerate_config_files_parallelism_keys_are_read_from_accelerates_state(monkeypatch):
    # `accelerate launch --config_file` with `parallelism_config: {parallelism_config_sp_size: 2, ...}` exports
    # PARALLELISM_CONFIG_*; the Accelerator builds ParallelismConfig() from them and keeps it in its state.
    accelerate = pytest.importorskip("accelerate.parallelism_config")
    from root_hf.integrations import transformers as hf

    monkeypatch.setenv("PARALLELISM_CONFIG_SP_SIZE", "2")
    monkeypatch.setenv("PARALLELISM_CONFIG_SP_BACKEND", "deepspeed")
    monkeypatch.setattr(hf, "_accelerate_state", lambda: {"parallelism_config": accelerate.ParallelismConfig()})
    with pytest.raises(ValueError, match="context parallelism"):
        hf.check_root_compatible(None)
    monkeypatch.setenv("PARALLELISM_CONFIG_SP_SIZE", "1")
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_SHARD_SIZE", "2")
    monkeypatch.setenv("PARALLELISM_CONFIG_TP_SIZE", "2")
    hf.check_root_compatible(None)
