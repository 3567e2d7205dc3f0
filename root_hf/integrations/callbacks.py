"""ROOT's live diagnostics in the `Trainer` logs (and so in TensorBoard / W&B / trackio when they are enabled).

Every `N` optimizer steps `RootDiagnosticsCallback` asks `root_hf.ROOT` to collect statistics during that one step
(`collect_diagnostics`; costs one extra Gram matrix per shape group, nothing on the other steps) and adds them to the
next training log line, averaged over the matrices of each branch:

| key | meaning |
|---|---|
| `root/clip_fraction` | fraction of momentum entries above the quantile threshold (clipped) |
| `root/eps_over_rms` | the threshold eps relative to the RMS of the momentum direction |
| `root/update_rms` | RMS of the ROOT branch's update (lr x scale x NS output) |
| `root/ortho_error` | `norm_F(X X^T - I) / sqrt(min(m, n))` of the Newton-Schulz output X (0 = orthogonal) |
| `adamw/update_rms` | RMS of the AdamW branch's update |

Under a DDP owner split or FSDP2 the means cover the matrices of every rank. With the stock `Trainer` (or TRL's),
`optim_args="diagnostics_steps=N"` attaches the callback by itself (see `attach_root_diagnostics`).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..optim.root import ROOT

__all__ = ["RootDiagnosticsCallback", "add_root_diagnostics"]


def _find_root(optimizer: Any) -> ROOT | None:
    """The `ROOT` inside `optimizer` (unwraps accelerate's `AcceleratedOptimizer` and similar)."""
    for _ in range(8):
        if isinstance(optimizer, ROOT):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return None
    return None


def _validate_steps(every_n_steps: Any) -> int | None:
    if every_n_steps is None:
        return None
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
        raise ValueError(f"Invalid every_n_steps: {every_n_steps!r}. Must be None (logging_steps) or an integer >= 0.")
    return every_n_steps


class RootDiagnosticsCallback(TrainerCallback):
    """Adds ROOT's diagnostics (see the module docstring) to the `Trainer`'s training logs.

    Args:
        every_n_steps: collect every this many optimizer steps; `0` turns collection off. Default (None): the
            optimizer's `diagnostics_steps` (the `optim_args` key) if set, else the `Trainer`'s logging steps.

    Reporting integrations (TensorBoard, W&B, trackio) see the values only if this callback runs before them: use
    `add_root_diagnostics` (which puts it first) or `root_hf.RootTrainer` (which does that itself),
    rather than `Trainer(callbacks=[...])` (which appends it last: then only `state.log_history` / the printed logs
    get the values). Does nothing when the optimizer is not ROOT.

    Example:
        >>> import tempfile, torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
        >>> data = [{"input_ids": torch.arange(16) % 128, "labels": torch.arange(16) % 128}] * 8
        >>> args = TrainingArguments(tempfile.mkdtemp(), optim="root", max_steps=2, per_device_train_batch_size=4,
        ...                          use_cpu=True, report_to="none", logging_steps=1)
        >>> trainer = Trainer(model=model, args=args, train_dataset=data)
        >>> _ = add_root_diagnostics(trainer, every_n_steps=2)
        >>> _ = trainer.train()  # doctest: +ELLIPSIS
        {'loss': ...}
        >>> ["root/ortho_error" in log for log in trainer.state.log_history[:2]]
        [False, True]
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = _validate_steps(every_n_steps)
        self._pending: dict[str, float] = {}

    def _interval(self, state: TrainerState, optimizer: ROOT) -> int:
        if self.every_n_steps is not None:
            return self.every_n_steps
        steps = getattr(optimizer, "diagnostics_steps", None)
        if steps is not None:
            return steps
        return max(1, int(state.logging_steps or 1))

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        optimizer = _find_root(kwargs.get("optimizer"))
        if optimizer is None:
            return
        interval = self._interval(state, optimizer)
        optimizer.collect_diagnostics = interval > 0 and (state.global_step + 1) % interval == 0
        if optimizer.collect_diagnostics:
            optimizer.last_diagnostics = {}

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        optimizer = _find_root(kwargs.get("optimizer"))
        if optimizer is None or not optimizer.collect_diagnostics:
            return
        optimizer.collect_diagnostics = False
        self._pending = dict(optimizer.last_diagnostics)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self._pending or logs is None or "loss" not in logs:
            return  # only training-step logs, not evaluation or the final summary
        logs.update(self._pending)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last.update(self._pending)  # Trainer.log appends its copy to log_history before on_log
        self._pending = {}


def add_root_diagnostics(trainer: Any, every_n_steps: int | None = None) -> RootDiagnosticsCallback:
    """Put a `RootDiagnosticsCallback` first in `trainer`'s callbacks (before the reporting integrations).

    Idempotent: an existing one is moved first and given `every_n_steps` if that is not None. Use it with the stock
    `Trainer` or TRL trainers and `optim="root"`; `root_hf.RootTrainer` does it itself.

    Returns:
        The callback.
    """
    every_n_steps = _validate_steps(every_n_steps)
    callbacks = trainer.callback_handler.callbacks
    existing = [cb for cb in callbacks if isinstance(cb, RootDiagnosticsCallback)]
    callback = existing[0] if existing else RootDiagnosticsCallback(every_n_steps)
    if existing and every_n_steps is not None:
        callback.every_n_steps = every_n_steps
    for cb in existing:
        callbacks.remove(cb)
    callbacks.insert(0, callback)
    return callback
