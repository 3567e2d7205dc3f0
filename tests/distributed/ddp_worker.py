"""Run under `torchrun --standalone --nproc_per_node 2 ddp_worker.py OUT_DIR`: 3 DDP steps of ROOT on gloo.

Writes OUT_DIR/rank{r}.pt with the final parameters and how many matrices this rank orthogonalized.
"""

import sys

import torch
import torch.distributed as dist

import root_hf.optim.root as root_module
from root_hf import ROOT


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 48),
        torch.nn.GELU(),
        torch.nn.Linear(48, 48),
        torch.nn.GELU(),
        torch.nn.Linear(48, 48),
        torch.nn.GELU(),
        torch.nn.Linear(48, 7),
    )


def batches(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 24, generator=g) for _ in range(steps)]


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    counted = {"matrices": 0}
    original = root_module.newton_schulz

    def counting(x, schedule):
        counted["matrices"] += x.shape[0]
        return original(x, schedule)

    root_module.newton_schulz = counting
    model = torch.nn.parallel.DistributedDataParallel(build_model())
    opt = ROOT(model.parameters(), lr=0.02)
    for x in batches(3):
        shard = x.chunk(world)[rank]  # each rank sees its slice of the global batch
        opt.zero_grad()
        model(shard).square().mean().backward()
        opt.step()
    torch.save({"params": [p.detach() for p in model.module.parameters()], **counted}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
