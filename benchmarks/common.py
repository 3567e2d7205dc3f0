"""Shared helpers for the benchmarks: machine description, timing, model shapes."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

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
    """Median wall time of ``fn()`` in seconds over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def llama_ratio_shapes(hidden: int, head_dim: int = 64) -> dict[str, int]:
    """Llama-style layer dims for a hidden size: ``intermediate = 64 * round(8 hidden / 3 / 64)``, heads of
    ``head_dim``, grouped-query KV heads (``heads / 3`` when divisible, as SmolLM2, else ``heads / 4``)."""
    heads = max(1, hidden // head_dim)
    kv_heads = heads // 3 if heads % 3 == 0 else max(1, heads // 4)
    intermediate = 64 * round(8 * hidden / 3 / 64)
    return {"hidden": hidden, "intermediate": intermediate, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}


def ns_flops(shape: tuple[int, int], ns_steps: int = 5) -> int:
    """Multiply-add FLOPs (2 per MAC) of ``ns_steps`` quintic Newton-Schulz steps on one ``m x n`` matrix.

    With ``s = min(m, n)`` and ``l = max(m, n)`` each step computes the Gram matrix ``A = X X^T`` (``2 s^2 l``),
    ``b A + c A^2`` (``2 s^3``) and ``(b A + c A^2) X`` (``2 s^2 l``): ``2 s^2 (2 l + s)`` per step. The
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
    """Median wall time (seconds) of each ``fn`` with the calls interleaved round-robin.

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
    """A question/answer pair as SmolLM2's ChatML without a system prompt: (input ids, labels), labels -100 on the
    prompt so that the loss is the answer's only, both cut to ``max_len`` tokens."""
    prompt = tokenizer(f"<|im_start|>user\n{row['question']}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    answer = tokenizer(f"{row['answer']}<|im_end|>")["input_ids"]
    return (prompt + answer)[:max_len], ([-100] * len(prompt) + answer)[:max_len]
