"""Properties of the quantile threshold and the soft-threshold clip (root_hf/optim/clip.py)."""

import pytest
import torch

from root_hf.optim.clip import QUANTILE_SAMPLE_SIZE, quantile_threshold, soft_threshold_clip_


@pytest.mark.parametrize("q", [0.5, 0.8, 0.9, 0.99, 1.0])
def test_exact_quantile_on_small_matrices_equals_torch_quantile(q):
    u = torch.randn(4, 30, 50, dtype=torch.float64)
    expected = torch.stack([torch.quantile(x.abs().flatten(), q) for x in u])
    torch.testing.assert_close(quantile_threshold(u, q), expected, rtol=1e-14, atol=0)


def test_sampled_quantile_on_large_matrices_is_close_and_deterministic():
    u = torch.randn(2, 384, 576)
    assert u[0].numel() > QUANTILE_SAMPLE_SIZE
    eps = quantile_threshold(u, 0.9)
    exact = torch.stack([torch.quantile(x.abs().flatten(), 0.9) for x in u])
    torch.testing.assert_close(eps, exact, rtol=0.03, atol=0)
    assert torch.equal(eps, quantile_threshold(u.clone(), 0.9))


def test_sample_depends_only_on_the_matrix_size():
    """Every rank and every resumed run sees the same sample, so the same threshold."""
    u = torch.randn(1, 300, 300)
    first = quantile_threshold(u, 0.9)
    quantile_threshold(torch.randn(1, 200, 200), 0.9)
    assert torch.equal(first, quantile_threshold(u, 0.9))


def test_clip_equals_the_soft_threshold_decomposition():
    """B = U - O with O = sign(U) * max(|U| - eps, 0), the proximal operator of the L1 norm."""
    u = torch.randn(3, 20, 40, dtype=torch.float64)
    original = u.clone()
    eps = soft_threshold_clip_(u, 0.9)
    bound = eps.view(-1, 1, 1)
    outliers = torch.sign(original) * torch.clamp(original.abs() - bound, min=0)
    torch.testing.assert_close(u, original - outliers, rtol=0, atol=1e-15)
    clipped = (original.abs() > bound).double().mean(dim=(1, 2))
    torch.testing.assert_close(clipped, torch.full_like(clipped, 0.1), atol=0.01, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_equals_torch_clamp_bitwise(dtype):
    """The in-place minimum/maximum pair gives exactly clamp(U, -eps, eps)."""
    u = torch.randn(4, 30, 50, dtype=dtype) * torch.logspace(-3, 3, 4, dtype=dtype).view(-1, 1, 1)
    original = u.clone()
    eps = soft_threshold_clip_(u, 0.9)
    bound = eps.view(-1, 1, 1)
    assert torch.equal(u, torch.clamp(original, min=-bound, max=bound))


def test_mostly_zero_matrix_uses_the_quantile_of_its_nonzero_entries():
    u = torch.zeros(1, 50, 40, dtype=torch.float64)
    idx = torch.randperm(2000)[:50]
    u.view(1, -1)[0, idx] = torch.randn(50, dtype=torch.float64)
    expected = torch.quantile(u.abs()[u != 0], 0.9)
    torch.testing.assert_close(quantile_threshold(u, 0.9), expected.reshape(1))


def test_all_zero_matrix_has_zero_threshold_and_stays_zero():
    u = torch.zeros(2, 10, 10)
    assert torch.equal(soft_threshold_clip_(u, 0.9), torch.zeros(2))
    assert torch.equal(u, torch.zeros(2, 10, 10))


def test_threshold_is_scale_equivariant():
    """Loss scaling and gradient accumulation multiply U by a constant: eps follows, the direction is unchanged."""
    u = torch.randn(2, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(quantile_threshold(1024.0 * u, 0.9), 1024.0 * quantile_threshold(u, 0.9))
