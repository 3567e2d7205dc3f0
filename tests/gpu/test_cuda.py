"""The mixed-precision checks on CUDA (bf16 Newton-Schulz by default). Skipped without a GPU."""

import pytest
import torch

from root_hf import ROOT, orthogonalize
from root_hf.schedules import get_schedule, schedule_band

pytestmark = pytest.mark.gpu


def test_auto_ns_dtype_is_bfloat16_on_cuda_and_stays_in_band():
    G = torch.randn(4, 576, 1536, device="cuda")
    X = orthogonalize(G, ns_coefficients="muon", out_dtype=torch.float32)
    hi = schedule_band(get_schedule("muon", (576, 1536), 5))[1]
    assert torch.isfinite(X).all()
    assert torch.linalg.svdvals(X.double()).max() <= hi + 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_step_matches_cpu_step(dtype):
    torch.manual_seed(0)
    w_cpu = torch.nn.Parameter(torch.randn(64, 96, dtype=dtype))
    w_gpu = torch.nn.Parameter(w_cpu.detach().cuda())
    g = torch.randn(64, 96, dtype=dtype)
    for w, grad in ((w_cpu, g), (w_gpu, g.cuda())):
        w.grad = grad
        ROOT([w], lr=0.01, ns_dtype="float32").step()
    torch.testing.assert_close(w_gpu.detach().cpu(), w_cpu.detach(), rtol=1e-3, atol=1e-4)


def test_bf16_params_with_autocast_train_and_keep_float32_state():
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).cuda()
    opt = ROOT(model.parameters(), lr=0.01)
    x = torch.randn(32, 64, device="cuda")
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
