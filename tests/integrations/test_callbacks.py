"""ROOT's live diagnostics in the Trainer logs: every N steps, before the reporting callbacks, off when asked."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")

from transformers import Trainer, TrainerCallback

from root_hf import RootDiagnosticsCallback, RootTrainer, add_root_diagnostics

KEYS = ("root/clip_fraction", "root/eps_over_rms", "root/update_rms", "root/ortho_error", "adamw/update_rms")


class Reporter(TrainerCallback):
    """Stands in for TensorBoard / W&B: records what on_log hands it."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _steps_with_diagnostics(history: list[dict]) -> list[int]:
    return [h["step"] for h in history if "root/clip_fraction" in h]


@pytest.mark.parametrize(("every", "expected"), [(1, [1, 2, 3, 4]), (2, [2, 4]), (3, [3]), (0, [])])
def test_diagnostics_are_collected_every_n_steps(make_model, make_args, lm_data, every, expected):
    trainer = Trainer(model=make_model(), args=make_args(optim="root", max_steps=4), train_dataset=lm_data)
    add_root_diagnostics(trainer, every_n_steps=every)
    trainer.train()
    assert _steps_with_diagnostics(trainer.state.log_history) == expected
    for entry in trainer.state.log_history:
        if "root/clip_fraction" in entry:
            assert set(KEYS) <= set(entry)
            assert all(math.isfinite(entry[k]) for k in KEYS)
            assert 0 < entry["root/clip_fraction"] < 0.2  # about 1 - 0.90 of the entries exceed the 0.90 quantile
            assert entry["root/eps_over_rms"] > 0 and entry["root/update_rms"] > 0
            assert 0 <= entry["root/ortho_error"] < 1


def test_reporting_callbacks_receive_the_diagnostics(make_model, make_args, lm_data):
    reporter = Reporter()
    trainer = Trainer(
        model=make_model(), args=make_args(optim="root", max_steps=2), train_dataset=lm_data, callbacks=[reporter]
    )
    add_root_diagnostics(trainer, every_n_steps=1)
    trainer.train()
    assert all(set(KEYS) <= set(logs) for logs in reporter.logs if "loss" in logs)
    assert len([logs for logs in reporter.logs if "loss" in logs]) == 2


def test_default_interval_is_the_logging_interval(make_model, make_args, lm_data):
    trainer = RootTrainer(model=make_model(), args=make_args(max_steps=4, logging_steps=2), train_dataset=lm_data)
    trainer.train()
    assert _steps_with_diagnostics(trainer.state.log_history) == [2, 4]


def test_diagnostics_steps_in_optim_args_sets_the_interval_and_zero_turns_them_off(make_model, make_args, lm_data):
    every_3 = RootTrainer(
        model=make_model(), args=make_args(max_steps=3, optim_args="diagnostics_steps=3"), train_dataset=lm_data
    )
    every_3.train()
    assert _steps_with_diagnostics(every_3.state.log_history) == [3]
    off = RootTrainer(
        model=make_model(), args=make_args(max_steps=2, optim_args="diagnostics_steps=0"), train_dataset=lm_data
    )
    assert not any(isinstance(cb, RootDiagnosticsCallback) for cb in off.callback_handler.callbacks)
    off.train()
    assert _steps_with_diagnostics(off.state.log_history) == []


def test_add_root_diagnostics_is_idempotent_and_puts_the_callback_first(make_model, make_args, lm_data):
    trainer = Trainer(model=make_model(), args=make_args(optim="root"), train_dataset=lm_data)
    first = add_root_diagnostics(trainer)
    again = add_root_diagnostics(trainer, every_n_steps=5)
    callbacks = trainer.callback_handler.callbacks
    assert again is first and callbacks[0] is first and first.every_n_steps == 5
    assert sum(isinstance(cb, RootDiagnosticsCallback) for cb in callbacks) == 1


def test_root_trainer_puts_its_callback_before_the_reporters(make_model, make_args, lm_data):
    trainer = RootTrainer(model=make_model(), args=make_args(), train_dataset=lm_data, callbacks=[Reporter()])
    assert isinstance(trainer.callback_handler.callbacks[0], RootDiagnosticsCallback)


def test_callback_is_a_no_op_with_another_optimizer(make_model, make_args, lm_data):
    trainer = Trainer(
        model=make_model(),
        args=make_args(optim="adamw_torch", max_steps=2),
        train_dataset=lm_data,
        callbacks=[RootDiagnosticsCallback(1)],
    )
    trainer.train()
    assert _steps_with_diagnostics(trainer.state.log_history) == []


def test_collection_is_switched_off_after_the_collecting_step(make_model, make_args, lm_data):
    trainer = Trainer(model=make_model(), args=make_args(optim="root", max_steps=2), train_dataset=lm_data)
    add_root_diagnostics(trainer, every_n_steps=1)
    trainer.train()
    assert trainer.optimizer.optimizer.collect_diagnostics is False


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_invalid_interval_raises_value_error(bad):
    with pytest.raises(ValueError, match="every_n_steps"):
        RootDiagnosticsCallback(bad)
