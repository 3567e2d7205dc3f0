"""ROOT under DDP (2 CPU processes, gloo): work is split across ranks and results match a single-process run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from root_hf import ROOT
from tests.distributed import ddp_worker
from tests.utils import assert_equal

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
HERE = Path(__file__).parent


def run_torchrun(script: Path, out_dir: Path, *args: str, nproc: int = 2, timeout: int = 300) -> None:
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = ["torchrun", "--standalone", "--nproc_per_node", str(nproc), str(script), str(out_dir), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_ddp_splits_the_work_and_matches_single_process(tmp_path):
    run_torchrun(HERE / "ddp_worker.py", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # Bitwise identical on every rank.
    for p0, p1 in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert_equal(p0, p1)

    # Steps 2 and 3 make no host sync in the owner split (owners and offsets cached per layout).
    assert [r["steady_step_syncs"] for r in ranks] == [[], []]

    # Each rank orthogonalized only its share: 4 matrices x 3 steps in total, none twice.
    counts = [r["matrices"] for r in ranks]
    assert sum(counts) == 4 * 3 and min(counts) > 0

    # Equal (to fp tolerance) to one process on the whole batch.
    model = ddp_worker.build_model()
    opt = ROOT(model.parameters(), lr=0.02)
    for x in ddp_worker.batches(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for p, d in zip(model.parameters(), ranks[0]["params"], strict=True):
        torch.testing.assert_close(p.detach(), d, rtol=1e-5, atol=1e-6)


def test_ddp_with_fused_expert_tensors_matches_single_process(tmp_path):
    run_torchrun(HERE / "ddp_worker.py", tmp_path, "moe")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for p0, p1 in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert_equal(p0, p1)
    # per step: 2 dense matrices + 3 experts x 2 gate/up blocks + 3 down experts, each orthogonalized by one rank
    counts = [r["matrices"] for r in ranks]
    assert sum(counts) == (2 + 6 + 3) * 3 and min(counts) > 0

    model = ddp_worker.build("moe")
    opt = ROOT(ddp_worker.param_groups(model, "moe"), lr=0.02)
    for step, x in enumerate(ddp_worker.batches(3)):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.collect_diagnostics = step == 2
        opt.step()
    for p, d in zip(model.parameters(), ranks[0]["params"], strict=True):
        torch.testing.assert_close(p.detach(), d, rtol=1e-5, atol=1e-6)

    # Diagnostics are reduced over the group: every rank reports the means over all 11 matrices, as one process does.
    assert ranks[0]["strategy"] == "ddp"
    assert ranks[0]["diagnostics"] == ranks[1]["diagnostics"]
    assert set(ranks[0]["diagnostics"]) == set(opt.last_diagnostics)
    for key, value in opt.last_diagnostics.items():
        assert ranks[0]["diagnostics"][key] == pytest.approx(value, rel=1e-4), key


def test_no_process_group_means_the_single_process_path():
    """process_group=None (the default) never splits work, even when torch.distributed is initialized."""
    from root_hf.optim.distributed import plan_for

    assert plan_for([torch.zeros(3, 3)]).mode == "single"
    assert plan_for([torch.zeros(3, 3)], process_group=None).mode == "single"
    assert plan_for([torch.zeros(3, 3)], process_group="default").mode == "single"  # not initialized here


def test_owner_assignment_balances_flops_and_is_deterministic():
    from root_hf.optim.distributed import assign_owners

    shapes = [(576, 1536)] * 3 + [(576, 576)] * 4 + [(192, 576)] * 2
    owners = assign_owners(shapes, 2)
    assert owners == assign_owners(list(shapes), 2)
    cost = [2 * min(s) ** 2 * (2 * max(s) + min(s)) for s in shapes]
    loads = [sum(c for c, o in zip(cost, owners, strict=True) if o == r) for r in range(2)]
    assert max(loads) / min(loads) < 1.3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
