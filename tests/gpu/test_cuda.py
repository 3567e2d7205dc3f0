"""ROOT on CUDA: bfloat16 Newton-Schulz against float64, ROOT steps against CPU steps, a tiny bf16 Trainer run.

Skipped without a GPU (tests/conftest.py); `benchmarks/gpu_check.sh` runs them on one.
"""

import math
import sys

import pytest
import torch

from root_hf import ROOT, orthogonalize
from root_hf.schedules import get_schedule

pytestmark = pytest.mark.gpu

_ns_module = sys.modules[orthogonalize.__module__]  # optim/orthogonalize.py, or optim/newton_schulz.py after the move
newton_schulz, resolve_ns_dtype = _ns_module.newton_schulz, _ns_module.resolve_ns_dtype

# The benchmark shapes (benchmarks/step_time.py): SmolLM2-135M and Llama-3.2-1B hidden matrices, both orientations.
SHAPES = [(576, 1536), (1536, 576), (192, 576), (2048, 8192), (8192, 2048), (512, 2048)]


def _polar(g: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    return u @ vh


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_auto_ns_dtype_is_bfloat16_on_cuda():
    assert resolve_ns_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_ns_dtype("auto", torch.device("cuda"), torch.float64) == torch.float64


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bf16_newton_schulz_on_cuda_tracks_float64(shape):
    """Same schedule, same X_0: bf16 on the GPU vs float64 on the GPU, and both vs the exact polar factor."""
    g = torch.randn(*shape, dtype=torch.float64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    schedule = get_schedule("adaptive", shape, 5)
    x0 = g / g.norm()
    x64 = newton_schulz(x0.clone(), schedule)
    x16 = newton_schulz(x0.to(torch.bfloat16), schedule)
    assert x16.dtype == torch.bfloat16 and torch.isfinite(x16).all()
    # measured on CPU bf16 (fp32 accumulation, as cuBLAS): 0.005-0.008 apart; error vs polar within 0.004 of float64
    assert _rel(x16, x64) < 0.03
    polar = _polar(g)
    assert abs(_rel(x16, polar) - _rel(x64, polar)) < 0.015
    assert torch.linalg.svdvals(x16.double()).max() < 1.25


def test_orthogonalize_default_on_cuda_is_bf16_and_batched():
    g = torch.randn(4, 576, 1536, device="cuda")
    x = orthogonalize(g, out_dtype=torch.float32)
    ref = orthogonalize(g.double(), ns_dtype="float64")
    assert x.shape == g.shape and torch.isfinite(x).all()
    for k in range(4):
        assert _rel(x[k], ref[k]) < 0.03


def _model_params(device: str, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(192, 576), (576, 576), (576, 576), (1536, 576), (576, 1536), (64,)]
    return [torch.nn.Parameter((torch.randn(s, generator=gen, dtype=torch.float64) * 0.02).to(device)) for s in shapes]


@pytest.mark.parametrize("ns_dtype", ["float32", "auto"])
def test_root_step_on_cuda_matches_a_float64_cpu_step(ns_dtype):
    """Several shapes (batched buckets, tall and wide, an AdamW vector), 3 steps, against float64 on the CPU."""
    cpu = _model_params("cpu")
    gpu = [torch.nn.Parameter(p.detach().float().cuda()) for p in cpu]
    opt_cpu = ROOT(cpu, lr=0.01, ns_dtype="float64")
    opt_gpu = ROOT(gpu, lr=0.01, ns_dtype=ns_dtype)
    gen = torch.Generator().manual_seed(1)
    start = [p.detach().clone() for p in cpu]
    for _ in range(3):
        for pc, pg in zip(cpu, gpu, strict=True):
            g = torch.randn(pc.shape, generator=gen, dtype=torch.float64)
            pc.grad, pg.grad = g, g.float().cuda()
        opt_cpu.step()
        opt_gpu.step()
    tol = 0.02 if ns_dtype == "auto" else 2e-3  # bf16 NS on CUDA by default
    for pc, pg, p0 in zip(cpu, gpu, start, strict=True):
        change_cpu, change_gpu = pc.detach() - p0, pg.detach().double().cpu() - p0
        assert _rel(change_gpu, change_cpu) < tol, tuple(pc.shape)


def test_root_step_with_bf16_params_on_cuda_keeps_float32_state():
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).cuda()
    model.to(torch.bfloat16)
    opt = ROOT(model.parameters(), lr=0.01)
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True))
    buffers = [v for s in opt.state.values() for k, v in s.items() if k != "step" and torch.is_tensor(v)]
    assert buffers and all(v.dtype == torch.float32 for v in buffers)


def test_bf16_autocast_training_on_cuda_lowers_the_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).cuda()
    opt = ROOT(model.parameters(), lr=0.02)
    x, y = torch.randn(256, 64, device="cuda"), torch.randn(256, 8, device="cuda")
    losses = []
    for _ in range(30):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (model(x).float() - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0]


def test_tiny_bf16_trainer_run_with_optim_root(tmp_path):
    transformers = pytest.importorskip("transformers")
    import root_hf

    register = getattr(root_hf, "register_root_optimizer", None)
    if register is not None:
        register()
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 16, (32,), generator=gen) for _ in range(64)]  # 16 of 128 tokens: learnable
    data = [{"input_ids": r, "labels": r.clone(), "attention_mask": torch.ones_like(r)} for r in rows]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        optim="root",
        learning_rate=3e-3,
        max_steps=12,
        per_device_train_batch_size=8,
        bf16=True,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(opt, ROOT)
    assert next(model.parameters()).is_cuda
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(model.named_parameters())[q].detach(), before[q])


# -- issue 21: a steady step never waits for the GPU -----------------------------------------------------------------


def _cuda_groups(model: str) -> list[dict]:
    from tests.optim.test_sync_free_step import MODELS

    groups = MODELS[model]()
    for group in groups:
        group["params"] = [torch.nn.Parameter(p.detach().cuda()) for p in group["params"]]
    return groups


@pytest.mark.parametrize("mode", ["raise", "skip", "ignore"])
@pytest.mark.parametrize("model", ["linear", "conv", "experts", "split", "bf16", "big"])
def test_steady_cuda_step_runs_under_sync_debug_mode_error(model, mode):
    """Steps 2 and 3 under `torch.cuda.set_sync_debug_mode("error")`: any host sync raises."""
    from tests.optim.test_sync_free_step import _grads

    groups = _cuda_groups(model)
    opt = ROOT(groups, lr=0.01, weight_decay=0.1, nonfinite_grads=mode, ns_coefficients="muon")
    _grads(groups, 0)
    opt.step()
    torch.cuda.synchronize()
    for step in (1, 2):
        _grads(groups, step)  # built before the debug mode: the CPU -> GPU copies of test data are not the step's
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for g in groups for p in g["params"])


def test_nonfinite_cuda_step_changes_nothing_and_raises_at_a_later_step():
    from tests.optim.test_sync_free_step import _grads

    groups = _cuda_groups("experts") + _cuda_groups("linear")
    opt = ROOT(groups, lr=0.01, weight_decay=0.1)
    _grads(groups, 0)
    opt.step()
    before = [p.detach().clone() for g in groups for p in g["params"]]
    _grads(groups, 1, nonfinite=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()  # gated on the device; the flag's copy to the host is still under way or just done
    except FloatingPointError:
        pass  # the copy had completed already: raised in the same step, also fine
    else:
        torch.cuda.synchronize()
        _grads(groups, 2)
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    after = [p.detach() for g in groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_cuda_batch_cap_is_bounded_by_memory_not_threads():
    from root_hf.optim.functional import MAX_BATCH_ELEMENTS_PER_THREAD, batch_cap

    cap = batch_cap(torch.device("cuda"))
    total = torch.cuda.get_device_properties(0).total_memory
    assert cap > MAX_BATCH_ELEMENTS_PER_THREAD * torch.get_num_threads()
    assert 64 * 2048 * 2048 <= 4 * cap and cap * 8 < total
