"""Convergence and robustness study: does ROOT beat Muon and AdamW on this hardware?

Usage:
    python benchmarks/convergence.py                  # the full study, then docs/results.md and docs/img/*.png
    python benchmarks/convergence.py --quick          # smoke run (~1-2 min): tiny budgets, output under
                                                      # benchmarks/results/quick/ (docs/ untouched)
    python benchmarks/convergence.py --setting a      # one setting (a | b | all); --no-speed skips step_time
    python benchmarks/convergence.py --report-only    # re-render the page and plots from the cached runs

Same model, data order, steps, lr schedule and seeds for every optimizer:

- ``AdamW``: ``torch.optim.AdamW`` on every parameter (betas 0.9/0.95, eps 1e-8).
- ``Muon``: ROOT with both ROOT features off (``clip_quantile=None, ns_coefficients="muon"``): the same code path as
  ROOT, so only the clip and the coefficients differ. Non-matrix params go to ROOT's AdamW branch, as for ROOT.
- ``ROOT-paper``: clip at the 0.90 quantile + the paper's per-shape coefficient table (``"root-paper"``).
- ``ROOT``: the package defaults (clip 0.90 + the default schedule: ``"adaptive"`` once that schedule exists).

Settings: (a) a small Llama-style causal LM trained from scratch on the bytes of the chatterbot corpus (all 28
languages, held-out questions for eval); (b) LoRA fine-tuning of SmolLM2-135M-Instruct on the English chatterbot
question/answer pairs (answer tokens only). Each optimizer gets a small lr sweep at the first seed, then every seed at
its best lr; the robustness variant reruns the best lr with injected gradient outliers and label noise. Ablations
(setting a) vary one ROOT feature at a time at ROOT's best lr. Every run is cached as JSON under
``benchmarks/results/`` (keyed by everything that changes its outcome), so an interrupted study resumes where it
stopped, and two configurations that are the same computation on the model's shapes share one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import encode_chat_pair, library_versions, machine_dict
from root_hf import ROOT, get_schedule
from root_hf import schedules as coefficients

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
CACHE_VERSION = 1  # bump when a change to this file changes what a cached run means


# --------------------------------------------------------------------------------------------------------------------
# Optimizers and ablations (data)
# --------------------------------------------------------------------------------------------------------------------


def default_schedule() -> str:
    """The schedule "ROOT (our defaults)" uses: ``"adaptive"`` once it exists, else the package default."""
    return "adaptive" if "adaptive" in coefficients.SCHEDULE_NAMES else coefficients.DEFAULT_SCHEDULE


def optimizer_specs() -> dict[str, dict[str, Any]]:
    """Main comparison: name -> spec. ``kind`` is ``adamw``, ``root`` (ROOT kwargs follow) or ``torch_muon``."""
    ours = default_schedule()
    return {
        "AdamW": {"kind": "adamw"},
        "Muon": {"kind": "root", "clip_quantile": None, "ns_coefficients": "muon"},
        "ROOT-paper": {"kind": "root", "clip_quantile": 0.90, "ns_coefficients": "root-paper"},
        "ROOT": {"kind": "root", "clip_quantile": 0.90, "ns_coefficients": ours},
        # Not in the default list: torch.optim.Muon (bf16 NS) on the matrices + torch.optim.AdamW on the rest.
        "torch.optim.Muon": {"kind": "torch_muon"},
    }


MAIN_OPTIMIZERS = ("AdamW", "Muon", "ROOT-paper", "ROOT")


def ablation_specs() -> dict[str, dict[str, Any]]:
    """One ROOT feature changed at a time, from ROOT's defaults (run at ROOT's best lr, not re-tuned)."""
    ours = default_schedule()
    specs: dict[str, dict[str, Any]] = {
        "ROOT (defaults)": {"kind": "root", "clip_quantile": 0.90, "ns_coefficients": ours},
        "clip off": {"kind": "root", "clip_quantile": None, "ns_coefficients": ours},
        "Muon coefficients": {"kind": "root", "clip_quantile": 0.90, "ns_coefficients": "muon"},
        "paper coefficients": {"kind": "root", "clip_quantile": 0.90, "ns_coefficients": "root-paper"},
    }
    for name in ("adaptive", "polar-express"):
        if name in coefficients.SCHEDULE_NAMES:
            specs[f"{name} coefficients"] = {"kind": "root", "clip_quantile": 0.90, "ns_coefficients": name}
    for q in (0.80, 0.95, 0.99):
        specs[f"clip q={q:.2f}"] = {"kind": "root", "clip_quantile": q, "ns_coefficients": ours}
    return specs


# Which ablation rows are compared on which variant (clean = no injected noise).
ABLATION_GROUPS: dict[str, dict[str, Any]] = {
    "clip on/off": {
        "rows": ("ROOT (defaults)", "clip off"),
        "variants": ("clean", "noisy", "heavy-outliers"),
    },
    "Newton-Schulz coefficients": {
        "rows": (
            "ROOT (defaults)",
            "adaptive coefficients",
            "polar-express coefficients",
            "paper coefficients",
            "Muon coefficients",
        ),
        "variants": ("clean", "noisy"),
    },
    "clip quantile": {
        "rows": ("clip q=0.80", "ROOT (defaults)", "clip q=0.95", "clip q=0.99"),
        "variants": ("noisy", "heavy-outliers"),
    },
}


# --------------------------------------------------------------------------------------------------------------------
# Settings (data)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Noise:
    """Robustness variant: seeded, identical for every optimizer of a seed."""

    outlier_prob: float = 0.05  # fraction of steps with gradient outliers
    outlier_entries: int = 4  # entries per hidden matrix gradient multiplied on such a step
    outlier_scale: float = 1000.0  # the factor
    label_noise: float = 0.10  # fraction of target tokens replaced by uniformly random tokens


VARIANTS = ("clean", "noisy", "outliers", "heavy-outliers")
# Outliers large enough to dominate a momentum matrix's Frobenius norm for tens of steps (see docs/results.md).
HEAVY_OUTLIERS = {"outlier_scale": 1e5, "outlier_prob": 0.20}


@dataclass(frozen=True)
class Setting:
    name: str
    title: str
    steps: int
    batch_size: int
    seq_len: int
    eval_every: int
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    weight_decay: float
    model: dict[str, Any] = field(default_factory=dict)
    warmup_frac: float = 0.05
    final_lr_frac: float = 0.1
    eval_size: int = 64
    ablation_seeds: tuple[int, ...] = ()
    noise: Noise = Noise()
    variants: tuple[str, ...] = ("clean", "noisy")  # a subset of VARIANTS, "clean" first (see noise_for)


SETTINGS: dict[str, Setting] = {
    "a": Setting(
        name="a",
        title="(a) from-scratch causal LM: 4-layer Llama (0.72M params), bytes of the chatterbot corpus",
        steps=200,
        batch_size=16,
        seq_len=64,
        eval_every=20,
        lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
        seeds=(0, 1, 2),
        ablation_seeds=(0, 1),
        variants=VARIANTS,
        weight_decay=0.1,
        model={"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 1, "intermediate": 320, "vocab": 256},
    ),
    "b": Setting(
        name="b",
        title="(b) LoRA fine-tuning of SmolLM2-135M-Instruct on chatterbot question/answer pairs",
        steps=30,
        batch_size=4,
        seq_len=48,
        eval_every=10,
        lrs=(1e-3, 3e-3, 1e-2),
        seeds=(0, 1),
        weight_decay=0.0,
        eval_size=32,
        noise=Noise(outlier_prob=0.10),  # 30 steps: about 3 outlier steps per seed
        model={
            "r": 8,
            "alpha": 16,
            "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        },
    ),
}

QUICK: dict[str, dict[str, Any]] = {
    "a": {"steps": 8, "eval_every": 4, "lrs": (3e-3,), "seeds": (0, 1), "ablation_seeds": (0,), "eval_size": 8},
    "b": {"steps": 3, "eval_every": 3, "lrs": (4e-3,), "seeds": (0,), "eval_size": 4, "batch_size": 2},
}


# --------------------------------------------------------------------------------------------------------------------
# Tasks: model + data per setting
# --------------------------------------------------------------------------------------------------------------------


class Task:
    """A model factory, a deterministic batch stream, a clean eval set and the list of hidden matrices."""

    setting: Setting
    vocab: int

    def build(self, seed: int) -> torch.nn.Module:
        raise NotImplementedError

    def hidden_matrices(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        raise NotImplementedError

    def batch(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


def _masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class ScratchLM(Task):
    """(a): byte-level Llama from scratch on the chatterbot corpus (question and answer text, all languages)."""

    def __init__(self, setting: Setting) -> None:
        from root_hf.assets import chatterbot_languages, load_chatterbot_pairs, train_eval_split

        self.setting = setting
        self.vocab = setting.model["vocab"]
        rows = load_chatterbot_pairs(chatterbot_languages())
        train, held = train_eval_split(rows, eval_size=0.05, seed=0)

        def to_bytes(part: list[dict[str, str]]) -> torch.Tensor:
            text = "".join(f"{r['question']}\n{r['answer']}\n\n" for r in part)
            return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

        self.train_stream = to_bytes(train)
        held_stream = to_bytes(held)
        window = setting.seq_len + 1
        n_windows = held_stream.numel() // window
        picks = torch.linspace(0, n_windows - 1, min(setting.eval_size, n_windows)).round().long()
        self.eval_windows = held_stream[: n_windows * window].view(n_windows, window)[picks]
        self.n_rows = (len(train), len(held), len(rows))

    def build(self, seed: int) -> torch.nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        m = self.setting.model
        config = LlamaConfig(
            vocab_size=m["vocab"],
            hidden_size=m["hidden"],
            intermediate_size=m["intermediate"],
            num_hidden_layers=m["layers"],
            num_attention_heads=m["heads"],
            num_key_value_heads=m["kv_heads"],
            max_position_embeddings=self.setting.seq_len,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)

    def hidden_matrices(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n]

    def batch(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        s = self.setting
        starts = torch.randint(0, self.train_stream.numel() - s.seq_len - 1, (s.batch_size,), generator=generator)
        windows = torch.stack([self.train_stream[i : i + s.seq_len + 1] for i in starts.tolist()])
        return {"input_ids": windows[:, :-1], "labels": windows[:, 1:].clone()}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return _masked_ce(model(input_ids=batch["input_ids"]).logits, batch["labels"])

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        w = self.eval_windows
        return [{"input_ids": w[:, :-1], "labels": w[:, 1:]}]

    def describe(self) -> dict[str, Any]:
        model = self.build(0)
        return {
            "params": sum(p.numel() for p in model.parameters()),
            "hidden_matrix_params": sum(p.numel() for _, p in self.hidden_matrices(model)),
            "train_bytes": self.train_stream.numel(),
            "eval_tokens": self.eval_windows[:, 1:].numel(),
            "pairs_train_eval_total": self.n_rows,
        }


class LoraSFT(Task):
    """(b): LoRA on SmolLM2-135M-Instruct, ChatML without system prompt, loss on the answer tokens only."""

    def __init__(self, setting: Setting) -> None:
        from transformers import AutoTokenizer

        from root_hf.assets import load_chatterbot_pairs, smollm2_path, train_eval_split

        self.setting = setting
        self.path = smollm2_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.vocab = len(self.tokenizer)
        train, held = train_eval_split(load_chatterbot_pairs(), eval_size=setting.eval_size, seed=0)
        self.train = [self._encode(r) for r in train]
        self.held = [self._encode(r) for r in held]
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _encode(self, row: dict[str, str]) -> tuple[list[int], list[int]]:
        return encode_chat_pair(self.tokenizer, row, self.setting.seq_len)

    def _collate(self, items: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), width), self.pad, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, (x, y) in enumerate(items):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
            mask[i, : len(x)] = 1
        targets = torch.full_like(labels, -100)  # position t predicts token t + 1
        targets[:, :-1] = labels[:, 1:]
        return {"input_ids": ids, "attention_mask": mask, "labels": targets}

    def build(self, seed: int) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        m = self.setting.model
        base = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
        torch.manual_seed(seed)
        config = LoraConfig(r=m["r"], lora_alpha=m["alpha"], lora_dropout=0.0, target_modules=list(m["targets"]))
        return get_peft_model(base, config)

    def hidden_matrices(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        # name-based split: LoRA factors -> ROOT; any other trainable param -> the AdamW branch
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad and ("lora_A" in n or "lora_B" in n)]

    def batch(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(self.train), (self.setting.batch_size,), generator=generator)
        return self._collate([self.train[i] for i in idx.tolist()])

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # logits only where a label exists: the 49k-way LM head is a fifth of the model's FLOPs per position
        lm = model.get_base_model()
        hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        keep = batch["labels"] != -100
        return F.cross_entropy(lm.lm_head(hidden[keep]).float(), batch["labels"][keep])

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        size = 16
        return [self._collate(self.held[i : i + size]) for i in range(0, len(self.held), size)]

    def describe(self) -> dict[str, Any]:
        model = self.build(0)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return {
            "params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in trainable),
            "hidden_matrix_params": sum(p.numel() for _, p in self.hidden_matrices(model)),
            "train_pairs": len(self.train),
            "eval_pairs": len(self.held),
            "eval_tokens": sum(sum(1 for y in labels[1:] if y != -100) for _, labels in self.held),
        }


TASKS: dict[str, Callable[[Setting], Task]] = {"a": ScratchLM, "b": LoraSFT}


# --------------------------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------------------------


def param_groups(task: Task, model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    matrices = task.hidden_matrices(model)
    ids = {id(p) for _, p in matrices}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [p for _, p in matrices], rest


def build_optimizers(
    spec: dict[str, Any], matrices: list[torch.Tensor], rest: list[torch.Tensor], lr: float, weight_decay: float
) -> list[torch.optim.Optimizer]:
    adamw = {"lr": lr, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": weight_decay}
    if spec["kind"] == "adamw":
        return [torch.optim.AdamW(matrices + rest, foreach=True, **adamw)]
    if spec["kind"] == "torch_muon":
        opts: list[torch.optim.Optimizer] = [
            torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        ]
        return opts + ([torch.optim.AdamW(rest, foreach=True, **adamw)] if rest else [])
    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    groups = [{"params": matrices, "use_root": True}] + ([{"params": rest, "use_root": False}] if rest else [])
    return [ROOT(groups, lr=lr, weight_decay=weight_decay, **kwargs)]


def lr_factor(setting: Setting) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_frac`` of the steps, then cosine decay to ``final_lr_frac``."""
    warmup = max(1, round(setting.warmup_frac * setting.steps))
    decay = max(1, setting.steps - warmup)

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        t = min(1.0, (i - warmup) / decay)
        return setting.final_lr_frac + (1 - setting.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def _gen(*parts: int) -> torch.Generator:
    seed = int(hashlib.sha256(",".join(map(str, parts)).encode()).hexdigest()[:15], 16)
    return torch.Generator().manual_seed(seed)


def noise_for(setting: Setting, variant: str) -> Noise | None:
    """The noise of a variant: none (``clean``), outliers + label noise (``noisy``), outliers alone (``outliers``),
    larger and more frequent outliers alone (``heavy-outliers``)."""
    if variant == "clean":
        return None
    if variant == "noisy":
        return setting.noise
    if variant == "outliers":
        return dataclasses.replace(setting.noise, label_noise=0.0)
    if variant == "heavy-outliers":
        return dataclasses.replace(setting.noise, label_noise=0.0, **HEAVY_OUTLIERS)
    raise ValueError(f"Invalid variant: {variant!r}. Must be one of {VARIANTS}.")


def inject_label_noise(labels: torch.Tensor, fraction: float, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Replace ``fraction`` of the valid targets by uniformly random tokens (same draws for every optimizer)."""
    flip = (torch.rand(labels.shape, generator=generator) < fraction) & (labels != -100)
    random = torch.randint(0, vocab, labels.shape, generator=generator)
    return torch.where(flip, random, labels)


def inject_outliers(matrices: list[torch.Tensor], noise: Noise, generator: torch.Generator) -> None:
    """Multiply ``outlier_entries`` random entries of each matrix gradient by ``outlier_scale`` (in place)."""
    for p in matrices:
        if p.grad is None:
            continue
        flat = p.grad.view(-1)
        idx = torch.randint(0, flat.numel(), (noise.outlier_entries,), generator=generator)
        flat[idx] *= noise.outlier_scale


@torch.no_grad()
def evaluate(task: Task, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        n = int((b["labels"] != -100).sum())
        total += float(task.loss(model, b)) * n
        count += n
    model.train()
    return total / count


def train_run(
    task: Task, spec: dict[str, Any], lr: float, seed: int, noise: Noise | None, log: bool = False
) -> dict[str, Any]:
    """Train once (with ``noise`` injected, if given); return the loss curves, timings and the final clean eval
    loss."""
    s = task.setting
    model = task.build(seed)
    model.train()
    matrices, rest = param_groups(task, model)
    opts = build_optimizers(spec, matrices, rest, lr, s.weight_decay)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor(s)) for o in opts]
    data_gen = _gen(1, seed)
    outlier_steps = set()
    if noise is not None:
        draws = torch.rand(s.steps, generator=_gen(2, seed))
        outlier_steps = {i + 1 for i in range(s.steps) if draws[i] < noise.outlier_prob}
    eval_set = task.eval_batches()
    evals = [(0, 0.0, evaluate(task, model, eval_set))]
    train_loss, step_s, opt_s = [], [], []
    elapsed, diverged = 0.0, None
    for step in range(1, s.steps + 1):
        t0 = time.perf_counter()
        batch = task.batch(data_gen)
        if noise is not None and noise.label_noise > 0:
            batch["labels"] = inject_label_noise(batch["labels"], noise.label_noise, task.vocab, _gen(3, seed, step))
        loss = task.loss(model, batch)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            diverged = f"non-finite loss at step {step}"
            break
        loss.backward()
        if step in outlier_steps:
            inject_outliers(matrices, noise, _gen(4, seed, step))
        t1 = time.perf_counter()
        try:
            for o in opts:
                o.step()
        except FloatingPointError as e:
            diverged = f"step {step}: {e}"
            break
        for o in opts:
            o.zero_grad(set_to_none=True)
        for sc in scheds:
            sc.step()
        t2 = time.perf_counter()
        elapsed += t2 - t0
        train_loss.append(loss_value)
        step_s.append(t2 - t0)
        opt_s.append(t2 - t1)
        if step % s.eval_every == 0 or step == s.steps:
            ev = evaluate(task, model, eval_set)
            evals.append((step, elapsed, ev))
            if log:
                print(f"      step {step:4d}  train {train_loss[-1]:.4f}  eval {ev:.4f}  {elapsed:6.1f}s", flush=True)
            if not math.isfinite(ev):
                diverged = f"non-finite eval loss at step {step}"
                break
    final = evals[-1][2] if diverged is None else float("inf")
    return {
        "final_eval": final,
        "diverged": diverged,
        "evals": evals,
        "train_loss": train_loss,
        "step_s": step_s,
        "opt_s": opt_s,
        "outlier_steps": sorted(outlier_steps),
        "train_seconds": elapsed,
    }


# --------------------------------------------------------------------------------------------------------------------
# Run cache: a run is keyed by what it computes, so equal computations under two names share one file
# --------------------------------------------------------------------------------------------------------------------


def behavior(spec: dict[str, Any], shapes: list[tuple[int, int]]) -> dict[str, Any]:
    """What an optimizer spec computes on these matrix shapes (names resolved to per-shape schedules)."""
    if spec["kind"] != "root":
        return {"kind": spec["kind"]}
    out = {k: v for k, v in spec.items() if k != "ns_coefficients"}
    coef = spec.get("ns_coefficients", coefficients.DEFAULT_SCHEDULE)
    out["schedules"] = {f"{m}x{n}": get_schedule(coef, (m, n), 5) for m, n in sorted(set(shapes))}
    return out


def run_key(setting: Setting, variant: str, beh: dict[str, Any], lr: float, seed: int) -> str:
    described = dataclasses.asdict(setting) | {"seeds": None, "lrs": None, "ablation_seeds": None, "title": None}
    del described["variants"]  # which variants a study runs does not change any single run
    payload = {
        "v": CACHE_VERSION,
        "setting": described,
        "variant": variant,
        "behavior": beh,
        "lr": lr,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Study:
    """Runs (or loads) the runs of one setting and keeps them by (name, variant, lr, seed)."""

    def __init__(self, setting: Setting, results: Path, threads: int, verbose: bool) -> None:
        self.setting = setting
        self.dir = results / setting.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.threads = threads
        self.verbose = verbose
        self._task: Task | None = None
        self._shapes: list[tuple[int, int]] | None = None
        self.runs: dict[tuple[str, str, float, int], dict[str, Any]] = {}
        self.executed = 0
        self.task_description: dict[str, Any] = {}

    @property
    def task(self) -> Task:
        if self._task is None:
            self._task = TASKS[self.setting.name](self.setting)
        return self._task

    def shapes(self) -> list[tuple[int, int]]:
        if self._shapes is None:
            shape_file = self.dir / "shapes.json"
            if shape_file.exists():
                self._shapes = [tuple(s) for s in json.loads(shape_file.read_text())]
            else:
                model = self.task.build(0)
                self._shapes = [tuple(p.shape) for _, p in self.task.hidden_matrices(model)]
                shape_file.write_text(json.dumps(self._shapes))
        return self._shapes

    def path(self, spec: dict[str, Any], variant: str, lr: float, seed: int) -> Path:
        return self.dir / f"{run_key(self.setting, variant, behavior(spec, self.shapes()), lr, seed)}.json"

    def get(self, name: str, spec: dict[str, Any], variant: str, lr: float, seed: int) -> dict[str, Any]:
        path = self.path(spec, variant, lr, seed)
        if path.exists():
            run = json.loads(path.read_text())
        else:
            start = time.perf_counter()
            print(
                f"  [{self.setting.name}] {name:<22} {variant:<5} lr={lr:<7g} seed={seed}  ...",
                end="\n" if self.verbose else "",
                flush=True,
            )
            run = train_run(self.task, spec, lr, seed, noise_for(self.setting, variant), log=self.verbose)
            run.update(
                {
                    "name": name,
                    "spec": spec,
                    "behavior": behavior(spec, self.shapes()),
                    "variant": variant,
                    "lr": lr,
                    "seed": seed,
                    "threads": self.threads,
                    "load_average_1m": machine_dict()["load_average_1m"],
                    "date": time.strftime("%Y-%m-%d %H:%M"),
                }
            )
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(run, default=str))
            os.replace(tmp, path)
            self.executed += 1
            status = run["diverged"] or f"final eval {run['final_eval']:.4f}"
            print(f"  {status}  ({time.perf_counter() - start:.0f} s)", flush=True)
        self.runs[(name, variant, lr, seed)] = run
        return run

    def best_lr(self, name: str, spec: dict[str, Any]) -> float:
        s = self.setting
        finals = {lr: self.get(name, spec, "clean", lr, s.seeds[0])["final_eval"] for lr in s.lrs}
        return min(finals, key=lambda lr: (finals[lr], lr))

    def run_all(self, optimizers: tuple[str, ...], ablations: bool) -> dict[str, Any]:
        s = self.setting
        specs = optimizer_specs()
        best = {}
        for name in optimizers:  # 1. lr sweep at the first seed
            best[name] = self.best_lr(name, specs[name])
        for name in optimizers:  # 2. every seed at the best lr
            for seed in s.seeds[1:]:
                self.get(name, specs[name], "clean", best[name], seed)
        for variant in s.variants[1:]:  # 3. robustness variants at the same lr
            for name in optimizers:
                for seed in s.seeds:
                    self.get(name, specs[name], variant, best[name], seed)
        abl = ablation_specs()
        if ablations and s.ablation_seeds:  # 4. ablations at ROOT's best lr
            lr = best.get("ROOT") or self.best_lr("ROOT", specs["ROOT"])
            for group in ABLATION_GROUPS.values():
                for variant in group["variants"]:
                    for row in group["rows"]:
                        if row in abl:
                            for seed in s.ablation_seeds:
                                self.get(row, abl[row], variant, lr, seed)
        return best


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def quick_settings() -> dict[str, Setting]:
    return {k: dataclasses.replace(v, **QUICK[k]) for k, v in SETTINGS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=["a", "b", "all"], default="all", help="which setting(s) to run")
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny budgets (results/quick, no docs)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on the project's 2 shared cores, 2 threads ran 2-10x slower while "
        "other jobs were running, because each op waits for a descheduled thread)",
    )
    parser.add_argument(
        "--optimizers",
        default=",".join(MAIN_OPTIMIZERS),
        help=f"comma-separated subset of {','.join(optimizer_specs())} (default: {','.join(MAIN_OPTIMIZERS)})",
    )
    parser.add_argument("--no-ablations", action="store_true", help="skip the ablations of setting (a)")
    parser.add_argument("--no-speed", action="store_true", help="skip benchmarks/step_time.py (speed + memory)")
    parser.add_argument(
        "--rerun-speed", action="store_true", help="re-measure speed and memory even if results/step_time.json exists"
    )
    parser.add_argument("--report-only", action="store_true", help="only re-render the page from cached results")
    parser.add_argument("--results", type=Path, default=None, help="cache folder (default benchmarks/results[/quick])")
    parser.add_argument("--docs", type=Path, default=None, help="output docs folder (default docs/, quick: results)")
    parser.add_argument("--verbose", action="store_true", help="print the eval loss of every run as it trains")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    settings = quick_settings() if args.quick else SETTINGS
    results = args.results or (RESULTS / "quick" if args.quick else RESULTS)
    docs = args.docs or (results / "docs" if args.quick else REPO / "docs")
    names = tuple(n.strip() for n in args.optimizers.split(",") if n.strip())
    unknown = [n for n in names if n not in optimizer_specs()]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {list(optimizer_specs())}")
    chosen = ("a", "b") if args.setting == "all" else (args.setting,)

    from benchmarks import report

    print(f"machine: {machine_dict()}")
    print(f"versions: {library_versions()}")
    print(f"ROOT (our defaults) uses ns_coefficients={default_schedule()!r}; schedules: {coefficients.SCHEDULE_NAMES}")
    start = time.perf_counter()
    studies = {}
    for key in chosen:
        setting = settings[key]
        print(f"\n== setting {setting.title} ==")
        print(f"config: {dataclasses.asdict(setting)}")
        study = Study(setting, results, args.threads, args.verbose)
        if not args.report_only:
            best = study.run_all(names, ablations=not args.no_ablations)
            print(f"best lr: {best}  ({study.executed} runs executed, the rest loaded from {study.dir})")
        studies[key] = study
    speed_json = results / "step_time.json"
    run_speed = not (args.report_only or args.no_speed or args.quick) and (args.rerun_speed or not speed_json.exists())
    if run_speed:
        from benchmarks import step_time

        print("\n== speed and memory: benchmarks/step_time.py ==")
        step_time.collect(threads=args.threads, steps=7, save=speed_json)
    page = report.render(studies, names, docs, speed_json if speed_json.exists() else None, args)
    print(f"\nwrote {page} ({time.perf_counter() - start:.0f} s in all)")
    print(report.summary_text(studies, names))


if __name__ == "__main__":
    main()
