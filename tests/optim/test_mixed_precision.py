"""Mixed precision: bf16/fp16 Newton-Schulz, GradScaler, pure-bf16 models (CPU)."""

import pytest
import torch

from root_hf import ROOT, orthogonalize
from root_hf.schedules import get_schedule, schedule_band
from tests.utils import assert_equal


@pytest.mark.parametrize("ns_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(16, 512), (128, 128), (384, 96)])
def test_low_precision_newton_schulz_stays_in_band_and_finite(ns_dtype, shape):
    G = torch.randn(2, *shape) * 1e3  # large raw gradients: normalization happens before the low-precision cast
    X = orthogonalize(G, ns_coefficients="muon", ns_dtype=ns_dtype, out_dtype=torch.float32)
    assert torch.isfinite(X).all()
    hi = schedule_band(get_schedule("muon", shape, 5))[1]
    assert torch.linalg.svdvals(X).max() <= hi + 0.03


@pytest.mark.parametrize("magnitude", [1e-6, 1e6])
def test_float16_newton_schulz_neither_overflows_nor_underflows(magnitude):
    """Raw gradients of 1e6 overflow float16 (max 65504) and 1e-6 lose their mantissa: the norm is taken in float32
    before the cast, so the float16 iteration only ever sees singular values in [0, 1]."""
    G = torch.randn(64, 256) * magnitude
    X = orthogonalize(G, ns_coefficients="muon", ns_dtype="float16", out_dtype=torch.float32)
    s = torch.linalg.svdvals(X)
    assert torch.isfinite(s).all() and s.min() > 0.6 and s.max() < 1.25


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def test_grad_scaler_unscales_before_step_so_the_direction_is_unchanged():
    x = torch.randn(8, 16)
    plain, scaled = _model(), _model()
    opt_plain = ROOT(plain.parameters(), lr=0.01)
    opt_scaled = ROOT(scaled.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        opt_plain.zero_grad()
        plain(x).square().mean().backward()
        opt_plain.step()
        opt_scaled.zero_grad()
        scaler.scale(scaled(x).square().mean()).backward()
        scaler.step(opt_scaled)
        scaler.update()
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_scaler_skips_a_step_with_inf_grads_and_state_is_untouched():
    model = _model()
    opt = ROOT(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(8, 16)
    scaler.scale(model(x).square().mean()).backward()
    scaler.step(opt)
    scaler.update()
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    opt.zero_grad()
    scaler.scale(model(x).square().mean()).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)  # found inf: the optimizer step is skipped
    scaler.update()
    for p, before in zip(model.parameters(), params, strict=True):
        assert_equal(p.detach(), before)
    for k, v in opt.state[model[0].weight].items():
        assert_equal(v, state[k])


def test_pure_bfloat16_model_trains_with_float32_state():
    model = _model().to(torch.bfloat16)
    opt = ROOT(model.parameters(), lr=0.02, ns_dtype="bfloat16")
    x = torch.randn(64, 16, dtype=torch.bfloat16)
    y = torch.randn(64, 4, dtype=torch.bfloat16)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (model(x) - y).float().square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for state in opt.state.values():
        for key, value in state.items():
            if key != "step":
                assert value.dtype == torch.float32
