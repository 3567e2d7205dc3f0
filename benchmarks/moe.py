"""Mixture-of-experts and fused projections: per-expert ROOT vs today's fused view, router on ROOT vs AdamW, AdamW.

Usage:
    python benchmarks/moe.py                 # the MoE study: table + docs/img/moe.png
    python benchmarks/moe.py --study fused   # fused projections: "split" vs "whole" (MoE experts and a tiny Phi-3)
    python benchmarks/moe.py --study all     # both
    python benchmarks/moe.py --quick         # smoke run in seconds (plot under benchmarks/results/moe-quick/)

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
over seeds. Runs are cached as JSON under `benchmarks/results/moe/`
(git-ignored), keyed by their configuration, so an interrupted study resumes.

Cost on the project's 2-core CPU (shared with other jobs): 23-60 s per run of 200 steps, depending on the load;
`--study all --seeds 0 1` is 30 runs (the docs/models.md figures came from two processes, one per study, in about
25 minutes on a busy machine). Fewer runs: `--seeds 0`, or `--steps 100`.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT_DIR))

from root_hf import ROOT  # noqa: E402
from root_hf.integrations.routing import route_parameters  # noqa: E402

RESULTS = ROOT_DIR / "benchmarks" / "results"
MOE_CONFIGS = ("adamw", "root_per_expert", "root_per_expert_router_root", "root_fused_old")
FUSED_CONFIGS = ("phi3_split", "phi3_whole", "moe_whole", "moe_split")  # moe_split last: cached by --study moe
LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # learning rates the sweep may extend to
RUN_AS = {"moe_split": "root_per_expert"}  # the same run: the package default
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


def make_model(kind: str, budget: Budget, seed: int) -> torch.nn.Module:
    import transformers

    common = dict(
        hidden_size=budget.hidden,
        num_hidden_layers=budget.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        max_position_embeddings=budget.seq,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if kind == "moe":
        config = transformers.OlmoeConfig(
            **common, intermediate_size=budget.hidden, num_experts=budget.experts, num_experts_per_tok=2
        )
        return transformers.OlmoeForCausalLM(config)
    config = transformers.Phi3Config(**common, intermediate_size=4 * budget.hidden)
    return transformers.Phi3ForCausalLM(config)


def build_optimizer(config: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    hyper = dict(lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    if config == "adamw":
        routing = route_parameters(model)
        decay = [r.param for r in routing.params if r.decay and r.param.dim() >= 2]
        rest = [r.param for r in routing.params if not (r.decay and r.param.dim() >= 2)]
        return torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], **hyper)
    options: dict[str, Any] = {}
    if config == "root_per_expert_router_root":
        options["router_branch"] = "root"
    if config == "root_fused_old":
        options.update(router_branch="root", fused_projections="whole")
    if config.endswith("_whole"):
        options["fused_projections"] = "whole"
    groups = route_parameters(model, **options).param_groups(weight_decay=0.1)
    if config == "root_fused_old":
        for group in groups:
            if group["use_root"]:
                group["matrix_view"] = "flatten"  # one (E, out * in) matrix per fused expert tensor
    return ROOT(groups, **hyper)


# --------------------------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------------------------


def _key(config: str, lr: float, seed: int, budget: Budget) -> str:
    shape = {k: v for k, v in asdict(budget).items() if k not in ("lrs", "seeds")}  # what changes one run
    text = json.dumps({"config": config, "lr": lr, "seed": seed, "budget": shape, "v": 2}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def run(config: str, lr: float, seed: int, budget: Budget, data: torch.Tensor, cache: Path | None) -> dict[str, Any]:
    """Train one configuration; returns {"train": [(step, loss)], "eval": [(step, loss)], "seconds": ...}."""
    path = cache / f"{config}-{lr:g}-{seed}-{_key(config, lr, seed, budget)}.json" if cache else None
    if path is not None and path.exists():
        return json.loads(path.read_text())
    kind = "phi3" if config.startswith("phi3") else "moe"
    model = make_model(kind, budget, seed)
    optimizer = build_optimizer(config, model, lr)
    warmup = max(1, budget.steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, budget.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    train, held_out = split_corpus(data)
    g = torch.Generator().manual_seed(1234)  # the same batches for every configuration and seed
    eval_batch = windows(
        held_out, torch.linspace(0, len(held_out) - budget.seq - 2, budget.eval_windows).long(), budget.seq
    )

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=eval_batch[:, :-1], labels=eval_batch[:, :-1]).loss.item()
        model.train()
        return loss

    out: dict[str, Any] = {"config": config, "lr": lr, "seed": seed, "train": [], "eval": [(0, evaluate())]}
    start = time.perf_counter()
    for step in range(1, budget.steps + 1):
        batch = windows(train, torch.randint(0, len(train) - budget.seq - 2, (budget.batch,), generator=g), budget.seq)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        value = loss.item()
        out["train"].append((step, value if math.isfinite(value) else float("nan")))
        if not math.isfinite(value):
            break
        if step % budget.eval_every == 0 or step == budget.steps:
            out["eval"].append((step, evaluate()))
    out["seconds"] = time.perf_counter() - start
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
    return out


def final(result: dict[str, Any], budget: Budget) -> tuple[float, float]:
    """(final train loss: mean of the last 10% of steps, final eval loss)."""
    tail = [v for _, v in result["train"][-max(1, budget.steps // 10) :]]
    train = sum(tail) / len(tail) if len(result["train"]) == budget.steps else float("nan")
    return train, result["eval"][-1][1] if len(result["train"]) == budget.steps else float("nan")


# --------------------------------------------------------------------------------------------------------------------
# Study
# --------------------------------------------------------------------------------------------------------------------


def study(configs: tuple[str, ...], budget: Budget, cache: Path | None) -> dict[str, dict[str, Any]]:
    data = corpus_bytes()
    rows: dict[str, dict[str, Any]] = {}
    for config in configs:
        sweep = {}
        for lr in budget.lrs:
            result = run(RUN_AS.get(config, config), lr, budget.seeds[0], budget, data, cache)
            sweep[lr] = final(result, budget)
            train_loss, eval_loss = sweep[lr]
            seconds = result["seconds"]
            print(f"  {config:28s} lr {lr:<6g} train {train_loss:.4f} eval {eval_loss:.4f} ({seconds:.0f} s)")

        def score(lr: float, sweep: dict[float, tuple[float, float]] = sweep) -> float:
            return sweep[lr][1] if math.isfinite(sweep[lr][1]) else float("inf")

        for _ in range(2):  # extend the grid along LADDER while the best lr sits at its edge
            lrs = sorted(sweep)
            best = min(lrs, key=score)
            if len(lrs) < 2 or best not in (lrs[0], lrs[-1]) or best not in LADDER:
                break
            step = 1 if best == lrs[-1] else -1
            if not 0 <= LADDER.index(best) + step < len(LADDER):
                break
            lr = LADDER[LADDER.index(best) + step]
            result = run(RUN_AS.get(config, config), lr, budget.seeds[0], budget, data, cache)
            sweep[lr] = final(result, budget)
            print(f"  {config:28s} lr {lr:<6g} train {sweep[lr][0]:.4f} eval {sweep[lr][1]:.4f} (grid edge)")
        best = min(sweep, key=score)
        results = [run(RUN_AS.get(config, config), best, seed, budget, data, cache) for seed in budget.seeds]
        finals = [final(r, budget) for r in results]
        rows[config] = {
            "lr": best,
            "sweep": {str(lr): sweep[lr] for lr in sorted(sweep)},
            "train": sum(f[0] for f in finals) / len(finals),
            "eval": sum(f[1] for f in finals) / len(finals),
            "eval_seeds": [f[1] for f in finals],
            "curves": results[0],
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
        steps, losses = zip(*curves["train"], strict=True)
        smooth = [sum(losses[max(0, i - 9) : i + 1]) / len(losses[max(0, i - 9) : i + 1]) for i in range(len(losses))]
        label = f"{LABELS[config]} (lr {row['lr']:g})"
        axes[0].plot(steps, smooth, label=label)
        axes[1].plot(*zip(*curves["eval"], strict=True), marker="o", markersize=3, label=label)
    for ax, name in zip(axes, ("train loss (10-step mean), seed 0", "held-out loss, seed 0"), strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    low = min(min(v for _, v in r["curves"]["eval"]) for r in rows.values())
    axes[1].set_ylim(low - 0.05, low + 1.0)
    axes[0].set_ylim(low - 0.3, low + 1.5)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def header(budget: Budget) -> str:
    import transformers

    return (
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}\n"
        f"budget: {asdict(budget)}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", choices=("moe", "fused", "all"), default="moe")
    parser.add_argument("--quick", action="store_true", help="smoke run in seconds; nothing under docs/")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="folder of the plots (default: docs/img)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else Budget()
    if args.steps:
        budget = Budget(**{**asdict(budget), "steps": args.steps})
    if args.seeds:
        budget = Budget(**{**asdict(budget), "seeds": tuple(args.seeds)})
    cache = None if args.quick else RESULTS / "moe"
    img = args.out or (RESULTS / "moe-quick" if args.quick else ROOT_DIR / "docs" / "img")
    print(header(budget), flush=True)
    out: dict[str, Any] = {}
    if args.study in ("moe", "all"):
        rows = study(MOE_CONFIGS, budget, cache)
        print("\nMoE study (tiny OLMoE-style LM, bytes of the chatterbot corpus)\n" + table(rows, budget))
        plot(rows, img / "moe.png", "Tiny OLMoE-style byte LM: per-expert ROOT vs fused view vs AdamW")
        out["moe"] = rows
    if args.study in ("fused", "all"):
        rows = study(FUSED_CONFIGS, budget, cache)
        print("\nFused projections: split into logical blocks vs one matrix\n" + table(rows, budget))
        plot(rows, img / "moe_fused.png", "Fused projections: split vs whole")
        out["fused"] = rows
    return out


if __name__ == "__main__":
    main()
