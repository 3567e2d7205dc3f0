"""Shared helpers for the benchmarks: machine description, timing, model shapes."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

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
