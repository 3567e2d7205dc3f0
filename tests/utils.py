"""Helpers shared by the tests."""

import functools
import re
from pathlib import Path
from typing import Any

import torch

# Bitwise equality, with torch's readable mismatch report (Emerging-Optimizers' convention).
assert_equal = functools.partial(torch.testing.assert_close, rtol=0, atol=0)


def clone_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def matrix_with_singular_values(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """An ``m x n`` float64 matrix with the given singular values (``len(s) == min(m, n)``)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (u * s.to(torch.float64)) @ v.T


def run_markdown_examples(path: Path, min_blocks: int = 1) -> dict[str, Any]:
    """Run every ```python block of the Markdown file ``path``, in order, in one namespace; return the namespace."""
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert len(blocks) >= min_blocks, f"{path}: {len(blocks)} python blocks, expected at least {min_blocks}"
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, str(path), "exec"), namespace)
    return namespace
