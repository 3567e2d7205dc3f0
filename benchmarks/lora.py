"""LoRA fine-tuning of the real SmolLM2-135M-Instruct with AdamW, Muon-style updates and ROOT's LoRA policies.

Usage:
    python benchmarks/lora.py                  # the study: table, docs/img/lora.png (see "Cost" below)
    python benchmarks/lora.py --configs all    # also ROOT with the alternative LoRA update scale ("original")
    python benchmarks/lora.py --report-only    # table and plot from the cached runs
    python benchmarks/lora.py --quick          # smoke run: tiny budget, results and plot under results/lora-quick
    python benchmarks/lora.py --scaling        # update-scale rules for r x d factors on a small pretrained model
    python benchmarks/lora.py --first-step     # how far step 1 (B = 0) moves SmolLM2's q_proj outputs

Task: answer the held-out questions of the English chatterbot corpus (SPEC section 5: `recipes.assets`; every
held-out question is unseen in training). Prompts are ChatML without a system prompt, the loss is the cross-entropy on
the answer tokens only, and the score is the token-weighted eval loss on the held-out pairs after the last step.

Every configuration trains the same LoRA adapters (r = 8, alpha = 16, no dropout, all seven projections q, k, v, o,
gate, up, down) from the same initialization, on the same batches in the same order, with the same schedule (linear
warm-up over the first 10% of steps, then cosine decay to 0), weight decay 0 (PEFT's usual recipe) and AdamW betas
(0.9, 0.999) (`TrainingArguments`' defaults) wherever AdamW is used:

- `AdamW`: `torch.optim.AdamW` on every LoRA factor.
- `Muon-style`: ROOT with both of ROOT's features off (`clip_quantile=None, ns_coefficients="muon"`), i.e.
  `torch.optim.Muon`'s fixed Newton-Schulz polynomial and no clip, through the same code path and the same
  matched-RMS update scale as ROOT, so that only the clip and the coefficients differ. Both factors on the ROOT branch.
- `ROOT both`: `create_root_optimizer(model, lr=..., lora_policy="both")`, otherwise the package defaults.
- `ROOT b_only`: `lora_policy="b_only"` (the package default, chosen from this study): `lora_B`
  orthogonalized, `lora_A` on ROOT's AdamW branch.
- `ROOT both, original`: as `ROOT both` with `lora_adjust_lr_fn="original"` (Keller Jordan's
  `sqrt(max(1, m/n))`: `lora_B` (out x r) gets `sqrt(out/r)`, `lora_A` (r x in) gets 1): the alternative
  update scale for r x d factors, against the default matched-RMS `0.2 sqrt(max(m, n))`.

Each configuration gets a learning-rate sweep at seed 0 (a 3x grid, extended while the best lr sits at its edge), then
its best lr at every seed; the table reports the mean over seeds.

Affordable on 2 CPU cores: the adapters sit in the top `lora_layers` decoder layers only (PEFT's
`layers_to_transform`). The layers below are frozen and adapter-free, so their output for an example never changes:
it is computed once per example and cached on disk, and every training step runs only the top layers (forward and
backward) and the LM head on the answer positions. This is exactly the computation of an ordinary PEFT run with the
same `layers_to_transform` (the script checks the loss of the full model against the cached path before training).

The training loop, the run cache and the lr sweep are `benchmarks/harness.py`'s (`train_run`, `Study.tune`): runs are
cached as JSON under `benchmarks/results/lora/` (git-ignored), keyed by everything that changes their outcome, so an
interrupted study resumes where it stopped.

Cost on the project's 2-core CPU: about 0.17 s per training step when the machine is otherwise idle (several times
more while other jobs share it), so about 25 s per run of 120 steps including its evaluations; 7 runs per configuration
(4 learning rates, then 3 more seeds), about 15 minutes for the five configurations of `--configs all`. Caching the
frozen layers' outputs costs a full forward pass over the ~900 pairs once. `--steps 40` gives the short-budget
variant quoted in `docs/guides/peft.md` (its plot goes under `benchmarks/results/lora/`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    RESULTS,
    Plan,
    Study,
    Task,
    encode_chat_pair,
    library_versions,
    lr_factor,
    machine_dict,
    warmup_steps,
)
from root_hf import ROOT, create_root_optimizer
from root_hf.schedules import DEFAULT_SCHEDULE

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------------------------------
# Configuration (data)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """Everything that defines the task and the training budget."""

    steps: int = 120  # --steps; 120 x 8 = 960 examples, about 1.2 epochs of the 801 training pairs
    batch_size: int = 8
    max_len: int = 48  # tokens per example (prompt + answer); 88% of the pairs fit, longer ones are cut
    eval_size: int = 96  # held-out pairs (whole questions)
    eval_every: int = 20
    warmup_fraction: float = 0.1
    r: int = 8
    alpha: int = 16
    lora_layers: int = 4  # adapters in the top 4 of SmolLM2's 30 decoder layers
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    lr_grid: tuple[float, ...] = (1e-3, 3e-3)  # first points; extended on the 1-3-10 grid while the best is at an edge
    max_extra_lrs: int = 2
    max_train: int | None = None  # keep only the first N training pairs (None: all); --quick uses 8

    def key(self) -> dict[str, Any]:
        """What changes a run (the run cache's key): everything but the sweep plan, and ROOT's default schedule."""
        plan = ("seeds", "lr_grid", "max_extra_lrs")
        return {k: v for k, v in asdict(self).items() if k not in plan} | {"schedule": DEFAULT_SCHEDULE}


# --quick: a smoke run (the frozen layers' outputs of 8 + 4 pairs are computed once), not a result.
QUICK = Setting(
    steps=2,
    batch_size=2,
    eval_size=4,
    eval_every=2,
    lora_layers=1,
    seeds=(0,),
    lr_grid=(3e-3,),
    max_extra_lrs=0,
    max_train=8,
)

# name -> how to build the optimizer: "adamw", or keyword arguments of create_root_optimizer.
# Every setting that differs between configurations is spelled out, so that no run depends on a package default.
CONFIGS: dict[str, dict[str, Any]] = {
    "AdamW": {"kind": "adamw"},
    "Muon-style": {"kind": "root", "clip_quantile": None, "ns_coefficients": "muon", "lora_policy": "both"},
    "ROOT both": {"kind": "root", "lora_policy": "both"},
    "ROOT b_only": {"kind": "root", "lora_policy": "b_only"},
    "ROOT both, original": {"kind": "root", "lora_policy": "both", "lora_adjust_lr_fn": "original"},
}
DEFAULT_CONFIGS = ("AdamW", "Muon-style", "ROOT both", "ROOT b_only")


# --------------------------------------------------------------------------------------------------------------------
# Task: data, cached frozen layers, the adapter-carrying top layers
# --------------------------------------------------------------------------------------------------------------------


class LoraTask(Task):
    """SmolLM2-135M-Instruct + chatterbot; runs the top `lora_layers` layers on cached inputs."""

    def __init__(self, setting: Setting, cache: Path) -> None:
        from transformers import AutoTokenizer

        from recipes.assets import load_chatterbot_pairs, smollm2_path, train_eval_split

        self.setting = setting
        self.plan = Plan(setting.steps, setting.eval_every, warmup_steps(setting.warmup_fraction, setting.steps))
        self.path = smollm2_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        train, held = train_eval_split(load_chatterbot_pairs(), eval_size=setting.eval_size, seed=0)
        self.train = [self._encode(r) for r in train[: setting.max_train]]
        self.held = [self._encode(r) for r in held]
        base = self._base_model()
        self.num_layers = len(base.model.layers)
        self.first = self.num_layers - setting.lora_layers  # index of the first adapted layer
        self.hidden_train = self._cached_hidden(base, self.train, cache, "train")
        self.hidden_held = self._cached_hidden(base, self.held, cache, "held")
        self.check = self._reference_loss(base)
        self.base_eval = self.evaluate(self.build(seed=0))  # B = 0: every run starts from the base model's loss

    def _encode(self, row: dict[str, str]) -> tuple[list[int], list[int]]:
        return encode_chat_pair(self.tokenizer, row, self.setting.max_len)

    def _base_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
        model.requires_grad_(False)
        return model.eval()

    @torch.no_grad()
    def _cached_hidden(
        self, base: torch.nn.Module, examples: list[tuple[list[int], list[int]]], cache: Path, split: str
    ) -> list[torch.Tensor]:
        """Input of layer `first` for every example (its own length; causal attention and right padding make it
        independent of the batch), computed once and stored under `cache`; from the cached input of a lower layer
        when there is one (another `lora_layers`), else from the embeddings."""

        def file(layer: int) -> Path:
            digest = hashlib.sha256(json.dumps([examples, layer, str(self.path)]).encode()).hexdigest()[:16]
            return cache / f"hidden-{split}-{digest}.pt"

        if file(self.first).is_file():
            return torch.load(file(self.first), weights_only=True)
        start = time.perf_counter()
        lower = next((layer for layer in range(self.first - 1, 0, -1) if file(layer).is_file()), 0)
        if lower > 0:
            inputs = torch.load(file(lower), weights_only=True)
        else:
            inputs = [base.model.embed_tokens(torch.tensor(ids)) for ids, _ in examples]
        inner = base.model
        layers, norm = inner.layers, inner.norm
        inner.layers, inner.norm = torch.nn.ModuleList(list(layers)[lower : self.first]), torch.nn.Identity()
        try:
            order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # little padding per batch
            out: list[torch.Tensor] = [None] * len(examples)  # type: ignore[list-item]
            for k in range(0, len(order), 32):
                idx = order[k : k + 32]
                batch = self.collate(inputs, examples, idx)
                states = inner(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"])
                for row, i in enumerate(idx):
                    out[i] = states.last_hidden_state[row, : len(examples[i][0])].clone()
        finally:
            inner.layers, inner.norm = layers, norm
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(out, file(self.first))
        print(
            f"  cached layer-{self.first} inputs of {len(examples)} {split} examples from layer {lower} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        return out

    def _reference_loss(self, base: torch.nn.Module) -> tuple[float, float]:
        """(full model, cached path) loss on the first eval batch: the two must agree."""
        with torch.no_grad():
            items = list(range(min(8, len(self.held))))
            ids, mask = _pad([self.held[i][0] for i in items], self.tokenizer.pad_token_id or 0)
            targets = _targets([self.held[i][1] for i in items], ids.shape[1])
            hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
            keep = targets != -100
            full = float(F.cross_entropy(base.lm_head(hidden[keep]), targets[keep]))
            model = self.build(seed=0)
            cached = float(self.loss(model, self.collate(self.hidden_held, self.held, items)))
        return full, cached

    def build(self, seed: int) -> torch.nn.Module:
        """The PEFT model with fresh adapters (initialized from `seed`), cut to its top layers."""
        from peft import LoraConfig, get_peft_model

        s = self.setting
        base = self._base_model()
        torch.manual_seed(seed)
        config = LoraConfig(
            r=s.r,
            lora_alpha=s.alpha,
            lora_dropout=0.0,
            target_modules=list(TARGETS),
            layers_to_transform=list(range(self.first, self.num_layers)),
        )
        model = get_peft_model(base, config)
        inner = model.get_base_model().model
        inner.layers = torch.nn.ModuleList(list(inner.layers)[self.first :])  # the frozen part is cached
        return model.train()

    def collate(
        self, hidden: list[torch.Tensor], examples: list[tuple[list[int], list[int]]], items: list[int]
    ) -> dict[str, torch.Tensor]:
        width = max(hidden[i].shape[0] for i in items)
        states = torch.zeros(len(items), width, hidden[items[0]].shape[1])
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for row, i in enumerate(items):
            states[row, : hidden[i].shape[0]] = hidden[i]
            mask[row, : hidden[i].shape[0]] = 1
        return {
            "inputs_embeds": states,
            "attention_mask": mask,
            "labels": _targets([examples[i][1] for i in items], width),
        }

    @staticmethod
    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        lm = model.get_base_model()
        hidden = lm.model(
            inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        keep = batch["labels"] != -100  # logits only where there is a label: the 49k-way head is costly
        return F.cross_entropy(lm.lm_head(hidden[keep]), batch["labels"][keep])

    def train_order(self, seed: int) -> list[list[int]]:
        """The batches of one run: a seeded permutation of the training pairs (repeated if the run needs more)."""
        g = torch.Generator().manual_seed(10_000 + seed)
        need = self.setting.steps * self.setting.batch_size
        flat: list[int] = []
        while len(flat) < need:
            flat += torch.randperm(len(self.train), generator=g).tolist()
        b = self.setting.batch_size
        return [flat[i * b : (i + 1) * b] for i in range(self.setting.steps)]

    def batches(self, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        return (self.collate(self.hidden_train, self.train, items) for items in self.train_order(seed))

    def optimizers(self, model: torch.nn.Module, spec: dict[str, Any], lr: float) -> list[torch.optim.Optimizer]:
        if spec["kind"] == "adamw":
            params = [p for p in model.parameters() if p.requires_grad]
            return [torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)]
        kwargs = {k: v for k, v in spec.items() if k != "kind"}
        return [create_root_optimizer(model, lr=lr, weight_decay=0.0, betas=(0.9, 0.999), **kwargs)]

    def initial_eval(self, model: torch.nn.Module) -> float:
        return self.base_eval

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        """The held-out pairs in batches of 16 (the harness weighs their losses by their answer tokens)."""
        held = range(len(self.held))
        return [self.collate(self.hidden_held, self.held, list(held[k : k + 16])) for k in held[::16]]


def _pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def _targets(labels: list[list[int]], width: int) -> torch.Tensor:
    """Next-token targets: position t predicts token t + 1; -100 where there is nothing to predict."""
    out = torch.full((len(labels), width), -100, dtype=torch.long)
    for i, y in enumerate(labels):
        if len(y) > 1:
            out[i, : len(y) - 1] = torch.tensor(y[1:])
    return out


# --------------------------------------------------------------------------------------------------------------------
# The study: table, plot
# --------------------------------------------------------------------------------------------------------------------


def _paired(entry: dict[str, Any], other: dict[str, Any] | None) -> str:
    """Mean (min..max) over seeds of this configuration's final eval loss minus `other`'s at the same seed (same
    adapter initialization and batch order): the seed-to-seed spread of both largely cancels."""
    if other is None:
        return "-"
    theirs = {r["seed"]: r["final_eval"] for r in other["runs"]}
    diffs = [r["final_eval"] - theirs[r["seed"]] for r in entry["runs"] if r["seed"] in theirs]
    if not diffs or entry is other:
        return "-"
    return f"{sum(diffs) / len(diffs):+.4f} ({min(diffs):+.4f}..{max(diffs):+.4f})"


def table(summary: dict[str, Any], setting: Setting) -> str:
    lines = [
        "| optimizer | LoRA factors on ROOT | LoRA update scale | eval loss by lr (seed 0) | best lr | "
        f"eval loss, mean of {len(setting.seeds)} seeds (min-max) | paired vs AdamW | paired vs Muon-style | s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary.items():
        spec = CONFIGS[name]
        if spec["kind"] == "adamw":
            factors, scale = "none (AdamW)", "-"
        else:
            factors = {"both": "A and B", "b_only": "B only", "none": "none"}[spec.get("lora_policy", "both")]
            scale = spec.get("lora_adjust_lr_fn", "match_rms_adamw")
        sweep = ", ".join(f"{lr:g}: {r['final_eval']:.4f}" for lr, r in entry["sweep"].items())
        finals = [r["final_eval"] for r in entry["runs"]]
        mean = sum(finals) / len(finals)
        speed = sum(r["train_seconds"] / max(1, len(r["train_loss"])) for r in entry["runs"]) / len(entry["runs"])
        lines.append(
            f"| {name} | {factors} | {scale} | {sweep} | {entry['best_lr']:g} | "
            f"**{mean:.4f}** ({min(finals):.4f}-{max(finals):.4f}) | {_paired(entry, summary.get('AdamW'))} | "
            f"{_paired(entry, summary.get('Muon-style'))} | {speed:.2f} |"
        )
    return "\n".join(lines)


def paired_table(summary: dict[str, Any]) -> str:
    """Every configuration against every other, paired by seed: mean (min..max) of row minus column."""
    names = list(summary)
    lines = [
        "| row minus column, same seed | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for row in names:
        cells = [_paired(summary[row], summary[col]) for col in names]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], setting: Setting, out: Path, base_eval: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_eval, ax_train) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, entry in summary.items():
        runs = entry["runs"]
        steps = [e[0] for e in runs[0]["evals"]]
        mean_eval = [sum(r["evals"][k][2] for r in runs) / len(runs) for k in range(len(steps))]
        (line,) = ax_eval.plot(steps, mean_eval, marker="o", label=f"{name} (lr {entry['best_lr']:g})")
        width = min(len(r["train_loss"]) for r in runs)
        mean_train = [sum(r["train_loss"][k] for r in runs) / len(runs) for k in range(width)]
        ax_train.plot(range(1, width + 1), _ema(mean_train, 0.8), color=line.get_color(), label=name)
    if base_eval is not None:
        ax_eval.axhline(base_eval, color="gray", lw=0.8, ls=":", label="base model")
    ax_eval.set(xlabel="step", ylabel="held-out answer loss", title="Eval loss (mean over seeds, best lr)")
    ax_train.set(xlabel="step", ylabel="train loss (EMA 0.8)", title="Training loss (mean over seeds)")
    ax_eval.legend(fontsize=8)
    ax_eval.grid(alpha=0.3)
    ax_train.grid(alpha=0.3)
    fig.suptitle(
        f"LoRA r={setting.r} on SmolLM2-135M-Instruct (top {setting.lora_layers} layers, 7 projections), "
        f"chatterbot Q/A, {setting.steps} steps x {setting.batch_size}",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _ema(values: list[float], beta: float) -> list[float]:
    out, avg = [], values[0] if values else 0.0
    for v in values:
        avg = beta * avg + (1 - beta) * v
        out.append(avg)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Update-scale study (--scaling): which scale for r x d factors, over a wide lr grid, on a small pretrained model
# --------------------------------------------------------------------------------------------------------------------

# Scale s(m, n) of the orthogonalized update of an m x n LoRA factor (lora_A: r x in, lora_B: out x r).
SCALE_RULES: dict[str, Callable[[int, int], float]] = {
    "match_rms_adamw": lambda m, n: 0.2 * math.sqrt(max(m, n)),  # the default: entry RMS 0.2, as AdamW
    "original": lambda m, n: math.sqrt(max(1.0, m / n)),  # Keller Jordan's Muon: B sqrt(out / r), A 1
    "spectral": lambda m, n: math.sqrt(m / n),  # spectral-norm scaling (modular norm): B sqrt(out / r), A sqrt(r / in)
    "short_side": lambda m, n: 0.2 * math.sqrt(min(m, n)),  # matched RMS read on the short side: 0.2 sqrt(r)
}


@dataclass(frozen=True)
class ScalingSetting:
    hidden: int = 128
    layers: int = 2
    seq_len: int = 64
    pretrain_steps: int = 600
    steps: int = 100
    batch_size: int = 16
    r: int = 4
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


QUICK_SCALING = ScalingSetting(hidden=64, pretrain_steps=20, steps=5, batch_size=4, lrs=(1e-2, 1e-1))


class ScalingTask(Task):
    """A byte-level Llama (vocab 256) pretrained with AdamW on the English chatterbot pairs, then LoRA-adapted (all 7
    projections) to the French, Italian, Portuguese and Spanish pairs (held-out questions for eval): cheap enough for
    a wide lr grid. Spec `{"rule": None}` trains the factors with AdamW, `{"rule": name}` with ROOT under that
    update scale (`SCALE_RULES`); warm-up over 10% of the steps, cosine decay to 0, the held-out loss at the end."""

    def __init__(self, setting: ScalingSetting, cache: Path) -> None:
        from recipes.assets import load_chatterbot_pairs, train_eval_split

        self.setting = setting
        self.plan = Plan(setting.steps, setting.steps, warmup_steps(0.1, setting.steps))
        rows = load_chatterbot_pairs(["french", "italian", "portuguese", "spanish"])
        train, held = train_eval_split(rows, eval_size=0.15)
        self.train, self.held = _bytes(train), _bytes(held)
        self.eval_windows = self._windows(self.held, 8, torch.Generator().manual_seed(123))
        self.base_state = self._pretrained(cache)

    def _windows(self, data: torch.Tensor, n: int, g: torch.Generator) -> list[torch.Tensor]:
        s = self.setting
        starts = torch.randint(0, len(data) - s.seq_len - 1, (n, s.batch_size), generator=g)
        return [torch.stack([data[i : i + s.seq_len] for i in row.tolist()]) for row in starts]

    def _model(self) -> torch.nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        s = self.setting
        config = LlamaConfig(
            hidden_size=s.hidden,
            intermediate_size=64 * round(8 * s.hidden / 3 / 64),
            num_hidden_layers=s.layers,
            num_attention_heads=s.hidden // 32,
            num_key_value_heads=max(1, s.hidden // 64),
            vocab_size=256,
            max_position_embeddings=s.seq_len,
        )
        torch.manual_seed(0)
        return LlamaForCausalLM(config)

    def _pretrained(self, cache: Path) -> dict[str, torch.Tensor]:
        from recipes.assets import load_chatterbot_pairs

        s = self.setting
        path = cache / f"scaling-base-{hashlib.sha256(json.dumps(asdict(s)).encode()).hexdigest()[:16]}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        start = time.perf_counter()
        model = self._model()
        english = _bytes(load_chatterbot_pairs(["english"]))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
        schedule = lr_factor(Plan(s.pretrain_steps, s.pretrain_steps, warmup_steps(0.05, s.pretrain_steps)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        for x in self._windows(english, s.pretrain_steps, torch.Generator().manual_seed(0)):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        print(f"  pretrained the byte-level base model ({time.perf_counter() - start:.0f} s)", flush=True)
        return model.state_dict()

    def build(self, seed: int) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        model = self._model()
        model.load_state_dict(self.base_state)
        torch.manual_seed(seed)
        r = self.setting.r
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS)))

    def optimizers(self, model: torch.nn.Module, spec: dict[str, Any], lr: float) -> list[torch.optim.Optimizer]:
        factors = [p for p in model.parameters() if p.requires_grad]
        if spec["rule"] is None:
            return [torch.optim.AdamW(factors, lr=lr, weight_decay=0.0)]
        # no adjustment in the core, the rule's scale folded into each factor's own lr
        groups = [{"params": [p], "lr": lr * SCALE_RULES[spec["rule"]](*p.shape)} for p in factors]
        return [ROOT(groups, lr=lr, weight_decay=0.0, adjust_lr_fn=None)]

    def batches(self, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        return (
            {"input_ids": x}
            for x in self._windows(self.train, self.setting.steps, torch.Generator().manual_seed(1 + seed))
        )

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> float:
        return sum(float(model(input_ids=x, labels=x).loss) for x in self.eval_windows) / len(self.eval_windows)


def _bytes(rows: list[dict[str, str]]) -> torch.Tensor:
    text = "\n".join(f"Q: {r['question']}\nA: {r['answer']}" for r in rows)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def scaling_study(setting: ScalingSetting, results: Path, report_only: bool) -> None:
    key = {"scaling": asdict(setting), "schedule": DEFAULT_SCHEDULE}
    study = Study(results, key, lambda: ScalingTask(setting, results / "cache"), report_only=report_only)
    print(f"scaling setting: {json.dumps(asdict(setting))}")
    table_data: dict[str, dict[str, float]] = {}
    for rule in ("AdamW", *SCALE_RULES):
        for lr in setting.lrs:
            run = study.get(rule, {"rule": None if rule == "AdamW" else rule}, lr, seed=0)
            if run is not None:
                table_data.setdefault(rule, {})[f"{lr:g}"] = run["final_eval"]
    if not table_data:
        raise SystemExit(f"No cached scaling runs under {results}; run without --report-only first.")
    lrs = [f"{lr:g}" for lr in setting.lrs]
    print("\n| LoRA factor update scale | " + " | ".join(f"lr {lr}" for lr in lrs) + " | best lr |")
    print("|---|" + "---|" * (len(lrs) + 1))
    for rule, by_lr in table_data.items():
        best = min(by_lr, key=by_lr.get)
        cells = [f"**{by_lr[lr]:.4f}**" if lr == best else f"{by_lr.get(lr, float('nan')):.4f}" for lr in lrs]
        print(f"| {rule} | " + " | ".join(cells) + f" | {best} |")


# --------------------------------------------------------------------------------------------------------------------
# First step (--first-step): how far does step 1 (B = 0) move an adapted layer of the real model?
# --------------------------------------------------------------------------------------------------------------------


def first_step_study(lrs: tuple[float, ...] = (2e-4, 1e-3)) -> None:
    """Relative change of the q_proj outputs of SmolLM2-135M-Instruct (LoRA r = 8 on q and v) after one step from
    PEFT's initialization, with ROOT and with AdamW, on one batch of 8 chatterbot pairs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes.assets import load_chatterbot_pairs, smollm2_path

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [
        f"<|im_start|>user\n{r['question']}<|im_end|>\n<|im_start|>assistant\n{r['answer']}<|im_end|>"
        for r in load_chatterbot_pairs()[:8]
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    print("| lr | optimizer | relative change of q_proj outputs after step 1: layer 0 | mean over 30 layers | max |")
    print("|---|---|---|---|---|")
    for lr in lrs:
        for name in ("ROOT", "AdamW"):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            torch.manual_seed(0)
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
            q_layers = [layer.self_attn.q_proj for layer in model.get_base_model().model.layers]
            inputs: dict[int, torch.Tensor] = {}

            def keep_input(k: int, store: dict[int, torch.Tensor] = inputs) -> Callable[..., None]:
                return lambda module, args, output: store.__setitem__(k, args[0].detach())

            hooks = [q.register_forward_hook(keep_input(k)) for k, q in enumerate(q_layers)]
            model(**batch, labels=labels).loss.backward()
            for h in hooks:
                h.remove()
            with torch.no_grad():
                before = [q(inputs[k]) for k, q in enumerate(q_layers)]
            factors = [p for p in model.parameters() if p.requires_grad]
            if name == "ROOT":
                optimizer: torch.optim.Optimizer = create_root_optimizer(model, lr=lr, weight_decay=0.0)
            else:
                optimizer = torch.optim.AdamW(factors, lr=lr, weight_decay=0.0)
            optimizer.step()
            with torch.no_grad():
                change = [float((q(inputs[k]) - before[k]).norm() / before[k].norm()) for k, q in enumerate(q_layers)]
            print(f"| {lr:g} | {name} | {change[0]:.2e} | {sum(change) / len(change):.2e} | {max(change):.2e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run with a tiny budget")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per run (default: {Setting.steps})")
    parser.add_argument("--report-only", action="store_true", help="table and plot from cached runs only")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: docs/img/lora.png)")
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma-separated subset of {list(CONFIGS)}, or 'all' (default: {','.join(DEFAULT_CONFIGS)})",
    )
    parser.add_argument("--scaling", action="store_true", help="the update-scale study on a small model instead")
    parser.add_argument("--first-step", action="store_true", help="how far step 1 moves the adapted layers instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.first_step:
        print(json.dumps({"machine": machine_dict(), "versions": library_versions()}))
        first_step_study()
        return
    if args.scaling:
        print(json.dumps({"machine": machine_dict(), "versions": library_versions()}))
        results = RESULTS / ("lora-quick" if args.quick else "lora")
        scaling_study(QUICK_SCALING if args.quick else ScalingSetting(), results, args.report_only)
        return
    setting = QUICK if args.quick else Setting()
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit(f"Invalid --steps: {args.steps}. Must be a positive integer.")
        setting = replace(setting, steps=args.steps)
    results = RESULTS / ("lora-quick" if args.quick else "lora")
    if args.plot is not None:
        plot_path = args.plot
    elif args.quick or setting.steps != Setting.steps:
        plot_path = results / f"lora-{setting.steps}-steps.png"
    else:
        plot_path = REPO / "docs" / "img" / "lora.png"

    print("benchmarks/lora.py: LoRA fine-tuning of SmolLM2-135M-Instruct (chatterbot Q/A)")
    print(json.dumps({"machine": machine_dict(), "versions": library_versions()}))
    print(f"setting: {json.dumps(asdict(setting))}")
    print(f"ROOT schedule (package default): {DEFAULT_SCHEDULE}")
    task = None
    if not args.report_only:
        start = time.perf_counter()
        task = LoraTask(setting, results / "cache")
        full, cached = task.check
        print(f"check: full-model loss {full:.5f}, cached-path loss {cached:.5f}")
        if abs(full - cached) > 1e-3 * max(1.0, abs(full)):
            raise SystemExit("The cached path does not reproduce the full model: refusing to benchmark.")
        print(
            f"task: {len(task.train)} train / {len(task.held)} held-out pairs, adapters in layers "
            f"{task.first}-{task.num_layers - 1} ({time.perf_counter() - start:.0f} s to set up)"
        )
    configs = list(CONFIGS) if args.configs == "all" else args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"Invalid --configs: {unknown}. Must be names from {list(CONFIGS)}, or 'all'.")
    study = Study(results, setting.key(), lambda: task, report_only=args.report_only)
    start = time.perf_counter()
    summary = {}
    for name in configs:
        entry = study.tune(name, CONFIGS[name], setting.lr_grid, setting.seeds, setting.max_extra_lrs)
        if entry is not None:
            summary[name] = entry
    if not summary:
        raise SystemExit(f"No cached runs under {results}; run without --report-only first.")
    base_eval = next(iter(summary.values()))["runs"][0]["evals"][0][2]
    print(f"\nheld-out loss of the base model (before any step): {base_eval:.4f}")
    print(table(summary, setting))
    print("\nPaired differences of the final eval loss (negative: the row's optimizer is lower at the same seed):")
    print(paired_table(summary))
    plot(summary, setting, plot_path, base_eval)
    print(f"\nplot: {plot_path}   runs: {results}   ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
