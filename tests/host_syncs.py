"""Count the calls that make the host wait for the device (a "host sync") inside a block of code.

On CUDA, `torch.cuda.set_sync_debug_mode("error")` finds them; on CPU nothing waits, so the tests count the calls that
*would* wait on an accelerator instead, through a `TorchFunctionMode` that sees every tensor method and torch function:

- a tensor turned into a Python value: `bool(t)` / `if t:`, `t.item()`, `t.tolist()`, `float(t)`, `int(t)`,
  `operator.index(t)`, `t.numpy()`, `torch.equal`, `torch.is_nonzero`;
- a copy to the host: `t.cpu()` and `t.to("cpu")` (counted for every tensor, also CPU ones, so that a CPU test
  catches what a GPU step would wait for), `t.to(device)` with a CPU `device` from a non-CPU tensor, and a blocking
  `host.copy_(t)` from a non-CPU tensor (`non_blocking=True` into pinned memory does not wait);
- an output whose shape depends on the data: `nonzero`, `argwhere`, `masked_select`, `unique`, indexing or assigning
  with a boolean mask.

Usage::

    with count_host_syncs() as syncs:
        opt.step()
    assert syncs.calls == [], syncs.report()
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Names as `func.__name__` reports them in `__torch_function__`.
_TO_PYTHON = {"__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy", "equal", "is_nonzero"}
_DATA_DEPENDENT_SHAPE = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}
_INDEXING = {"__getitem__", "__setitem__"}


def _is_to_host(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if name == "cpu":
        return True
    if name == "copy_":
        dst, src = args[0], args[1] if len(args) > 1 else kwargs.get("src")
        blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        return isinstance(src, torch.Tensor) and dst.device.type == "cpu" and src.device.type != "cpu" and blocking
    if name != "to":
        return False
    targets = [*list(args[1:]), kwargs.get("device")]
    source_on_host = isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"
    return any(
        (isinstance(t, str) and t.startswith("cpu"))  # an explicit host copy, whatever the source
        or (isinstance(t, torch.device) and t.type == "cpu" and not source_on_host)
        for t in targets
    )


def _has_bool_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@dataclass
class HostSyncs:
    """The host syncs seen: one `(name, where)` per call, `where` the innermost frame outside torch and this file."""

    calls: list[tuple[str, str]] = field(default_factory=list)

    def report(self) -> str:
        return "\n".join(f"{name} at {where}" for name, where in self.calls) or "no host syncs"


class _SyncCounter(TorchFunctionMode):
    def __init__(self, record: HostSyncs) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if (
            name in _TO_PYTHON
            or name in _DATA_DEPENDENT_SHAPE
            or _is_to_host(name, args, kwargs)
            or (name in _INDEXING and len(args) > 1 and _has_bool_mask(args[1]))
        ):
            self.record.calls.append((name, _caller()))
        return func(*args, **kwargs)


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("host_syncs.py"):
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "?"


class count_host_syncs:
    """Context manager: `with count_host_syncs() as syncs: ...`; then `syncs.calls` lists every host sync."""

    def __enter__(self) -> HostSyncs:
        self.record = HostSyncs()
        self.mode = _SyncCounter(self.record)
        self.mode.__enter__()
        return self.record

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)
