"""Optimizer step time on the hidden matrices of a SmolLM2-135M-shaped model: ROOT vs torch.optim.Muon vs AdamW.

Usage:  python benchmarks/step_time.py [--layers 6] [--steps 5] [--threads 2] [--device cpu|cuda]

Prints the median step time of each optimizer (grads are fixed random tensors, so only the optimizer is timed), the
ratio ROOT / torch Muon at equal Newton-Schulz dtype (torch.optim.Muon always iterates in bfloat16), and the share of
ROOT's step spent in the quantile clip (ROOT with clip_quantile=0.90 vs None).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SMOLLM2_135M, llama_hidden_shapes, machine_info, median_time
from root_hf import ROOT


def make_params(layers: int, device: str = "cpu", seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(layers):
        for shape in llama_hidden_shapes(**SMOLLM2_135M):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6, help="decoder layers (SmolLM2-135M has 30)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimizer (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where params and grads live")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; none is visible to torch")
    params = make_params(args.layers, args.device)
    n_params = sum(p.numel() for p in params)
    print(machine_info())
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}")
    print(
        f"config: {args.layers} layers of SmolLM2-135M hidden matrices, {len(params)} tensors, "
        f"{n_params / 1e6:.1f}M params, median of {args.steps} steps after 2 warm-up steps"
    )

    optimizers = {
        "AdamW (foreach)": lambda: torch.optim.AdamW(params, lr=1e-3, foreach=True),
        "torch.optim.Muon (bf16 NS)": lambda: torch.optim.Muon(params, lr=1e-3, adjust_lr_fn="match_rms_adamw"),
        "ROOT (bf16 NS)": lambda: ROOT(params, lr=1e-3, ns_dtype="bfloat16"),
        "ROOT (bf16 NS, no clip)": lambda: ROOT(params, lr=1e-3, ns_dtype="bfloat16", clip_quantile=None),
        "ROOT (fp32 NS, CPU default)": lambda: ROOT(params, lr=1e-3, ns_dtype="float32"),
        "ROOT (fp32 NS, no clip)": lambda: ROOT(params, lr=1e-3, ns_dtype="float32", clip_quantile=None),
    }
    times = {}
    for name, build in optimizers.items():
        opt = build()
        times[name] = median_time(synchronized(opt.step, args.device), args.steps)
        print(f"  {name:<30} {times[name] * 1e3:9.1f} ms/step")

    muon = times["torch.optim.Muon (bf16 NS)"]
    ratio = times["ROOT (bf16 NS)"] / muon
    clip_bf16 = 1 - times["ROOT (bf16 NS, no clip)"] / times["ROOT (bf16 NS)"]
    clip_fp32 = 1 - times["ROOT (fp32 NS, no clip)"] / times["ROOT (fp32 NS, CPU default)"]
    print(f"ROOT / torch.optim.Muon at equal NS dtype (bf16): {ratio:.2f}x  (target <= 1.10x)")
    print(f"clip share of the ROOT step: {clip_bf16:.1%} (bf16 NS), {clip_fp32:.1%} (fp32 NS)  (target < 5%)")
    print(f"ROOT fp32 / AdamW: {times['ROOT (fp32 NS, CPU default)'] / times['AdamW (foreach)']:.1f}x")


if __name__ == "__main__":
    main()
