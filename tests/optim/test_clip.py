"""Properties of the quantile threshold and the soft-threshold clip (root_hf/optim/clip.py)."""

import pytest
import torch

from root_hf.optim.clip import QUANTILE_SAMPLE_SIZE, _sample_indices, quantile_threshold, soft_threshold_clip_


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


def test_sample_is_built_in_o_sample_time_and_memory_for_a_70b_class_matrix():
    """An 8192 x 28672 matrix (a 70B-class MLP): the sample costs what its size costs, not a permutation of 235M."""
    import time

    from root_hf.optim.clip import _sample_cache

    numel = 8192 * 28672
    _sample_cache.clear()
    start = time.perf_counter()
    idx = _sample_indices(numel, QUANTILE_SAMPLE_SIZE, torch.device("cpu"))
    elapsed = time.perf_counter() - start
    assert idx.shape == (QUANTILE_SAMPLE_SIZE,)
    assert int(idx.min()) >= 0 and int(idx.max()) < numel
    assert torch.equal(idx, idx.sort().values)
    # generous bound (a randperm of all entries took 57 s): a loaded machine must not make this flaky
    assert elapsed < 5.0


def test_sample_is_identical_in_a_fresh_process():
    """Every rank and every resumed run draws the same indices: the sample depends on the size alone."""
    import subprocess
    import sys

    code = (
        "import torch; from root_hf.optim.clip import _sample_indices; "
        "torch.manual_seed(123); "
        "print(int(_sample_indices(1000003, 4096, torch.device('cpu')).sum()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert int(out.stdout) == int(_sample_indices(1000003, 4096, torch.device("cpu")).sum())


@pytest.mark.parametrize("placement", range(20))
def test_very_sparse_matrix_is_never_clipped_to_zero(placement):
    """50 non-zeros in 2048 x 2048: the sample usually holds none; the threshold must still keep them."""
    g = torch.Generator().manual_seed(placement)
    u = torch.zeros(1, 2048, 2048)
    idx = torch.randint(u.numel(), (50,), generator=g)
    u.view(-1)[idx] = torch.randn(50, generator=g)
    nonzero = u[u != 0].abs()
    eps = quantile_threshold(u, 0.9)
    assert eps.item() > 0
    soft_threshold_clip_(u, 0.9)
    assert int((u != 0).sum()) == nonzero.numel()


def test_sample_without_nonzeros_falls_back_to_the_largest_entry():
    """Its outliers cannot be told from the sample: no clipping (eps = max |U|), chosen on the device; an all-zero
    matrix of the same batch keeps eps = 0 and a dense one its sampled quantile."""
    u = torch.zeros(3, 2048, 2048)
    sample = set(_sample_indices(2048 * 2048, QUANTILE_SAMPLE_SIZE, torch.device("cpu")).tolist())
    idx = torch.tensor([i for i in range(0, 2048 * 2048, 9973) if i not in sample][:50])
    u[0].view(-1)[idx] = -torch.linspace(1, 50, 50)
    u[2] = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0))
    eps = quantile_threshold(u, 0.9)
    assert eps[0] == 50 and eps[1] == 0
    dense = u[2].reshape(-1)[_sample_indices(2048 * 2048, QUANTILE_SAMPLE_SIZE, torch.device("cpu"))].abs()
    torch.testing.assert_close(eps[2], torch.quantile(dense, 0.9))


def test_very_sparse_gradient_gives_a_nonzero_root_update():
    from root_hf import ROOT

    for placement in range(20):
        g = torch.Generator().manual_seed(placement)
        w = torch.nn.Parameter(torch.zeros(2048, 2048))
        grad = torch.zeros(2048, 2048)
        grad.view(-1)[torch.randint(grad.numel(), (50,), generator=g)] = torch.randn(50, generator=g)
        w.grad = grad
        ROOT([w], lr=0.01, weight_decay=0.0, ns_steps=0).step()  # the clipped momentum itself
        assert w.detach().abs().max() > 0, placement
