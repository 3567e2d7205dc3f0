"""Fixtures for the Hugging Face integration tests: tiny random Llama models, in-memory data, CPU TrainingArguments.

Nothing here downloads: the Hub is offline, models are built from a config and data lives in memory. The whole
directory is skipped when ``transformers`` is not installed (each module calls ``pytest.importorskip``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    _has_transformers = importlib.util.find_spec("transformers") is not None
except (ImportError, ValueError):
    _has_transformers = False
if not _has_transformers:
    collect_ignore_glob = ["test_*.py"]

VOCAB = 128
SEQ_LEN = 16


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and the CPU is shared: 2 threads on a busy machine are ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(tie_word_embeddings: bool = False, seed: int = 0, num_labels: int | None = None) -> Any:
    """A random 2-layer Llama (hidden 32, vocab 128): ~27k parameters. ``num_labels``: a sequence classifier."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    if num_labels is not None:
        config.num_labels = num_labels
        return LlamaForSequenceClassification(config)
    return LlamaForCausalLM(config)


@pytest.fixture
def make_model() -> Callable[..., Any]:
    """``make_model(tie_word_embeddings=False, seed=0, num_labels=None)``: see :func:`tiny_llama`."""
    return tiny_llama


@pytest.fixture
def lm_data() -> list[dict[str, torch.Tensor]]:
    """32 learnable sequences: counting upwards from a random start (mod vocab)."""
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, VOCAB, (32,), generator=g)
    seqs = [(int(s) + torch.arange(SEQ_LEN)) % VOCAB for s in starts]
    return [{"input_ids": s, "labels": s.clone()} for s in seqs]


@pytest.fixture
def make_args(tmp_path: Any) -> Callable[..., Any]:
    """``TrainingArguments`` for a short CPU run: no reporting, no saving, logs every step, fixed seed."""
    from transformers import TrainingArguments

    def make(**overrides: Any) -> Any:
        kwargs: dict[str, Any] = dict(
            output_dir=str(tmp_path / "out"),
            use_cpu=True,
            report_to="none",
            disable_tqdm=True,
            save_strategy="no",
            logging_steps=1,
            per_device_train_batch_size=4,
            max_steps=4,
            learning_rate=1e-2,
            seed=0,
            dataloader_num_workers=0,
        )
        kwargs.update(overrides)
        return TrainingArguments(**kwargs)

    return make


def tiny_tokenizer() -> Any:
    """A word-level tokenizer over ``t0 ... t124`` built in memory (TRL's trainers need a processing class)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i + 3 for i in range(VOCAB - 3)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture
def make_tokenizer() -> Callable[[], Any]:
    return tiny_tokenizer
