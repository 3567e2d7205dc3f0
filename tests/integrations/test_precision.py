"""ROOT under the stock Trainer with mixed precision (CPU): bf16 autocast, fp16 autocast, pure-bf16 models."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import root_hf  # noqa: F401  (registers optim="root")
from root_hf import ROOT


def _train(make_model, make_args, lm_data, model=None, **overrides):
    from transformers import Trainer

    model = model if model is not None else make_model()
    trainer = Trainer(model=model, args=make_args(optim="root", max_steps=6, **overrides), train_dataset=lm_data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, losses


def _states_are_float32(optimizer: ROOT) -> bool:
    return all(v.dtype == torch.float32 for s in optimizer.state.values() for k, v in s.items() if k != "step")


def test_bf16_autocast_trains_and_keeps_float32_state(make_model, make_args, lm_data):
    trainer, losses = _train(make_model, make_args, lm_data, bf16=True)
    assert losses[-1] < losses[0]
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(optimizer, ROOT) and _states_are_float32(optimizer)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_fp16_autocast_trains_or_is_refused_clearly(make_model, make_args, lm_data):
    """transformers may refuse fp16 without a GPU; if it runs, ROOT trains under its GradScaler."""
    try:
        trainer, losses = _train(make_model, make_args, lm_data, fp16=True)
    except ValueError as err:
        pytest.skip(f"transformers refuses fp16 here: {err}")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_pure_bf16_model_trains_with_float32_optimizer_state(make_model, make_args, lm_data):
    model = make_model().to(torch.bfloat16)
    trainer, losses = _train(make_model, make_args, lm_data, model=model)
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())
    assert _states_are_float32(optimizer)
