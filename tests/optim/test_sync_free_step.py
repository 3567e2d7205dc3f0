"""A steady single-process ROOT step never makes the host wait for the device (issue 21).

`tests/host_syncs.py` counts, on CPU, every call that would wait on an accelerator (`bool(t)`, `.item()`,
`.tolist()`, host copies, data-dependent shapes); from the second step on there must be none, in every branch and
execution path of a single process: Linear stacks, conv kernels, fused experts (`matrix_view="batched"`), fused
projections (`matrix_split`), bfloat16 params, matrices above the clip's exact-quantile size (sampled threshold),
and each `nonfinite_grads` mode, also on a step whose gradient is non-finite. `benchmarks/gpu_check.sh` runs the same
steps on CUDA under `torch.cuda.set_sync_debug_mode("error")` (tests/gpu/test_cuda.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from root_hf import ROOT
from root_hf.optim.clip import QUANTILE_SAMPLE_SIZE
from tests.host_syncs import count_host_syncs


def _linear_stack() -> list[dict]:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.Linear(32, 8)]
    model = torch.nn.Sequential(*layers)
    return [{"params": list(model.parameters())}]


def _conv() -> list[dict]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 1))
    return [{"params": list(model.parameters())}]


def _experts() -> list[dict]:
    experts = torch.nn.Parameter(torch.randn(4, 16, 12) * 0.02)  # fused (E, out, in)
    router = torch.nn.Parameter(torch.randn(4, 12) * 0.02)
    return [{"params": [experts], "matrix_view": "batched"}, {"params": [router]}]


def _split() -> list[dict]:
    gate_up = torch.nn.Parameter(torch.randn(2 * 20, 16) * 0.02)  # fused gate_up_proj (2 I, H)
    qkv = torch.nn.Parameter(torch.randn(16, 3 * 16) * 0.02)  # GPT-2 Conv1D c_attn (H, 3 H)
    return [
        {"params": [gate_up], "matrix_split": [0, [20, 20]]},
        {"params": [qkv], "matrix_split": [1, [16, 16, 16]]},
        {"params": [torch.nn.Parameter(torch.zeros(16))], "use_root": False},
    ]


def _bf16() -> list[dict]:
    groups = _linear_stack()
    for p in groups[0]["params"]:
        p.data = p.data.bfloat16()
    return groups


def _big() -> list[dict]:
    """Matrices above QUANTILE_SAMPLE_SIZE entries (sampled threshold, device-side fallback), one all-zero grad."""
    shape = (256, QUANTILE_SAMPLE_SIZE // 128)
    assert shape[0] * shape[1] > QUANTILE_SAMPLE_SIZE
    return [{"params": [torch.nn.Parameter(torch.randn(shape) * 0.02) for _ in range(3)]}]


MODELS = {
    "linear": _linear_stack,
    "conv": _conv,
    "experts": _experts,
    "split": _split,
    "bf16": _bf16,
    "big": _big,
}


def _grads(groups: list[dict], step: int, nonfinite: bool = False) -> None:
    gen = torch.Generator().manual_seed(step)
    for group in groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
    if groups[0]["params"][0].numel() > QUANTILE_SAMPLE_SIZE:
        groups[0]["params"][-1].grad.zero_()  # an all-zero matrix in a sampled batch
    if nonfinite:
        groups[0]["params"][0].grad.view(-1)[0] = float("nan")


# "device": the accelerator path of the non-finite check (the step gated on the device), forced on the CPU; "host":
# the CPU path (the flag read from host memory at once). Neither may sync.
GATES = pytest.mark.parametrize("gate", ["device", "host"])


@GATES
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", ["raise", "skip", "ignore"])
def test_steady_step_makes_no_host_sync(model: str, mode: str, gate: str) -> None:
    groups = MODELS[model]()
    # fixed coefficients: the adaptive schedules are fitted when params are added (slow on first use), not in step()
    opt = ROOT(groups, lr=0.01, weight_decay=0.1, nonfinite_grads=mode, ns_coefficients="muon")
    assert opt.collect_diagnostics is False
    opt._gate_on_device = gate == "device"
    _grads(groups, 0)
    opt.step()  # the first step may allocate state and the host copy of the non-finite count
    for step in (1, 2):
        _grads(groups, step)
        with count_host_syncs() as syncs:
            opt.step()
        assert syncs.calls == [], syncs.report()


@GATES
@pytest.mark.parametrize("nesterov", [True, False])
def test_a_skipped_step_makes_no_host_sync(nesterov: bool, gate: str) -> None:
    """skip mode: the non-finite step is skipped (on the device, or before any work on the host) and reported from
    host memory, without a sync."""
    groups = _experts() + _big()
    opt = ROOT(groups, lr=0.01, nonfinite_grads="skip", nesterov=nesterov, ns_coefficients="muon")
    opt._gate_on_device = gate == "device"
    _grads(groups, 0)
    opt.step()
    _grads(groups, 1, nonfinite=True)
    with count_host_syncs() as syncs, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert syncs.calls == [], syncs.report()
    assert any("skipped 1 step" in str(w.message) for w in caught)
