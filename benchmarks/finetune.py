"""Fine-tuning study: the real SmolLM2-135M-Instruct fine-tuned fully and with LoRA on three tasks, with AdamW,
Muon + AdamW, ROOT (defaults) and ROOT with the clip off.

Usage:
    python benchmarks/finetune.py                   # train what is missing (in plan order), then the report
    python benchmarks/finetune.py --report-only     # tables, plot and the "N of M runs cached" line from the cache
    python benchmarks/finetune.py --quick           # smoke run: tiny random model and budget, nothing cached
    python benchmarks/finetune.py --max-runs 10     # train at most 10 missing runs, then the report
    python benchmarks/finetune.py --jobs 2          # two worker processes (1 thread each) share the plan
    python benchmarks/finetune.py --step-time       # seconds per step of full FT / LoRA (float32, bf16 autocast)
    python benchmarks/finetune.py --update-rms      # AdamW's and ROOT's update size per unit lr (the drop-in basis)

Tasks (every prompt encoded by the recipe's chat encoder, `recipes.assets.encode_chat`, loss on the answer tokens):

- `chat`: the recipe's chatterbot question/answer pairs (English); held-out questions never trained on. Metrics:
  held-out answer loss, teacher-forced answer token accuracy and answer exact match (`recipes/metrics/token_accuracy`).
- `arith`: "What is a + b?" with two 3-digit numbers, generated from a fixed seed; the held-out pairs (and their
  swapped twins) never appear in training. Metric: exact match of the GREEDY-generated answer
  (`recipes/metrics/exact_match`).
- `langid`: name the language of a chatterbot question (15 languages of the `chatterbot-corpus` package, a dataset that
  ships in a package); held-out texts never trained on. Metric: accuracy of the greedy-generated label
  (`recipes/metrics/accuracy`).

Every run also measures forgetting: the model's loss on general text of its original distribution (the docstrings of
Python standard-library modules, plain text, no chat template) after the fine-tune, against the base model's.

Optimizers (every run: the same batches in the same order, the same schedule: linear warm-up over 5% of the steps,
then cosine decay to 0, as the `Trainer`'s `cosine`; weight decay 0, the `Trainer` default):

- `AdamW`: `torch.optim.AdamW` with the `Trainer` defaults (betas (0.9, 0.999), eps 1e-8).
- `Muon`: `torch.optim.Muon`'s update (its quintic coefficients, momentum 0.95 with Nesterov, no clip,
  `adjust_lr_fn="match_rms_adamw"`) computed in float32 by ROOT's code path (`clip_quantile=None,
  ns_coefficients="muon"`), on the matrices ROOT's routing sends to its ROOT branch (hidden matrices; for LoRA the
  factors `lora_policy` allows), the `Trainer`'s AdamW on the rest. Not `torch.optim.Muon` itself: its Newton-Schulz
  runs in bfloat16, which this CPU (AMD EPYC, no AVX512-BF16/AMX) emulates: 5.1 CPU seconds per 1536 x 576 matrix
  against 0.37 s for ROOT's float32 (1 thread, 2026-12-07), about 30 CPU hours per full fine-tuning run.
  `torch.optim.Muon` itself is the spec `{"kind": "torch_muon"}` (`build_optimizers`), for a GPU.
- `ROOT`: `create_root_optimizer(model, lr=...)` as `--optim root` builds it from `TrainingArguments` (betas
  (0.9, 0.999), eps 1e-8, weight decay 0), otherwise the package defaults (clip 0.90-quantile, `lora_policy`).
- `ROOT clip off`: as `ROOT` with `clip_quantile=None` (the clip isolated), at ROOT's best lr.
- `ROOT lora_policy=both` (LoRA only): as `ROOT` with both LoRA factors on the orthogonalized branch, against the
  default `lora_policy="b_only"` (`lora_B` only), at ROOT's best lr: the evidence for that default on real tasks.

The plan, in the order it trains (most decision-relevant first; `plan_runs`), one (task, mode) at a time, every task
with LoRA before any with full fine-tuning, the recipe's task (`chat`) first: 1. the shared lr grid at seed 0 with
the optimizers side by side at each lr, each sweep extended past an edge where its best lr sits; 2. the ablations at
ROOT's best lr (clip off; with LoRA also `lora_policy=both`) and the drop-in runs (ROOT at AdamW's best lr, which the
shared grid holds, and at TRL's default lr 2e-5); 3. seeds 1 and 2 of every best lr, ablation and drop-in run. Then,
over every (task, mode): 4. the noisy variant (20% of the training answers replaced by another item's answer) at the
clean best lrs, 3 seeds; 5. the too-high-lr probe (every optimizer at 10x its own best lr). So a study stopped early
leaves whole (task, mode) pairs settled rather than every pair at one seed.

Runs are cached one JSON file each under `benchmarks/results/finetune/` (committed), keyed by everything that changes
them (task data, budget, model, the harness's and this study's versions; ROOT's defaults for ROOT's and Muon's runs
only), so the study accumulates across sessions and `--report-only` reproduces every table and plot from the cache.
The training loop, the run cache and the lr sweep are `benchmarks/harness.py`'s (`train_run`, `Study`, `sweep_lr`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    CACHE_VERSION,
    RESULTS,
    Plan,
    Study,
    Task,
    best_lr,
    encode_chat_pair,
    library_versions,
    machine_dict,
    warmup_steps,
)
from root_hf import create_root_optimizer
from root_hf.integrations.routing import DEFAULT_LORA_POLICY
from root_hf.optim.hyperparams import DEFAULTS as ROOT_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
# Bump when a change here changes what a cached run means (the run key holds it).
FINETUNE_VERSION = 1
TASKS = ("chat", "arith", "langid")
MODES = ("full", "lora")
# The recipe's LoRA (recipes/configs/smollm2_lora_cpu.yaml: r 8, alpha 16, no dropout, all-linear = these 7 on Llama).
LORA = {"r": 8, "alpha": 16, "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
# TrainingArguments' defaults (transformers): what `--optim adamw_torch` / `--optim root` get from the Trainer.
TRAINER_ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
TRL_DEFAULT_LR = 2e-5  # trl.SFTConfig.learning_rate
# Languages of the langid task: the chatterbot-corpus languages with >= 85 distinct pairs, less traditionalchinese
# (the same sentences as chinese in another script).
LANGUAGES = (
    "bengali",
    "chinese",
    "dutch",
    "english",
    "french",
    "german",
    "indonesian",
    "italian",
    "japanese",
    "korean",
    "persian",
    "portuguese",
    "spanish",
    "turkish",
    "ukrainian",
)
# General text of the base model's original distribution (forgetting): these stdlib modules' docstrings.
FORGET_MODULES = (
    "argparse",
    "collections",
    "csv",
    "decimal",
    "difflib",
    "email",
    "fractions",
    "heapq",
    "json",
    "logging",
    "pickle",
    "random",
    "string",
    "textwrap",
    "threading",
    "unittest",
)


# --------------------------------------------------------------------------------------------------------------------
# Configuration (data)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """Everything that defines a run's data and budget (the run key holds all of it)."""

    steps: int = 200
    # 4 x 200 = 800 examples, about one pass over the chat task's training pairs; 8 would double every run's cost
    # (3.5 s per LoRA step at batch 4 on the development machine, 1 thread: 14 minutes a run).
    batch_size: int = 4
    max_len: int = 64  # tokens per example (system + question + answer); longer chats are cut
    eval_size: int = 64  # held-out items
    eval_every: int = 50
    warmup_fraction: float = 0.05
    train_items: int = 2000  # generated training items (arith) / cap per task
    forget_windows: int = 16  # windows of general text for the forgetting loss
    forget_len: int = 64
    gen_tokens: int = 6  # greedy tokens generated per held-out item (answers are shorter)


@dataclass(frozen=True)
class Design:
    """The sweep plan (not part of the run key)."""

    lrs: dict[str, tuple[float, ...]] = dataclasses.field(
        default_factory=lambda: {"full": (1e-5, 3e-5, 1e-4), "lora": (1e-4, 3e-4, 1e-3)}
    )  # three points each; a sweep whose best lr is at an edge grows past it (max_extra)
    max_extra: int = 2  # grid points the sweep may add past the edge where the best lr sits
    seeds: tuple[int, ...] = (0, 1, 2)
    wrong_labels: float = 0.2  # the noisy variant: share of training answers replaced by another item's answer
    probe_factor: float = 10.0  # the too-high-lr probe: each optimizer at this multiple of its best lr
    tasks: tuple[str, ...] = ("chat", "arith", "langid")  # in plan order: the recipe's task first
    # In plan order, outermost: every task's LoRA before any full fine-tuning (a full ROOT step costs 300x a LoRA one
    # on CPU: STEP_CPU_S).
    modes: tuple[str, ...] = ("lora", "full")


# --quick trains a tiny random model of SmolLM2's architecture and vocabulary (its config with these sizes) instead of
# the real 135M one: the smoke run walks every phase of the plan (14 runs) in seconds each instead of 16-24 s.
TINY_MODEL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
}
QUICK_BUDGET = Budget(
    steps=3, batch_size=2, max_len=48, eval_size=4, eval_every=3, train_items=16, forget_windows=2, forget_len=16
)
QUICK_DESIGN = Design(
    lrs={"full": (1e-5,), "lora": (1e-3,)}, max_extra=0, seeds=(0,), tasks=("arith",), modes=("lora",)
)

# CPU seconds (`time.process_time`, 1 thread) per training step at the default Budget (batch 4) on the 2-core AMD EPYC
# development machine, 2026-12-07, chat batches of 4 x 52-64 tokens: full forward + backward and optimizer steps
# measured directly (median of 3 / the second of 2 steps; load average 2, the study's two workers running); LoRA
# forward + backward from the study's first runs (median step 4.76-4.78 s with AdamW / Muon). LoRA optimizer steps:
# at batch 8, 2026-12-07 (they do not depend on the batch). Muon's runs take ROOT's code path, so it is given ROOT's
# figure. Only the CPU estimates printed with the report use them.
STEP_CPU_S = {
    "lora forward+backward": 4.7,
    "full forward+backward": 5.3,
    "lora optimizer step AdamW": 0.05,
    "lora optimizer step Muon": 0.13,
    "lora optimizer step ROOT": 0.13,
    "full optimizer step AdamW": 1.0,
    "full optimizer step Muon": 37.5,
    "full optimizer step ROOT": 37.5,
}

SWEPT = ("AdamW", "Muon", "ROOT")
GENERATED = ("arith", "langid")  # tasks scored on greedy-generated answers
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "AdamW": {"kind": "adamw"},
    "Muon": {"kind": "root", "clip_quantile": None, "ns_coefficients": "muon"},
    "ROOT": {"kind": "root"},
    "ROOT clip off": {"kind": "root", "clip_quantile": None},
    # LoRA only: both factors orthogonalized, against the package default `lora_policy="b_only"` (lora_A on AdamW)
    "ROOT lora_policy=both": {"kind": "root", "lora_policy": "both"},
}
ABLATIONS = {"ROOT clip off": ("full", "lora"), "ROOT lora_policy=both": ("lora",)}  # name -> modes; at ROOT's best lr


# --------------------------------------------------------------------------------------------------------------------
# Data: the three tasks' items (question, answer), split with held-out items disjoint from training
# --------------------------------------------------------------------------------------------------------------------


def chat_items(budget: Budget) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The recipe's chatterbot pairs (English), split by question (`train_eval_split`)."""
    from recipes.assets import load_chatterbot_pairs, train_eval_split

    train, held = train_eval_split(load_chatterbot_pairs(), eval_size=budget.eval_size, seed=0)
    train = train[: budget.train_items]
    return [_qa(r["question"], r["answer"]) for r in train], [_qa(r["question"], r["answer"]) for r in held]


def arith_items(budget: Budget) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """`budget.train_items` + `budget.eval_size` distinct 3-digit additions from a fixed seed; no held-out pair nor
    its swapped twin is a training pair."""
    rng = random.Random(24)
    pairs: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    while len(pairs) < budget.train_items + budget.eval_size:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        key = (min(a, b), max(a, b))
        if key not in seen:
            seen.add(key)
            pairs.append((a, b))
    rows = [_qa(f"What is {a} + {b}?", str(a + b)) for a, b in pairs]
    return rows[budget.eval_size :], rows[: budget.eval_size]


def langid_items(budget: Budget) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Chatterbot questions labelled with their language; the held-out side takes whole texts, balanced over the
    languages (`eval_size // len(LANGUAGES)` each, at least 1), so no held-out text is trained on."""
    from recipes.assets import load_chatterbot_pairs, train_eval_split

    per_language = max(1, budget.eval_size // len(LANGUAGES))
    train: list[dict[str, str]] = []
    held: list[dict[str, str]] = []
    for language in LANGUAGES:
        rows = [{"text": r["question"]} for r in load_chatterbot_pairs([language])]
        unique = list({r["text"]: r for r in rows}.values())
        tr, he = train_eval_split(unique, eval_size=per_language, seed=0, group_by="text")
        cap = max(1, budget.train_items // len(LANGUAGES))
        train += [_langid(r["text"], language) for r in tr[:cap]]
        held += [_langid(r["text"], language) for r in he]
    random.Random(24).shuffle(train)  # interleave the languages (the batches are drawn by seed anyway)
    return train, held


def _qa(question: str, answer: str) -> dict[str, str]:
    return {"question": question, "answer": answer}


def _langid(text: str, language: str) -> dict[str, str]:
    return _qa(f"Name the language of this text:\n{text}", language.capitalize())


ITEMS: dict[str, Callable[[Budget], tuple[list[dict[str, str]], list[dict[str, str]]]]] = {
    "chat": chat_items,
    "arith": arith_items,
    "langid": langid_items,
}


def with_wrong_labels(rows: list[dict[str, str]], share: float, seed: int = 24) -> list[dict[str, str]]:
    """`share` of the rows (a fixed seeded draw) get the answer of another row that differs from theirs."""
    if share <= 0:
        return rows
    rng = random.Random(seed)
    out = [dict(r) for r in rows]
    for i in rng.sample(range(len(rows)), round(share * len(rows))):
        while True:
            other = rows[rng.randrange(len(rows))]["answer"]
            if other != rows[i]["answer"]:
                out[i]["answer"] = other
                break
    return out


def forget_text() -> str:
    """General text of the base model's original distribution: the stdlib modules' docstrings, concatenated."""
    import importlib

    parts = [inspect.getdoc(importlib.import_module(name)) or "" for name in FORGET_MODULES]
    return "\n\n".join(p for p in parts if p)


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def task_key(task: str, mode: str, budget: Budget, wrong_labels: float) -> dict[str, Any]:
    """What changes a run besides optimizer, lr, seed: the data (hashed), budget, model, ROOT's defaults, versions."""
    from recipes.assets import smollm2_path

    train, held = ITEMS[task](budget)
    return {
        "study": "finetune",
        "version": FINETUNE_VERSION,
        "harness": CACHE_VERSION,
        "task": task,
        "mode": mode,
        "lora": LORA if mode == "lora" else None,
        "budget": asdict(budget),
        "wrong_labels": wrong_labels,
        "data": digest([with_wrong_labels(train, wrong_labels), held]),
        "forget": digest(forget_text()),
        "model": smollm2_path(progress=False).name,
        "trainer_adamw": TRAINER_ADAMW,
    }


# --------------------------------------------------------------------------------------------------------------------
# The task: the real model, batches, losses, generated answers, metrics
# --------------------------------------------------------------------------------------------------------------------


class FinetuneTask(Task):
    """SmolLM2-135M-Instruct, fully or LoRA fine-tuned on one task's items (see the module docstring)."""

    def __init__(
        self,
        task: str,
        mode: str,
        budget: Budget,
        wrong_labels: float = 0.0,
        bf16: bool = False,
        device: str = "cpu",
        tiny: bool = False,
    ) -> None:
        from transformers import AutoTokenizer

        from recipes.assets import smollm2_path

        if task not in TASKS or mode not in MODES:
            raise ValueError(f"Invalid task/mode: {task!r}/{mode!r}. Must be one of {TASKS} / {MODES}.")
        self.name, self.mode, self.budget, self.bf16, self.tiny = task, mode, budget, bf16, tiny
        self.device = torch.device(device)
        self.plan = Plan(budget.steps, budget.eval_every, warmup_steps(budget.warmup_fraction, budget.steps), 0.0)
        self.path = smollm2_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.vocab = len(self.tokenizer)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        train_rows, held_rows = ITEMS[task](budget)
        self.train_rows, self.held_rows = with_wrong_labels(train_rows, wrong_labels), held_rows
        if task in GENERATED:  # the answer must be whole: items longer than max_len are left out
            fits = [len(encode_chat_pair(self.tokenizer, r, None)[0]) <= budget.max_len for r in train_rows]
            self.train_rows = [r for r, ok in zip(self.train_rows, fits, strict=True) if ok]
            fits = [len(encode_chat_pair(self.tokenizer, r, None)[0]) <= budget.max_len for r in held_rows]
            self.held_rows = [r for r, ok in zip(held_rows, fits, strict=True) if ok]
        self.train = [encode_chat_pair(self.tokenizer, r, budget.max_len) for r in self.train_rows]
        self.held = [encode_chat_pair(self.tokenizer, r, budget.max_len) for r in self.held_rows]
        ids = self.tokenizer(forget_text())["input_ids"]
        n = budget.forget_windows
        stride = max(1, (len(ids) - budget.forget_len) // max(1, n - 1))
        self.forget = torch.tensor([ids[i * stride : i * stride + budget.forget_len] for i in range(n)]).to(device)
        self._before: dict[str, float] | None = None
        self._metrics: dict[str, Any] = {}

    # -- model and optimizers --

    def build(self, seed: int) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.tiny:  # the --quick smoke model (TINY_MODEL), the same weights at every seed
            config = AutoConfig.from_pretrained(self.path)
            config.update(TINY_MODEL)
            torch.manual_seed(1234)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
        torch.manual_seed(seed)
        if self.mode == "lora":
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=list(LORA["targets"])
            )
            model = get_peft_model(model, config)
        return model.to(self.device).train()

    def optimizers(self, model: torch.nn.Module, spec: dict[str, Any], lr: float) -> list[torch.optim.Optimizer]:
        return build_optimizers(model, spec, lr)

    def hidden_matrices(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        ids = {id(p) for p in routed_matrices(model)}
        return [(n, p) for n, p in model.named_parameters() if id(p) in ids]

    # -- data --

    def collate(self, items: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded ids, mask and next-token targets (-100 outside the answers)."""
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
        return {k: v.to(self.device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": targets}.items()}

    def batches(self, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Seeded permutations of the training items (epoch after epoch), `batch_size` per step."""
        g = torch.Generator().manual_seed(10_000 + seed)
        b = self.budget.batch_size
        order: list[int] = []
        while True:
            while len(order) < b:
                order += torch.randperm(len(self.train), generator=g).tolist()
            items, order = order[:b], order[b:]
            yield self.collate([self.train[i] for i in items])

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        size = 32
        return [self.collate(self.held[i : i + size]) for i in range(0, len(self.held), size)]

    # -- losses --

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits at the target positions, targets): the 49k-way head runs only where a target exists."""
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        with self._autocast():
            hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            keep = batch["labels"] != -100
            return lm.lm_head(hidden[keep]).float(), batch["labels"][keep]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, targets = self.logits(model, batch)
        return F.cross_entropy(logits, targets)

    @torch.no_grad()
    def forget_loss(self, model: torch.nn.Module) -> float:
        """Loss on the general-text windows (every next token), the model in eval mode."""
        was = model.training
        model.eval()
        ids = self.forget
        with self._autocast():
            logits = model(input_ids=ids).logits.float()
        model.train(was)
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))

    # -- metrics --

    @torch.no_grad()
    def teacher_forced(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out answer token accuracy and answer exact match (argmax at each answer position), via `evaluate`."""
        was = model.training
        model.eval()
        preds, refs = [], []
        for b in self.eval_batches():
            lm = model.get_base_model() if hasattr(model, "get_base_model") else model
            with self._autocast():
                hidden = lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
                argmax = lm.lm_head(hidden).argmax(-1)
            for row in range(b["labels"].shape[0]):
                keep = b["labels"][row] != -100
                preds.append(argmax[row][keep].tolist())
                refs.append(b["labels"][row][keep].tolist())
        model.train(was)
        return metric("token_accuracy").compute(predictions=preds, references=refs)

    def prompts(self) -> list[list[int]]:
        """Each held-out item's prompt: its ids up to the first answer token."""
        out = []
        for ids, labels in self.held:
            first = next(i for i, y in enumerate(labels) if y != -100)
            out.append(ids[:first])
        return out

    @torch.no_grad()
    def generate(self, model: torch.nn.Module) -> list[str]:
        """Greedy answers to the held-out prompts (deterministic: no sampling, left-padded batches of 32)."""
        was = model.training
        model.eval()
        answers: list[str] = []
        prompts = self.prompts()
        for k in range(0, len(prompts), 32):
            chunk = prompts[k : k + 32]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            with self._autocast():
                out = model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=self.budget.gen_tokens,
                    do_sample=False,
                    pad_token_id=self.pad,
                    eos_token_id=self.end,
                )
            for row in out[:, width:].cpu().tolist():
                row = row[: row.index(self.end)] if self.end in row else row
                answers.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        model.train(was)
        return answers

    def task_metrics(self, model: torch.nn.Module) -> dict[str, Any]:
        """The task's held-out metrics (see the module docstring), all in [0, 1]."""
        out: dict[str, Any] = dict(self.teacher_forced(model))
        if self.name in GENERATED:
            answers = self.generate(model)
            refs = [r["answer"] for r in self.held_rows]
            if self.name == "arith":
                out.update(metric("exact_match").compute(predictions=answers, references=refs))
            else:
                labels = [lang.capitalize() for lang in LANGUAGES]
                out.update(metric("accuracy").compute(predictions=answers, references=refs, labels=labels))
            out["samples"] = [[a, r] for a, r in list(zip(answers, refs, strict=True))[:4]]
        return out

    def before(self) -> dict[str, Any]:
        """The base model's metrics and forgetting loss (computed once per task)."""
        if self._before is None:
            model = self.build(0)
            self._before = {**self.task_metrics(model), "forget_loss": self.forget_loss(model)}
        return self._before

    def final_metrics(self, model: torch.nn.Module) -> dict[str, Any]:
        """After the last step: the task metrics, the forgetting loss, and the base model's values (`before`)."""
        return {**self.task_metrics(model), "forget_loss": self.forget_loss(model), "before": self.before()}


_METRICS: dict[str, Any] = {}


def metric(name: str) -> Any:
    """The local `evaluate` module `recipes/metrics/<name>.py` (loaded once, offline)."""
    if name not in _METRICS:
        from recipes import metrics

        _METRICS[name] = metrics.load(name)
    return _METRICS[name]


def routed_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters `create_root_optimizer` sends to its ROOT branch (the recipe's routing and `lora_policy`)."""
    probe = create_root_optimizer(model, lr=1e-3)
    return [p for g in probe.param_groups if g.get("use_root") for p in g["params"]]


def build_optimizers(model: torch.nn.Module, spec: dict[str, Any], lr: float) -> list[torch.optim.Optimizer]:
    """The optimizers of a spec (`OPTIMIZERS`) for `model` at `lr` (see the module docstring)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if spec["kind"] == "adamw":
        return [torch.optim.AdamW(trainable, lr=lr, foreach=True, **TRAINER_ADAMW)]
    if spec["kind"] == "torch_muon":
        matrices = routed_matrices(model)
        ids = {id(p) for p in matrices}
        rest = [p for p in trainable if id(p) not in ids]
        opts: list[torch.optim.Optimizer] = [
            torch.optim.Muon(matrices, lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
        ]
        return opts + ([torch.optim.AdamW(rest, lr=lr, foreach=True, **TRAINER_ADAMW)] if rest else [])
    if spec["kind"] == "root":
        kwargs = {k: v for k, v in spec.items() if k != "kind"}
        adamw = {"betas": TRAINER_ADAMW["betas"], "adamw_eps": TRAINER_ADAMW["eps"]}
        return [create_root_optimizer(model, lr=lr, weight_decay=TRAINER_ADAMW["weight_decay"], **adamw, **kwargs)]
    raise ValueError(f"Invalid optimizer kind: {spec['kind']!r}. Must be one of 'adamw', 'torch_muon', 'root'.")


# --------------------------------------------------------------------------------------------------------------------
# The plan: which runs, in which order
# --------------------------------------------------------------------------------------------------------------------


class FinetuneStudy(Study):
    """The runs of one (task, mode, wrong-label share) under `benchmarks/results/finetune/`."""

    def __init__(
        self,
        results: Path,
        task: str,
        mode: str,
        budget: Budget,
        wrong_labels: float = 0.0,
        report_only: bool = False,
        write: bool = True,
        bf16: bool = False,
        device: str = "cpu",
        tiny: bool = False,
    ) -> None:
        key = task_key(task, mode, budget, wrong_labels)
        if tiny:
            key["model"] = {"tiny": TINY_MODEL}
        if bf16:
            key["bf16"] = True
        if device != "cpu":  # ROOT's Newton-Schulz dtype and the kernels differ: a run set of its own
            key["device"] = torch.device(device).type
        variant = "noisy" if wrong_labels else "clean"
        super().__init__(
            results if write else None,
            key,
            lambda: FinetuneTask(task, mode, budget, wrong_labels, bf16, device, tiny),
            report_only=report_only,
            label=f"[{task} {mode} {variant}] ",
        )
        self.task_name, self.mode, self.variant, self.tiny = task, mode, variant, tiny
        self.missing: dict[str, None] = {}  # ordered set: what the plan still needs

    def spec_key(self, spec: dict[str, Any]) -> Any:
        """A ROOT spec with ROOT's defaults (a changed default retrains ROOT and Muon runs, never AdamW's)."""
        if spec["kind"] != "root":
            return spec
        key = {**spec, "root_defaults": ROOT_DEFAULTS}
        # The default `lora_policy` entered the key after the first cached LoRA runs, all trained under "b_only": it
        # is named only once it differs, so those runs keep their keys and a changed default still retrains them.
        if self.mode == "lora" and "lora_policy" not in spec and DEFAULT_LORA_POLICY != "b_only":
            key["lora_policy"] = DEFAULT_LORA_POLICY
        return key

    def get(self, name: str, spec: dict[str, Any], lr: float, seed: int, variant: str = "clean") -> dict | None:
        run = super().get(name, spec, lr, seed, variant)
        if run is None:
            self.missing[f"{self.label}{name} lr={lr:g} seed={seed}"] = None
        return run

    def sweep(self, name: str, lrs: tuple[float, ...], max_extra: int) -> dict[float, dict[str, Any]]:
        """lr -> run at seed 0 (the harness's `sweep_lr` through `Study.tune`, one seed)."""
        entry = self.tune(name, OPTIMIZERS[name], lrs, (0,), max_extra)
        return entry["sweep"] if entry else {}

    def pending(self, what: str) -> None:
        """A run of the design whose lr is not known yet (its sweep is not done)."""
        self.missing[f"{self.label}{what}"] = None


class Budgeted(Exception):
    """Raised when `--max-runs` runs have been trained."""


def ablations(mode: str) -> tuple[str, ...]:
    """The ablations of ROOT (`ABLATIONS`) that run in `mode`, at ROOT's best lr."""
    return tuple(name for name, modes in ABLATIONS.items() if mode in modes)


def plan_runs(
    studies: dict[tuple[str, str, str], FinetuneStudy], design: Design, max_runs: int | None = None
) -> dict[str, Any]:
    """Walk the plan in order (module docstring), training what is missing (or, report-only, listing it).

    Returns `{(task, mode): {"best": {name: lr}, "sweeps": {name: {lr: run}}}}` for what is cached."""
    trained = [0]

    def check() -> None:
        if max_runs is not None and sum(s.executed for s in studies.values()) >= max_runs:
            raise Budgeted

    out: dict[str, Any] = {}

    def sweeps(task: str, mode: str) -> None:
        s = studies[(task, mode, "clean")]
        entry = out.setdefault((task, mode), {"best": {}, "sweeps": {}})
        for lr in design.lrs[mode]:  # the shared grid first, optimizers side by side at each lr
            for name in SWEPT:
                check()
                s.get(name, OPTIMIZERS[name], lr, 0)
        for name in SWEPT:  # then each sweep, extended past an edge where its best lr sits
            check()
            sweep = s.sweep(name, design.lrs[mode], design.max_extra)
            entry["sweeps"][name] = sweep
            if sweep and len(sweep) >= len(design.lrs[mode]):
                entry["best"][name] = best_lr(sweep)
            else:
                entry["best"].pop(name, None)
        best = entry["best"]
        for name in ablations(mode):
            if "ROOT" in best:
                check()
                s.get(name, OPTIMIZERS[name], best["ROOT"], 0)
            else:
                s.pending(f"{name} at ROOT's best lr, seed 0")
        check()
        s.get("ROOT", OPTIMIZERS["ROOT"], TRL_DEFAULT_LR, 0)  # drop-in at TRL's default lr
        if "AdamW" in best:
            check()
            s.get("ROOT", OPTIMIZERS["ROOT"], best["AdamW"], 0)  # drop-in at AdamW's best lr (on the shared grid)
        else:
            s.pending("ROOT at AdamW's best lr, seed 0")

    def seeds(task: str, mode: str) -> None:
        s = studies[(task, mode, "clean")]
        best = out[(task, mode)]["best"]
        for name in (*SWEPT, *ablations(mode)):
            lr = best.get("ROOT" if name in ABLATIONS else name)
            for seed in design.seeds[1:]:
                if lr is None:
                    s.pending(f"{name} at its best lr, seed {seed}")
                    continue
                check()
                s.get(name, OPTIMIZERS[name], lr, seed)
        for seed in design.seeds[1:]:
            check()
            s.get("ROOT", OPTIMIZERS["ROOT"], TRL_DEFAULT_LR, seed)
            if "AdamW" in best:
                check()
                s.get("ROOT", OPTIMIZERS["ROOT"], best["AdamW"], seed)
            else:
                s.pending(f"ROOT at AdamW's best lr, seed {seed}")

    def noisy(task: str, mode: str) -> None:
        s = studies[(task, mode, "noisy")]
        best = out[(task, mode)]["best"]
        for seed in design.seeds:
            for name in (*SWEPT, "ROOT clip off"):
                lr = best.get("ROOT" if name == "ROOT clip off" else name)
                if lr is None:
                    s.pending(f"{name} at the clean best lr, seed {seed}")
                    continue
                check()
                s.get(name, OPTIMIZERS[name], lr, seed)

    def probe(task: str, mode: str) -> None:
        s = studies[(task, mode, "clean")]
        best = out[(task, mode)]["best"]
        for name in (*SWEPT, "ROOT clip off"):
            lr = best.get("ROOT" if name == "ROOT clip off" else name)
            if lr is None:
                s.pending(f"{name} at {design.probe_factor:g}x its best lr, seed 0")
                continue
            check()
            s.get(name, OPTIMIZERS[name], float(f"{lr * design.probe_factor:.3g}"), 0)

    try:
        for mode in design.modes:  # 1-3. one (task, mode) at a time: sweeps, drop-in, seeds
            for task in design.tasks:
                sweeps(task, mode)
                seeds(task, mode)
        for phase in (noisy, probe):  # 4-5.
            for mode in design.modes:
                for task in design.tasks:
                    phase(task, mode)
    except Budgeted:
        print(f"--max-runs reached after {sum(s.executed for s in studies.values())} trained runs", flush=True)
        trained[0] = -1
    out["stopped"] = trained[0] < 0
    return out


# --------------------------------------------------------------------------------------------------------------------
# Report: tables and plot from the cache
# --------------------------------------------------------------------------------------------------------------------

PRIMARY = {"chat": "token_accuracy", "arith": "exact_match", "langid": "accuracy"}
PRIMARY_LABEL = {
    "chat": "answer token acc.",
    "arith": "exact match (greedy)",
    "langid": "accuracy (greedy)",
}


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if any(not math.isfinite(v) for v in values):
        return f"diverged ({sum(not math.isfinite(v) for v in values)}/{len(values)})"
    if len(values) == 1:
        return f"{values[0]:.3f} (n=1)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} (n={len(values)})"


def _metric(run: dict[str, Any], key: str) -> float | None:
    if run.get("diverged"):
        return float("nan")
    return (run.get("metrics") or {}).get(key)


def _runs(study: FinetuneStudy, name: str, lr: float, seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    runs = [study.runs.get((name, "clean", lr, seed)) for seed in seeds]
    return [r for r in runs if r is not None]


def _row(runs: list[dict[str, Any]], task: str) -> list[str]:
    losses = [r["final_eval"] if not r.get("diverged") else float("inf") for r in runs]
    prim = [_metric(r, PRIMARY[task]) for r in runs]
    forget = [
        _metric(r, "forget_loss") - r["metrics"]["before"]["forget_loss"]
        for r in runs
        if not r.get("diverged") and r.get("metrics")
    ]
    step = [statistics.median(r["step_s"]) for r in runs if r.get("step_s")]
    return [
        _mean_sd(losses),
        _mean_sd([p for p in prim if p is not None]),
        _mean_sd(forget),
        f"{statistics.median(step):.2f}" if step else "-",
    ]


def run_cpu_s(mode: str, name: str, budget: Budget) -> float:
    """Estimated CPU seconds of one run (`STEP_CPU_S`): the steps, the evaluations (a forward is about a third of
    forward + backward) and the final metrics (about three more evaluation passes)."""
    fb = STEP_CPU_S[f"{mode} forward+backward"]
    opt = STEP_CPU_S[f"{mode} optimizer step {name}"]
    passes = budget.steps // budget.eval_every + 1 + 3
    return budget.steps * (fb + opt) + passes * (budget.eval_size / budget.batch_size) * fb / 3


def estimate_hours(missing: list[str], budget: Budget) -> float:
    """CPU hours (one thread) of the missing runs, from their labels `[task mode variant] name ...`."""
    total = 0.0
    for m in missing:
        mode = "full" if " full " in m.split("]")[0] + " " else "lora"
        name = m.split("] ", 1)[1]
        opt = "ROOT" if name.startswith("ROOT") else "Muon" if name.startswith("Muon") else "AdamW"
        total += run_cpu_s(mode, opt, budget)
    return total / 3600


def estimate_all(studies: dict[tuple[str, str, str], FinetuneStudy], budget: Budget) -> str:
    """CPU time of the whole design: the cached runs (their measured seconds) plus the missing ones' estimate."""
    done = sum(r.get("train_seconds", 0.0) for s in studies.values() for r in s.runs.values()) / 3600
    missing = [m for s in studies.values() for m in s.missing]
    return f"{done + estimate_hours(missing, budget):.0f} CPU hours at 1 thread"


def settled_pair(
    studies: dict[tuple[str, str, str], FinetuneStudy], plan: dict[str, Any], design: Design, task: str, mode: str
) -> bool:
    """Every swept optimizer has a best lr strictly inside its sweep and a cached run at every seed there."""
    entry = plan.get((task, mode))
    if not entry:
        return False
    s = studies[(task, mode, "clean")]
    for name in SWEPT:
        sweep, best = entry["sweeps"].get(name) or {}, entry["best"].get(name)
        if best is None or best in (min(sweep), max(sweep)):
            return False
        if len(_runs(s, name, best, design.seeds)) < len(design.seeds):
            return False
    return True


# Below this gap between two optimizers' mean held-out losses a single seed decides nothing: the seed spread (sd over
# 2 seeds) of the earlier 30-step LoRA study on the same model and data was 0.038 (AdamW) and 0.060 (ROOT)
# (docs/results.md, setting (b)). With 2+ seeds per side the measured spreads are used instead.
SEED_SPREAD_N1 = 0.04


def compare(a_runs: list[dict[str, Any]], b_runs: list[dict[str, Any]], names: tuple[str, str]) -> str:
    """ "A ahead by x / B ahead by x / a tie" from the held-out losses of two run sets, against the seed spread."""
    a = [r["final_eval"] for r in a_runs if not r.get("diverged")]
    b = [r["final_eval"] for r in b_runs if not r.get("diverged")]
    if not a or not b:
        return f"{names[0] if not a else names[1]} diverged"
    gap = statistics.mean(a) - statistics.mean(b)
    if len(a) > 1 and len(b) > 1:
        spread, basis = max(statistics.stdev(a), statistics.stdev(b)), f"the larger seed sd, {len(a)}/{len(b)} seeds"
    else:
        spread, basis = SEED_SPREAD_N1, "one seed: the seed spread of an earlier LoRA study"
    if abs(gap) <= spread:
        return f"a tie ({names[0]} - {names[1]} = {gap:+.3f}, within {spread:.3f}, {basis})"
    return f"{names[0] if gap < 0 else names[1]} ahead by {abs(gap):.3f} (more than {spread:.3f}, {basis})"


def verdict(root: list[dict[str, Any]], adamw: list[dict[str, Any]]) -> str:
    """ "ROOT ahead / AdamW ahead / a tie" from the two optimizers' runs at their best lrs, against the seed spread."""
    text = compare(root, adamw, ("ROOT", "AdamW"))
    return "Verdict: one side diverged at its best lr." if text.endswith("diverged") else f"Verdict: {text}."


def lower_at(a_runs: list[dict[str, Any]], b_runs: list[dict[str, Any]]) -> tuple[int, int]:
    """(seeds where A's held-out loss is below B's, seeds both have): the paired comparison (a seed fixes the data
    order and the LoRA initialization for every optimizer)."""
    b = {r["seed"]: r["final_eval"] for r in b_runs}
    pairs = [(r["final_eval"], b[r["seed"]]) for r in a_runs if r["seed"] in b]
    return sum(x < y for x, y in pairs), len(pairs)


def _forgetting(runs: list[dict[str, Any]]) -> float | None:
    values = [
        r["metrics"]["forget_loss"] - r["metrics"]["before"]["forget_loss"]
        for r in runs
        if not r.get("diverged") and r.get("metrics")
    ]
    return statistics.mean(values) if values else None


def recommendation(
    studies: dict[tuple[str, str, str], FinetuneStudy], plan: dict[str, Any], design: Design
) -> list[str]:
    """What a user can act on, per settled (task, mode) pair (`settled_pair`) only: ROOT against AdamW and Muon, the lr
    to use (and what TRL's default lr costs), the clip and `lora_policy` ablations, forgetting, and the extra cost of
    ROOT's optimizer step; then the pairs not settled yet."""
    out, open_pairs = [], []
    for mode in design.modes:
        for task in design.tasks:
            if not settled_pair(studies, plan, design, task, mode):
                open_pairs.append(f"{task} {mode}")
                continue
            s, best = studies[(task, mode, "clean")], plan[(task, mode)]["best"]

            def at(name: str, lr: float, s: FinetuneStudy = s) -> list[dict[str, Any]]:
                return _runs(s, name, lr, design.seeds)

            root, adamw = at("ROOT", best["ROOT"]), at("AdamW", best["AdamW"])
            wins, n = lower_at(root, adamw)
            parts = [
                f"ROOT against AdamW: {compare(root, adamw, ('ROOT', 'AdamW'))}; ROOT lower at {wins} of {n} seeds",
                f"ROOT against Muon: {compare(root, at('Muon', best['Muon']), ('ROOT', 'Muon'))}",
                f"{PRIMARY_LABEL[task]}: "
                + ", ".join(f"{name} {_row(at(name, best[name]), task)[1]}" for name in ("ROOT", "AdamW", "Muon")),
            ]
            if best["ROOT"] == best["AdamW"]:
                parts.append(f"lr: AdamW's best, {best['AdamW']:g}, is ROOT's best too: switch only `--optim`")
            else:
                drop = _row(at("ROOT", best["AdamW"]), task)[0]
                parts.append(
                    f"lr: ROOT's best is {best['ROOT'] / best['AdamW']:.3g}x AdamW's ({best['ROOT']:g}); at AdamW's "
                    f"{best['AdamW']:g} ROOT reaches {drop}: set `--learning_rate {best['ROOT']:g}`"
                )
            trl = at("ROOT", TRL_DEFAULT_LR)
            if trl:
                worse = statistics.mean(r["final_eval"] for r in trl) > statistics.mean(r["final_eval"] for r in root)
                parts.append(
                    f"TRL's default lr {TRL_DEFAULT_LR:g} leaves ROOT at {_row(trl, task)[0]} "
                    f"(vs {_row(root, task)[0]} at its best)" + (": pass `--learning_rate`" if worse else "")
                )
            for name, label in (("ROOT clip off", "the clip"), ("ROOT lora_policy=both", "`lora_policy`")):
                other = at(name, best["ROOT"]) if name in ablations(mode) else []
                if other:
                    pair = ("ROOT", "clip off") if name == "ROOT clip off" else ("b_only (default)", "both")
                    parts.append(f"{label}: {compare(root, other, pair)}")
            fr, fa = _forgetting(root), _forgetting(adamw)
            if fr is not None and fa is not None:
                parts.append(f"forgetting (general-text loss change): ROOT {fr:+.3f}, AdamW {fa:+.3f}")
            opt_r, opt_a = ([statistics.median(r["opt_s"]) for r in v if r.get("opt_s")] for v in (root, adamw))
            steps = [statistics.median(r["step_s"]) for r in adamw if r.get("step_s")]
            if opt_r and opt_a and steps:
                o_r, o_a, step = statistics.median(opt_r), statistics.median(opt_a), statistics.median(steps)
                parts.append(
                    f"cost: ROOT's optimizer step {o_r:.3f} s against AdamW's {o_a:.3f} s, "
                    f"{(o_r - o_a) / step:+.0%} of AdamW's training step ({step:.2f} s)"
                )
            out.append(f"- **{task}, {mode}**:")
            out += [f"    - {part}." for part in parts]
    if not out:
        return []
    tail = f"- Not settled yet, so no advice: {', '.join(open_pairs)}." if open_pairs else ""
    return ["Recommendation (settled pairs only, mean over seeds at each optimizer's best lr):", "", *out, tail, ""]


def headline(studies: dict[tuple[str, str, str], FinetuneStudy], plan: dict[str, Any], design: Design) -> list[str]:
    """One bullet per (task, mode) whose seed-0 sweeps all have their best lr inside the grid: each optimizer's best
    lr and held-out loss there, and the drop-in run (ROOT at AdamW's best lr), stating how many seeds back it."""
    out = []
    for mode in design.modes:
        for task in design.tasks:
            entry = plan.get((task, mode))
            if not entry or any(
                n not in entry["best"] or entry["best"][n] in (min(entry["sweeps"][n]), max(entry["sweeps"][n]))
                for n in SWEPT
            ):
                continue
            s, best = studies[(task, mode, "clean")], entry["best"]
            parts = []
            for name in SWEPT:
                runs = _runs(s, name, best[name], design.seeds)
                parts.append(f"{name} {_row(runs, task)[0]} at lr {best[name]:g}")
            drop = _runs(s, "ROOT", best["AdamW"], design.seeds)
            same = (
                "the same lr as ROOT's own best"
                if best["AdamW"] == best["ROOT"]
                else f"ROOT's best is {best['ROOT']:g}"
            )
            out.append(
                f"- **{task}, {mode}**: held-out loss at each optimizer's best lr: " + "; ".join(parts) + ". "
                f"Drop-in (ROOT at AdamW's best lr {best['AdamW']:g}, {same}): {_row(drop, task)[0]}. "
                + verdict(_runs(s, "ROOT", best["ROOT"], design.seeds), _runs(s, "AdamW", best["AdamW"], design.seeds))
                + (
                    " Switching only `--optim` keeps the lr."
                    if best["AdamW"] == best["ROOT"]
                    else f" Use ROOT at {best['ROOT'] / best['AdamW']:.3g}x AdamW's lr."
                )
            )
    return (["Sweeps finished (best lr inside the grid for AdamW, Muon and ROOT):", "", *out, ""]) if out else []


def report(
    studies: dict[tuple[str, str, str], FinetuneStudy],
    plan: dict[str, Any],
    design: Design,
    budget: Budget,
    plot_path: Path | None,
) -> str:
    """Markdown tables of every (task, mode) from the cached runs, and the plot."""
    lines: list[str] = []
    done = sum(len(s.runs) for s in studies.values())
    missing = [m for s in studies.values() for m in s.missing]
    total = done + len(missing)
    hours = estimate_hours(missing, budget)
    lines.append(f"**{done} of {total} runs of the design cached** (a run whose lr depends on an unfinished sweep")
    lines.append(f"counts once as missing). The missing runs need about {hours:.0f} CPU hours at 1 thread.")
    lines.append("")
    settled = [f"{t} {m}" for t in design.tasks for m in design.modes if settled_pair(studies, plan, design, t, m)]
    lines.append(
        f"Settled (every optimizer's best lr inside its sweep, all {len(design.seeds)} seeds cached): "
        + (", ".join(settled) if settled else "none yet")
        + f" of {len(design.tasks) * len(design.modes)} (task, mode) pairs. "
        + "No recommendation is drawn from unsettled pairs; a recipe default (lr, `lora_policy`) cites this study "
        + (
            "only for a settled pair (the recipe configs' comments name which)."
            if settled
            else "once its pair is settled."
        )
    )
    lines.append("")
    lines += recommendation(studies, plan, design)
    if UPDATE_RMS.exists() and not any(s.tiny for s in studies.values()):
        lines += update_rms_lines(json.loads(UPDATE_RMS.read_text(encoding="utf-8")))
    lines += headline(studies, plan, design)
    for task in design.tasks:
        for mode in design.modes:
            entry = plan.get((task, mode))
            s = studies[(task, mode, "clean")]
            if not entry or not any(entry["sweeps"].values()):
                continue
            lines.append(f"#### {task}, {'full fine-tuning' if mode == 'full' else 'LoRA (r 8, the recipe targets)'}")
            lines.append("")
            grid = sorted({lr for sw in entry["sweeps"].values() for lr in sw})
            lines.append(
                "Held-out answer loss after the last step, seed 0 (lr sweep; **bold**: the optimizer's best):"
            )
            lines.append("")
            lines.append("| optimizer | " + " | ".join(f"lr {lr:g}" for lr in grid) + " |")
            lines.append("|---|" + "---|" * len(grid))
            for name, sweep in entry["sweeps"].items():
                best = entry["best"].get(name)
                cells = []
                for lr in grid:
                    run = sweep.get(lr)
                    if run is None:
                        cells.append("")
                    elif run.get("diverged"):
                        cells.append("diverged")
                    else:
                        text = f"{run['final_eval']:.3f}"
                        cells.append(f"**{text}**" if lr == best else text)
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
            before = next((r["metrics"]["before"] for r in s.runs.values() if r.get("metrics")), None)
            base_loss = next((r["evals"][0][2] for r in s.runs.values()), None)
            if before is not None:
                lines.append(
                    f"Base model (no fine-tuning): held-out loss {base_loss:.3f}, {PRIMARY_LABEL[task]} "
                    f"{before.get(PRIMARY[task], float('nan')):.3f}, general-text loss {before['forget_loss']:.3f}."
                )
                lines.append("")
            lines.append(
                "At each optimizer's best lr, mean ± sd over seeds (forgetting: general-text loss after minus before; "
                "step: median seconds per step):"
            )
            lines.append("")
            lines.append(f"| optimizer | lr | held-out loss | {PRIMARY_LABEL[task]} | forgetting | s/step |")
            lines.append("|---|---|---|---|---|---|")
            best = entry["best"]
            rows: list[tuple[str, float | None]] = [(n, best.get(n)) for n in SWEPT]
            rows += [(name, best.get("ROOT")) for name in ablations(mode)]
            for name, lr in rows:
                if lr is None:
                    continue
                runs = _runs(s, name, lr, design.seeds)
                if runs:
                    lines.append(f"| {name} | {lr:g} | " + " | ".join(_row(runs, task)) + " |")
            drop = [("ROOT at TRL's default lr", TRL_DEFAULT_LR)]
            if "AdamW" in best:
                drop.insert(0, ("ROOT at AdamW's best lr", best["AdamW"]))
            for label, lr in drop:
                runs = _runs(s, "ROOT", lr, design.seeds)
                if runs:
                    lines.append(f"| {label} (drop-in) | {lr:g} | " + " | ".join(_row(runs, task)) + " |")
            n = studies[(task, mode, "noisy")]
            noisy_rows = []
            for name, lr in rows:
                runs = [n.runs.get((name, "clean", lr, seed)) for seed in design.seeds] if lr else []
                runs = [r for r in runs if r is not None]
                if runs:
                    noisy_rows.append(f"| {name} (noisy) | {lr:g} | " + " | ".join(_row(runs, task)) + " |")
            lines += noisy_rows
            for name, lr in rows:
                if lr is None:
                    continue
                high = float(f"{lr * design.probe_factor:.3g}")
                run = s.runs.get((name, "clean", high, 0))
                if run is not None:
                    lines.append(
                        f"| {name} (probe: {design.probe_factor:g}x lr) | {high:g} | "
                        + " | ".join(_row([run], task))
                        + " |"
                    )
            lines.append("")
    if missing:
        shown = missing[:12]
        more = f" ... and {len(missing) - len(shown)} more" if len(missing) > len(shown) else ""
        lines.append(f"Missing ({len(missing)}): " + "; ".join(shown) + more)
    if plot_path is not None:
        if plot(plan, design, plot_path, studies):
            lines.append("")
            docs = REPO / "docs"
            if plot_path.is_relative_to(docs):  # the docs page shows it (its path relative to docs/results.md)
                lines.append(f"![held-out loss against lr, per task and mode]({plot_path.relative_to(docs)})")
            else:
                lines.append(f"Plot: {plot_path}")
    return "\n".join(lines)


def plot(
    plan: dict[str, Any], design: Design, path: Path, studies: dict[tuple[str, str, str], FinetuneStudy] | None = None
) -> bool:
    """Top row: final held-out loss against lr, one panel per (task, mode) with a sweep. Bottom row (with `studies`):
    held-out loss against step at each optimizer's best lr, mean over the cached seeds with their range shaded, so
    a reader sees whether the budget let the curves flatten. False without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [
        (t, m) for t in design.tasks for m in design.modes if plan.get((t, m)) and any(plan[(t, m)]["sweeps"].values())
    ]
    if not panels:
        return False
    rows = 2 if studies is not None else 1
    fig, axes = plt.subplots(rows, len(panels), figsize=(4.2 * len(panels), 3.6 * rows), squeeze=False)
    for ax, (task, mode) in zip(axes[0], panels, strict=True):
        for name, sweep in plan[(task, mode)]["sweeps"].items():
            pts = [(lr, r["final_eval"]) for lr, r in sorted(sweep.items()) if not r.get("diverged")]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=name)
        ax.set(xscale="log", xlabel="lr", title=f"{task}, {mode}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out loss (seed 0)")
    axes[0][0].legend()
    if studies is not None:
        for ax, (task, mode) in zip(axes[1], panels, strict=True):
            best = plan[(task, mode)]["best"]
            for name in (n for n in SWEPT if n in best):  # a sweep still growing has no best lr yet
                runs = _runs(studies[(task, mode, "clean")], name, best[name], design.seeds)
                runs = [r for r in runs if not r.get("diverged")]
                if not runs:
                    continue
                steps = [e[0] for e in runs[0]["evals"]]
                curves = [[e[2] for e in r["evals"]] for r in runs if [e[0] for e in r["evals"]] == steps]
                mean = [statistics.mean(c) for c in zip(*curves, strict=True)]
                (line,) = ax.plot(steps, mean, "o-", ms=3, label=f"{name} lr {best[name]:g} (n={len(curves)})")
                if len(curves) > 1:
                    lo, hi = ([f(c) for c in zip(*curves, strict=True)] for f in (min, max))
                    ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
            ax.set(xlabel="step", title=f"{task}, {mode}: at each best lr")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        axes[1][0].set_ylabel("held-out loss (mean over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------------------------
# Step time (--step-time)
# --------------------------------------------------------------------------------------------------------------------


def step_time(budget: Budget, repeats: int = 3) -> dict[str, float]:
    """CPU seconds (`time.process_time`: on a shared machine closer to an idle machine's wall time than the wall
    clock) of one training step's forward + backward, full and LoRA, float32 and bf16 autocast, on the chat task's
    batches (round-robin, median of `repeats`), and of one optimizer step of each optimizer (median of 2)."""
    out: dict[str, float] = {}
    models = {}
    for mode in MODES:
        for bf16 in (False, True):
            task = FinetuneTask("chat", mode, budget, bf16=bf16)
            models[(mode, bf16)] = (task, task.build(0), task.batches(0))
    times: dict[tuple[str, bool], list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for key, (task, model, it) in models.items():
            batch = next(it)
            start = time.process_time()
            loss = task.loss(model, batch)
            loss.backward()
            times[key].append(time.process_time() - start)
            model.zero_grad(set_to_none=True)
    for (mode, bf16), t in times.items():
        out[f"{mode} forward+backward {'bf16 autocast' if bf16 else 'float32'}"] = statistics.median(t)
    for mode in MODES:
        task, model, it = models[(mode, False)]
        task.loss(model, next(it)).backward()
        for name in SWEPT:
            opts = task.optimizers(model, OPTIMIZERS[name], 1e-5)
            t = []
            for _ in range(2):
                start = time.process_time()
                for o in opts:
                    o.step()
                t.append(time.process_time() - start)
            out[f"{mode} optimizer step {name}"] = statistics.median(t)
    print(f"CPU seconds, 1 thread (batch {budget.batch_size}, <= {budget.max_len} tokens per example):")
    for name, t in out.items():
        print(f"  {name:<36} {t:.2f}")
    return out


UPDATE_RMS = RESULTS / "finetune_update_rms.json"  # `--update-rms`'s measurement (committed; the report quotes it)


def update_rms(budget: Budget, steps: int = 40, root_steps: int = 3, tiny: bool = False) -> dict[str, Any]:
    """How far one step moves the matrices ROOT orthogonalizes, per unit of lr: the per-element RMS of
    (W_after - W_before) / lr at each step, median (and range) over those matrices, for AdamW (`steps` steps) and ROOT
    (`root_steps`: its update size is fixed by construction, and a full ROOT step costs 37.5 CPU s), on the chat
    task's batches at a constant lr (the grid's middle), full and LoRA.

    ROOT's `adjust_lr_fn="match_rms_adamw"` scales the orthogonalized update to RMS 0.2 because that is about the RMS
    of AdamW's update once its second moment has averaged the gradient noise (arXiv 2502.16982). Where AdamW's
    measured RMS is near 0.2, the same lr moves the weights of both optimizers alike: the basis of the drop-in
    claim."""
    out: dict[str, Any] = {"steps": steps, "root_steps": root_steps}
    for mode in ("lora", "full"):
        lr = Design().lrs[mode][1]
        entry: dict[str, Any] = {"lr": lr}
        for name, n in (("AdamW", steps), ("ROOT", root_steps)):
            task = FinetuneTask("chat", mode, budget, tiny=tiny)
            model = task.build(0)
            matrices = routed_matrices(model)
            opts, batches = task.optimizers(model, OPTIMIZERS[name], lr), task.batches(0)
            rows = []
            for _ in range(n):
                task.loss(model, next(batches)).backward()
                before = [p.detach().clone() for p in matrices]
                for o in opts:
                    o.step()
                    o.zero_grad(set_to_none=True)
                with torch.no_grad():
                    rms = sorted(
                        float((p - b).pow(2).mean().sqrt()) / lr for p, b in zip(matrices, before, strict=True)
                    )
                rows.append((statistics.median(rms), rms[0], rms[-1]))
            entry[name] = {"median": [r[0] for r in rows], "min": [r[1] for r in rows], "max": [r[2] for r in rows]}
            print(
                f"  {mode:<4} {name:<5} update RMS / lr, median over {len(matrices)} matrices, steps 1..{n}: "
                + " ".join(f"{r[0]:.3f}" for r in rows),
                flush=True,
            )
        out[mode] = entry
    return out


def update_rms_lines(data: dict[str, Any]) -> list[str]:
    """The report's paragraph on `update_rms`'s measurement."""
    late = slice(min(19, data["steps"] - 1), None)  # steps 20.. (AdamW's second moment has averaged ~20 gradients)
    parts = []
    for mode in ("lora", "full"):
        e = data[mode]
        a, r = e["AdamW"]["median"], e["ROOT"]["median"]
        parts.append(
            f"{'LoRA (lora_B)' if mode == 'lora' else 'full fine-tuning'} at lr {e['lr']:g}: AdamW {a[0]:.2f} at step "
            f"1, {a[min(9, len(a) - 1)]:.2f} at step {min(10, len(a))}, {statistics.mean(a[late]):.2f} over steps "
            f"{late.start + 1}-{len(a)}; ROOT {statistics.mean(r):.2f} (steps 1-{len(r)})"
        )
    return [
        "Update size (`python benchmarks/finetune.py --update-rms`, chat task, constant lr, seed 0): per-element RMS "
        "of one step's change of the matrices ROOT orthogonalizes, divided by the lr, median over the matrices: "
        + "; ".join(parts)
        + ". So after AdamW's first steps (larger: bias correction makes its first step sign-like, RMS 1) the same lr "
        "moves the weights of both optimizers by about the same amount, in LoRA and in full fine-tuning: what ROOT's "
        "`match_rms_adamw` scale (0.2) is for.",
        "",
    ]


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def make_studies(
    results: Path,
    budget: Budget,
    design: Design,
    report_only: bool,
    write: bool,
    device: str = "cpu",
    tiny: bool = False,
) -> dict[tuple[str, str, str], FinetuneStudy]:
    """The clean and noisy study of every (task, mode) of the design (`tiny`: on the --quick model, `TINY_MODEL`)."""
    studies = {}
    for task in design.tasks:
        for mode in design.modes:
            for variant, share in (("clean", 0.0), ("noisy", design.wrong_labels)):
                studies[(task, mode, variant)] = FinetuneStudy(
                    results, task, mode, budget, share, report_only, write, device=device, tiny=tiny
                )
    return studies


DOCS = REPO / "docs" / "results.md"
MARKERS = (
    "<!-- finetune.py: start (generated by benchmarks/finetune.py --report-only) -->",
    "<!-- finetune.py: end -->",
)


def docs_section(body: str, studies: dict[tuple[str, str, str], FinetuneStudy], budget: Budget, design: Design) -> str:
    """The fine-tuning section of `docs/results.md`: what the study is, then `body` (the report's tables)."""
    runs = [r for s in studies.values() for r in s.runs.values()]
    loads = [r["load_average_1m"] for r in runs if "load_average_1m" in r]
    load = f"{min(loads):.1f} to {max(loads):.1f}" if loads else "-"
    return "\n".join(
        [
            MARKERS[0],
            "## Fine-tuning SmolLM2-135M-Instruct: chat, arithmetic, language ID (`benchmarks/finetune.py`)",
            "",
            "Generated from the run cache (`benchmarks/results/finetune/`, one JSON file per run, committed) by "
            "`python benchmarks/finetune.py --report-only`; `python benchmarks/finetune.py` trains the missing runs "
            "in plan order and can be stopped and resumed at any point (`--jobs N`: N worker processes share the "
            "cache, each run claimed before it trains). The study accumulates across sessions: "
            "**read the count below before reading anything into the tables**: rows with n=1 are single seeds, and "
            "a sweep whose best lr sits at the edge of its grid is not finished.",
            "",
            f"- Model: SmolLM2-135M-Instruct (the recipe's embedded copy), full fine-tuning or LoRA (r {LORA['r']}, "
            f"alpha {LORA['alpha']}, the recipe's 7 projections, `lora_policy` the package default). Budget per run: "
            f"{budget.steps} steps of batch {budget.batch_size}, at most {budget.max_len} tokens per example, "
            f"linear warm-up over {budget.warmup_fraction:.0%} then cosine decay to 0 (the same for every optimizer), "
            "weight decay 0; held-out loss every "
            f"{budget.eval_every} steps on {budget.eval_size} held-out items.",
            "- Tasks: `chat` (the recipe's chatterbot Q&A; metric: teacher-forced answer token accuracy), `arith` "
            "(3-digit additions; metric: exact match of the greedy-generated answer), `langid` (name the language of "
            f"a chatterbot question, {len(LANGUAGES)} languages; metric: accuracy of the greedy-generated label). "
            "Metrics are the local `evaluate` modules in `recipes/metrics/`. Forgetting: loss on general text "
            "(Python standard-library docstrings) after minus before the fine-tune.",
            "- Optimizers: AdamW (the `Trainer` defaults), Muon (`torch.optim.Muon`'s update in float32 through "
            "ROOT's code path: `torch.optim.Muon`'s bfloat16 Newton-Schulz is 14x slower on this CPU) + AdamW, "
            "ROOT (`--optim root` defaults), and at ROOT's best lr ROOT with the clip off and, with LoRA, ROOT "
            "with both LoRA factors orthogonalized (`lora_policy=both`, against the default `b_only`). lr grids "
            f"(seed 0, extended past an edge up to {design.max_extra} points): full {list(design.lrs['full'])}, "
            f"LoRA {list(design.lrs['lora'])}; seeds "
            f"{list(design.seeds)} at each best lr; noisy variant: {design.wrong_labels:.0%} of the training answers "
            f"replaced by another item's answer; probe: each optimizer at {design.probe_factor:g}x its best lr; "
            f"drop-in: ROOT at AdamW's best lr and at TRL's default lr {TRL_DEFAULT_LR:g}.",
            "- Cost per step (CPU seconds at 1 thread, `--step-time`, batch of the default budget): "
            + ", ".join(f"{k} {v:g}" for k, v in STEP_CPU_S.items())
            + f". The whole design needs about {estimate_all(studies, budget)}. bf16 autocast is no help on this CPU "
            "(AMD EPYC without AVX512-BF16/AMX): a LoRA forward + backward took 83.6 CPU seconds against 7.3 in "
            "float32 (one step each, same batch size, 2026-12-07), so the study runs in float32.",
            f"- Machine: 2 shared CPU cores, 1 torch thread, niced (1-minute load average during the runs: {load}); "
            "seconds per step are therefore only comparable within a row's seeds, not across sessions.",
            "",
            body,
            MARKERS[1],
        ]
    )


def write_docs(section: str, page: Path = DOCS) -> None:
    """Put `section` into `page` between the markers (replacing the last one), or append it."""
    text = page.read_text(encoding="utf-8") if page.exists() else ""
    if MARKERS[0] in text and MARKERS[1] in text:
        head, rest = text.split(MARKERS[0], 1)
        tail = rest.split(MARKERS[1], 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    page.write_text(text, encoding="utf-8")


def walk(
    studies: dict[tuple[str, str, str], FinetuneStudy], design: Design, max_runs: int | None, poll_s: float = 30.0
) -> dict[str, Any]:
    """`plan_runs` until nothing is left that another worker holds: a walk that skipped claimed runs walks again
    (after `poll_s` when it trained nothing), since their results decide the sweeps' extensions and best lrs."""
    while True:
        before = sum(s.executed for s in studies.values())
        for s in studies.values():
            s.claimed_elsewhere = 0
            s.missing.clear()
        plan = plan_runs(studies, design, max_runs)
        if plan["stopped"] or not any(s.claimed_elsewhere for s in studies.values()):
            return plan
        if sum(s.executed for s in studies.values()) == before:
            time.sleep(poll_s)


def spawn_worker(argv: list[str] | None) -> Any:
    """Another process running this study on the same cache (`--jobs`): the same arguments, `--jobs 1 --worker`."""
    import subprocess

    args = list(sys.argv[1:] if argv is None else argv)
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args, "--jobs", "1", "--worker"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: a tiny random model, tiny budget, no cache written"
    )
    parser.add_argument("--report-only", action="store_true", help="tables and plot from the cached runs only")
    parser.add_argument("--max-runs", type=int, default=None, help="train at most this many missing runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--step-time", action="store_true", help="seconds per step, full / LoRA, fp32 / bf16")
    parser.add_argument(
        "--update-rms",
        action="store_true",
        help=f"measure AdamW's and ROOT's update size per unit lr, full and LoRA (writes {UPDATE_RMS.name})",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device of the runs (default: cpu; other devices are cached apart)"
    )
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: docs/img/finetune.png)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes sharing the plan through the run cache (each run is claimed before it trains; "
        "each worker uses --threads threads). Default: 1",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a --jobs child: no report
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"invalid --jobs: {args.jobs}. Must be a positive integer (1: this process alone).")
    if args.jobs > 1 and (args.quick or args.report_only or args.step_time or args.update_rms):
        parser.error(
            "--jobs applies to training the study: drop it with --quick, --report-only, --step-time or --update-rms."
        )
    torch.set_num_threads(args.threads)
    budget, design = (QUICK_BUDGET, QUICK_DESIGN) if args.quick else (Budget(), Design())
    print("benchmarks/finetune.py: fine-tuning SmolLM2-135M-Instruct (full and LoRA) on chat / arith / langid")
    print(json.dumps({"machine": machine_dict(), "versions": library_versions()}))
    print(f"budget: {json.dumps(asdict(budget))}")
    if args.step_time:
        step_time(budget)
        return
    if args.update_rms or args.quick:
        data = update_rms(budget, **({"steps": 3, "root_steps": 2, "tiny": True} if args.quick else {}))
        if not args.quick:
            UPDATE_RMS.write_text(json.dumps({**data, "machine": machine_dict()}, indent=1) + "\n", encoding="utf-8")
        print("\n".join(update_rms_lines(data)))
        if args.update_rms:
            return
    results = RESULTS / ("finetune-quick" if args.quick else "finetune")
    studies = make_studies(
        results, budget, design, args.report_only, write=not args.quick, device=args.device, tiny=args.quick
    )
    start = time.perf_counter()
    children = [spawn_worker(argv) for _ in range(args.jobs - 1)]
    plan = walk(studies, design, None if args.report_only else args.max_runs)
    for child in children:
        child.wait()
    if args.worker:
        return
    if not args.report_only and not plan["stopped"]:
        for s in studies.values():
            s.missing.clear()
    if args.report_only or plan["stopped"]:  # list what is missing: walk the plan again without training
        for s in studies.values():
            s.report_only, s.missing = True, {}
        plan = plan_runs(studies, design)
    plot_path = args.plot or (results / "finetune.png" if args.quick else REPO / "docs" / "img" / "finetune.png")
    body = report(studies, plan, design, budget, plot_path)
    print()
    print(body)
    missing = [m for s in studies.values() for m in s.missing]
    if missing:
        print(f"\nAll {len(missing)} missing runs, in plan order:\n  " + "\n  ".join(missing))
    if not args.quick:
        write_docs(docs_section(body, studies, budget, design))
        print(f"\nwrote the fine-tuning section of {DOCS.relative_to(REPO)}")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
