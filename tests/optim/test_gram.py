"""The Gram form of Newton-Schulz (root_hf/optim/newton_schulz.py): the same map as the standard form, as accurate
in bfloat16, float16 and float32, inside the schedule's band, and the `ns_method` option from the table to the step.

Accuracy tolerance (stated once, `TOLERANCE`): the Gram form's relative Frobenius error against the exact polar factor
is at most `1.1 x` the standard form's plus an absolute term per dtype; its largest output singular value is at most
the schedule's band edge plus the rounding slack the standard form's band test allows (`SLACK`).
"""

import os

import pytest
import torch

from benchmarks.harness import SMOLLM2_135M, llama_hidden_shapes
from root_hf import ROOT, orthogonalize
from root_hf.optim import newton_schulz as ns
from root_hf.optim.hyperparams import HYPERPARAMS, parse_optim_args
from root_hf.optim.newton_schulz import gram_flop_ratio, newton_schulz, select_ns_method
from root_hf.schedules import get_schedule, schedule_band
from root_hf.schedules.table import TABLE

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (relative factor, absolute term) of the error bound, and the band slack, by dtype (see the module docstring).
TOLERANCE = {torch.bfloat16: (1.1, 0.01), torch.float16: (1.1, 0.002), torch.float32: (1.1, 1e-4)}
SLACK = {torch.bfloat16: 0.02, torch.float16: 0.005, torch.float32: 1e-4}

LLAMA_32_1B = {"hidden": 2048, "intermediate": 8192, "heads": 32, "kv_heads": 8, "head_dim": 64}
LLAMA_31_8B = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128}
QWEN3_30B_A3B_EXPERT = [(768, 2048), (2048, 768)]  # one expert's gate/up and down (moe_intermediate_size 768)


def _key(shape: tuple[int, int]) -> tuple[int, int]:
    return (min(shape), max(shape))


def _all_shapes() -> list[tuple[int, int]]:
    """Every shape of the shipped table (as wide matrices) and of the benchmark sets (as they are), each once."""
    shapes = [tuple(s) for s in TABLE]
    for dims in (SMOLLM2_135M, LLAMA_32_1B, LLAMA_31_8B):
        shapes += [tuple(s) for s in llama_hidden_shapes(**dims)]
    shapes += QWEN3_30B_A3B_EXPERT
    out: list[tuple[int, int]] = []
    for s in shapes:
        if s not in out:
            out.append(s)
    return out


def _cost(shape: tuple[int, int]) -> int:
    return min(shape) ** 2 * max(shape)


ALL_SHAPES = _all_shapes()
# The default run: a sample, every third shape up to 2^21 multiply-adds per Gram product and SmolLM2-135M's k/v
# projection (a few seconds in all; float16 matmuls are slow on CPU); every shape under `slow`.
FAST = [*[s for s in ALL_SHAPES if _cost(s) <= 2**21][::3], (192, 576)]
# `slow` (run in CI): shapes up to these k^2 K costs. CPUs without native half-precision matmul emulate bfloat16 and
# float16 (about 1 GFLOP/s measured on the 2-core AMD EPYC development machine, vs 18-37 in float32), so the largest
# shapes (Llama-3.1-8B's 4096 x 14336: hours there) are the full sweep, run with ROOT_HF_FULL_GRAM_SWEEP=1 (minutes
# on a GPU or a CPU with AVX512-BF16 / AMX).
SLOW_LIMIT = {torch.bfloat16: 2**25, torch.float16: 2**25, torch.float32: 2**29}
FULL_SWEEP = os.environ.get("ROOT_HF_FULL_GRAM_SWEEP") == "1"


def _shape_dtype_params() -> list:
    out = []
    for shape in ALL_SHAPES:
        for dtype in DTYPES:
            ident = f"{shape[0]}x{shape[1]}-{str(dtype).removeprefix('torch.')}"
            if shape in FAST:
                out.append(pytest.param(shape, dtype, id=ident))
            elif _cost(shape) <= SLOW_LIMIT[dtype] or FULL_SWEEP:
                out.append(pytest.param(shape, dtype, id=ident, marks=pytest.mark.slow))
            else:
                skip = pytest.mark.skip(reason="full sweep only: set ROOT_HF_FULL_GRAM_SWEEP=1")
                out.append(pytest.param(shape, dtype, id=ident, marks=[pytest.mark.slow, skip]))
    return out


def _polar_case(shape: tuple[int, int], rank: int | None = None, seed: int = 0):
    """A matrix with log-spaced singular values 1e-3..1 (zeros beyond `rank`) and its exact polar factor."""
    m, n = shape
    k = min(shape)
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(-3, 0, k, dtype=torch.float64).flip(0)
    r = k if rank is None else rank
    s[r:] = 0
    return (u * s) @ v.T, u[:, :r] @ v[:, :r].T


def _error(x: torch.Tensor, polar: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(x.double() - polar) / torch.linalg.matrix_norm(polar)).item()


def _max_singular_value(x: torch.Tensor) -> float:
    x = x.double()
    gram = x @ x.mT if x.shape[-2] <= x.shape[-1] else x.mT @ x
    return torch.linalg.eigvalsh(gram).max().clamp(min=0).sqrt().item()


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (32, 32), (1, 9), (9, 1)])
@pytest.mark.parametrize(
    "schedule", ["muon", "polar-express", "root-paper-safe", [(3.0, -3.2, 1.2), *[(2.0, -1.5, 0.5)] * 4]]
)
def test_gram_form_is_the_standard_map_in_float64(shape, schedule):
    """In exact-enough arithmetic both forms compute the same composed polynomial of X_0 (batched, wide and tall)."""
    x = torch.randn(3, *shape, dtype=torch.float64)
    x = x / torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
    steps = get_schedule(schedule, shape, 5)
    standard = newton_schulz(x.clone(), steps, "standard")
    gram = newton_schulz(x.clone(), steps, "gram")
    assert gram.shape == standard.shape
    torch.testing.assert_close(gram, standard, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("shape", "dtype"), _shape_dtype_params())
def test_gram_error_and_band_match_the_standard_form_on_every_shipped_and_benchmark_shape(shape, dtype):
    """Against the float64 polar factor, the Gram form's error is within `TOLERANCE` of the standard form's, and its
    largest output singular value stays in the adaptive schedule's band (plus the standard form's rounding slack)."""
    g, polar = _polar_case(shape)
    schedule = get_schedule("adaptive", shape, 5)
    x0 = (g / torch.linalg.vector_norm(g)).to(dtype)
    standard = newton_schulz(x0.clone(), schedule, "standard")
    gram = newton_schulz(x0.clone(), schedule, "gram")
    factor, atol = TOLERANCE[dtype]
    assert _error(gram, polar) <= factor * _error(standard, polar) + atol
    assert _max_singular_value(gram) <= schedule_band(schedule)[1] + SLACK[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", ["muon", "polar-express", "root-paper-safe"])
@pytest.mark.parametrize("shape", [(64, 192), (192, 64), (64, 64)])
def test_gram_form_is_as_accurate_with_every_named_schedule(shape, schedule, dtype):
    """Schedules with large first coefficients (Polar Express: a = 8.3) make Q grow fastest between restarts."""
    g, polar = _polar_case(shape, seed=1)
    steps = get_schedule(schedule, shape, 5)
    x0 = (g / torch.linalg.vector_norm(g)).to(dtype)
    standard = newton_schulz(x0.clone(), steps, "standard")
    gram = newton_schulz(x0.clone(), steps, "gram")
    factor, atol = TOLERANCE[dtype]
    assert _error(gram, polar) <= factor * _error(standard, polar) + atol
    assert _max_singular_value(gram) <= schedule_band(steps)[1] + SLACK[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])
def test_low_rank_input_keeps_its_null_space_empty_in_the_gram_form(shape, dtype):
    """Rank 8 of k = 64: the polar factor is U_r V_r^T; the zero singular values stay (near) zero in both forms."""
    g, polar = _polar_case(shape, rank=8, seed=2)
    schedule = get_schedule("adaptive", shape, 5)
    x0 = (g / torch.linalg.vector_norm(g)).to(dtype)
    standard = newton_schulz(x0.clone(), schedule, "standard")
    gram = newton_schulz(x0.clone(), schedule, "gram")
    factor, atol = TOLERANCE[dtype]
    assert _error(gram, polar) <= factor * _error(standard, polar) + atol
    assert _max_singular_value(gram) <= schedule_band(schedule)[1] + SLACK[dtype]


def test_restarts_are_what_keeps_half_precision_in_the_band():
    """The measurement behind the restarts: without them, bfloat16 Q and R drift and the output leaves the band."""
    g, _ = _polar_case((192, 576), rank=96, seed=3)
    schedule = get_schedule("adaptive", (192, 576), 5)
    x0 = (g / torch.linalg.vector_norm(g)).to(torch.bfloat16)
    hi = schedule_band(schedule)[1] + SLACK[torch.bfloat16]
    assert _max_singular_value(newton_schulz(x0.clone(), schedule, "gram")) <= hi
    saved = dict(ns._GRAM_RESTART_EVERY)
    try:
        ns._GRAM_RESTART_EVERY[torch.bfloat16] = 0
        assert _max_singular_value(newton_schulz(x0.clone(), schedule, "gram")) > hi
    finally:
        ns._GRAM_RESTART_EVERY.update(saved)


@pytest.mark.parametrize("method", ["standard", "gram"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_degenerate_inputs_behave_as_in_the_standard_form(method, dtype):
    zeros = orthogonalize(torch.zeros(2, 32, 128), ns_method=method, ns_dtype=dtype)
    assert torch.equal(zeros, torch.zeros(2, 32, 128))
    g = torch.randn(64, 192, dtype=torch.float64)
    reference = orthogonalize(g, ns_method="standard", ns_dtype=dtype, eps=0.0, out_dtype=torch.float64)
    for scale in (1e-20, 1e20):  # the norm is taken in float32 or wider, so the scale drops out
        got = orthogonalize(scale * g, ns_method=method, ns_dtype=dtype, eps=0.0, out_dtype=torch.float64)
        torch.testing.assert_close(got, reference, rtol=0, atol=0.03 if dtype != "float32" else 1e-4)
    factor, atol = TOLERANCE[getattr(torch, dtype)]
    for shape in [(1, 64), (64, 1)]:  # k = 1: the one singular value goes to p(1); as close to float64 as standard
        v = torch.randn(shape, dtype=torch.float64)

        def run(m: str, d: str, v: torch.Tensor = v) -> torch.Tensor:
            return orthogonalize(v, ns_coefficients="muon", ns_method=m, ns_dtype=d, out_dtype=torch.float64)

        exact = run("standard", "float64")
        assert _error(run(method, dtype), exact) <= factor * _error(run("standard", dtype), exact) + atol


def test_batched_gram_call_equals_one_matrix_at_a_time():
    """Same-shape buckets and fused experts (leading dims): each matrix as if alone (a batch of one runs as mm)."""
    g = torch.randn(3, 2, 32, 128, dtype=torch.float64)
    x = orthogonalize(g, ns_method="gram")
    for idx in [(0, 0), (1, 1), (2, 0)]:
        torch.testing.assert_close(x[idx], orthogonalize(g[idx], ns_method="gram"), rtol=1e-12, atol=1e-13)


def test_gram_flop_ratio_counts_the_products():
    """Square matrices cost more in the Gram form, 4:1 rectangles less; restarts add one X X^T and one Q X each."""
    assert gram_flop_ratio((512, 512), 5, torch.float32) > 1
    assert gram_flop_ratio((512, 2048), 5, torch.float32) < 0.6
    assert gram_flop_ratio((512, 2048), 5, torch.bfloat16) > gram_flop_ratio((512, 2048), 5, torch.float32)
    assert gram_flop_ratio((512, 2048), 5, torch.float32) == gram_flop_ratio((2048, 512), 5, torch.float32)


def test_auto_picks_gram_for_wide_rectangles_and_standard_for_square_or_tiny_matrices():
    for dtype in (torch.float32, torch.bfloat16):
        assert select_ns_method("auto", (2048, 8192), 5, dtype, "cpu") == "gram"
        assert select_ns_method("auto", (576, 576), 5, dtype, "cpu") == "standard"
        assert select_ns_method("auto", (4, 4096), 5, dtype, "cpu") == "standard"
    assert select_ns_method("gram", (576, 576), 5, torch.float32, "cpu") == "gram"
    assert select_ns_method("standard", (2048, 8192), 5, torch.float32, "cpu") == "standard"
    with pytest.raises(ValueError, match="ns_method"):
        select_ns_method("fast", (4, 4), 5, torch.float32, "cpu")


def test_ns_method_is_declared_once_and_reaches_the_step(monkeypatch):
    assert HYPERPARAMS["ns_method"].default == "auto"
    assert parse_optim_args("ns_method=gram") == {"ns_method": "gram"}
    with pytest.raises(ValueError, match="ns_method"):
        ROOT([torch.nn.Parameter(torch.randn(4, 8))], ns_method="fast")
    seen = []
    real = ns.newton_schulz

    def spy(x, schedule, method="standard"):
        seen.append((tuple(x.shape[-2:]), method))
        return real(x, schedule, method)

    monkeypatch.setattr("root_hf.optim.functional.newton_schulz", spy)
    params = [torch.nn.Parameter(torch.randn(64, 256)), torch.nn.Parameter(torch.randn(4, 128))]
    for method, expected in [("gram", ["gram", "gram"]), ("standard", ["standard", "standard"])]:
        opt = ROOT(params, ns_method=method, ns_dtype="float32")
        for p in params:
            p.grad = torch.randn_like(p)
        seen.clear()
        opt.step()
        assert sorted(m for _, m in seen) == expected
    opt = ROOT(params, ns_dtype="float32")  # auto: resolved when the params were added
    assert opt._ns_methods[(64, 256, 5, torch.float32, "cpu")] == select_ns_method(
        "auto", (64, 256), 5, torch.float32, "cpu"
    )
    seen.clear()
    opt.step()
    assert dict(seen) == {
        (64, 256): select_ns_method("auto", (64, 256), 5, torch.float32, "cpu"),
        (4, 128): select_ns_method("auto", (4, 128), 5, torch.float32, "cpu"),
    }


def test_gram_and_standard_steps_agree_in_float64():
    """A whole ROOT step (clip, momentum, scale) with either form: the same update to float64 rounding."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 256, dtype=torch.float64)) for _ in range(2)]
    params.append(torch.nn.Parameter(torch.randn(3, 128, 32, dtype=torch.float64)))
    grads = [torch.randn_like(p) for p in params]
    results = {}
    for method in ("standard", "gram"):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = ROOT([{"params": ps[:2]}, {"params": ps[2:], "matrix_view": "batched"}], lr=0.02, ns_method=method)
        for _ in range(2):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            opt.step()
        results[method] = ps
    for a, b in zip(results["standard"], results["gram"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (2048, 8192), (512, 512)])
def test_gram_form_on_cuda_is_as_accurate_as_the_standard_form(shape, dtype):
    """Both forms on the GPU (cuBLAS, TF32 as configured): the same tolerance and band as on CPU."""
    g, polar = _polar_case(shape, seed=4)
    g, polar = g.cuda(), polar.cuda()
    schedule = get_schedule("adaptive", shape, 5)
    x0 = (g / torch.linalg.vector_norm(g)).to(dtype)
    standard = newton_schulz(x0.clone(), schedule, "standard")
    gram = newton_schulz(x0.clone(), schedule, "gram")
    factor, atol = TOLERANCE[dtype]
    assert _error(gram, polar) <= factor * _error(standard, polar) + atol
    assert _max_singular_value(gram) <= schedule_band(schedule)[1] + SLACK[dtype]
