"""Convergence with either Newton-Schulz form: setting (a) of benchmarks/convergence.py, ROOT's defaults at one lr.

Usage:  python benchmarks/gram_convergence.py [--lr 0.01] [--seeds 0 1 2] [--setting a] [--quick]

Runs ROOT (the package defaults: clip 0.90, adaptive schedule) with `ns_method="standard"` and with the new default
`ns_method="auto"` (and `"gram"`, which forces the Gram form on every shape) through the convergence study's harness
(same model, data order, steps, lr schedule and seeds; clean variant; cached under benchmarks/results like every
study run), and prints each one's final held-out loss per seed, mean and std. `auto`'s per-shape picks are printed
too. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import QUICK, RESULTS, SETTINGS, SettingStudy, default_schedule, machine_info
from root_hf.optim.newton_schulz import select_ns_method


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="a", choices=tuple(SETTINGS))
    parser.add_argument("--lr", type=float, default=0.01, help="ROOT's best lr of setting (a) in docs/results.md")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["standard", "auto"], choices=("standard", "auto", "gram"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    setting = SETTINGS[args.setting]
    results = RESULTS
    if args.quick:
        import dataclasses

        setting = dataclasses.replace(setting, **QUICK[args.setting])
        results = RESULTS / "quick"
    print(machine_info())
    study = SettingStudy(setting, results)
    shapes = sorted(set(study.shapes()))
    picks = {f"{m}x{n}": select_ns_method("auto", (m, n), 5, torch.float32, "cpu") for m, n in shapes}
    print(f"setting {setting.name}: lr {args.lr}, seeds {args.seeds}; auto picks (float32, cpu): {picks}")
    for method in args.methods:
        spec = {"kind": "root", "clip_quantile": 0.90, "ns_coefficients": default_schedule(), "ns_method": method}
        losses = []
        for seed in args.seeds:
            run = study.get(f"ROOT ns_method={method}", spec, args.lr, seed)
            losses.append(run["final_eval"])
            print(f"  ns_method={method:<8} seed {seed}: final held-out loss {run['final_eval']:.4f}", flush=True)
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        print(f"ns_method={method}: mean {statistics.mean(losses):.4f} +- {spread:.4f} (std over {len(losses)} seeds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
