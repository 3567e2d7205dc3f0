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

``--save`` writes every figure as JSON (default ``benchmarks/results/step_time.json``), which
``benchmarks/convergence.py`` puts on the results page. Wall-clock figures on a shared machine are noisy; medians.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
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
from root_hf.optim.newton_schulz import newton_schulz
from root_hf.optim.root import adjusted_lr_ratio
from root_hf.schedules import DEFAULT_SCHEDULE

SECTIONS = ("main", "breakdown", "sweep", "memory")
SWEEP_HIDDEN = (256, 576, 1024, 2048)
PEAK_SIZES = (2048, 3072, 4096)  # square matmuls timed for the machine's peak; the fastest counts
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "step_time.json"


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
        from root_hf.assets import smollm2_path

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


def collect(
    sections: tuple[str, ...] = SECTIONS,
    *,
    layers: int = 6,
    steps: int = 5,
    threads: int = 2,
    device: str = "cpu",
    sweep_hidden: tuple[int, ...] = SWEEP_HIDDEN,
    save: Path | None = None,
) -> dict[str, Any]:
    """Run the chosen sections, print their figures and return them as one dict (also written to ``save``)."""
    torch.set_num_threads(threads)
    print(machine_info())
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}")
    result: dict[str, Any] = {
        "machine": machine_dict(),
        "versions": library_versions(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "config": {"layers": layers, "steps": steps, "threads": threads, "sections": list(sections)},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "default_schedule": DEFAULT_SCHEDULE,
    }
    start = time.perf_counter()
    if "main" in sections:
        result["main"] = run_main(layers, steps, device)
    if "breakdown" in sections:
        result["breakdown"] = run_breakdown(layers, steps, device)
    if "sweep" in sections:
        result["sweep"] = run_sweep(sweep_hidden, max(2, steps - 2), device)
    if "memory" in sections:
        result["memory"] = run_memory()
    result["seconds"] = time.perf_counter() - start
    result["machine"]["load_average_1m_end"] = machine_dict()["load_average_1m"]
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text(json.dumps(result, indent=1, default=_json_default), encoding="utf-8")
        print(f"\nwrote {save}")
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6, help="decoder layers (SmolLM2-135M has 30)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimizer (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where params and grads live")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)"
    )
    parser.add_argument(
        "--save", nargs="?", const=DEFAULT_JSON, type=Path, default=None, help=f"write JSON (default {DEFAULT_JSON})"
    )
    args = parser.parse_args()
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; none is visible to torch")
    collect(sections, layers=args.layers, steps=args.steps, threads=args.threads, device=args.device, save=args.save)


if __name__ == "__main__":
    main()
