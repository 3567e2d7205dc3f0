"""Properties of Newton-Schulz orthogonalization (root_hf/optim/newton_schulz.py)."""

import pytest
import torch

from root_hf import orthogonalize
from root_hf.optim.newton_schulz import newton_schulz, resolve_ns_dtype
from root_hf.schedules import MUON_COEFFICIENTS, composed_polynomial, get_schedule, schedule_band
from tests.utils import matrix_with_singular_values


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (32, 32)])
@pytest.mark.parametrize("schedule", ["muon", "root-paper-safe", [(3.0, -3.2, 1.2), *[(2.0, -1.5, 0.5)] * 4]])
def test_output_singular_values_are_the_composed_polynomial_of_the_input_ones(shape, schedule):
    m, n = shape
    s = torch.logspace(-2, 0, min(m, n), dtype=torch.float64)
    G = matrix_with_singular_values(m, n, s)
    X = orthogonalize(G, ns_coefficients=schedule, ns_steps=5, eps=0.0)
    expected = composed_polynomial(get_schedule(schedule, shape, 5), s / s.norm())
    got = torch.linalg.svdvals(X)
    torch.testing.assert_close(got.sort().values, expected.sort().values, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(8, 200), (200, 8), (64, 64), (48, 96)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_singular_values_stay_within_the_schedule_band(shape, dtype):
    G = torch.randn(4, *shape)
    X = orthogonalize(G, ns_coefficients="muon", ns_dtype=dtype, out_dtype=torch.float64)
    hi = schedule_band(get_schedule("muon", shape, 5))[1]
    slack = 0.02 if dtype == "bfloat16" else 1e-4  # bf16 rounding of the iterates
    assert torch.linalg.svdvals(X).max() <= hi + slack


def test_muon_band_is_the_documented_one():
    """SPEC section 2: Muon's outputs end in [0.68, 1.20]; its peak 1.2024 is at a tiny input (x ~ 0.004)."""
    lo = schedule_band((MUON_COEFFICIENTS,) * 5, x_min=0.05)[0]
    hi = schedule_band((MUON_COEFFICIENTS,) * 5)[1]
    assert 0.68 < lo < 0.69 and 1.20 < hi < 1.21


def test_batched_call_equals_one_matrix_at_a_time():
    G = torch.randn(3, 2, 24, 40, dtype=torch.float64)
    X = orthogonalize(G)
    for idx in [(0, 0), (1, 1), (2, 0)]:
        torch.testing.assert_close(X[idx], orthogonalize(G[idx]), rtol=1e-12, atol=1e-13)


def test_tall_input_gives_the_transpose_of_the_wide_result():
    G = torch.randn(24, 40, dtype=torch.float64)
    torch.testing.assert_close(orthogonalize(G.T), orthogonalize(G).T, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tall_batch_runs_in_the_wide_form_and_matches_float64(dtype):
    """Tall half-precision batches are iterated as their transposes (the fast layout on CPU): the result is a
    transposed view of a contiguous wide batch and agrees with the float64 tall iteration to bf16/fp16 rounding."""
    g = torch.randn(3, 96, 32, dtype=torch.float64)
    x0 = g / torch.linalg.vector_norm(g, dim=(1, 2), keepdim=True)
    schedule = get_schedule("muon", (96, 32), 5)
    got = newton_schulz(x0.to(dtype), schedule)
    assert got.shape == (3, 96, 32) and got.mT.is_contiguous()
    expected = newton_schulz(x0.clone(), schedule)
    assert expected.is_contiguous()  # float64 contiguous tall input keeps the tall form, no transpose
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=0.05)


def test_batch_of_one_equals_the_same_matrix_in_a_larger_batch():
    """A batch of one runs as 2-D GEMMs (mm/addmm), larger batches as bmm/baddbmm: the same map."""
    x = torch.randn(4, 24, 40, dtype=torch.float64)
    x = x / torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
    schedule = get_schedule("adaptive", (24, 40), 5)
    batched = newton_schulz(x.clone(), schedule)
    for k in range(4):
        single = newton_schulz(x[k : k + 1].clone(), schedule)
        assert single.shape == (1, 24, 40)
        torch.testing.assert_close(single[0], batched[k], rtol=1e-12, atol=1e-14)


def test_zero_matrix_orthogonalizes_to_zero():
    X = orthogonalize(torch.zeros(2, 5, 7))
    assert torch.equal(X, torch.zeros(2, 5, 7))


def test_scale_invariance():
    G = torch.randn(16, 48, dtype=torch.float64)
    torch.testing.assert_close(orthogonalize(G, eps=0.0), orthogonalize(1e4 * G, eps=0.0))


def test_output_dtype_defaults_to_input_dtype():
    G = torch.randn(8, 12, dtype=torch.bfloat16)
    assert orthogonalize(G).dtype == torch.bfloat16
    assert orthogonalize(G, out_dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize(
    "ns_dtype,device,expected",
    [
        ("auto", "cuda", torch.bfloat16),
        ("bfloat16", "cpu", torch.bfloat16),
        (torch.float16, "cpu", torch.float16),
    ],
)
def test_ns_dtype_resolution(ns_dtype, device, expected):
    assert resolve_ns_dtype(ns_dtype, torch.device(device)) == expected


@pytest.mark.parametrize("native_bf16,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_ns_dtype_on_cpu_is_bfloat16_only_with_native_bfloat16_matmul(monkeypatch, native_bf16, expected):
    import sys

    monkeypatch.setattr(sys.modules[resolve_ns_dtype.__module__], "cpu_has_native_bf16", lambda: native_bf16)
    assert resolve_ns_dtype("auto", torch.device("cpu")) == expected
    assert resolve_ns_dtype("auto", torch.device("cpu"), torch.bfloat16) == expected
    assert resolve_ns_dtype("auto", torch.device("cpu"), torch.float64) == torch.float64


@pytest.mark.parametrize(
    "cpuinfo,expected",
    [
        ("processor : 0\nflags : fpu sse avx512f avx512_bf16 amx_tile\n", True),
        ("flags\t\t: fpu avx2 amx_bf16\n", True),
        ("Features : fp asimd bf16 i8mm\n", True),
        ("flags : fpu sse avx2 avx512f\n", False),
        ("model name : AMD EPYC avx512_bf16\n", False),  # a flag only counts on a flags / Features line
        ("", False),
    ],
)
def test_native_bfloat16_is_read_from_the_cpu_feature_flags(cpuinfo, expected):
    import sys

    assert sys.modules[resolve_ns_dtype.__module__]._has_bf16_flag(cpuinfo) is expected


def test_auto_ns_dtype_keeps_float64_input_in_float64():
    assert resolve_ns_dtype("auto", torch.device("cpu"), torch.float64) == torch.float64


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: orthogonalize(torch.randn(5)), "at least 2 dims"),
        (lambda: orthogonalize(torch.randn(3, 3), ns_dtype="int8"), "ns_dtype"),
        (lambda: orthogonalize(torch.randn(3, 3), ns_coefficients="bogus"), "ns_coefficients"),
        (lambda: orthogonalize(torch.randn(3, 3), ns_steps=-2), "ns_steps"),
    ],
)
def test_invalid_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
