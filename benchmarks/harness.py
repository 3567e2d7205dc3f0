"""The one benchmark harness: machine description and timing, the `Task` protocol, noise injection, the training
loop (`train_run`), the run cache and the lr sweep (`Study`), and the convergence study's optimizers, settings and
tasks (shared with `report.py`).

Studies (`convergence.py`, `lora.py`, `moe.py`, `report.py`, `import_time.py`, and perf's `step_time.py` /
`orthogonality.py`) import from here; this module imports no study, so there is no import circle. The chat encoder
is the recipe's (`recipes.assets.encode_chat`), so a benchmark and `recipes/sft.py` train on the same tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/, not the repository, on sys.path
    sys.path.insert(0, str(REPO))

from root_hf import (  # noqa: E402
    ROOT,
    get_schedule,
    schedules,
)

# Run cache and outputs; $BENCHMARKS_RESULTS moves them (the --quick smoke tests write to a temporary folder).
RESULTS = Path(os.environ.get("BENCHMARKS_RESULTS") or Path(__file__).resolve().parent / "results")
# Bump when a change here changes what a cached run means (2: the recipe's chat encoding; 3: one cache key format
# for every study)
CACHE_VERSION = 3


# --------------------------------------------------------------------------------------------------------------------
# Machine, versions, timing
# --------------------------------------------------------------------------------------------------------------------

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config): hidden 576, intermediate 1536, 9 heads / 3 KV heads of dim 64.
SMOLLM2_135M = {"hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3, "head_dim": 64}


def llama_hidden_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> list[tuple]:
    """Shapes (out, in) of one Llama decoder layer's hidden matrices: q, k, v, o, gate, up, down."""
    return [
        (heads * head_dim, hidden),
        (kv_heads * head_dim, hidden),
        (kv_heads * head_dim, hidden),
        (hidden, heads * head_dim),
        (intermediate, hidden),
        (intermediate, hidden),
        (hidden, intermediate),
    ]


def machine_info() -> str:
    threads = torch.get_num_threads()
    return (
        f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} torch_threads={threads}\n"
        f"versions: python {platform.python_version()}, torch {torch.__version__}"
    )


def median_time(fn: Callable[[], object], steps: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` in seconds over `steps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def llama_ratio_shapes(hidden: int, head_dim: int = 64) -> dict[str, int]:
    """Llama-style layer dims for a hidden size: `intermediate = 64 * round(8 hidden / 3 / 64)`, heads of
    `head_dim`, grouped-query KV heads (`heads / 3` when divisible, as SmolLM2, else `heads / 4`)."""
    heads = max(1, hidden // head_dim)
    kv_heads = heads // 3 if heads % 3 == 0 else max(1, heads // 4)
    intermediate = 64 * round(8 * hidden / 3 / 64)
    return {"hidden": hidden, "intermediate": intermediate, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}


def ns_flops(shape: tuple[int, int], ns_steps: int = 5) -> int:
    """Multiply-add FLOPs (2 per MAC) of `ns_steps` quintic Newton-Schulz steps on one `m x n` matrix.

    With `s = min(m, n)` and `l = max(m, n)` each step computes the Gram matrix `A = X X^T` (`2 s^2 l`),
    `b A + c A^2` (`2 s^3`) and `(b A + c A^2) X` (`2 s^2 l`): `2 s^2 (2 l + s)` per step. The
    normalization and the elementwise terms are O(s l) and not counted.
    """
    s, long = min(shape), max(shape)
    return 2 * s * s * (2 * long + s) * ns_steps


def library_versions() -> dict[str, str]:
    """Versions of the libraries a benchmark used (those importable here)."""
    import importlib.metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "root-hf", "numpy", "matplotlib"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def machine_dict() -> dict[str, object]:
    """Machine description as data (for JSON results): CPU, core count, torch threads, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(load[0], 2),
        "platform": platform.platform(),
    }


def interleaved_medians(fns: dict[str, Callable[[], object]], steps: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time (seconds) of each `fn` with the calls interleaved round-robin.

    On a machine shared with other jobs the load drifts over a benchmark; timing the candidates in turns, instead of
    one after the other, exposes every candidate to the same drift, so their ratios stay meaningful.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def encode_chat_pair(tokenizer: Any, row: dict[str, str], max_len: int) -> tuple[list[int], list[int]]:
    """A question/answer pair encoded exactly as the recipe trains it (`recipes.assets.encode_chat`: the model's chat
    template, SmolLM2's default system prompt included): (input ids, labels), labels -100 outside the answer and its
    end-of-turn token, both cut to `max_len` tokens."""
    from recipes.assets import encode_chat

    messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
    encoded = encode_chat(tokenizer, messages, max_len)
    ids = encoded["input_ids"]
    return ids, [t if m else -100 for t, m in zip(ids, encoded["assistant_masks"], strict=True)]


# --------------------------------------------------------------------------------------------------------------------
# Optimizers and ablations (data)
# --------------------------------------------------------------------------------------------------------------------


def default_schedule() -> str:
    """The schedule "ROOT (our defaults)" uses: `"adaptive"` once it exists, else the package default."""
    return "adaptive" if "adaptive" in schedules.SCHEDULE_NAMES else schedules.DEFAULT_SCHEDULE


def optimizer_specs() -> dict[str, dict[str, Any]]:
    """Main comparison: name -> spec. `kind` is `adamw`, `root` (ROOT kwargs follow) or `torch_muon`."""
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
        if name in schedules.SCHEDULE_NAMES:
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
    max_extra_lrs: int = 0  # lr points the sweep may add past an edge of `lrs` (0: the published grid only)
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

# --quick: a smoke run in seconds (a 1-layer model, 3 steps, one lr and seed, clean + noisy), not a result.
QUICK: dict[str, dict[str, Any]] = {
    "a": {
        "steps": 3,
        "eval_every": 3,
        "batch_size": 4,
        "seq_len": 16,
        "lrs": (3e-3,),
        "seeds": (0,),
        "ablation_seeds": (0,),
        "eval_size": 4,
        "variants": ("clean", "noisy"),
        "model": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 64, "vocab": 256},
    },
    "b": {"steps": 2, "eval_every": 2, "lrs": (4e-3,), "seeds": (0,), "eval_size": 4, "batch_size": 2},
}


# --------------------------------------------------------------------------------------------------------------------
# Tasks: what a study trains
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The schedule of one run: `steps` optimizer steps, an evaluation every `eval_every` steps (and after the last),
    a linear warm-up over `warmup` steps, then a cosine decay to `final_lr_frac` of the lr."""

    steps: int
    eval_every: int
    warmup: int
    final_lr_frac: float = 0.0


def warmup_steps(fraction: float, steps: int) -> int:
    """Warm-up steps for a warm-up over `fraction` of `steps` (at least one)."""
    return max(1, round(fraction * steps))


def lr_factor(plan: Plan) -> Callable[[int], float]:
    """The lr multiplier after `i` optimizer steps: `(i + 1) / warmup` during the warm-up, then a cosine decay from 1
    to `final_lr_frac` over the remaining steps."""
    decay = max(1, plan.steps - plan.warmup)

    def factor(i: int) -> float:
        if i < plan.warmup:
            return (i + 1) / plan.warmup
        t = min(1.0, (i - plan.warmup) / decay)
        return plan.final_lr_frac + (1 - plan.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


class Task:
    """What `train_run` trains. A task has a `plan` (steps, evaluations, lr schedule) and implements

    - `build(seed) -> model` (initialized from `seed`),
    - `optimizers(model, spec, lr) -> [optimizer, ...]` (what an optimizer spec of the study means),
    - `loss(model, batch) -> tensor`,
    - `batch(generator) -> batch` (one batch from the run's seeded generator) or `batches(seed)` (the whole order),
    - `eval_batches() -> [batch, ...]` (for the token-weighted eval loss) or `evaluate(model) -> float`;
    - for noise injection, `vocab` (label noise) and `hidden_matrices(model) -> [(name, param), ...]` (outliers);
    - optionally `final_metrics(model) -> dict` (held-out metrics after the last step).
    """

    plan: Plan
    vocab: int = 0
    _eval_set: list[dict[str, torch.Tensor]] | None = None

    def batches(self, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """The training batches of a run at `seed`, one per step (default: `batch` from one seeded generator)."""
        generator = _gen(1, seed)
        while True:
            yield self.batch(generator)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> float:
        """Eval loss over `eval_batches()`, weighted by the targets (labels other than -100) of each batch."""
        if self._eval_set is None:
            self._eval_set = self.eval_batches()
        model.eval()
        total, count = 0.0, 0
        for b in self._eval_set:
            n = int((b["labels"] != -100).sum())
            total += float(self.loss(model, b)) * n
            count += n
        model.train()
        return total / count

    def schedule(self) -> Callable[[int], float]:
        """The lr multiplier after `i` optimizer steps (default: `lr_factor(self.plan)`)."""
        return lr_factor(self.plan)

    def initial_eval(self, model: torch.nn.Module) -> float:
        """Eval loss before the first step (a task may know it already: LoRA starts from the base model)."""
        return self.evaluate(model)

    def final_metrics(self, model: torch.nn.Module) -> dict[str, Any]:
        """Held-out metrics besides the eval loss, computed once after the last step of a run that did not diverge
        (default: none); `train_run` stores a non-empty result as the run's `metrics`."""
        return {}


def _masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class SettingTask(Task):
    """A task of the convergence study: plan, weight decay and optimizer specs (`build_optimizers`) from a
    `Setting`."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        warmup = warmup_steps(setting.warmup_frac, setting.steps)
        self.plan = Plan(setting.steps, setting.eval_every, warmup, setting.final_lr_frac)

    def optimizers(self, model: torch.nn.Module, spec: dict[str, Any], lr: float) -> list[torch.optim.Optimizer]:
        matrices = [p for _, p in self.hidden_matrices(model)]
        ids = {id(p) for p in matrices}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return build_optimizers(spec, matrices, rest, lr, self.setting.weight_decay)


class ScratchLM(SettingTask):
    """(a): byte-level Llama from scratch on the chatterbot corpus (question and answer text, all languages)."""

    def __init__(self, setting: Setting) -> None:
        from recipes.assets import chatterbot_languages, load_chatterbot_pairs, train_eval_split

        super().__init__(setting)
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


class LoraSFT(SettingTask):
    """(b): LoRA on SmolLM2-135M-Instruct, ChatML without system prompt, loss on the answer tokens only."""

    def __init__(self, setting: Setting) -> None:
        from transformers import AutoTokenizer

        from recipes.assets import load_chatterbot_pairs, smollm2_path, train_eval_split

        super().__init__(setting)
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


TASKS: dict[str, Callable[[Setting], SettingTask]] = {"a": ScratchLM, "b": LoraSFT}


# --------------------------------------------------------------------------------------------------------------------
# One run: the training loop (with noise injection)
# --------------------------------------------------------------------------------------------------------------------


def build_optimizers(
    spec: dict[str, Any], matrices: list[torch.Tensor], rest: list[torch.Tensor], lr: float, weight_decay: float
) -> list[torch.optim.Optimizer]:
    """The optimizers of a convergence spec (`optimizer_specs`): `matrices` on the matrix branch, `rest` on AdamW."""
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


def _gen(*parts: int) -> torch.Generator:
    seed = int(hashlib.sha256(",".join(map(str, parts)).encode()).hexdigest()[:15], 16)
    return torch.Generator().manual_seed(seed)


def noise_for(setting: Setting, variant: str) -> Noise | None:
    """The noise of a variant: none (`clean`), outliers + label noise (`noisy`), outliers alone (`outliers`),
    larger and more frequent outliers alone (`heavy-outliers`)."""
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
    """Replace `fraction` of the valid targets by uniformly random tokens (same draws for every optimizer)."""
    flip = (torch.rand(labels.shape, generator=generator) < fraction) & (labels != -100)
    random = torch.randint(0, vocab, labels.shape, generator=generator)
    return torch.where(flip, random, labels)


def inject_outliers(matrices: list[torch.Tensor], noise: Noise, generator: torch.Generator) -> None:
    """Multiply `outlier_entries` random entries of each matrix gradient by `outlier_scale` (in place)."""
    for p in matrices:
        if p.grad is None:
            continue
        flat = p.grad.view(-1)
        idx = torch.randint(0, flat.numel(), (noise.outlier_entries,), generator=generator)
        flat[idx] *= noise.outlier_scale


def train_run(
    task: Task, spec: dict[str, Any], lr: float, seed: int, noise: Noise | None = None, log: bool = False
) -> dict[str, Any]:
    """Train `task.build(seed)` once with `task.optimizers(model, spec, lr)` under `task.plan`, on
    `task.batches(seed)`, with `noise` injected if given (the same draws for every optimizer at a seed).

    A run stops early (diverges) on a non-finite training or eval loss, or when an optimizer step raises
    `FloatingPointError` (ROOT's `nonfinite_grads="raise"`).

    Returns:
        A JSON-serializable dict: `final_eval` (the last eval loss; `inf` if the run diverged), `diverged` (`None` or
        why it stopped), `evals` (`(step, training seconds so far, eval loss)` at step 0, every `eval_every` steps
        and after the last), `train_loss` (per completed step), `step_s` (seconds per step: batch, forward,
        backward, optimizer), `opt_s` (of the optimizer steps alone), `outlier_steps`, `train_seconds`;
        `metrics` when the task's `final_metrics` returns any.
    """
    plan = task.plan
    model = task.build(seed)
    model.train()
    opts = task.optimizers(model, spec, lr)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, task.schedule()) for o in opts]
    batches = task.batches(seed)
    outlier_steps, matrices = set(), []
    if noise is not None:
        draws = torch.rand(plan.steps, generator=_gen(2, seed))
        outlier_steps = {i + 1 for i in range(plan.steps) if draws[i] < noise.outlier_prob}
        matrices = [p for _, p in task.hidden_matrices(model)]
    evals = [(0, 0.0, task.initial_eval(model))]
    train_loss, step_s, opt_s = [], [], []
    elapsed, diverged = 0.0, None
    for step in range(1, plan.steps + 1):
        t0 = time.perf_counter()
        batch = next(batches)
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
        if step % plan.eval_every == 0 or step == plan.steps:
            ev = task.evaluate(model)
            evals.append((step, elapsed, ev))
            if log:
                print(f"      step {step:4d}  train {train_loss[-1]:.4f}  eval {ev:.4f}  {elapsed:6.1f}s", flush=True)
            if not math.isfinite(ev):
                diverged = f"non-finite eval loss at step {step}"
                break
    metrics = task.final_metrics(model) if diverged is None else {}
    return {
        **({"metrics": metrics} if metrics else {}),
        "final_eval": evals[-1][2] if diverged is None else float("inf"),
        "diverged": diverged,
        "evals": evals,
        "train_loss": train_loss,
        "step_s": step_s,
        "opt_s": opt_s,
        "outlier_steps": sorted(outlier_steps),
        "train_seconds": elapsed,
    }


# --------------------------------------------------------------------------------------------------------------------
# The run cache and the lr sweep
# --------------------------------------------------------------------------------------------------------------------


def run_key(task_key: dict[str, Any], spec_key: Any, lr: float, seed: int, variant: str = "clean") -> str:
    """The cache key of a run: a hash of what changes it (the task's description, the optimizer spec or what it
    computes, lr, seed, noise variant) and `CACHE_VERSION`."""
    payload = {"v": CACHE_VERSION, "task": task_key, "spec": spec_key, "variant": variant, "lr": lr, "seed": seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def grid_step(lr: float, up: bool) -> float:
    """The next learning rate of the 1-3-10 grid (..., 1e-3, 3e-3, 1e-2, ...) above (`up`) or below `lr`."""
    grid = [m * 10.0**e for e in range(-9, 3) for m in (1, 3)]
    return float(f"{(min(g for g in grid if g > lr * 1.01) if up else max(g for g in grid if g < lr / 1.01)):.3g}")


def _score(run: dict[str, Any]) -> float:
    return run["final_eval"] if math.isfinite(run["final_eval"]) else float("inf")


def best_lr(sweep: dict[float, dict[str, Any]]) -> float:
    """The lr of the lowest final eval loss (a diverged run counts as `inf`; ties: the smaller lr)."""
    return min(sweep, key=lambda lr: (_score(sweep[lr]), lr))


def sweep_lr(
    run: Callable[[float], dict[str, Any] | None],
    lrs: tuple[float, ...],
    max_extra: int = 0,
    lr_range: tuple[float, float] = (1e-9, 100.0),
) -> dict[float, dict[str, Any]]:
    """lr -> `run(lr)` over the grid `lrs`, extended one point of the 1-3-10 grid at a time past the edge where the
    best lr sits, up to `max_extra` points within `lr_range`. A one-point grid has no edge and is not extended;
    `run` returning `None` (a missing run in report-only mode, or one another worker is training) leaves its lr out,
    and the grid is not extended until every point of it has a run."""
    runs = {lr: run(lr) for lr in lrs}
    for _ in range(max_extra):
        done = {lr: r for lr, r in runs.items() if r is not None}
        grid = sorted(runs)
        if len(grid) < 2 or len(done) < len(runs) or best_lr(done) not in (grid[0], grid[-1]):
            break
        new = grid_step(grid[-1], up=True) if best_lr(done) == grid[-1] else grid_step(grid[0], up=False)
        if not lr_range[0] <= new <= lr_range[1]:
            break
        runs[new] = run(new)
    return {lr: r for lr, r in sorted(runs.items()) if r is not None}


def claim(path: Path) -> bool:
    """Claim the run `path` for this process (a `.claim` file created exclusively, holding host and pid), so that
    workers sharing a run cache never train the same run; False when another live process holds it. A claim left by
    a dead process of this host is taken over."""
    lock, me = path.with_suffix(".claim"), f"{socket.gethostname()} {os.getpid()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = lock.read_text().split()
            except (OSError, ValueError):  # being written or removed right now: treat as held
                return False
            if host != socket.gethostname() or _alive(int(pid)):
                return False
            lock.unlink(missing_ok=True)  # its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


def release(path: Path) -> None:
    """Drop this process's claim on the run `path` (`claim`)."""
    path.with_suffix(".claim").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class Study:
    """The runs of one task: loaded from the run cache, else trained (`train_run`) and cached.

    Runs are JSON files `directory/<run_key>.json`, written atomically (a temporary file, then `os.replace`), so an
    interrupted study resumes where it stopped; two names whose specs compute the same thing share one run. Several
    processes can walk the same study over one cache: each run is claimed (`claim`) before it trains, and a run
    another worker holds counts in `claimed_elsewhere` and reads as missing for this walk.

    Args:
        directory: the run cache folder (`None`: runs kept in memory only).
        key: what changes a run besides its spec, lr, seed and variant (data, model, budget, schedule; not the
            sweep plan: grid, seeds).
        make_task: builds the task on the first run to train (never called in report-only mode).
        report_only: a run that is not cached is `None` instead of trained.
        verbose: print the eval losses of a run as it trains.
        label: printed in front of every trained run.
    """

    def __init__(
        self,
        directory: Path | None,
        key: dict[str, Any],
        make_task: Callable[[], Task],
        *,
        report_only: bool = False,
        verbose: bool = False,
        label: str = "",
    ) -> None:
        self.dir, self.key, self._make_task = directory, key, make_task
        self.report_only, self.verbose, self.label = report_only, verbose, label
        self._task: Task | None = None
        self._memory: dict[str, dict[str, Any]] = {}
        self.runs: dict[tuple[str, str, float, int], dict[str, Any]] = {}  # (name, variant, lr, seed) -> run
        self.executed = 0
        self.claimed_elsewhere = 0  # runs this walk skipped because another worker had claimed them

    @property
    def task(self) -> Task:
        if self._task is None:
            self._task = self._make_task()
        return self._task

    def spec_key(self, spec: dict[str, Any]) -> Any:
        """What identifies a spec's computation in the cache key (default: the spec itself)."""
        return spec

    def noise(self, variant: str) -> Noise | None:
        """The noise injected in a run of `variant` (default: none)."""
        return None

    def get(self, name: str, spec: dict[str, Any], lr: float, seed: int, variant: str = "clean") -> dict | None:
        """The run of `spec` at `lr`, `seed` and `variant`: cached, else trained (`None` in report-only mode)."""
        spec_key = self.spec_key(spec)
        key = run_key(self.key, spec_key, lr, seed, variant)
        path = self.dir / f"{key}.json" if self.dir is not None else None
        run = self._memory.get(key)
        if run is None and path is not None and path.exists():
            run = json.loads(path.read_text())
        if run is None:
            if self.report_only:
                return None
            if path is not None:
                if not claim(path):  # another worker is training it
                    self.claimed_elsewhere += 1
                    return None
                try:
                    if path.exists():  # finished by another worker since the check above
                        run = json.loads(path.read_text())
                    else:
                        run = self._train(name, spec, spec_key, lr, seed, variant, path)
                finally:
                    release(path)
            else:
                run = self._train(name, spec, spec_key, lr, seed, variant, path)
        self._memory[key] = run
        self.runs[(name, variant, lr, seed)] = run
        return run

    def _train(
        self, name: str, spec: dict[str, Any], spec_key: Any, lr: float, seed: int, variant: str, path: Path | None
    ) -> dict[str, Any]:
        """Train one run, write it to `path` (atomically) and return it."""
        start = time.perf_counter()
        end = "\n" if self.verbose else ""
        print(f"  {self.label}{name:<22} {variant:<5} lr={lr:<7g} seed={seed}  ...", end=end, flush=True)
        run = train_run(self.task, spec, lr, seed, self.noise(variant), log=self.verbose)
        run.update(name=name, spec=spec, variant=variant, lr=lr, seed=seed, threads=torch.get_num_threads())
        run.update(load_average_1m=machine_dict()["load_average_1m"], date=time.strftime("%Y-%m-%d %H:%M"))
        if spec_key is not spec:
            run["behavior"] = spec_key
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(run, default=str))
            os.replace(tmp, path)
        self.executed += 1
        status = run["diverged"] or f"final eval {run['final_eval']:.4f}"
        print(f"  {status}  ({time.perf_counter() - start:.0f} s)", flush=True)
        return run

    def tune(
        self,
        name: str,
        spec: dict[str, Any],
        lrs: tuple[float, ...],
        seeds: tuple[int, ...],
        max_extra: int = 0,
        lr_range: tuple[float, float] = (1e-9, 100.0),
    ) -> dict[str, Any] | None:
        """The lr sweep (`sweep_lr`) at the first seed, then the best lr at every seed: `{"sweep": {lr: run},
        "best_lr": lr, "runs": [run per seed]}`, or `None` when no run of the sweep exists (report-only)."""
        sweep = sweep_lr(lambda lr: self.get(name, spec, lr, seeds[0]), lrs, max_extra, lr_range)
        if not sweep:
            return None
        best = best_lr(sweep)
        runs = [r for r in (self.get(name, spec, best, seed) for seed in seeds) if r is not None]
        return {"sweep": sweep, "best_lr": best, "runs": runs}


# --------------------------------------------------------------------------------------------------------------------
# The convergence study's runs: a run is keyed by what it computes, so equal computations share one file
# --------------------------------------------------------------------------------------------------------------------


def behavior(spec: dict[str, Any], shapes: list[tuple[int, int]]) -> dict[str, Any]:
    """What an optimizer spec computes on these matrix shapes (names resolved to per-shape schedules)."""
    if spec["kind"] != "root":
        return {"kind": spec["kind"]}
    out = {k: v for k, v in spec.items() if k != "ns_coefficients"}
    coef = spec.get("ns_coefficients", schedules.DEFAULT_SCHEDULE)
    out["schedules"] = {f"{m}x{n}": get_schedule(coef, (m, n), 5) for m, n in sorted(set(shapes))}
    return out


class SettingStudy(Study):
    """The runs of one convergence setting, kept by (name, variant, lr, seed) in `runs`."""

    def __init__(self, setting: Setting, results: Path, verbose: bool = False, report_only: bool = False) -> None:
        plan = ("seeds", "lrs", "ablation_seeds", "title", "variants", "max_extra_lrs")  # do not change a run
        key = {k: v for k, v in dataclasses.asdict(setting).items() if k not in plan}
        super().__init__(
            results / setting.name,
            key,
            lambda: TASKS[setting.name](setting),
            report_only=report_only,
            verbose=verbose,
            label=f"[{setting.name}] ",
        )
        self.setting = setting
        self._shapes: list[tuple[int, int]] | None = None
        self.task_description: dict[str, Any] = {}

    def shapes(self) -> list[tuple[int, int]]:
        if self._shapes is None:
            shape_file = self.dir / "shapes.json"
            if shape_file.exists():
                self._shapes = [tuple(s) for s in json.loads(shape_file.read_text())]
            else:
                model = self.task.build(0)
                self._shapes = [tuple(p.shape) for _, p in self.task.hidden_matrices(model)]
                shape_file.parent.mkdir(parents=True, exist_ok=True)
                shape_file.write_text(json.dumps(self._shapes))
        return self._shapes

    def spec_key(self, spec: dict[str, Any]) -> dict[str, Any]:
        return behavior(spec, self.shapes())

    def noise(self, variant: str) -> Noise | None:
        return noise_for(self.setting, variant)

    def best_lr(self, name: str, spec: dict[str, Any]) -> float | None:
        s = self.setting
        sweep = sweep_lr(lambda lr: self.get(name, spec, lr, s.seeds[0]), s.lrs, s.max_extra_lrs)
        return best_lr(sweep) if sweep else None

    def run_all(self, optimizers: tuple[str, ...], ablations: bool) -> dict[str, float]:
        """Train (or, in report-only mode, load) the study: 1. each optimizer's lr sweep at the first seed, 2. every
        seed at its best lr, 3. the noise variants at the same lr, 4. the ablations at ROOT's best lr. Returns the
        best lr of each optimizer."""
        s = self.setting
        specs = optimizer_specs()
        best = {name: self.best_lr(name, specs[name]) for name in optimizers}
        best = {name: lr for name, lr in best.items() if lr is not None}
        for variant in s.variants:  # "clean" first: every seed, then the robustness variants
            for name, lr in best.items():
                for seed in s.seeds:
                    self.get(name, specs[name], lr, seed, variant)
        abl = ablation_specs()
        lr = (best.get("ROOT") or self.best_lr("ROOT", specs["ROOT"])) if ablations and s.ablation_seeds else None
        if lr is not None:
            for group in ABLATION_GROUPS.values():
                for variant in group["variants"]:
                    for row in group["rows"]:
                        if row in abl:
                            for seed in s.ablation_seeds:
                                self.get(row, abl[row], lr, seed, variant)
        return best
