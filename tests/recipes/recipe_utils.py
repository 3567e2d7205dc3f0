"""Helpers for the recipe tests: the recipe module, a tiny random chat model folder and a local JSONL dataset.

Nothing here downloads: the tiny model's tokenizer is a byte-level BPE trained on the fly with a ChatML template, the
model is a random 2-layer Llama, and the data is synthetic question/answer pairs written to a JSONL file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
SFT = RECIPES / "sft.py"

NEEDED = ("transformers", "peft", "datasets", "trl", "tokenizers", "yaml")
_WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket", "garden", "silver", "window"]


def qa_rows(n: int = 48) -> list[dict[str, str]]:
    """Deterministic synthetic question/answer pairs (arithmetic and spelling)."""
    rows = []
    for i in range(n):
        if i % 2 == 0:
            a, b = i % 7 + 1, i % 5 + 2
            rows.append({"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}."})
        else:
            word = _WORDS[i % len(_WORDS)]
            rows.append({"question": f"Spell {word} backwards.", "answer": f"{word} backwards is {word[::-1]}."})
    return rows


def load_recipe() -> ModuleType:
    """Import recipes/sft.py as a module (recipes/ is not a package)."""
    if "recipes_sft" in sys.modules:
        return sys.modules["recipes_sft"]
    spec = importlib.util.spec_from_file_location("recipes_sft", SFT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["recipes_sft"] = module
    spec.loader.exec_module(module)
    return module


def build_tiny_chat_model(folder: Path) -> Path:
    """Save a random 2-layer Llama (hidden 32) with a byte-level BPE tokenizer and a ChatML template to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [f"user\n{r['question']} assistant\n{r['answer']} system\nYou are helpful." for r in qa_rows(200)]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    from recipes.assets import CHATML_TEMPLATE

    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def subprocess_env() -> dict[str, str]:
    """Environment of recipe subprocesses: offline, one thread per process (the CPU is shared), repo importable."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
