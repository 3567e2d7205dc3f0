"""Optimizer step time on the hidden matrices of a SmolLM2-135M-shaped model: ROOT vs torch.optim.Muon vs AdamW.

Usage:  python benchmarks/step_time.py [--layers 6] [--steps 5] [--threads 2] [--device cpu|cuda]
                                       [--sections main,breakdown,sweep,memory] [--save [PATH]]

Sections (all by default):

- ``main``: the median step time of each optimizer (grads are fixed random tensors, so only the optimizer is timed),
  the ratio ROOT / torch Muon at equal Newton-Schulz dtype (torch.optim.Muon always iterates in bfloat16), and the
  share of ROOT's step spent in the quantile clip (ROOT with clip_quantile=0.90 vs None).
- ``breakdown``: ROOT's step split into its components (momentum, quantile + clip, normalize + Newton-Schulz, weight
  update), run batched by shape exactly as ``ROOT.step`` does, in float32 and bfloat16; the Newton-Schulz FLOP rate
  per shape against the machine's matmul peak, measured in the same run with a large square matmul of that dtype;
  and the top operators of one ROOT step under ``torch.profiler``.
- ``sweep``: step time of one Llama-style layer (intermediate = 8/3 hidden) for hidden in {256, 576, 1024, 2048}.
- ``memory``: optimizer-state bytes per parameter of the full SmolLM2-135M architecture (random weights, all 30
  layers), read from the real optimizer state after one step.
- ``batch-cap`` (ask for it): ROOT's step (bf16 NS) under each candidate of
  ``root_hf.optim.functional.MAX_BATCH_ELEMENTS_PER_THREAD`` (2**22, 2**21, 2**20) against ``torch.optim.Muon``,
  interleaved in one process, per shape set: the figures the default cap was chosen from.
- ``gram-peers`` (ask for it; root_hf issue 22): ROOT (each ``ns_method`` its hyperparameter table accepts, in each
  ``--ns-dtypes``) against DeepSpeed's Muon (Gram and standard Newton-Schulz), microsoft/dion's Muon (Polar Express,
  and Gram through ``gram-newton-schulz``), ``torch.optim.Muon`` and the ``bench`` peers, on the layers of
  SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B and Qwen3-30B-A3B (experts as batched ``(E, out, in)`` tensors, router on
  AdamW): step time (interleaved medians), FLOPs per step (counted with ``FlopCounterMode``) and each optimizer's
  error against the exact polar factor (float64 SVD) of the same input, then the issue 22 target ratios.
  ``--gram-sets``, ``--experts``, ``--distinct-shapes``, ``--gram-peers`` and ``--rounds`` cut it down for a CPU.
- ``adamw-foreach`` (ask for it): ROOT's AdamW branch (all params ``use_root=False``; ``nonfinite_grads`` "ignore"
  and the default "raise") against ``torch.optim.AdamW(foreach=True)`` on the same params (target <= 1.1x), and
  against the AdamW branch of ``--before-ref`` (git main by default, imported from a ``git archive`` copy).
- ``elementwise`` (ask for it): ROOT's step outside Newton-Schulz (clip off, ``newton_schulz`` replaced by the
  identity: momentum, U_t, normalization, casts, weight decay, update, the AdamW branch of the vectors and the
  non-finite check) now and at ``--before-ref``, interleaved in one process.
- ``compile`` (ask for it): ``torch.compile`` of the elementwise functions of the step (the AdamW branch and the
  momentum / Nesterov / weight-decay update of the matrices) against eager: compile time and step time.

``--save`` writes every figure as JSON (default ``benchmarks/results/step_time.json``), which
``benchmarks/convergence.py`` puts on the results page. Wall-clock figures on a shared machine are noisy; medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import root_hf.optim.functional as root_functional
from benchmarks.harness import (
    SMOLLM2_135M,
    interleaved_medians,
    library_versions,
    llama_hidden_shapes,
    llama_ratio_shapes,
    machine_dict,
    machine_info,
    ns_flops,
)
from root_hf import ROOT, get_schedule
from root_hf.optim.clip import soft_threshold_clip_
from root_hf.optim.functional import adjusted_lr_ratio
from root_hf.optim.newton_schulz import cpu_has_native_bf16, newton_schulz, resolve_ns_dtype
from root_hf.schedules import DEFAULT_SCHEDULE

SECTIONS = (
    "main", "breakdown", "sweep", "memory", "peers", "ns-dtype", "temp-memory", "first-step", "batch-cap", "e2e",
    "gram-peers",
    "adamw-foreach", "elementwise", "compile",
)  # fmt: skip
# what convergence.py's results page reads (collect()'s default); the CLI default adds the issue 16 sections
LEGACY_SECTIONS = ("main", "breakdown", "sweep", "memory")
CLI_DEFAULT = ("peers", "ns-dtype", "temp-memory", "first-step", "main", "breakdown", "sweep", "memory")
QUICK_SECTIONS = ("peers", "ns-dtype", "gram-peers")
SWEEP_HIDDEN = (256, 576, 1024, 2048)
PEAK_SIZES = (2048, 3072, 4096)  # square matmuls timed for the machine's peak; the fastest counts
CUDA_PEAK_SIZES = (4096, 8192)  # an H200 reaches its bf16 peak (about 790 TFLOP/s) only on large products
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "step_time.json"
DEFAULT_PLOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "step_time_peers.png"


def make_params(
    layers: int, device: str = "cpu", seed: int = 0, dims: dict[str, int] | None = None
) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(layers):
        for shape in llama_hidden_shapes(**(dims or SMOLLM2_135M)):
            p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(device))
            p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device)
            params.append(p)
    return params


def synchronized(step, device: str):
    """Time a step including the device work it queued."""

    def run():
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


# --------------------------------------------------------------------------------------------------------------------
# main: whole-step times
# --------------------------------------------------------------------------------------------------------------------


def optimizer_builders(params: list[torch.nn.Parameter]) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    return {
        "AdamW (foreach)": lambda: torch.optim.AdamW(params, lr=1e-3, foreach=True),
        "torch.optim.Muon (bf16 NS)": lambda: torch.optim.Muon(params, lr=1e-3, adjust_lr_fn="match_rms_adamw"),
        "ROOT (bf16 NS)": lambda: ROOT(params, lr=1e-3, ns_dtype="bfloat16"),
        "ROOT (bf16 NS, no clip)": lambda: ROOT(params, lr=1e-3, ns_dtype="bfloat16", clip_quantile=None),
        "ROOT (fp32 NS, CPU default)": lambda: ROOT(params, lr=1e-3, ns_dtype="float32"),
        "ROOT (fp32 NS, no clip)": lambda: ROOT(params, lr=1e-3, ns_dtype="float32", clip_quantile=None),
    }


def run_main(layers: int, steps: int, device: str) -> dict[str, Any]:
    params = make_params(layers, device)
    n_params = sum(p.numel() for p in params)
    print(
        f"config: {layers} layers of SmolLM2-135M hidden matrices, {len(params)} tensors, "
        f"{n_params / 1e6:.1f}M params, median of {steps} steps after 2 warm-up steps "
        "(optimizers timed in turns, step by step)"
    )
    opts = {name: build() for name, build in optimizer_builders(params).items()}  # shared params, own states
    times = interleaved_medians({name: synchronized(o.step, device) for name, o in opts.items()}, steps)
    for name, t in times.items():
        print(f"  {name:<30} {t * 1e3:9.1f} ms/step")

    muon = times["torch.optim.Muon (bf16 NS)"]
    ratio = times["ROOT (bf16 NS)"] / muon
    clip_bf16 = 1 - times["ROOT (bf16 NS, no clip)"] / times["ROOT (bf16 NS)"]
    clip_fp32 = 1 - times["ROOT (fp32 NS, no clip)"] / times["ROOT (fp32 NS, CPU default)"]
    print(f"ROOT / torch.optim.Muon at equal NS dtype (bf16): {ratio:.2f}x  (target <= 1.0x)")
    print(f"clip share of the ROOT step: {clip_bf16:.1%} (bf16 NS), {clip_fp32:.1%} (fp32 NS)  (target < 5%)")
    print(f"ROOT fp32 / AdamW: {times['ROOT (fp32 NS, CPU default)'] / times['AdamW (foreach)']:.1f}x")
    return {
        "layers": layers,
        "tensors": len(params),
        "params": n_params,
        "steps": steps,
        "ms": {k: v * 1e3 for k, v in times.items()},
        "root_over_muon_bf16": ratio,
        "clip_share_bf16": clip_bf16,
        "clip_share_fp32": clip_fp32,
    }


# --------------------------------------------------------------------------------------------------------------------
# breakdown: the components of ROOT's step, batched by shape as ROOT.step does
# --------------------------------------------------------------------------------------------------------------------

COMPONENTS = ("momentum", "quantile + clip", "normalize + NS", "weight update")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def root_step_components(
    params: list[torch.nn.Parameter],
    bufs: list[torch.Tensor],
    *,
    ns_dtype: torch.dtype,
    clip_quantile: float | None = 0.90,
    momentum: float = 0.95,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    ns_coefficients: Any = DEFAULT_SCHEDULE,
    ns_steps: int = 5,
    eps: float = 1e-7,
    device: str = "cpu",
) -> dict[str, float]:
    """One ROOT step on ``params`` (fp32, single process, Nesterov), with a timer around each component.

    Mirrors ``root_hf.optim.root``: a same-shape bucket's ``U_t`` is written into one ``(batch, m, n)`` buffer, clipped
    in place, normalized, cast to the NS dtype and orthogonalized in one batched call (tall matrices in the wide form
    when the NS dtype is half precision), then applied.
    """
    spent = dict.fromkeys(COMPONENTS, 0.0)
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for j, p in enumerate(params):
        buckets[tuple(p.shape)].append(j)
    for (m, n), idx in buckets.items():
        _sync(device)
        t0 = time.perf_counter()
        u = torch.empty((len(idx), m, n), dtype=torch.float32, device=params[idx[0]].device)
        for k, j in enumerate(idx):
            g, buf = params[j].grad, bufs[j]
            buf.mul_(momentum).add_(g)
            torch.add(g, buf, alpha=momentum, out=u[k])
        _sync(device)
        t1 = time.perf_counter()
        if clip_quantile is not None:
            soft_threshold_clip_(u, clip_quantile)
        _sync(device)
        t2 = time.perf_counter()
        norm = torch.linalg.vector_norm(u, dim=(1, 2), keepdim=True)
        u.div_(norm + eps)
        x = u.to(ns_dtype)
        x = newton_schulz(x, get_schedule(ns_coefficients, (m, n), ns_steps))
        _sync(device)
        t3 = time.perf_counter()
        scale = adjusted_lr_ratio("match_rms_adamw", (m, n))
        for k, j in enumerate(idx):
            p = params[j]
            p.data.mul_(1 - lr * weight_decay)
            p.data.add_(x[k], alpha=-lr * scale)
        _sync(device)
        t4 = time.perf_counter()
        for name, dt in zip(COMPONENTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            spent[name] += dt
    return spent


def ns_batches(
    layers: int, ns_dtype: torch.dtype, device: str, ns_coefficients: Any = DEFAULT_SCHEDULE
) -> dict[str, tuple[int, int, Callable[[], None]]]:
    """Newton-Schulz alone on each same-shape bucket of ``layers`` SmolLM2 layers: shape -> (batch, FLOPs, runner)."""
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for shape in llama_hidden_shapes(**SMOLLM2_135M):
        counts[shape] += layers
    out = {}
    g = torch.Generator().manual_seed(1)
    for (m, n), count in counts.items():
        x0 = torch.randn(count, m, n, generator=g)
        x0 = (x0 / torch.linalg.vector_norm(x0, dim=(1, 2), keepdim=True)).to(device=device, dtype=ns_dtype)
        schedule = get_schedule(ns_coefficients, (m, n), 5)

        def run(x0=x0, schedule=schedule) -> None:
            newton_schulz(x0, schedule)
            _sync(device)

        out[f"{m}x{n}"] = (count, ns_flops((m, n)) * count, run)
    return out


def matmul_runner(dtype: torch.dtype, size: int = 2048, device: str = "cpu") -> tuple[int, Callable[[], None]]:
    """A ``size``-cubed matmul in ``dtype`` (the practical peak): (FLOPs, runner)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)

    def run() -> None:
        torch.mm(a, b, out=out)
        _sync(device)

    return 2 * size**3, run


def profile_root_step(layers: int, ns_dtype: str, device: str, top: int = 10) -> str:
    """``torch.profiler`` table (self CPU time) of one ROOT step after two warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    params = make_params(layers, device)
    opt = ROOT(params, lr=1e-3, ns_dtype=ns_dtype)
    opt.step()
    opt.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        opt.step()
        _sync(device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40)


def run_breakdown(layers: int, steps: int, device: str) -> dict[str, Any]:
    print(f"\n== breakdown: ROOT step components, {layers} SmolLM2 layers, batched by shape as ROOT.step ==")
    print(
        "   (components: median over steps; peak, NS-alone and whole-step figures: medians of runs interleaved "
        "round-robin, so load drift from other jobs hits them alike)"
    )
    total_flops = sum(ns_flops(s) for s in llama_hidden_shapes(**SMOLLM2_135M)) * layers
    result: dict[str, Any] = {"layers": layers, "ns_gflop_per_step": total_flops / 1e9, "dtypes": {}}
    muon_params = make_params(layers, device)
    muon = torch.optim.Muon(muon_params, lr=1e-3, adjust_lr_fn="match_rms_adamw")
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        params = make_params(layers, device)
        bufs = [torch.zeros_like(p) for p in params]
        runs = []
        for _ in range(2 + steps):
            runs.append(root_step_components(params, bufs, ns_dtype=dtype, device=device))
        runs = runs[2:]
        med = {c: sorted(r[c] for r in runs)[len(runs) // 2] for c in COMPONENTS}
        parts = sum(med.values())
        # The peak: the fastest of three large square matmuls (single large GEMMs vary by ~10% with size and from run
        # to run on this CPU; taking one size alone put some NS shapes above "100% of peak").
        peaks = {size: matmul_runner(dtype, size, device) for size in PEAK_SIZES}
        batches = ns_batches(layers, dtype, device)
        opt = ROOT(make_params(layers, device), lr=1e-3, ns_dtype=dtype_name)
        fns: dict[str, Callable[[], object]] = {f"peak {size}": run for size, (_, run) in peaks.items()}
        fns["ROOT.step"] = synchronized(opt.step, device)
        fns |= {f"NS {shape}": run for shape, (_, _, run) in batches.items()}
        if dtype == torch.bfloat16:
            fns["torch.optim.Muon.step"] = synchronized(muon.step, device)
        t = interleaved_medians(fns, steps)
        peak_size, peak = max(
            ((size, flops / t[f"peak {size}"]) for size, (flops, _) in peaks.items()), key=lambda r: r[1]
        )
        whole = t["ROOT.step"]
        ns_rate = total_flops / med["normalize + NS"]
        by_shape = {
            shape: {"batch": count, "ms": t[f"NS {shape}"] * 1e3, "gflops": flops / t[f"NS {shape}"] / 1e9}
            for shape, (count, flops, _) in batches.items()
        }
        print(
            f"-- NS in {dtype_name}: matmul peak (fastest of {'/'.join(map(str, PEAK_SIZES))}-cubed {dtype_name} "
            f"matmuls, same run: {peak_size}) {peak / 1e9:.0f} GFLOP/s"
        )
        for c in COMPONENTS:
            print(f"  {c:<18} {med[c] * 1e3:9.1f} ms  {med[c] / parts:6.1%}")
        print(f"  {'sum of components':<18} {parts * 1e3:9.1f} ms   (ROOT.step measured: {whole * 1e3:.1f} ms)")
        print(
            f"  NS: {total_flops / 1e9:.1f} GFLOP/step -> {ns_rate / 1e9:.0f} GFLOP/s = {ns_rate / peak:.0%} of peak "
            "(normalize + NS component)"
        )
        for shape, row in by_shape.items():
            print(
                f"    NS alone on {shape:>9} x{row['batch']:<3} {row['ms']:8.1f} ms  {row['gflops']:6.0f} GFLOP/s "
                f"= {row['gflops'] * 1e9 / peak:4.0%} of peak"
            )
        result["dtypes"][dtype_name] = {
            "peak_gflops": peak / 1e9,
            "peak_matmul_size": peak_size,
            "components_ms": {c: med[c] * 1e3 for c in COMPONENTS},
            "sum_ms": parts * 1e3,
            "root_step_ms": whole * 1e3,
            "ns_gflops": ns_rate / 1e9,
            "ns_peak_fraction": ns_rate / peak,
            "ns_by_shape": {k: {**v, "peak_fraction": v["gflops"] * 1e9 / peak} for k, v in by_shape.items()},
        }
        if "torch.optim.Muon.step" in t:
            # torch.optim.Muon's whole step as NS work (its NS is bf16; the step also holds momentum and the update)
            muon_s = t["torch.optim.Muon.step"]
            result["torch_muon_step_ms"] = muon_s * 1e3
            result["torch_muon_step_gflops"] = total_flops / muon_s / 1e9
            print(
                f"-- torch.optim.Muon step {muon_s * 1e3:.1f} ms = {total_flops / muon_s / 1e9:.0f} GFLOP/s of NS "
                f"work ({total_flops / muon_s / peak:.0%} of the bf16 peak, whole step counted)"
            )
    table = profile_root_step(layers, "bfloat16", device)
    result["profile_bf16"] = table
    print("-- torch.profiler, one ROOT step (bf16 NS), top operators by self CPU time:")
    print(table)
    return result


# --------------------------------------------------------------------------------------------------------------------
# sweep: step cost against hidden size
# --------------------------------------------------------------------------------------------------------------------


def run_sweep(hidden_sizes: tuple[int, ...], steps: int, device: str) -> dict[str, Any]:
    print("\n== sweep: one Llama-style layer (intermediate = 64 * round(8 h / 3 / 64), head dim 64) ==")
    names = ("AdamW (foreach)", "torch.optim.Muon (bf16 NS)", "ROOT (bf16 NS)", "ROOT (fp32 NS, CPU default)")
    print(f"  {'hidden':>6} {'inter':>6} {'params':>8} {'NS GFLOP':>9} " + " ".join(f"{n:>28}" for n in names))
    rows = []
    for hidden in hidden_sizes:
        dims = llama_ratio_shapes(hidden)
        params = make_params(1, device, dims=dims)
        builders = optimizer_builders(params)
        n_steps = steps if hidden < 2048 else max(1, steps - 1)
        opts = {name: builders[name]() for name in names}
        t = interleaved_medians({n: synchronized(o.step, device) for n, o in opts.items()}, n_steps, warmup=1)
        ms = {name: t[name] * 1e3 for name in names}
        flops = sum(ns_flops(s) for s in llama_hidden_shapes(**dims))
        rows.append(
            {
                "hidden": hidden,
                "intermediate": dims["intermediate"],
                "params": sum(p.numel() for p in params),
                "ns_gflop": flops / 1e9,
                "steps": n_steps,
                "ms": ms,
            }
        )
        print(
            f"  {hidden:>6} {dims['intermediate']:>6} {rows[-1]['params'] / 1e6:>7.2f}M {flops / 1e9:>9.1f} "
            + " ".join(f"{ms[n]:>25.1f} ms" for n in names)
        )
    return {"rows": rows, "optimizers": list(names)}


# --------------------------------------------------------------------------------------------------------------------
# memory: optimizer-state bytes per parameter
# --------------------------------------------------------------------------------------------------------------------


def smollm2_config() -> Any:
    """SmolLM2-135M's LlamaConfig: from the converted packaged model when available, else its published values."""
    from transformers import AutoConfig, LlamaConfig

    try:
        from recipes.assets import smollm2_path

        return AutoConfig.from_pretrained(smollm2_path(progress=False))
    except (ImportError, ModuleNotFoundError, OSError):
        return LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
        )


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def run_memory() -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    config = smollm2_config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    named = list(model.named_parameters())  # tied lm_head appears once
    matrices = [p for n, p in named if p.dim() == 2 and ".layers." in f".{n}"]
    others = [p for n, p in named if not (p.dim() == 2 and ".layers." in f".{n}")]
    n_total = sum(p.numel() for _, p in named)
    n_mat = sum(p.numel() for p in matrices)
    print(
        f"\n== memory: optimizer state after one step, SmolLM2-135M architecture ({n_total / 1e6:.1f}M params: "
        f"{n_mat / 1e6:.1f}M in hidden matrices, {(n_total - n_mat) / 1e6:.1f}M embeddings/norms), fp32 params =="
    )
    for _, p in named:
        p.grad = torch.zeros_like(p)
    builds: dict[str, Callable[[], list[torch.optim.Optimizer]]] = {
        "AdamW": lambda: [torch.optim.AdamW([p for _, p in named], lr=1e-3)],
        "torch.optim.Muon (matrices) + AdamW (rest)": lambda: [
            torch.optim.Muon(matrices, lr=1e-3, adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(others, lr=1e-3),
        ],
        "ROOT (matrices) + its AdamW branch (rest)": lambda: [
            ROOT([{"params": matrices, "use_root": True}, {"params": others, "use_root": False}], lr=1e-3)
        ],
    }
    rows = {}
    for name, build in builds.items():
        opts = build()
        for opt in opts:
            opt.step()
        total = sum(state_bytes(o) for o in opts)
        mat = sum(
            v.numel() * v.element_size()
            for o in opts
            for p in matrices
            if p in o.state
            for v in o.state[p].values()
            if torch.is_tensor(v)
        )
        rows[name] = {
            "bytes": total,
            "bytes_per_param": total / n_total,
            "bytes_per_matrix_param": mat / n_mat,
            "bytes_per_other_param": (total - mat) / (n_total - n_mat),
        }
        print(
            f"  {name:<44} {total / 2**20:8.1f} MiB  {total / n_total:5.2f} B/param  "
            f"(hidden matrices {mat / n_mat:.2f} B/param, rest {(total - mat) / (n_total - n_mat):.2f} B/param)"
        )
        del opts
    return {"params": n_total, "matrix_params": n_mat, "rows": rows}


# --------------------------------------------------------------------------------------------------------------------
# peers: ROOT vs every Muon implementation at hand, per shape set and NS dtype (root_hf issue 16)
# --------------------------------------------------------------------------------------------------------------------

# Llama-3.2-1B (meta-llama/Llama-3.2-1B config.json): hidden 2048, intermediate 8192, 32 heads / 8 KV heads of dim 64.
LLAMA_32_1B = {"hidden": 2048, "intermediate": 8192, "heads": 32, "kv_heads": 8, "head_dim": 64}
# name -> (dims, decoder layers): 6 of SmolLM2-135M's 30 layers, 2 of Llama-3.2-1B's 16.
SHAPE_SETS: dict[str, tuple[dict[str, int], int]] = {
    "smollm2-135m": (SMOLLM2_135M, 6),
    "llama-3.2-1b": (LLAMA_32_1B, 2),
    # the --quick smoke run's set on a CPU without native bf16 matmul, where the peers' bf16 Newton-Schulz is
    # emulated (SmolLM2's set took 655 s of --quick on the 2-core AMD EPYC, 2026-12-07; this one takes seconds)
    "tiny-llama": ({"hidden": 64, "intermediate": 160, "heads": 2, "kv_heads": 1, "head_dim": 32}, 1),
}
NS_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}
ADAMW = "AdamW (foreach)"


class _Anything:
    """Stand-in for every attribute of a missing `triton`: Emerging-Optimizers imports it at module level for its
    optional CUDA kernel (`use_syrk`), which a CPU run never calls."""

    def __call__(self, *args: Any, **kwargs: Any) -> _Anything:
        return self

    def __getattr__(self, name: str) -> _Anything:
        return self

    def __iter__(self) -> Any:
        return iter(())


def _import_without_triton(module: str) -> Any:
    import importlib
    import importlib.util
    import types

    if importlib.util.find_spec("triton") is not None:
        return importlib.import_module(module)
    stubs = {}
    for name in ("triton", "triton.language"):
        stub = types.ModuleType(name)
        stub.__getattr__ = lambda attr: _Anything()  # type: ignore[method-assign]
        stubs[name] = stub
    stubs["triton"].language = stubs["triton.language"]  # type: ignore[attr-defined]
    sys.modules.update(stubs)
    try:
        return importlib.import_module(module)
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


def load_peers() -> tuple[dict[str, Any], list[str]]:
    """The optional Muon implementations of the `bench` extra: name -> optimizer class, and a note per absent one."""
    peers: dict[str, Any] = {}
    notes: list[str] = []
    try:
        import typing

        if not hasattr(typing, "override"):  # Emerging-Optimizers 0.3 uses typing.override (Python 3.12)
            import typing_extensions

            typing.override = typing_extensions.override  # type: ignore[attr-defined]
        module = _import_without_triton("emerging_optimizers.orthogonalized_optimizers")
        peers["Emerging-Optimizers Muon"] = module.Muon
    except Exception as exc:  # an optional peer: any import failure means "absent"
        notes.append(f"Emerging-Optimizers Muon skipped ({type(exc).__name__}: {exc}); pip install 'root-hf[bench]'")
    try:
        import heavyball
        import heavyball.utils

        # eager kernels: heavyball would torch.compile them (max-autotune), minutes of compile time on a CPU
        heavyball.utils.compile_mode = None
        heavyball.utils.compile_mode_recommended_to_none = None
        peers["heavyball Muon"] = heavyball.Muon
    except Exception as exc:
        notes.append(f"heavyball Muon skipped ({type(exc).__name__}: {exc}); pip install 'root-hf[bench]'")
    return peers, notes


def peer_builders(
    params: list[torch.nn.Parameter], ns: str, peers: dict[str, Any]
) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    """Optimizers iterating Newton-Schulz in `ns` ("bf16" or "fp32"), plus AdamW; one entry per implementation.

    `torch.optim.Muon` and heavyball iterate in bfloat16 only, so they appear in the bf16 rows only.
    """
    out: dict[str, Callable[[], torch.optim.Optimizer]] = {
        f"ROOT ({ns} NS)": lambda: ROOT(params, lr=1e-3, ns_dtype=NS_DTYPE_NAMES[ns]),
    }
    if ns == "bf16":
        out["torch.optim.Muon"] = lambda: torch.optim.Muon(params, lr=1e-3, adjust_lr_fn="match_rms_adamw")
    if "Emerging-Optimizers Muon" in peers:
        cls = peers["Emerging-Optimizers Muon"]
        # fp32_matmul_prec "medium": its NS casts to bf16; "highest": NS in fp32
        prec = "medium" if ns == "bf16" else "highest"
        out["Emerging-Optimizers Muon"] = lambda cls=cls: cls(params, lr=1e-3, nesterov=True, fp32_matmul_prec=prec)
    if ns == "bf16" and "heavyball Muon" in peers:
        cls = peers["heavyball Muon"]
        out["heavyball Muon"] = lambda cls=cls: cls(params, lr=1e-3)
    out[ADAMW] = lambda: torch.optim.AdamW(params, lr=1e-3, foreach=True)
    return out


def bucket_counts(dims: dict[str, int], layers: int) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for shape in llama_hidden_shapes(**dims):
        counts[shape] += layers
    return dict(counts)


def ns_runners(
    dims: dict[str, int], layers: int, dtype: torch.dtype, device: str
) -> tuple[int, dict[str, Callable[[], None]]]:
    """Newton-Schulz alone (ROOT's kernel, default schedule) on each same-shape bucket: (total FLOPs, runners)."""
    g = torch.Generator().manual_seed(1)
    runners, flops = {}, 0
    for (m, n), count in bucket_counts(dims, layers).items():
        x0 = torch.randn(count, m, n, generator=g)
        x0 = (x0 / torch.linalg.vector_norm(x0, dim=(1, 2), keepdim=True)).to(device=device, dtype=dtype)
        schedule = get_schedule(DEFAULT_SCHEDULE, (m, n), 5)

        def run(x0: torch.Tensor = x0, schedule: Any = schedule) -> None:
            newton_schulz(x0.clone(), schedule)  # ROOT's NS input is a fresh cast of the clipped momentum
            _sync(device)

        runners[f"NS {m}x{n} x{count}"] = run
        flops += ns_flops((m, n)) * count
    return flops, runners


def with_grads(step: Callable[[], object], params: list[torch.nn.Parameter], device: str) -> Callable[[], None]:
    """`step` with the fixed gradients re-attached first (heavyball's step sets `p.grad = None`), synchronized."""
    grads = [p.grad for p in params]

    def run() -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        step()
        _sync(device)

    return run


def run_peers(
    shape_sets: tuple[str, ...],
    rounds: int,
    device: str,
    peak_sizes: tuple[int, ...],
    layers: int | None = None,
    ns_dtypes: tuple[str, ...] = ("bf16", "fp32"),
) -> dict[str, Any]:
    """Step time of ROOT and its peers per shape set and NS dtype, all timed in turns with the NS-alone batches and
    the matmul peak of that dtype (so the ratios, the peak fraction and the time outside NS share the same load)."""
    peers, notes = load_peers()
    print("\n== peers: optimizer step time, interleaved round-robin (medians) ==")
    for note in notes:
        print(f"  note: {note}")
    if "heavyball Muon" in peers:
        print(
            "  note: heavyball runs eager (its torch.compile disabled); it iterates in bf16 only, as torch.optim.Muon"
        )
    result: dict[str, Any] = {"notes": notes, "sets": {}}
    for set_name in shape_sets:
        dims, default_layers = SHAPE_SETS[set_name]
        n_layers = layers or default_layers
        for ns in ns_dtypes:
            dtype = getattr(torch, NS_DTYPE_NAMES[ns])
            params = make_params(n_layers, device, dims=dims)
            n_params = sum(p.numel() for p in params)
            opts = {name: build() for name, build in peer_builders(params, ns, peers).items()}
            fns: dict[str, Callable[[], object]] = {n: with_grads(o.step, params, device) for n, o in opts.items()}
            ns_total_flops, ns_fns = ns_runners(dims, n_layers, dtype, device)
            peaks = {size: matmul_runner(dtype, size, device) for size in peak_sizes}
            fns |= ns_fns
            fns |= {f"peak {size}": run for size, (_, run) in peaks.items()}
            t = interleaved_medians(fns, rounds, warmup=1)
            root_name = f"ROOT ({ns} NS)"
            peer_names = [n for n in opts if n not in (root_name, ADAMW)]
            fastest = min(peer_names, key=lambda n: t[n]) if peer_names else None
            peak = max(flops / t[f"peak {size}"] for size, (flops, _) in peaks.items())
            ns_time = sum(t[n] for n in ns_fns)
            row = {
                "layers": n_layers,
                "params": n_params,
                "ms": {n: t[n] * 1e3 for n in opts},
                "ns_ms": ns_time * 1e3,
                "ns_gflop": ns_total_flops / 1e9,
                "peak_gflops": peak / 1e9,
                "ns_peak_fraction": ns_total_flops / ns_time / peak,
                "outside_ns_fraction": max(0.0, 1 - ns_time / t[root_name]),
                "fastest_peer": fastest,
                "root_over_fastest_peer": t[root_name] / t[fastest] if fastest else None,
                "root_over_peer": {n: t[root_name] / t[n] for n in peer_names},
            }
            result["sets"][f"{set_name} {ns}"] = row
            print(
                f"-- {set_name} ({n_layers} layers, {n_params / 1e6:.1f}M params), NS in {ns}, {rounds} rounds; "
                f"{ns} matmul peak {peak / 1e9:.0f} GFLOP/s (same run)"
            )
            for name in opts:
                ratio = f"  ROOT/this {t[root_name] / t[name]:.2f}x" if name in peer_names else ""
                print(f"  {name:<28} {t[name] * 1e3:9.1f} ms{ratio}")
            print(
                f"  ROOT's NS alone {ns_time * 1e3:.1f} ms = {row['ns_peak_fraction']:.0%} of the {ns} peak "
                f"(target >= 90%); time outside NS {row['outside_ns_fraction']:.0%} of ROOT's step (target <= 10%)"
            )
            if fastest:
                r = row["root_over_fastest_peer"]
                print(
                    f"  ROOT / fastest peer ({fastest}): {r:.2f}x  "
                    f"(target <= 0.85x: {'met' if r <= 0.85 else 'NOT met'})"
                )
            del opts, params
    return result


# --------------------------------------------------------------------------------------------------------------------
# ns-dtype: bf16 vs fp32 Newton-Schulz, error against the float64 polar factor and speed (the CPU default's evidence)
# --------------------------------------------------------------------------------------------------------------------


def polar_error(x: torch.Tensor, polar: torch.Tensor) -> float:
    return float((x.double() - polar).norm() / polar.norm())


def run_ns_dtype(shape_sets: tuple[str, ...], rounds: int, device: str) -> dict[str, Any]:
    """Per benchmark shape: relative Frobenius error of ROOT's NS (default schedule) in fp32 and in bf16 and of
    `torch.optim.Muon`'s NS (bf16) against the exact polar factor of a Gaussian matrix (float64 SVD), and the time
    of ROOT's NS on the shape's whole bucket in both dtypes, interleaved."""
    try:  # torch.optim.Muon's private kernel (torch >= 2.9); its error column is skipped without it
        from torch.optim._muon import _zeropower_via_newtonschulz
    except ImportError:
        _zeropower_via_newtonschulz = None

    print("\n== ns-dtype: Newton-Schulz error vs the float64 polar factor, and speed, bf16 vs fp32 ==")
    auto = resolve_ns_dtype("auto", torch.device(device))
    print(f"  ns_dtype='auto' resolves to {auto} on this {device} (float32 params)")
    rows = []
    gen = torch.Generator().manual_seed(0)
    for set_name in shape_sets:
        dims, layers = SHAPE_SETS[set_name]
        for (m, n), count in bucket_counts(dims, layers).items():
            g = torch.randn(m, n, generator=gen, dtype=torch.float64).to(device)
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            polar = u @ vh
            schedule = get_schedule(DEFAULT_SCHEDULE, (m, n), 5)
            x0 = (g / g.norm()).float().to(device)
            err = {}
            for ns in ("fp32", "bf16"):
                x = newton_schulz(x0.to(getattr(torch, NS_DTYPE_NAMES[ns])).clone(), schedule)
                err[ns] = polar_error(x, polar)
            muon_coeffs = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults
            err["torch Muon (bf16)"] = float("nan")
            if _zeropower_via_newtonschulz is not None:
                x = _zeropower_via_newtonschulz(g.float(), muon_coeffs, 5, 1e-7)
                err["torch Muon (bf16)"] = polar_error(x, polar)
            batch = torch.randn(count, m, n, generator=gen)
            batch = batch / torch.linalg.vector_norm(batch, dim=(1, 2), keepdim=True)
            fns = {}
            for ns in ("fp32", "bf16"):
                xb = batch.to(device=device, dtype=getattr(torch, NS_DTYPE_NAMES[ns]))
                fns[ns] = lambda xb=xb, schedule=schedule: (newton_schulz(xb.clone(), schedule), _sync(device))
            t = interleaved_medians(fns, rounds, warmup=1)
            row = {
                "set": set_name,
                "shape": [m, n],
                "batch": count,
                "error": err,
                "ms": {k: v * 1e3 for k, v in t.items()},
            }
            rows.append(row)
            print(
                f"  {m:>5}x{n:<5} err fp32 {err['fp32']:.4f}  bf16 {err['bf16']:.4f}  torch Muon bf16 "
                f"{err['torch Muon (bf16)']:.4f} | NS on x{count}: fp32 {t['fp32'] * 1e3:8.1f} ms  bf16 "
                f"{t['bf16'] * 1e3:8.1f} ms  fp32/bf16 {t['fp32'] / t['bf16']:.2f}x"
            )
    return {"auto_cpu": str(auto), "rows": rows}


# --------------------------------------------------------------------------------------------------------------------
# temp-memory: peak RSS rise of a steady step (temporary memory), first-step overhead; in fresh worker processes
# --------------------------------------------------------------------------------------------------------------------

_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)


def _step_memory(opt: torch.optim.Optimizer, device: str) -> int:
    """Bytes the step needs on top of what it keeps: peak RSS (CPU) or peak allocated (CUDA) rise."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        opt.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _reset_hwm()
    before = _rss_bytes()
    opt.step()
    return _hwm_bytes() - before


def memory_worker(kind: str, set_name: str, optimizer: str, ns: str, device: str) -> dict[str, Any]:
    """Runs in a fresh process (glibc returns every large block at free, so RSS falls back after each step)."""
    if kind == "first-step":
        return first_step_worker(optimizer, device)
    dims, layers = SHAPE_SETS[set_name]
    params = make_params(layers, device, dims=dims)
    peers, _ = load_peers()
    opt = peer_builders(params, ns, peers)[optimizer]()
    grads = [p.grad for p in params]
    rises = []
    for i in range(5):
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad  # heavyball's step sets p.grad = None
        if i < 2:
            opt.step()
        else:
            rises.append(_step_memory(opt, device))
    return {"rise_bytes": statistics.median(rises), "state_bytes": state_bytes(opt)}


def first_step_worker(ns_steps: str, device: str) -> dict[str, Any]:
    """ROOT on one 8192 x 28672 matrix (a 70B-class MLP): first step minus a later one, time and memory."""
    m, n = 8192, 28672
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.empty(m, n, device=device).normal_(0, 0.02, generator=None))
    p.grad = torch.randn(m, n, generator=g).mul_(1e-3).to(device)
    start = time.perf_counter()
    probe = torch.zeros_like(p)  # what allocating the momentum buffer (state, not overhead) costs on its own
    state_alloc_s = time.perf_counter() - start
    del probe
    opt = ROOT([p], lr=1e-3, ns_steps=int(ns_steps), ns_coefficients="muon")
    times, rises = [], []
    for _ in range(3):
        if device == "cpu":
            _reset_hwm()
        start = time.perf_counter()
        rises.append(_step_memory(opt, device))
        times.append(time.perf_counter() - start)
    state = state_bytes(opt)
    return {
        "first_s": times[0],
        "later_s": statistics.median(times[1:]),
        "first_rise_bytes": rises[0],
        "later_rise_bytes": statistics.median(rises[1:]),
        "state_bytes": state,
        "state_alloc_s": state_alloc_s,
    }


def _run_worker(args: list[str], threads: int) -> dict[str, Any]:
    """CPU: a fresh process (clean RSS, glibc told to return large blocks); CUDA: in process (peak stats reset)."""
    if args[-1] == "cuda":
        result = memory_worker(*args)
        torch.cuda.empty_cache()
        return result
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *args, "--threads", str(threads)]
    env = {**os.environ, **_MMAP_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_temp_memory(
    shape_sets: tuple[str, ...], device: str, threads: int, ns_dtypes: tuple[str, ...] = ("bf16", "fp32")
) -> dict[str, Any]:
    print("\n== temp-memory: peak RSS rise of a steady step (temporary memory; CUDA: max_memory_allocated rise) ==")
    peers, _ = load_peers()
    result: dict[str, Any] = {}
    for set_name in shape_sets:
        for ns in ns_dtypes:
            names = list(peer_builders([], ns, peers))
            rows = {}
            for name in names:
                try:
                    rows[name] = _run_worker(["temp-memory", set_name, name, ns, device], threads)
                except Exception as exc:
                    print(f"  {name}: failed ({exc})")
            result[f"{set_name} {ns}"] = rows
            muon = rows.get("torch.optim.Muon") or result.get(f"{set_name} bf16", {}).get("torch.optim.Muon")
            print(f"-- {set_name}, NS in {ns}")
            for name, r in rows.items():
                vs = (
                    f"  {r['rise_bytes'] / muon['rise_bytes']:.2f}x torch Muon's"
                    if muon and muon["rise_bytes"]
                    else ""
                )
                rise, state = r["rise_bytes"] / 2**20, r["state_bytes"] / 2**20
                print(f"  {name:<28} step rise {rise:8.1f} MiB  (state {state:7.1f} MiB){vs}")
            root = rows.get(f"ROOT ({ns} NS)")
            if root and muon and muon["rise_bytes"]:
                ratio = root["rise_bytes"] / muon["rise_bytes"]
                verdict = "met" if ratio <= 1.5 else "NOT met"
                print(f"  ROOT / torch Muon temporary memory {ratio:.2f}x (target <= 1.5x: {verdict})")
    return result


def run_first_step(device: str, threads: int) -> dict[str, Any]:
    print("\n== first-step: ROOT on one 8192 x 28672 matrix (70B-class MLP), first step minus a later step ==")
    print("   (ns_steps=0: Newton-Schulz on this matrix costs minutes on a CPU and has no first-step cost of its own)")
    r = _run_worker(["first-step", "-", "0", "-", device], threads)
    # the first step allocates the momentum buffer (optimizer state, which every momentum optimizer allocates)
    over_s = r["first_s"] - r["later_s"] - r["state_alloc_s"]
    # the first step allocates the momentum buffer (optimizer state): not an overhead
    over_b = r["first_rise_bytes"] - r["later_rise_bytes"] - r["state_bytes"]
    print(
        f"  first {r['first_s']:.2f} s, later {r['later_s']:.2f} s, allocating a zero momentum buffer alone "
        f"{r['state_alloc_s']:.2f} s: overhead {over_s:.3f} s (target <= 0.2 s: "
        f"{'met' if over_s <= 0.2 else 'NOT met'}); memory beyond the momentum buffer "
        f"({r['state_bytes'] / 2**20:.0f} MiB) {over_b / 2**20:.1f} MiB (target <= 50 MB: "
        f"{'met' if over_b <= 50e6 else 'NOT met'})"
    )
    start = time.perf_counter()
    get_schedule("adaptive", (8191, 28673), 5)
    fit = time.perf_counter() - start
    print(f"  (a cold 'adaptive' schedule lookup for an off-table shape, 8191 x 28673: {fit:.2f} s, paid when the "
          "parameter is added)")  # fmt: skip
    return {**r, "overhead_s": over_s, "overhead_bytes": over_b, "cold_schedule_s": fit}


# --------------------------------------------------------------------------------------------------------------------
# e2e: the optimizer's share of a full fine-tuning step of the real SmolLM2-135M
# --------------------------------------------------------------------------------------------------------------------


def _smollm2_model() -> tuple[Any, str]:
    """SmolLM2-135M: the real weights from the recipe's asset loader when available, else random from its config."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    for module in ("recipes.assets",):
        try:
            loader = __import__(module, fromlist=["smollm2_path"]).smollm2_path
            path = loader(progress=False) if "progress" in loader.__code__.co_varnames else loader()
            source = f"embedded:smollm2-135m-instruct ({module}.smollm2_path(), as recipes/sft.py resolves it)"
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), source
        except Exception:  # absent module, asset or dependency: try the next
            continue
    return LlamaForCausalLM(smollm2_config()), "random init from SmolLM2-135M's config (asset not available)"


def run_e2e(rounds: int, device: str, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    import copy

    print("\n== e2e: full fine-tuning step of SmolLM2-135M, batch 4 x 256 tokens, fp32 weights ==")
    base, source = _smollm2_model()
    print(f"  model: {source}")
    base.to(device)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, base.config.vocab_size, (4, 256), generator=g).to(device)

    def split(model: Any) -> tuple[list, list]:
        named = list(model.named_parameters())
        hidden = [p for n, p in named if p.dim() == 2 and ".layers." in f".{n}"]
        rest = [p for n, p in named if not (p.dim() == 2 and ".layers." in f".{n}")]
        return hidden, rest

    builds = {
        "AdamW": lambda m: [torch.optim.AdamW(m.parameters(), lr=1e-5, foreach=True)],
        "torch.optim.Muon + AdamW": lambda m: [
            torch.optim.Muon(split(m)[0], lr=1e-5, adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(split(m)[1], lr=1e-5, foreach=True),
        ],
    }
    for variant, kwargs in root_variants().items():  # each ns_method ROOT accepts (issue 22), else ROOT as it is
        builds[f"ROOT {variant} (default ns_dtype)".replace("  ", " ")] = lambda m, kw=kwargs: [
            ROOT(
                [{"params": split(m)[0], "use_root": True}, {"params": split(m)[1], "use_root": False}], lr=1e-5, **kw
            )
        ]
    if only is not None and set(only) - set(builds):
        raise ValueError(f"unknown --e2e-optimizers {sorted(set(only) - set(builds))}; choose from {list(builds)}")
    if only is not None:  # e.g. without torch.optim.Muon on a CPU without native bf16 (its NS is bf16 only)
        print(f"  optimizers: {', '.join(n for n in builds if n in only)} (left out: "
              f"{', '.join(n for n in builds if n not in only) or 'none'})")  # fmt: skip
        builds = {name: build for name, build in builds.items() if name in only}
    models = {name: copy.deepcopy(base) for name in builds}
    opts = {name: build(models[name]) for name, build in builds.items()}
    times: dict[str, dict[str, list[float]]] = {n: {"fwd_bwd": [], "opt": []} for n in builds}
    for r in range(rounds + 1):
        for name in builds:
            model = models[name]
            start = time.perf_counter()
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            _sync(device)
            mid = time.perf_counter()
            for opt in opts[name]:
                opt.step()
                opt.zero_grad(set_to_none=True)
            _sync(device)
            end = time.perf_counter()
            if r > 0:  # round 0 is the warm-up (state allocation)
                times[name]["fwd_bwd"].append(mid - start)
                times[name]["opt"].append(end - mid)
    rows = {}
    threads = torch.get_num_threads()
    print(f"  {rounds} timed round(s) after one warm-up round, interleaved, medians; {threads} thread(s)")
    print(f"  | {'optimizer':<42} | forward+backward | optimizer step | whole step | optimizer share |")
    for name, t in times.items():
        fb, op = statistics.median(t["fwd_bwd"]), statistics.median(t["opt"])
        rows[name] = {"fwd_bwd_s": fb, "opt_s": op, "step_s": fb + op, "opt_share": op / (fb + op)}
        print(f"  | {name:<42} | {fb:14.2f} s | {op:12.2f} s | {fb + op:8.2f} s | {op / (fb + op):15.0%} |")
    return {"model": source, "rounds": rounds, "threads": threads, "rows": rows}


# --------------------------------------------------------------------------------------------------------------------


BATCH_CAPS_PER_THREAD = (2**22, 2**21, 2**20)  # root_hf.optim.functional.MAX_BATCH_ELEMENTS_PER_THREAD candidates


def run_batch_cap(shape_sets: tuple[str, ...], rounds: int, device: str) -> dict[str, Any]:
    """ROOT's step (bf16 NS) under each batch cap per thread vs `torch.optim.Muon`, interleaved in one process.

    The cap (`MAX_BATCH_ELEMENTS_PER_THREAD`) is a module constant read at each step; each ROOT instance runs under its
    own value, restored after the section.
    """
    print("\n== batch-cap: ROOT step (bf16 NS) / torch.optim.Muon step for each batch cap per thread ==")
    default = root_functional.MAX_BATCH_ELEMENTS_PER_THREAD
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "default": default, "sets": {}}
    try:
        for name in shape_sets:
            dims, layers = SHAPE_SETS[name]
            fns: dict[str, Callable[[], None]] = {}
            for cap in BATCH_CAPS_PER_THREAD:
                params = make_params(layers, device, dims=dims)
                opt = ROOT(params, lr=1e-3, ns_dtype="bfloat16")

                def step(opt: ROOT = opt, cap: int = cap) -> None:
                    root_functional.MAX_BATCH_ELEMENTS_PER_THREAD = cap
                    opt.step()

                fns[f"2**{cap.bit_length() - 1}"] = with_grads(step, params, device)
            params = make_params(layers, device, dims=dims)
            fns["torch.optim.Muon"] = with_grads(torch.optim.Muon(params, lr=1e-3).step, params, device)
            ms = {k: v * 1e3 for k, v in interleaved_medians(fns, rounds).items()}
            ratios = {k: v / ms["torch.optim.Muon"] for k, v in ms.items() if k != "torch.optim.Muon"}
            print(f"-- {name} ({layers} layers), {torch.get_num_threads()} thread(s), {rounds} rounds")
            for k, v in ms.items():
                print(f"  {k:<18} {v:9.1f} ms" + (f"  {ratios[k]:.3f}x torch Muon" if k in ratios else ""))
            out["sets"][name] = {"ms": ms, "ratio_to_muon": ratios}
    finally:
        root_functional.MAX_BATCH_ELEMENTS_PER_THREAD = default
    return out


# --------------------------------------------------------------------------------------------------------------------
# gram-peers: ROOT (each ns_method it accepts) vs DeepSpeed's Gram Muon, dion, torch.optim.Muon and the other Muon
# implementations on the layers of four models: step time, counted FLOPs, error vs the exact polar factor (issue 22)
# --------------------------------------------------------------------------------------------------------------------

# Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json): hidden 4096, intermediate 14336, 32 heads / 8 KV heads of
# dim 128.
LLAMA_31_8B = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128}
# Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B config.json): hidden 2048, 32 q heads / 4 KV heads of dim 128, 128 experts of
# moe_intermediate 768 (gate, up: (128, 768, 2048); down: (128, 2048, 768)), a 128 x 2048 router.
QWEN3_30B_A3B = {"hidden": 2048, "heads": 32, "kv_heads": 4, "head_dim": 128, "experts": 128, "moe_intermediate": 768}
# name -> (dims, decoder layers by default); the MoE set is one layer (attention + experts + router). The tiny sets
# are the --quick smoke run's (seconds on a CPU without native bf16).
GRAM_SETS: dict[str, tuple[dict[str, int], int]] = {
    **SHAPE_SETS,
    "llama-3.1-8b": (LLAMA_31_8B, 1),
    "qwen3-30b-a3b": (QWEN3_30B_A3B, 1),
    "tiny-moe": ({"hidden": 64, "heads": 2, "kv_heads": 1, "head_dim": 32, "experts": 4, "moe_intermediate": 32}, 1),
}
GRAM_DEFAULT_SETS = ("smollm2-135m", "llama-3.2-1b", "llama-3.1-8b", "qwen3-30b-a3b")
GRAM_NS_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
# ROOT's ns_method values, timed when its hyperparameter table has them
NS_METHODS_TRIED = ("standard", "gram", "auto")
TORCH_MUON, DS_GRAM = "torch.optim.Muon", "DeepSpeed Muon (gram)"
# the targets of issue 22: (shape set, peer) -> the ROOT bf16 step / peer step ratio to reach
GRAM_TARGETS = {
    ("smollm2-135m", TORCH_MUON): 0.9,
    ("llama-3.2-1b", TORCH_MUON): 0.75,
    ("llama-3.1-8b", TORCH_MUON): 0.75,
    ("llama-3.2-1b", DS_GRAM): 0.9,
    ("llama-3.1-8b", DS_GRAM): 0.9,
}


def gram_set_tensors(
    set_name: str, layers: int, experts: int | None = None, distinct: bool = False
) -> dict[str, list[tuple[int, ...]]]:
    """Parameter shapes of `layers` layers of a shape set: `{"matrices": 2-D, "experts": (E, out, in), "router": 2-D}`.

    `experts` keeps that many of the MoE's experts (a sample, for a CPU); `distinct` keeps one matrix per distinct
    shape (q and o, k and v, gate and up share theirs) and one layer.
    """
    dims, _ = GRAM_SETS[set_name]
    out: dict[str, list[tuple[int, ...]]] = {"matrices": [], "experts": [], "router": []}
    if "experts" in dims:
        n_experts = min(experts or dims["experts"], dims["experts"])
        attention = llama_hidden_shapes(dims["hidden"], 1, dims["heads"], dims["kv_heads"], dims["head_dim"])[:4]
        inter, hidden = dims["moe_intermediate"], dims["hidden"]
        for _ in range(layers):
            out["matrices"] += attention
            out["experts"] += [(n_experts, inter, hidden), (n_experts, inter, hidden), (n_experts, hidden, inter)]
            out["router"].append((dims["experts"], hidden))
    else:
        for _ in range(layers):
            out["matrices"] += llama_hidden_shapes(**dims)
    if distinct:
        out = {kind: list(dict.fromkeys(shapes)) for kind, shapes in out.items()}
    return out


def _split_experts(experts: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Each expert of a fused (E, out, in) tensor as its own 2-D parameter (a view: same storage, same gradient)."""
    out = []
    for e in experts:
        for i in range(e.shape[0]):
            p = torch.nn.Parameter(e.data[i])
            p.grad = e.grad[i]
            out.append(p)
    return out


def _ds_module() -> Any:
    from deepspeed.runtime.zero.muon import original_muon

    return original_muon


def _keller_scale(shape: tuple[int, ...]) -> float:
    """sqrt(max(1, m / n)): the update scale of Keller Jordan's Muon (torch "original", DeepSpeed)."""
    return math.sqrt(max(1.0, shape[-2] / shape[-1]))


def _deepspeed_peers() -> dict[str, dict[str, Any]]:
    import deepspeed

    ds = _ds_module()
    dtypes = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return {
        f"DeepSpeed Muon ({method})": {
            "dtype": dtypes[ds.ns_compute_dtype(method)],
            "experts": "fused",  # is_expert_group: its NS runs batched over the leading dim
            "build": lambda mats, exps, m=method: ds.SingleDeviceMuon(mats + exps, lr=1e-3, ns_method=m),
            "probe": lambda mats, exps, m=method: ds.SingleDeviceMuon(
                mats + exps, lr=1.0, weight_decay=0.0, momentum=0.0, ns_method=m
            ),
            "scale": _keller_scale,
            "version": deepspeed.__version__,
        }
        for method in ("gram", "standard")
    }


def _dion_peers(notes: list[str]) -> dict[str, dict[str, Any]]:
    import importlib.metadata

    import dion

    version = importlib.metadata.version("dion")
    peers = {
        "dion Muon (Polar Express)": {
            "dtype": "bf16",
            "experts": "fused",  # flatten=False: a 3-D tensor is a batch of matrices
            "build": lambda mats, exps: dion.Muon(mats + exps, lr=1e-3),
            "probe": lambda mats, exps: dion.Muon(mats + exps, lr=1.0, mu=0.0, weight_decay=0.0, adjust_lr=None),
            "scale": lambda shape: 1.0,
            "version": version,
        }
    }
    try:
        from gram_newton_schulz import GramNewtonSchulz

        # dion's use_gram_newton_schulz=True with the package's plain-torch backend: its CuTe kernels need CUDA and
        # its torch.compile is skipped on a CPU (as every peer here runs eager)
        gns = GramNewtonSchulz(ns_use_kernels=False, gram_newton_schulz_reset_iterations=[2], compile_kwargs=None)
        ns = lambda x, epsilon=None: gns(x)  # noqa: E731
        peers["dion Muon (gram)"] = {
            "dtype": "fp16",
            "experts": "fused",
            "build": lambda mats, exps: dion.Muon(mats + exps, lr=1e-3, newton_schulz_func=ns),
            "probe": lambda mats, exps: dion.Muon(
                mats + exps, lr=1.0, mu=0.0, weight_decay=0.0, adjust_lr=None, newton_schulz_func=ns
            ),
            "scale": lambda shape: 1.0,
            "version": f"{version}, gram-newton-schulz {importlib.metadata.version('gram-newton-schulz')}",
        }
    except Exception as exc:
        pip = "pip install --no-deps gram-newton-schulz"
        notes.append(f"dion Muon (gram) skipped ({type(exc).__name__}: {exc}); {pip}")
    return peers


def load_gram_peers(wanted: tuple[str, ...] | None = None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The Muon implementations timed beside ROOT (those named in `wanted`, default all): name -> spec, and a note
    per absent one.

    A spec has `dtype` (the NS dtype it iterates in on this machine), `build(matrices, experts)` -> optimizer for the
    step timing (library defaults, lr 1e-3), `probe(matrices, experts)` -> optimizer whose step on a zero parameter
    writes minus the orthogonalized update times `scale(shape)` (lr 1, momentum and weight decay 0), `scale` and
    `experts`: "fused" (takes (E, out, in) tensors as batches of matrices) or "split" (2-D parameters only).
    """
    peers: dict[str, dict[str, Any]] = {}
    notes: list[str] = []

    def want(*names: str) -> bool:
        return wanted is None or any(n in wanted for n in names)

    peers[TORCH_MUON] = {
        "dtype": "bf16",
        "experts": "split",
        "build": lambda mats, _: torch.optim.Muon(mats, lr=1e-3, adjust_lr_fn="match_rms_adamw"),
        "probe": lambda mats, _: torch.optim.Muon(
            mats, lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, adjust_lr_fn="original"
        ),
        "scale": _keller_scale,
    }
    if want(DS_GRAM, "DeepSpeed Muon (standard)"):
        try:
            peers |= _deepspeed_peers()
        except Exception as exc:  # an optional peer: any import failure means "absent"
            notes.append(f"DeepSpeed Muon skipped ({type(exc).__name__}: {exc}); pip install 'root-hf[bench]'")
    if want("dion Muon (Polar Express)", "dion Muon (gram)"):
        try:
            peers |= _dion_peers(notes)
        except Exception as exc:
            notes.append(
                f"dion Muon skipped ({type(exc).__name__}: {exc}); dion is not on PyPI: "
                "pip install git+https://github.com/microsoft/dion"
            )
    if want("Emerging-Optimizers Muon", "heavyball Muon"):
        others, other_notes = load_peers()
        notes += other_notes
        if "Emerging-Optimizers Muon" in others:
            cls = others["Emerging-Optimizers Muon"]
            peers["Emerging-Optimizers Muon"] = {
                "dtype": "bf16",
                "experts": "split",
                "build": lambda mats, _: cls(mats, lr=1e-3, nesterov=True, fp32_matmul_prec="medium"),
                "probe": None,
            }
        if "heavyball Muon" in others:
            cls = others["heavyball Muon"]
            peers["heavyball Muon"] = {
                "dtype": "bf16", "experts": "split", "build": lambda mats, _: cls(mats, lr=1e-3), "probe": None
            }  # fmt: skip
    if wanted is not None:
        peers = {name: spec for name, spec in peers.items() if name in wanted}
    return peers, notes


def root_variants() -> dict[str, dict[str, Any]]:
    """ROOT's constructor options to time: each `ns_method` its hyperparameter table accepts, else ROOT as it is."""
    from root_hf.optim.hyperparams import HYPERPARAMS

    if "ns_method" not in HYPERPARAMS:
        return {"": {}}
    out = {}
    for method in NS_METHODS_TRIED:
        try:
            HYPERPARAMS["ns_method"].check(method)
        except ValueError:
            continue
        out[f"ns_method={method}"] = {"ns_method": method}
    return out


def _root_groups(mats: list, exps: list, router: list) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = [{"params": mats}] if mats else []
    if exps:
        groups.append({"params": exps, "matrix_view": "batched"})
    if router:
        groups.append({"params": router, "use_root": False})
    return groups


def _gram_candidates(peers: dict[str, dict[str, Any]], ns_dtypes: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Every optimizer of the section: ROOT per variant and NS dtype, then the peers, then AdamW."""
    out: dict[str, dict[str, Any]] = {}
    for variant, kwargs in root_variants().items():
        for ns in ns_dtypes:
            dtype = GRAM_NS_DTYPES[ns]
            name = f"ROOT {variant} ({ns} NS)".replace("  ", " ")
            out[name] = {
                "dtype": ns,
                "experts": "fused",
                "root": True,
                "build": lambda mats, exps, router, kw=kwargs, d=dtype: [
                    ROOT(_root_groups(mats, exps, router), lr=1e-3, ns_dtype=d, **kw)
                ],
                # clip off: the error measures the orthogonalization alone, on the same input as the peers'
                "probe": lambda mats, exps, kw=kwargs, d=dtype: ROOT(
                    _root_groups(mats, exps, []),
                    lr=1.0,
                    weight_decay=0.0,
                    momentum=0.0,
                    clip_quantile=None,
                    adjust_lr_fn=None,
                    ns_dtype=d,
                    **kw,
                ),
                "scale": lambda shape: 1.0,
            }
    for name, spec in peers.items():
        out[name] = {
            **spec,
            "build": lambda mats, exps, router, b=spec["build"]: (
                [b(mats, exps)] + ([torch.optim.AdamW(router, lr=1e-3, foreach=True)] if router else [])
            ),
        }
    out[ADAMW] = {
        "dtype": "-",
        "experts": "fused",
        "build": lambda mats, exps, router: [torch.optim.AdamW(mats + exps + router, lr=1e-3, foreach=True)],
        "probe": None,
    }
    return out


def orthogonalization_probe(
    spec: dict[str, Any], shape: tuple[int, ...], grad: torch.Tensor, device: str
) -> tuple[torch.Tensor, int]:
    """The optimizer's orthogonalized update of `grad` (one matrix, or a batch for a fused expert tensor) and the FLOPs
    its step spent (counted by `torch.utils.flop_counter.FlopCounterMode`)."""
    from torch.utils.flop_counter import FlopCounterMode

    p = torch.nn.Parameter(torch.zeros(shape, device=device))
    p.grad = grad.to(device=device, dtype=torch.float32).clone()
    if len(shape) == 3:
        if spec["experts"] == "split":
            params = _split_experts([p])
            opt = spec["probe"](params, [])
        else:
            p.is_expert_group = True  # DeepSpeed: NS batched over the leading dim
            opt = spec["probe"]([], [p])
    else:
        opt = spec["probe"]([p], [])
    with torch.compiler.set_stance("force_eager"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        opt.step()
        _sync(device)
    return -p.detach().double().cpu() / spec["scale"](shape), counter.get_total_flops()


def run_gram_peers(
    set_names: tuple[str, ...],
    rounds: int,
    device: str,
    layers: int | None = None,
    ns_dtypes: tuple[str, ...] = ("bf16", "fp32"),
    experts: int | None = None,
    distinct: bool = False,
    wanted_peers: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """ROOT against the Muon implementations per shape set: step time (interleaved medians), FLOPs per step (counted
    on one step of each distinct shape) and each optimizer's error against the exact polar factor (float64 SVD) of
    the same Gaussian input, one per distinct shape (a sample of 2 experts for a fused expert tensor)."""
    peers, notes = load_gram_peers(wanted_peers)
    print("\n== gram-peers: ROOT vs the Muon implementations, step time / FLOPs / error vs the exact polar factor ==")
    for note in notes:
        print(f"  note: {note}")
    for name, spec in peers.items():
        if "version" in spec:
            print(f"  {name}: version {spec['version']}, NS in {spec['dtype']} here")
    if any(n.startswith("DeepSpeed") for n in peers):
        ds = _ds_module()
        print(
            f"  DeepSpeed: SingleDeviceMuon; ns_method='gram' runs {ds.zeropower_via_gram_newtonschulz.__name__} "
            f"(fp16 where its accelerator supports fp16, else fp32: {ds.ns_compute_dtype('gram')} here; restart at "
            "step 2; Keller Jordan's Muon coefficients), 'standard' runs zeropower_via_newtonschulz5"
        )
    print(
        "  every peer runs eager (torch.compiler.set_stance('force_eager'): DeepSpeed's and dion's torch.compile "
        "would compile per shape for minutes on a CPU); torch.optim.Muon, heavyball and Emerging-Optimizers take "
        "2-D parameters only, so they get each expert of a fused expert tensor as its own matrix"
    )
    variants = root_variants()
    print("  ROOT variants: " + (", ".join(variants) if "" not in variants else "ROOT as it is (no ns_method option)"))
    threads = torch.get_num_threads()
    result: dict[str, Any] = {"notes": notes, "threads": threads, "variants": list(variants), "sets": {}}
    result["peer_versions"] = {n: s["version"] for n, s in peers.items() if "version" in s}
    gen = torch.Generator().manual_seed(0)
    with torch.compiler.set_stance("force_eager"):
        for set_name in set_names:
            n_layers = 1 if distinct else (layers or GRAM_SETS[set_name][1])
            shapes = gram_set_tensors(set_name, n_layers, experts, distinct)
            cands = _gram_candidates(peers, ns_dtypes)
            # -- error and FLOPs: one step of each optimizer on one Gaussian matrix per distinct shape
            distinct_shapes = list(dict.fromkeys(shapes["matrices"] + shapes["experts"]))
            counts: dict[tuple[int, ...], int] = defaultdict(int)
            for s in shapes["matrices"] + shapes["experts"]:
                counts[s] += 1
            errors: dict[str, dict[str, float]] = defaultdict(dict)
            flops: dict[str, float] = defaultdict(float)
            for shape in distinct_shapes:
                probe_shape = (min(2, shape[0]), *shape[1:]) if len(shape) == 3 else shape
                g = torch.randn(probe_shape, generator=gen, dtype=torch.float64)
                u, _, vh = torch.linalg.svd(g, full_matrices=False)
                polar = u @ vh
                per_matrix = shape[0] / probe_shape[0] if len(shape) == 3 else 1.0
                for name, spec in cands.items():
                    if spec.get("probe") is None:
                        continue
                    out, f = orthogonalization_probe(spec, probe_shape, g, device)
                    err = (out - polar).flatten(-2).norm(dim=-1) / polar.flatten(-2).norm(dim=-1)
                    errors[name]["x".join(map(str, shape))] = float(err.max())
                    flops[name] += f * per_matrix * counts[shape]
            # -- step time: every optimizer on the same parameters and gradients, interleaved round-robin
            g2 = torch.Generator().manual_seed(0)

            def tensor(shape: tuple[int, ...], g2: torch.Generator = g2) -> torch.nn.Parameter:
                p = torch.nn.Parameter((torch.randn(shape, generator=g2) * 0.02).to(device))
                p.grad = (torch.randn(shape, generator=g2) * 1e-3).to(device)
                return p

            mats = [tensor(s) for s in shapes["matrices"]]
            exps = [tensor(s) for s in shapes["experts"]]
            router = [tensor(s) for s in shapes["router"]]
            for e in exps:
                e.is_expert_group = True  # DeepSpeed: NS batched over the leading dim (ignored by the others)
            split = _split_experts(exps) if exps else []
            fns: dict[str, Callable[[], None]] = {}
            for name, spec in cands.items():
                fused = spec["experts"] == "fused"
                opts = spec["build"](mats if fused else mats + split, exps if fused else [], router)
                params = mats + (exps if fused else split) + router

                def step(opts: list = opts) -> None:
                    for opt in opts:
                        opt.step()

                fns[name] = with_grads(step, params, device)
            t = interleaved_medians(fns, rounds, warmup=1)
            n_params = sum(p.numel() for p in mats + exps + router)
            row = {
                "layers": n_layers,
                "params": n_params,
                "experts": shapes["experts"][0][0] if shapes["experts"] else None,
                "distinct_only": distinct,
                "shapes": {"x".join(map(str, s)): c for s, c in counts.items()},
                "dtype": {n: c["dtype"] for n, c in cands.items()},
                "ms": {n: t[n] * 1e3 for n in cands},
                "gflop": {n: flops[n] / 1e9 for n in cands if n in flops},
                "error": dict(errors),
            }
            result["sets"][set_name] = row
            _print_gram_set(set_name, row, rounds, threads)
            del fns, mats, exps, router, split
    return result


def _print_gram_set(set_name: str, row: dict[str, Any], rounds: int, threads: int) -> None:
    total = GRAM_SETS[set_name][0].get("experts")
    experts = f", {row['experts']} of the {total} experts (a sample)" if row["experts"] else ""
    if row["experts"] and row["experts"] == total:
        experts = f", all {total} experts"
    what = "one matrix per distinct shape" if row["distinct_only"] else f"{row['layers']} layer(s)"
    print(
        f"-- {set_name}: {what}{experts}, {row['params'] / 1e6:.1f}M params, {threads} thread(s), {rounds} rounds "
        "(medians)"
    )
    shapes = list(row["shapes"])
    print(f"  {'optimizer':<34} {'NS':>4} {'step ms':>10} {'GFLOP':>8}  error vs polar per shape: {', '.join(shapes)}")
    for name, ms in row["ms"].items():
        gf = f"{row['gflop'][name]:8.4g}" if name in row["gflop"] else f"{'-':>8}"
        err = row["error"].get(name)
        err_text = " ".join(f"{err[s]:.4f}" for s in shapes) if err else "-"
        print(f"  {name:<34} {row['dtype'][name]:>4} {ms:10.1f} {gf}  {err_text}")
    ms = row["ms"]
    for name in (n for n in ms if n.startswith("ROOT") and row["dtype"][n] == "bf16"):
        for peer in (TORCH_MUON, DS_GRAM):
            if peer not in ms:
                continue
            ratio = ms[name] / ms[peer]
            target = GRAM_TARGETS.get((set_name, peer))
            verdict = f"target <= {target}x: {'met' if ratio <= target else 'NOT met'}" if target else "no target"
            if target and set_name == "smollm2-135m" and threads != 1:
                verdict = f"the target, <= {target}x, is at 1 thread"
            mine, theirs = row["error"].get(name, {}), row["error"].get(peer, {})
            lower = sum(mine[s] <= theirs[s] for s in shapes if s in mine and s in theirs)
            print(
                f"  {name} / {peer} ({row['dtype'][peer]} NS): {ratio:.2f}x ({verdict}); error max "
                f"{max(mine.values(), default=float('nan')):.4f} vs {max(theirs.values(), default=float('nan')):.4f}, "
                f"equal or lower on {lower} of {len(shapes)} shapes"
            )
    ds = row["dtype"].get(DS_GRAM)
    for name in (n for n in ms if n.startswith("ROOT") and ds and row["dtype"][n] == ds and ds != "bf16"):
        print(f"  {name} / {DS_GRAM} at equal NS dtype ({ds}): {ms[name] / ms[DS_GRAM]:.2f}x")


# --------------------------------------------------------------------------------------------------------------------
# adamw-foreach / elementwise (issue 21): the foreach AdamW branch and the step outside Newton-Schulz, before vs after
# --------------------------------------------------------------------------------------------------------------------


def load_before(ref: str) -> Any:
    """`root_hf` as of git `ref`, imported as the package `root_hf_before` (its imports are relative), or None.

    The copy comes from `git archive` into a temporary folder; None (with a note) where git or the ref is missing,
    e.g. on a device machine that received the working tree only.
    """
    import importlib
    import io
    import tarfile
    import tempfile

    root = Path(__file__).resolve().parents[1]
    try:
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", ref, "root_hf"], capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        print(f"  note: no before copy ({ref}): {e}")
        return None
    folder = Path(tempfile.mkdtemp(prefix="root_hf_before_"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "root_hf").rename(folder / "root_hf_before")
    sys.path.insert(0, str(folder))
    return importlib.import_module("root_hf_before")


def adamw_param_sets(device: str) -> dict[str, list[torch.nn.Parameter]]:
    """The SmolLM2 hidden matrices of 6 layers (bandwidth) and 600 small vectors (per-parameter overhead)."""
    g = torch.Generator().manual_seed(0)
    vectors = []
    for _ in range(600):
        p = torch.nn.Parameter(torch.randn(576, generator=g).to(device))
        p.grad = torch.randn(576, generator=g).to(device)
        vectors.append(p)
    return {"smollm2-135m 6 layers (matrices)": make_params(6, device), "600 vectors of 576": vectors}


def _clone_with_grads(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


def run_adamw_foreach(rounds: int, device: str, before_ref: str) -> dict[str, Any]:
    print("\n== adamw-foreach: ROOT's AdamW branch vs torch.optim.AdamW(foreach=True), same params (medians) ==")
    before = load_before(before_ref)
    out: dict[str, Any] = {"before_ref": before_ref if before is not None else None, "sets": {}}
    for name, params in adamw_param_sets(device).items():
        fns: dict[str, Callable[[], None]] = {}
        torch_params = _clone_with_grads(params)
        fns["torch AdamW (foreach)"] = with_grads(
            torch.optim.AdamW(torch_params, lr=1e-3, weight_decay=0.1, foreach=True).step, torch_params, device
        )
        for mode in ("ignore", "raise"):
            own = _clone_with_grads(params)
            opt = ROOT([{"params": own, "use_root": False}], lr=1e-3, weight_decay=0.1, nonfinite_grads=mode)
            fns[f"ROOT AdamW branch ({mode})"] = with_grads(opt.step, own, device)
            if before is not None:
                old = _clone_with_grads(params)
                old_opt = before.ROOT(
                    [{"params": old, "use_root": False}], lr=1e-3, weight_decay=0.1, nonfinite_grads=mode
                )
                fns[f"before: AdamW branch ({mode})"] = with_grads(old_opt.step, old, device)
        ms = {k: v * 1e3 for k, v in interleaved_medians(fns, rounds).items()}
        base = ms["torch AdamW (foreach)"]
        print(f"-- {name}: {sum(p.numel() for p in params) / 1e6:.1f}M params, {rounds} rounds")
        for k, v in ms.items():
            print(f"  {k:<32} {v:9.2f} ms  {v / base:.2f}x torch foreach")
        ratio = ms["ROOT AdamW branch (ignore)"] / base
        print(f"  ROOT AdamW branch / torch AdamW(foreach=True): {ratio:.2f}x ignore, "
              f"{ms['ROOT AdamW branch (raise)'] / base:.2f}x raise (target <= 1.1x: "
              f"{'met' if ratio <= 1.1 else 'NOT met'} without the check)")  # fmt: skip
        out["sets"][name] = {"ms": ms, "ratio_to_torch_foreach": {k: v / base for k, v in ms.items()}}
    return out


def _identity_ns(x: torch.Tensor, schedule: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


def run_elementwise(rounds: int, device: str, before_ref: str) -> dict[str, Any]:
    """The step with the clip off and Newton-Schulz replaced by the identity: what is left is elementwise."""
    print("\n== elementwise: ROOT's step outside Newton-Schulz (clip off, NS = identity), now vs before (medians) ==")
    before = load_before(before_ref)
    modules = [root_functional] + ([sys.modules["root_hf_before.optim.functional"]] if before is not None else [])
    saved = [m.newton_schulz for m in modules]
    out: dict[str, Any] = {"before_ref": before_ref if before is not None else None, "sets": {}}
    try:
        for m in modules:
            m.newton_schulz = _identity_ns
        for name in ("smollm2-135m", "llama-3.2-1b"):
            dims, layers = SHAPE_SETS[name]
            base = make_params(layers, device, dims=dims)
            g = torch.Generator().manual_seed(1)
            for _ in range(4 * layers):  # the norms of each layer: AdamW branch
                v = torch.nn.Parameter(torch.ones(dims["hidden"]).to(device))
                v.grad = (torch.randn(dims["hidden"], generator=g) * 1e-3).to(device)
                base.append(v)
            fns: dict[str, Callable[[], None]] = {}
            for mode in ("ignore", "raise"):
                for label, cls in (("now", ROOT), ("before", before.ROOT if before is not None else None)):
                    if cls is None:
                        continue
                    params = _clone_with_grads(base)
                    opt = cls(params, lr=1e-3, clip_quantile=None, ns_dtype="float32", nonfinite_grads=mode)
                    fns[f"{label} ({mode})"] = with_grads(opt.step, params, device)
            ms = {k: v * 1e3 for k, v in interleaved_medians(fns, rounds).items()}
            print(f"-- {name} ({layers} layers + {4 * layers} norm vectors), {rounds} rounds")
            for k, v in ms.items():
                rel = f"  {v / ms[k.replace('now', 'before')]:.2f}x before" if k.startswith("now") and before else ""
                print(f"  {k:<18} {v:9.2f} ms{rel}")
            out["sets"][name] = {"ms": ms}
    finally:
        for m, fn in zip(modules, saved, strict=True):
            m.newton_schulz = fn
    return out


def _momentum_update(params, grads, bufs, lr: float, wd: float, mu: float) -> None:
    """The matrices' elementwise work of a step with NS = identity: W (1 - lr wd), M = mu M + G, W -= lr (G + mu M)."""
    torch._foreach_mul_(params, 1 - lr * wd)
    for buf, g in zip(bufs, grads, strict=True):
        torch.add(g, buf, alpha=mu, out=buf)
    for p, buf, g in zip(params, bufs, grads, strict=True):
        p.add_(torch.add(g, buf, alpha=mu), alpha=-lr)


def run_compile(rounds: int, device: str) -> dict[str, Any]:
    """Eager vs `torch.compile` (inductor) of the elementwise step functions: compile time, interleaved medians."""
    print("\n== compile: torch.compile of the elementwise part of the step vs eager (medians) ==")
    out: dict[str, Any] = {}
    matrices = make_params(6, device)
    vectors = adamw_param_sets(device)["600 vectors of 576"]
    cases: dict[str, tuple[Callable[..., None], Callable[[], tuple]]] = {}

    def adamw_args(params: list[torch.nn.Parameter]) -> Callable[[], tuple]:
        own = _clone_with_grads(params)
        state = (
            [torch.zeros_like(p) for p in own],
            [torch.zeros_like(p) for p in own],
            [torch.zeros((), device=p.device) for p in own],
        )
        return lambda: ([p.data for p in own], [p.grad for p in own], *state)

    def momentum_args(params: list[torch.nn.Parameter]) -> Callable[[], tuple]:
        own = _clone_with_grads(params)
        bufs = [torch.zeros_like(p) for p in own]
        return lambda: ([p.data for p in own], [p.grad for p in own], bufs)

    kw_adamw = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
    cases["AdamW branch, 6 SmolLM2 layers"] = (lambda *a: root_functional.adamw(*a, **kw_adamw), adamw_args(matrices))
    cases["momentum + update, 6 SmolLM2 layers"] = (
        lambda *a: _momentum_update(*a, lr=1e-3, wd=0.1, mu=0.95),
        momentum_args(matrices),
    )
    # last: its compile (one graph over 600 tensors) took more than 15 minutes on the 2-core machine
    cases["AdamW branch, 600 vectors"] = (lambda *a: root_functional.adamw(*a, **kw_adamw), adamw_args(vectors))
    for name, (fn, args) in cases.items():
        compiled = torch.compile(fn, dynamic=False)
        start = time.perf_counter()
        compiled(*args())
        _sync(device)
        compile_s = time.perf_counter() - start
        fns = {"eager": lambda fn=fn, args=args: fn(*args()), "compiled": lambda c=compiled, args=args: c(*args())}
        ms = {k: v * 1e3 for k, v in interleaved_medians(fns, rounds).items()}
        saved = ms["eager"] - ms["compiled"]
        verdict = f"pays back after {compile_s * 1e3 / saved:.0f} steps" if saved > 0 else "never pays"
        print(
            f"  {name:<38} compile {compile_s:6.1f} s; eager {ms['eager']:8.2f} ms, compiled {ms['compiled']:8.2f} ms "
            f"({ms['compiled'] / ms['eager']:.2f}x): {verdict}"
        )
        out[name] = {"compile_s": compile_s, "ms": ms}
    return out


def collect(
    sections: tuple[str, ...] = LEGACY_SECTIONS,
    *,
    layers: int = 6,
    steps: int = 5,
    threads: int = 2,
    device: str = "cpu",
    sweep_hidden: tuple[int, ...] = SWEEP_HIDDEN,
    save: Path | None = None,
    shape_sets: tuple[str, ...] = tuple(SHAPE_SETS),
    peer_layers: int | None = None,
    peak_sizes: tuple[int, ...] = PEAK_SIZES,
    rounds: int = 5,
    ns_dtypes: tuple[str, ...] = ("bf16", "fp32"),
    gram_sets: tuple[str, ...] = GRAM_DEFAULT_SETS,
    experts: int | None = None,
    distinct_shapes: bool = False,
    gram_peers: tuple[str, ...] | None = None,
    e2e_optimizers: tuple[str, ...] | None = None,
    before_ref: str = "main",
) -> dict[str, Any]:
    """Run the chosen sections, print their figures and return them as one dict (also written to ``save``)."""
    torch.set_num_threads(threads)
    print(machine_info())
    print(f"cpu: {machine_dict()['cpu']}")
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}")
    result: dict[str, Any] = {
        "machine": machine_dict(),
        "versions": library_versions(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "config": {
            "layers": layers,
            "steps": steps,
            "threads": threads,
            "sections": list(sections),
            "rounds": rounds,
            "shape_sets": list(shape_sets),
            "gram_sets": list(gram_sets),
            "experts": experts,
            "distinct_shapes": distinct_shapes,
        },
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "default_schedule": DEFAULT_SCHEDULE,
    }
    start = time.perf_counter()
    if "peers" in sections:
        result["peers"] = run_peers(shape_sets, rounds, device, peak_sizes, peer_layers, ns_dtypes)
    if "ns-dtype" in sections:
        result["ns_dtype"] = run_ns_dtype(shape_sets, rounds, device)
    if "temp-memory" in sections:
        result["temp_memory"] = run_temp_memory(shape_sets, device, threads, ns_dtypes)
    if "first-step" in sections:
        result["first_step"] = run_first_step(device, threads)
    if "batch-cap" in sections:
        result["batch_cap"] = run_batch_cap(shape_sets, rounds, device)
    if "adamw-foreach" in sections:
        result["adamw_foreach"] = run_adamw_foreach(rounds, device, before_ref)
    if "elementwise" in sections:
        result["elementwise"] = run_elementwise(rounds, device, before_ref)
    if "compile" in sections:
        result["compile"] = run_compile(rounds, device)
    if "main" in sections:
        result["main"] = run_main(layers, steps, device)
    if "breakdown" in sections:
        result["breakdown"] = run_breakdown(layers, steps, device)
    if "sweep" in sections:
        result["sweep"] = run_sweep(sweep_hidden, max(2, steps - 2), device)
    if "memory" in sections:
        result["memory"] = run_memory()
    if "e2e" in sections:
        result["e2e"] = run_e2e(max(1, rounds // 2), device, e2e_optimizers)
    if "gram-peers" in sections:
        result["gram_peers"] = run_gram_peers(
            gram_sets, rounds, device, peer_layers, ns_dtypes, experts, distinct_shapes, gram_peers
        )
    result["seconds"] = time.perf_counter() - start
    result["machine"]["load_average_1m_end"] = machine_dict()["load_average_1m"]
    print(f"\ntotal {result['seconds']:.0f} s; load average {result['machine']['load_average_1m']} at the start, "
          f"{result['machine']['load_average_1m_end']} at the end")  # fmt: skip
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text(json.dumps(result, indent=1, default=_json_default), encoding="utf-8")
        print(f"\nwrote {save}")
    return result


def plot_peers(paths: list[Path], out: Path) -> None:
    """Bar chart of the peers section of one or more saved runs (one panel per shape set and NS dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, machine = {}, ""
    for path in paths:
        saved = json.loads(path.read_text(encoding="utf-8"))
        rows |= saved.get("peers", {}).get("sets", {})
        machine = f"{saved['machine']['cpu']}, {saved['config']['threads']} thread(s), {saved['device']}"
    if not rows:
        raise SystemExit(f"no peers section in {paths}")
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.6), squeeze=False)
    for ax, (name, row) in zip(axes[0], rows.items(), strict=True):
        names = list(row["ms"])
        colors = [
            "#2ca02c" if n.startswith("ROOT") else "#8c8c8c" if n.startswith("AdamW") else "#1f77b4" for n in names
        ]
        ax.barh(range(len(names)), [row["ms"][n] / 1e3 for n in names], color=colors)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([n.replace(" Muon", "\nMuon") for n in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("optimizer step (s, median)")
        ax.set_title(f"{name} NS, {row['layers']} layer(s)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"step time, interleaved medians: {machine}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"plot: {out}")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6, help="decoder layers of main/breakdown (SmolLM2 has 30)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimizer in main/breakdown/sweep")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds in peers/ns-dtype (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where params and grads live")
    parser.add_argument(
        "--sections",
        default=None,
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all but e2e; e2e is slow: ask for it)",
    )
    parser.add_argument("--shape-sets", default=",".join(SHAPE_SETS), help=f"subset of {','.join(SHAPE_SETS)}")
    parser.add_argument("--ns-dtypes", default="bf16,fp32", help="NS dtypes of peers / temp-memory (bf16,fp32)")
    parser.add_argument(
        "--peer-layers", type=int, default=None, help="decoder layers per shape set in peers (default: 6 / 2)"
    )
    parser.add_argument("--e2e", action="store_true", help="add the e2e section (real SmolLM2-135M; slow)")
    parser.add_argument(
        "--gram-sets",
        default=",".join(GRAM_DEFAULT_SETS),
        help=f"shape sets of gram-peers, a subset of {','.join(GRAM_SETS)} (NS dtypes: --ns-dtypes, also fp16)",
    )
    parser.add_argument(
        "--experts", type=int, default=None, help="gram-peers: experts kept per MoE expert tensor (default: all)"
    )
    parser.add_argument(
        "--distinct-shapes",
        action="store_true",
        help="gram-peers: one matrix per distinct shape instead of whole layers (q/o, k/v, gate/up once)",
    )
    parser.add_argument(
        "--gram-peers", default=None, help="gram-peers: the peers to time, comma-separated names (default: all)"
    )
    parser.add_argument(
        "--e2e-optimizers", default=None, help="e2e: the rows to run, comma-separated names (default: all)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="seconds, not minutes: peers and ns-dtype on one SmolLM2 layer, 2 rounds, a 1024 matmul peak; "
        "gram-peers on two tiny layers (dense and MoE)",
    )
    parser.add_argument(
        "--save", nargs="?", const=DEFAULT_JSON, type=Path, default=None, help=f"write JSON (default {DEFAULT_JSON})"
    )
    parser.add_argument(
        "--plot-from", nargs="+", type=Path, default=None, help="draw the peers section of saved JSON runs and exit"
    )
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help=f"with --plot-from (default {DEFAULT_PLOT})")
    parser.add_argument(
        "--before-ref", default="main", help="git ref of the 'before' copy in adamw-foreach / elementwise (main)"
    )
    parser.add_argument("--worker", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plot_from:
        plot_peers(args.plot_from, args.plot)
        return
    if args.worker:
        torch.set_num_threads(args.threads)
        print(json.dumps(memory_worker(*args.worker)))
        return
    if args.sections is None:
        sections = QUICK_SECTIONS if args.quick else CLI_DEFAULT
    else:
        sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    if args.e2e and "e2e" not in sections:
        sections = (*sections, "e2e")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    shape_sets = tuple(s.strip() for s in args.shape_sets.split(",") if s.strip())
    if set(shape_sets) - set(SHAPE_SETS):
        parser.error(f"unknown shape sets {sorted(set(shape_sets) - set(SHAPE_SETS))}; choose from {list(SHAPE_SETS)}")
    gram_sets = tuple(s.strip() for s in args.gram_sets.split(",") if s.strip())
    if set(gram_sets) - set(GRAM_SETS):
        parser.error(f"unknown gram sets {sorted(set(gram_sets) - set(GRAM_SETS))}; choose from {list(GRAM_SETS)}")
    ns_dtypes = tuple(d.strip() for d in args.ns_dtypes.split(",") if d.strip())
    if set(ns_dtypes) - set(GRAM_NS_DTYPES):
        parser.error(f"unknown NS dtypes {sorted(set(ns_dtypes) - set(GRAM_NS_DTYPES))}; choose from bf16, fp32, fp16")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; none is visible to torch")
    quick: dict[str, Any] = {"peak_sizes": CUDA_PEAK_SIZES} if args.device == "cuda" else {}
    if args.quick:
        smoke_set = "smollm2-135m" if device_has_fast_bf16(args.device) else "tiny-llama"
        quick |= {"shape_sets": (smoke_set,), "peer_layers": 1, "peak_sizes": (1024,), "rounds": 2}
        quick |= {"gram_sets": ("tiny-llama", "tiny-moe")}
    collect(
        sections,
        layers=args.layers,
        steps=args.steps,
        threads=args.threads,
        device=args.device,
        save=args.save,
        **(
            {
                "shape_sets": shape_sets,
                "rounds": args.rounds,
                "peer_layers": args.peer_layers,
                "ns_dtypes": ns_dtypes,
                "gram_sets": gram_sets,
                "experts": args.experts,
                "distinct_shapes": args.distinct_shapes,
                "gram_peers": tuple(n.strip() for n in args.gram_peers.split(",")) if args.gram_peers else None,
                "e2e_optimizers": (
                    tuple(n.strip() for n in args.e2e_optimizers.split(",")) if args.e2e_optimizers else None
                ),
                "before_ref": args.before_ref,
            }
            | quick
        ),
    )


def device_has_fast_bf16(device: str) -> bool:
    """bf16 matmul runs natively: any CUDA device, or a CPU with AVX512-BF16 / AMX (`cpu_has_native_bf16`)."""
    return device == "cuda" or cpu_has_native_bf16()


if __name__ == "__main__":
    main()
