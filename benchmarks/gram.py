"""Standard vs Gram Newton-Schulz: time, FLOPs and error per matrix shape, and what `ns_method="auto"` picks.

Usage:  python benchmarks/gram.py [--quick] [--shapes 576x1536 2048x8192 ...] [--dtypes bf16 fp32] [--threads 1 2]
                                  [--rounds 5] [--accuracy] [--save [PATH]]

Timing: for every shape, dtype and thread count, one normalized Gaussian matrix is orthogonalized by
`root_hf.optim.newton_schulz.newton_schulz` in both forms (`method="standard"` / `"gram"`, the shape's adaptive
schedule, 5 steps), the calls interleaved in one process (`harness.interleaved_medians`); the table gives both
medians, the time ratio Gram / standard, the FLOP ratio (`gram_flop_ratio`), both errors against the exact polar
factor (float64 SVD) and the form `ns_method="auto"` picks on this device. The selection rule's thresholds in
`root_hf/optim/newton_schulz.py` come from these figures.

`--accuracy`: the restart study: the Gram form's relative Frobenius error against the exact polar factor with a
restart every 0 (never), 1, 2 or 3 steps, beside the standard form's, in bfloat16, float16 and float32, for the
adaptive, Muon and Polar Express schedules on Gaussian, low-rank and log-spaced (1e-6..1) spectra; and the largest
output singular value. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    RESULTS,
    SMOLLM2_135M,
    interleaved_medians,
    llama_hidden_shapes,
    machine_dict,
    machine_info,
)
from root_hf.optim import newton_schulz as ns
from root_hf.schedules import get_schedule, schedule_band

# The shapes of issue 22's table, then one decoder layer of SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B
# (meta-llama/Llama-3.1-8B config.json: hidden 4096, intermediate 14336, 32 heads / 8 KV heads of dim 128).
ISSUE_SHAPES = [(2048, 8192), (8192, 2048), (576, 1536), (1536, 576), (192, 576), (576, 576)]
LLAMA_32_1B = {"hidden": 2048, "intermediate": 8192, "heads": 32, "kv_heads": 8, "head_dim": 64}
LLAMA_31_8B = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128}
QUICK_SHAPES = [(576, 1536), (1536, 576), (192, 576), (576, 576), (64, 2048), (16, 4096)]
# Without native bf16 matmul (about 1 GFLOP/s emulated on the 2-core AMD EPYC, 2026-12-07) the SmolLM2 shapes made
# --quick take 125 s; these keep a wide, a tall, a square and a very wide case.
QUICK_SHAPES_EMULATED_BF16 = [(192, 576), (576, 192), (128, 128), (16, 4096)]
# Errors need a float64 SVD: taken up to 2^35 multiply-adds per k^2 K product (2048 x 8192), nan above.
ERROR_LIMIT = 2**35
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_shapes() -> list[tuple[int, int]]:
    """Issue 22's table, then the SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B layer shapes, each once."""
    out: list[tuple[int, int]] = []
    for shape in [
        *ISSUE_SHAPES,
        *llama_hidden_shapes(**SMOLLM2_135M),
        *llama_hidden_shapes(**LLAMA_32_1B),
        *llama_hidden_shapes(**LLAMA_31_8B),
    ]:
        if tuple(shape) not in out:
            out.append(tuple(shape))
    return out


def polar_factor(g: torch.Tensor) -> torch.Tensor:
    """The exact polar factor `U_r V_r^T` of `g`, in float64, over its singular values above `1e-10 s_max` (a
    rank-deficient matrix has no singular directions beyond its rank, and Newton-Schulz keeps them at zero)."""
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    keep = (s > 1e-10 * s.max()).to(s.dtype)
    return (u * keep) @ vh


def rel_error(x: torch.Tensor, polar: torch.Tensor) -> float:
    """`||X - U V^T||_F / ||U V^T||_F`, averaged over a batch."""
    diff = torch.linalg.matrix_norm(x.double() - polar) / torch.linalg.matrix_norm(polar)
    return diff.mean().item()


def normalized(g: torch.Tensor) -> torch.Tensor:
    return g / torch.linalg.vector_norm(g, dim=(-2, -1), keepdim=True)


def time_shape(
    shape: tuple[int, int], dtype: torch.dtype, rounds: int, seed: int = 0, device: str = "cpu"
) -> dict[str, Any]:
    """Interleaved medians of both forms on one matrix of `shape`, their errors and `auto`'s pick."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen, dtype=torch.float32)
    x0 = normalized(g).to(device=device, dtype=dtype)
    schedule = get_schedule("adaptive", shape, 5)
    outs: dict[str, torch.Tensor] = {}

    def runner(method: str):
        def run() -> None:
            outs[method] = ns.newton_schulz(x0.clone(), schedule, method)
            if device != "cpu":
                torch.cuda.synchronize()

        return run

    medians = interleaved_medians({m: runner(m) for m in ("standard", "gram")}, steps=rounds, warmup=1)
    polar = polar_factor(g.to(device)) if min(shape) ** 2 * max(shape) <= ERROR_LIMIT else None
    return {
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "standard_s": medians["standard"],
        "gram_s": medians["gram"],
        "time_ratio": medians["gram"] / medians["standard"],
        "flop_ratio": ns.gram_flop_ratio(shape, 5, dtype),
        "error_standard": rel_error(outs["standard"], polar) if polar is not None else float("nan"),
        "error_gram": rel_error(outs["gram"], polar) if polar is not None else float("nan"),
        "device": device,
        "auto": ns.select_ns_method("auto", shape, 5, dtype, torch.device(device).type),
    }


TIMING_HEADER = (
    "| shape | dtype | threads | standard ms | Gram ms | time Gram/std | FLOPs Gram/std | error std / Gram | auto |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def print_timing(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        m, n = r["shape"]
        print(
            f"| {m} x {n} | {r['dtype']} | {r['threads']} | {1e3 * r['standard_s']:.1f} | {1e3 * r['gram_s']:.1f} | "
            f"{r['time_ratio']:.2f} | {r['flop_ratio']:.2f} | {r['error_standard']:.4f} / {r['error_gram']:.4f} | "
            f"{r['auto']} |",
            flush=True,
        )


def spectra(shape: tuple[int, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Test matrices: Gaussian, low rank (`k / 8`) and a log-spaced spectrum 1e-6..1 with Haar singular vectors."""
    m, n = shape
    k = min(shape)
    r = max(1, k // 8)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = torch.logspace(-6, 0, k, dtype=torch.float64)
    return {
        "gaussian": torch.randn(m, n, generator=gen, dtype=torch.float64),
        "low-rank": torch.randn(m, r, generator=gen, dtype=torch.float64)
        @ torch.randn(r, n, generator=gen, dtype=torch.float64),
        "log-1e-6": (u * s) @ v.T,
    }


def run_accuracy(shapes: list[tuple[int, int]], periods: tuple[int, ...] = (0, 1, 2, 3)) -> list[dict[str, Any]]:
    """The restart study (see the module docstring)."""
    rows = []
    saved = dict(ns._GRAM_RESTART_EVERY)
    gen = torch.Generator().manual_seed(0)
    try:
        for shape in shapes:
            mats = spectra(shape, gen)
            polars = {name: polar_factor(g) for name, g in mats.items()}
            for sched in ("adaptive", "muon", "polar-express"):
                schedule = get_schedule(sched, shape, 5)
                hi = schedule_band(schedule)[1]
                for name, g in mats.items():
                    x0 = normalized(g)
                    for dname, dtype in DTYPES.items():
                        std = ns.newton_schulz(x0.to(dtype), schedule, "standard")
                        row = {
                            "shape": list(shape),
                            "schedule": sched,
                            "spectrum": name,
                            "dtype": dname,
                            "band_hi": hi,
                            "standard": rel_error(std, polars[name]),
                            "standard_max": torch.linalg.svdvals(std.double()).max().item(),
                        }
                        for every in periods:
                            ns._GRAM_RESTART_EVERY[dtype] = every
                            gx = ns.newton_schulz(x0.to(dtype), schedule, "gram")
                            row[f"gram_{every}"] = rel_error(gx, polars[name])
                            row[f"gram_{every}_max"] = torch.linalg.svdvals(gx.double()).max().item()
                        ns._GRAM_RESTART_EVERY.update(saved)
                        rows.append(row)
                        errs = " / ".join(f"{row[f'gram_{e}']:.4f}" for e in periods)
                        peaks = " / ".join(f"{row[f'gram_{e}_max']:.3f}" for e in periods)
                        print(
                            f"| {shape[0]} x {shape[1]} | {sched} | {name} | {dname} | {row['standard']:.4f} | "
                            f"{errs} | {row['standard_max']:.3f} | {peaks} | {hi:.3f} |",
                            flush=True,
                        )
    finally:
        ns._GRAM_RESTART_EVERY.update(saved)
    return rows


def parse_shape(text: str) -> tuple[int, int]:
    m, _, n = text.lower().partition("x")
    return int(m), int(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 rounds, 1 thread (a smoke run)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None)
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--accuracy", action="store_true", help="run the restart study instead of the timing")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (timed with torch.cuda.synchronize)")
    parser.add_argument("--save", nargs="?", const=str(RESULTS / "gram.json"), default=None)
    args = parser.parse_args(argv)
    quick_shapes = QUICK_SHAPES if ns.cpu_has_native_bf16() else QUICK_SHAPES_EMULATED_BF16
    shapes = args.shapes or (quick_shapes if args.quick else default_shapes())
    print(machine_info())
    print(f"load: {machine_dict()['load_average_1m']}")
    result: dict[str, Any] = {"machine": machine_dict()}
    if args.accuracy:
        print(
            "| shape | schedule | spectrum | dtype | error std | error Gram, restart every 0/1/2/3 | max sv std | "
            "max sv Gram 0/1/2/3 | band hi |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        result["accuracy"] = run_accuracy(shapes[:3] if args.quick else shapes)
    else:
        rows = []
        threads = [1] if args.quick else args.threads
        print(TIMING_HEADER)
        for t in threads:
            torch.set_num_threads(t)
            for dname in args.dtypes:
                for shape in shapes:
                    rounds = 3 if args.quick else args.rounds
                    rows.append(time_shape(shape, DTYPES[dname], rounds, device=args.device))
                    print_timing(rows[-1:])
        result["timing"] = rows
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(result, indent=1))
        print(f"saved {args.save}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
