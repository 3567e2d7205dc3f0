"""Mixture-of-experts and fused projections: per-expert ROOT vs today's fused view, router on ROOT vs AdamW, AdamW.

Usage:
    python benchmarks/moe.py                 # the MoE study: table + docs/img/moe.png
    python benchmarks/moe.py --study fused   # fused projections: "split" vs "whole" (MoE experts and a tiny Phi-3)
    python benchmarks/moe.py --study all     # both
    python benchmarks/moe.py --quick         # smoke run in seconds (plot under benchmarks/results/moe-quick/)
    python benchmarks/moe.py --report-only   # table and plots from the cached runs

Task: from-scratch byte-level language modelling of the English chatterbot corpus (the YAML files shipped in the
`chatterbot_corpus` package, read as raw bytes: vocabulary 256). The files are concatenated in name order and cut
into 2 KiB chunks; every 10th chunk is held out, so both parts cover every topic file. Training batches are random
windows of `seq` + 1 bytes drawn from one fixed generator, so every configuration sees the same batches in the same
order; the model is initialized from the same seed.

Model: a tiny OLMoE-style causal LM (`OlmoeForCausalLM`: hidden 64, 2 layers, 4 heads, 8 experts of intermediate
size 64, top-2 routing, no auxiliary loss) whose fused expert tensors are `gate_up_proj (8, 128, 64)` and
`down_proj (8, 64, 64)`, the router `mlp.gate.weight (8, 64)`. The fused study adds a tiny `Phi3ForCausalLM`
(hidden 64, 2 layers, fused `qkv_proj` and `gate_up_proj`).

Configurations (MoE study):
- `AdamW`: `torch.optim.AdamW` on everything (decay on matrices only, as the routing's AdamW branch).
- `ROOT per-expert`: `route_parameters(model)` (the package default): each expert its own matrix
  (`matrix_view="batched"`), gate/up blocks split, router on AdamW.
- `ROOT per-expert, router ROOT`: the same with `router_branch="root"`.
- `ROOT fused (old)`: the behaviour before per-expert views: each fused expert tensor one `(E, out * in)` matrix
  (`matrix_view="flatten"`, no split), router on ROOT.
Fused study: `split` (default) vs `whole` for the MoE's expert `gate_up_proj` and for Phi-3's `qkv_proj` /
`gate_up_proj`.

Every configuration: linear warm-up over 10% of the steps then cosine decay to 0, weight decay 0.1, betas
(0.9, 0.95), a learning-rate sweep over 3 values at seed 0 (extended by up to two values while the best lr sits at
an edge of the grid); the best lr (final eval loss) is then run at the other seeds and the table reports the mean
over seeds. The training loop, the run cache and the lr sweep are `benchmarks/harness.py`'s (`train_run`, `Study`):
runs are cached as JSON under `benchmarks/results/moe/` (git-ignored), keyed by what they compute, so an interrupted
study resumes and `MoE experts: split` reuses the runs of `ROOT per-expert`, the same computation.

Cost on the project's 2-core CPU (shared with other jobs): 23-60 s per run of 200 steps, depending on the load;
`--study all --seeds 0 1` is 30 runs (the docs/models.md figures came from two processes, one per study, in about
25 minutes on a busy machine). Fewer runs: `--seeds 0`, or `--steps 100`.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import REPO, RESULTS, Plan, Study, Task, library_versions, machine_dict
from root_hf import ROOT
from root_hf.integrations.routing import route_parameters

MOE_CONFIGS = ("adamw", "root_per_expert", "root_per_expert_router_root", "root_fused_old")
FUSED_CONFIGS = ("phi3_split", "phi3_whole", "moe_whole", "moe_split")  # moe_split last: cached by --study moe
LR_RANGE = (1e-4, 3e-1)  # learning rates the sweep may extend to
# name -> (model, optimizer spec): "adamw", or ROOT over `route_parameters(model, **options)` with its groups'
# `matrix_view` set when given. moe_split and root_per_expert are the same computation (the package default).
SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("moe", {"kind": "adamw"}),
    "root_per_expert": ("moe", {"kind": "root"}),
    "root_per_expert_router_root": ("moe", {"kind": "root", "router_branch": "root"}),
    "root_fused_old": (
        "moe",
        {"kind": "root", "router_branch": "root", "fused_projections": "whole", "matrix_view": "flatten"},
    ),
    "moe_split": ("moe", {"kind": "root"}),
    "moe_whole": ("moe", {"kind": "root", "fused_projections": "whole"}),
    "phi3_split": ("phi3", {"kind": "root"}),
    "phi3_whole": ("phi3", {"kind": "root", "fused_projections": "whole"}),
}
LABELS = {
    "adamw": "AdamW",
    "root_per_expert": "ROOT per-expert (default)",
    "root_per_expert_router_root": "ROOT per-expert, router ROOT",
    "root_fused_old": "ROOT fused (old)",
    "moe_split": "MoE experts: split (default)",
    "moe_whole": "MoE experts: whole",
    "phi3_split": "Phi-3: split (default)",
    "phi3_whole": "Phi-3: whole",
}


@dataclass(frozen=True)
class Budget:
    steps: int = 200
    batch: int = 8
    seq: int = 64
    hidden: int = 64
    layers: int = 2
    experts: int = 8
    eval_every: int = 25
    eval_windows: int = 64
    lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    seeds: tuple[int, ...] = (0, 1)
    max_extra_lrs: int = 2  # lr points the sweep may add past an edge of `lrs`

    def key(self, model: str) -> dict[str, Any]:
        """What changes a run (the run cache's key): the model and the budget, not the sweep plan."""
        plan = ("lrs", "seeds", "max_extra_lrs")
        return {"model": model, "budget": {k: v for k, v in asdict(self).items() if k not in plan}}


QUICK = Budget(steps=6, batch=4, seq=32, hidden=32, layers=1, experts=4, eval_every=3, eval_windows=8, lrs=(1e-2,),
               seeds=(0,))  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------------------------


def corpus_bytes() -> torch.Tensor:
    """The English chatterbot corpus YAML files, concatenated in name order, as a uint8 tensor of bytes."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "benchmarks/moe.py needs the chatterbot-corpus package: pip install --no-deps chatterbot-corpus"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    data = b"".join(Path(f).read_bytes() for f in sorted(glob.glob(str(folder / "*.yml"))))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def split_corpus(data: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): every 10th chunk of `chunk` bytes is held out, so both cover every topic file."""
    chunks = list(data.split(chunk))
    held_out = [c for i, c in enumerate(chunks) if i % 10 == 9]
    return torch.cat([c for i, c in enumerate(chunks) if i % 10 != 9]), torch.cat(held_out)


def windows(data: torch.Tensor, starts: torch.Tensor, seq: int) -> torch.Tensor:
    return torch.stack([data[s : s + seq + 1] for s in starts.tolist()])


class ByteLM(Task):
    """A tiny from-scratch causal LM (`kind` "moe": OLMoE-style, "phi3": Phi-3) on random windows of the corpus
    bytes, the same batches for every configuration and seed; eval: `eval_windows` evenly spaced held-out windows;
    warm-up over `steps // 10` steps, cosine decay to 0."""

    def __init__(self, kind: str, budget: Budget, data: torch.Tensor) -> None:
        self.kind, self.budget = kind, budget
        self.plan = Plan(budget.steps, budget.eval_every, max(1, budget.steps // 10))
        self.train, held_out = split_corpus(data)
        starts = torch.linspace(0, len(held_out) - budget.seq - 2, budget.eval_windows).long()
        self.eval_batch = windows(held_out, starts, budget.seq)

    def build(self, seed: int) -> torch.nn.Module:
        import transformers

        b = self.budget
        common = dict(
            hidden_size=b.hidden,
            num_hidden_layers=b.layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=256,
            max_position_embeddings=b.seq,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        if self.kind == "moe":
            config = transformers.OlmoeConfig(
                **common, intermediate_size=b.hidden, num_experts=b.experts, num_experts_per_tok=2
            )
            return transformers.OlmoeForCausalLM(config)
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**common, intermediate_size=4 * b.hidden))

    def optimizers(self, model: torch.nn.Module, spec: dict[str, Any], lr: float) -> list[torch.optim.Optimizer]:
        hyper = dict(lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
        if spec["kind"] == "adamw":
            routing = route_parameters(model)
            decay = [r.param for r in routing.params if r.decay and r.param.dim() >= 2]
            rest = [r.param for r in routing.params if not (r.decay and r.param.dim() >= 2)]
            return [torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], **hyper)]
        options = {k: spec[k] for k in ("router_branch", "fused_projections") if k in spec}
        groups = route_parameters(model, **options).param_groups(weight_decay=0.1)
        for group in groups:
            if group["use_root"] and "matrix_view" in spec:
                group["matrix_view"] = spec["matrix_view"]  # "flatten": one (E, out * in) matrix per expert tensor
        return [ROOT(groups, **hyper)]

    def schedule(self) -> Callable[[int], float]:
        # `lr_factor(self.plan)` up to the last bit: moe.py's runs always computed pi * k / n, not pi * (k / n)
        warmup, decay = self.plan.warmup, max(1, self.plan.steps - self.plan.warmup)
        return lambda i: (i + 1) / warmup if i < warmup else 0.5 * (1 + math.cos(math.pi * (i - warmup) / decay))

    def batches(self, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        b, g = self.budget, torch.Generator().manual_seed(1234)  # the same batches for every configuration and seed
        while True:
            yield {
                "x": windows(self.train, torch.randint(0, len(self.train) - b.seq - 2, (b.batch,), generator=g), b.seq)
            }

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["x"][:, :-1], labels=batch["x"][:, :-1]).loss

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> float:
        model.eval()
        loss = self.loss(model, {"x": self.eval_batch}).item()
        model.train()
        return loss


def final(run: dict[str, Any], budget: Budget) -> tuple[float, float]:
    """(final train loss: mean of the last 10% of steps, final eval loss); NaN for a run that stopped early."""
    if run["diverged"]:
        return float("nan"), float("nan")
    tail = run["train_loss"][-max(1, budget.steps // 10) :]
    return sum(tail) / len(tail), run["final_eval"]


# --------------------------------------------------------------------------------------------------------------------
# Study
# --------------------------------------------------------------------------------------------------------------------


def studies(budget: Budget, cache: Path | None, report_only: bool) -> dict[str, Study]:
    """model kind -> the harness study of its runs (one corpus read, on the first run to train)."""
    data: list[torch.Tensor] = []

    def make_task(kind: str) -> ByteLM:
        data[:] = data or [corpus_bytes()]
        return ByteLM(kind, budget, data[0])

    return {
        kind: Study(cache, budget.key(kind), lambda k=kind: make_task(k), report_only=report_only, label=f"[{kind}] ")
        for kind in ("moe", "phi3")
    }


def study(configs: tuple[str, ...], budget: Budget, runs: dict[str, Study]) -> dict[str, dict[str, Any]]:
    """The lr sweep of each configuration at the first seed, then its best lr at every seed (`Study.tune`)."""
    rows: dict[str, dict[str, Any]] = {}
    for config in configs:
        kind, spec = SPECS[config]
        entry = runs[kind].tune(config, spec, budget.lrs, budget.seeds, budget.max_extra_lrs, LR_RANGE)
        if entry is None:
            continue
        sweep = {lr: final(run, budget) for lr, run in entry["sweep"].items()}
        for lr, (train_loss, eval_loss) in sweep.items():
            print(f"  {config:28s} lr {lr:<6g} train {train_loss:.4f} eval {eval_loss:.4f}")
        finals = [final(r, budget) for r in entry["runs"]]
        rows[config] = {
            "lr": entry["best_lr"],
            "sweep": {str(lr): v for lr, v in sweep.items()},
            "train": sum(f[0] for f in finals) / len(finals),
            "eval": sum(f[1] for f in finals) / len(finals),
            "eval_seeds": [f[1] for f in finals],
            "curves": entry["runs"][0],
        }
    return rows


def table(rows: dict[str, dict[str, Any]], budget: Budget) -> str:
    lines = [
        f"| configuration | best lr | final train loss | final eval loss (mean of {len(budget.seeds)} seeds) | "
        f"eval loss per seed |",
        "|---|---|---|---|---|",
    ]
    for config, row in rows.items():
        seeds = ", ".join(f"{v:.4f}" for v in row["eval_seeds"])
        lines.append(f"| {LABELS[config]} | {row['lr']:g} | {row['train']:.4f} | {row['eval']:.4f} | {seeds} |")
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for config, row in rows.items():
        curves = row["curves"]
        losses = curves["train_loss"]
        steps = range(1, len(losses) + 1)
        smooth = [sum(losses[max(0, i - 9) : i + 1]) / len(losses[max(0, i - 9) : i + 1]) for i in range(len(losses))]
        label = f"{LABELS[config]} (lr {row['lr']:g})"
        axes[0].plot(steps, smooth, label=label)
        axes[1].plot(
            [e[0] for e in curves["evals"]], [e[2] for e in curves["evals"]], marker="o", markersize=3, label=label
        )
    for ax, name in zip(axes, ("train loss (10-step mean), seed 0", "held-out loss, seed 0"), strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    low = min(min(e[2] for e in r["curves"]["evals"]) for r in rows.values())
    axes[1].set_ylim(low - 0.05, low + 1.0)
    axes[0].set_ylim(low - 0.3, low + 1.5)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", choices=("moe", "fused", "all"), default="moe")
    parser.add_argument("--quick", action="store_true", help="smoke run in seconds; nothing under docs/")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="folder of the plots (default: docs/img)")
    parser.add_argument("--report-only", action="store_true", help="table and plots from the cached runs only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else Budget()
    if args.steps:
        budget = replace(budget, steps=args.steps)
    if args.seeds:
        budget = replace(budget, seeds=tuple(args.seeds))
    cache = None if args.quick else RESULTS / "moe"
    img = args.out or (RESULTS / "moe-quick" if args.quick else REPO / "docs" / "img")
    print(json.dumps({"machine": machine_dict(), "versions": library_versions(), "budget": asdict(budget)}))
    out: dict[str, Any] = {}
    runs = studies(budget, cache, args.report_only)
    for name, configs in (("moe", MOE_CONFIGS), ("fused", FUSED_CONFIGS)):
        if args.study in (name, "all"):
            out[name] = study(configs, budget, runs)
            if not out[name]:
                where = f"under {cache}" if cache else "(--quick caches none)"
                raise SystemExit(f"No cached runs {where}; run without --report-only first.")
    if "moe" in out:
        rows = out["moe"]
        print("\nMoE study (tiny OLMoE-style LM, bytes of the chatterbot corpus)\n" + table(rows, budget))
        plot(rows, img / "moe.png", "Tiny OLMoE-style byte LM: per-expert ROOT vs fused view vs AdamW")
    if "fused" in out:
        rows = out["fused"]
        print("\nFused projections: split into logical blocks vs one matrix\n" + table(rows, budget))
        plot(rows, img / "moe_fused.png", "Fused projections: split vs whole")
    return out


if __name__ == "__main__":
    main()
