r"""Per-parameter matrix views: which independent matrices ROOT orthogonalizes inside one parameter tensor.

ROOT's clip threshold, Newton-Schulz schedule and update scale are defined per matrix $W \in \mathbb{R}^{m \times n}$.
A parameter tensor holds one or several such matrices, described by two param-group keys:

- `matrix_view`: `"flatten"` (default) views a tensor as the single matrix `(shape[0], prod(shape[1:]))`: a linear
  weight `(out, in)` as itself, a convolution kernel `(out, in, kh, kw)` as `(out, in * kh * kw)`. `"batched"` views
  the last two dims as one `(out, in)` matrix and the leading dims as an index of independent matrices: a fused
  mixture-of-experts tensor `(E, out, in)` is `E` matrices, each with its own threshold, schedule and scale.
- `matrix_split`: `None` (default) or `[axis, [size, ...]]`: after the view, each matrix is cut along `axis` (0: rows,
  1: columns) into independent blocks of those sizes, which must sum to that dim. For fused projections: a
  `gate_up_proj` weight `(2 I, H)` is `[0, [I, I]]`; GPT-2's `Conv1D` `c_attn` weight `(H, 3 H)` is `[1, [H, H, H]]`.

State (`momentum_buffer`) keeps the parameter's own shape; only the clip, Newton-Schulz and the update scale work on
the views. Every tensor here is a view of the parameter's storage (no copies) when the tensor is contiguous.

Example:
    >>> v = param_view((8, 6, 4), "batched", [0, [2, 4]])
    >>> v.batch, v.matrix, [b.shape for b in v.blocks]
    (8, (6, 4), [(2, 4), (4, 4)])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "MATRIX_VIEWS",
    "Block",
    "MatrixView",
    "ParamView",
    "as_batch",
    "normalize_matrix_split",
    "normalize_matrix_view",
    "param_view",
]

MatrixView = Literal["flatten", "batched"]
MATRIX_VIEWS: tuple[str, ...] = ("flatten", "batched")


@dataclass(frozen=True)
class Block:
    """One independent matrix inside the `(M, N)` view: rows `rows`, columns `cols`, of shape `shape = (m, n)`."""

    rows: slice
    cols: slice
    shape: tuple[int, int]


@dataclass(frozen=True)
class ParamView:
    """How a parameter of a given shape splits into independent matrices.

    Attributes:
        batch: number of `(M, N)` matrices indexed by the leading dims (1 for `"flatten"`).
        matrix: `(M, N)`, the matrix before `matrix_split`.
        blocks: the blocks each of the `batch` matrices is cut into (one block covering it all without a split).
    """

    batch: int
    matrix: tuple[int, int]
    blocks: tuple[Block, ...]

    @property
    def num_matrices(self) -> int:
        """Number of independent matrices: `batch * len(blocks)`."""
        return self.batch * len(self.blocks)


def normalize_matrix_view(view: Any) -> str:
    """Validate `matrix_view`; return it.

    Raises:
        ValueError: if `view` is not one of `MATRIX_VIEWS`.
    """
    if not isinstance(view, str) or view not in MATRIX_VIEWS:
        raise ValueError(f"Invalid matrix_view: {view!r}. Must be one of {MATRIX_VIEWS}.")
    return view


def normalize_matrix_split(split: Any) -> list[Any] | None:
    """Validate `matrix_split`; return `None` or the plain list `[axis, [size, ...]]` (safe for `weights_only` loads).

    Raises:
        ValueError: unless `split` is `None` or a pair `(axis, sizes)` with `axis` in `(0, 1)` and `sizes` a non-empty
            sequence of positive integers.
    """
    if split is None:
        return None
    error = ValueError(
        f"Invalid matrix_split: {split!r}. Must be None or [axis, [size, ...]] with axis 0 (rows) or 1 (columns) "
        "and positive integer sizes that sum to that dim of the matrix view."
    )
    if isinstance(split, (str, bytes)) or not isinstance(split, Sequence) or len(split) != 2:
        raise error
    axis, sizes = split
    if isinstance(axis, bool) or axis not in (0, 1) or isinstance(sizes, (str, bytes)):
        raise error
    if not isinstance(sizes, Sequence) or len(sizes) == 0:
        raise error
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise error
    return [int(axis), [int(s) for s in sizes]]


def param_view(shape: Sequence[int], view: str = "flatten", split: Sequence[Any] | None = None) -> ParamView:
    """The independent matrices of a parameter of shape `shape` under `matrix_view` / `matrix_split`.

    Args:
        shape: the parameter's (global) shape, at least 2 dims.
        view: `"flatten"` or `"batched"`.
        split: `None` or `[axis, [size, ...]]`.

    Returns:
        The `ParamView`.

    Raises:
        ValueError: for fewer than 2 dims, an unknown view, or split sizes that do not sum to the split dim.
    """
    split = normalize_matrix_split(split)
    key = None if split is None else (split[0], tuple(split[1]))
    return _param_view(tuple(int(s) for s in shape), normalize_matrix_view(view), key)


@functools.lru_cache(maxsize=4096)
def _param_view(shape: tuple[int, ...], view: str, split: tuple[int, tuple[int, ...]] | None) -> ParamView:
    if len(shape) < 2:
        raise ValueError(f"Invalid shape {shape}: a matrix view needs at least 2 dims.")
    if view == "batched":
        batch, matrix = math.prod(shape[:-2]), (shape[-2], shape[-1])
    else:
        batch, matrix = 1, (shape[0], math.prod(shape[1:]))
    if split is None:
        return ParamView(batch, matrix, (Block(slice(None), slice(None), matrix),))
    axis, sizes = split
    if sum(sizes) != matrix[axis]:
        raise ValueError(
            f"Invalid matrix_split {[axis, list(sizes)]} for a parameter of shape {shape} (matrix_view={view!r}): "
            f"the sizes sum to {sum(sizes)}, but axis {axis} of its {matrix[0]} x {matrix[1]} matrix view has "
            f"{matrix[axis]} entries."
        )
    blocks, start = [], 0
    for size in sizes:
        cut = slice(start, start + size)
        if axis == 0:
            blocks.append(Block(cut, slice(None), (size, matrix[1])))
        else:
            blocks.append(Block(slice(None), cut, (matrix[0], size)))
        start += size
    return ParamView(batch, matrix, tuple(blocks))


def as_batch(t: torch.Tensor, pv: ParamView) -> torch.Tensor:
    """`t` as a `(batch, M, N)` tensor: a view of its storage when possible, else a copy (only read from then)."""
    return t.reshape(pv.batch, *pv.matrix)
