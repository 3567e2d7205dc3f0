"""PEFT adapters trained with ROOT: routing of LoRA/DoRA/modules_to_save, LoRA policies, the B = 0 first step,
frozen base weights, create_root_optimizer with Trainer, saving, reloading and resuming."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers import Trainer  # noqa: E402

from root_hf import ROOT, create_root_optimizer, route_parameters  # noqa: E402
from root_hf.optim.functional import adjusted_lr_ratio  # noqa: E402
from root_hf.schedules import DEFAULT_SCHEDULE, get_schedule, schedule_band  # noqa: E402
from tests.utils import run_markdown_examples  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA = 4, 8
assert_equal = functools.partial(torch.testing.assert_close, rtol=0, atol=0)


def lora_model(make_model, seed: int = 0, base_seed: int = 0, **config):
    """A tiny random Llama with LoRA (r=4, alpha=8) on all seven projections, adapters initialized from ``seed``."""
    base = make_model(seed=base_seed)
    torch.manual_seed(seed)
    config.setdefault("target_modules", list(HIDDEN))
    return peft.get_peft_model(base, peft.LoraConfig(r=R, lora_alpha=ALPHA, **config))


def _unwrap(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def _branches(optimizer):
    """id(param) -> "root" / "adamw", from the optimizer's groups."""
    return {id(p): "root" if g["use_root"] else "adamw" for g in optimizer.param_groups for p in g["params"]}


def _q_proj(model):
    return model.get_base_model().model.layers[0].self_attn.q_proj


# --------------------------------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------------------------------

# policy -> branch of (lora_A, lora_B); everything PEFT adds besides the factors always takes the AdamW branch.
POLICY_TABLE = {"both": ("root", "root"), "b_only": ("adamw", "root"), "none": ("adamw", "adamw")}


@pytest.mark.parametrize("policy", list(POLICY_TABLE))
def test_routing_table_of_lora_dora_and_modules_to_save_per_policy(make_model, policy):
    model = lora_model(
        make_model,
        target_modules=[*HIDDEN, "embed_tokens"],
        use_dora=True,
        modules_to_save=["lm_head"],
    )
    routing = route_parameters(model, lora_policy=policy)
    a_branch, b_branch = POLICY_TABLE[policy]
    expected_by_pattern = [  # (regex on the name, role, branch); every trainable parameter matches exactly one
        (r"\.lora_A\.default\.weight$", "lora_A", a_branch),
        (r"\.lora_B\.default\.weight$", "lora_B", b_branch),
        (r"\.lora_embedding_[AB]\.default$", "lora_embedding", "adamw"),
        (r"\.lora_magnitude_vector\.default\.weight$", "dora_magnitude", "adamw"),
        (r"lm_head\.modules_to_save\.default\.weight$", "modules_to_save", "adamw"),
    ]
    counts = dict.fromkeys([role for _, role, _ in expected_by_pattern], 0)
    for r in routing.params:
        matches = [(role, branch) for pattern, role, branch in expected_by_pattern if re.search(pattern, r.name)]
        assert matches == [(r.role, r.branch)], r.name
        counts[r.role] += 1
    layers = 2
    assert counts == {
        "lora_A": 7 * layers,  # q, k, v, o, gate, up, down in each layer
        "lora_B": 7 * layers,
        "lora_embedding": 2,
        "dora_magnitude": 7 * layers + 1,  # DoRA also scales the adapted embedding
        "modules_to_save": 1,
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {r.name for r in routing.params} == trainable
    assert set(routing.frozen) == {n for n, _ in model.named_parameters()} - trainable
    assert all(
        ".base_layer." in n or "original_module" in n or "embed_tokens" in n or "norm" in n for n in routing.frozen
    )
    assert routing.summary().endswith(f"lora_policy={policy!r}")  # always named when the model has LoRA factors


def test_invalid_lora_policy_raises_value_error_naming_the_accepted_ones(make_model):
    with pytest.raises(ValueError, match=r"Invalid lora_policy: 'a_only'.*'both', 'b_only', 'none'"):
        route_parameters(lora_model(make_model), lora_policy="a_only")
    with pytest.raises(ValueError, match=r"Invalid lora_adjust_lr_fn: 'spectral'.*'inherit'"):
        create_root_optimizer(lora_model(make_model), lora_adjust_lr_fn="spectral")


def test_lora_policy_also_applies_after_target_modules(make_model):
    routing = route_parameters(lora_model(make_model), target_modules="all-linear", lora_policy="b_only")
    assert {r.role for r in routing.branch("root")} == {"lora_B"}
    assert {r.role for r in routing.branch("adamw")} == {"lora_A"}


# --------------------------------------------------------------------------------------------------------------------
# Training with the stock Trainer and with create_root_optimizer
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(POLICY_TABLE))
def test_stock_trainer_optim_root_trains_adapters_and_leaves_base_weights_bitwise_unchanged(
    make_model, make_args, lm_data, policy
):
    model = lora_model(make_model, modules_to_save=["lm_head"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = make_args(optim="root", optim_args=f"lora_policy={policy}", max_steps=3, weight_decay=0.1)
    trainer = Trainer(model=model, args=args, train_dataset=lm_data)
    trainer.train()

    optimizer = _unwrap(trainer.optimizer)
    assert isinstance(optimizer, ROOT)
    branch = _branches(optimizer)
    a_branch, b_branch = POLICY_TABLE[policy]
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen base weights: no group, no state, not a bit changed
            assert id(p) not in branch and p not in optimizer.state, name
            assert_equal(p, before[name], msg=name)
            continue
        assert torch.isfinite(p).all() and not torch.equal(p, before[name]), f"{name} did not change"
        expected = a_branch if ".lora_A." in name else b_branch if ".lora_B." in name else "adamw"
        assert branch[id(p)] == expected, name
        state_keys = set(optimizer.state[p])
        assert state_keys == ({"momentum_buffer"} if expected == "root" else {"step", "exp_avg", "exp_avg_sq"}), name


def test_create_root_optimizer_on_a_peft_model_works_as_trainer_optimizers(make_model, make_args, lm_data):
    model = lora_model(make_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = create_root_optimizer(model, lr=3e-3, weight_decay=0.0, lora_policy="b_only")
    assert "lora_policy='b_only'" in optimizer.routing_summary
    trainer = Trainer(model=model, args=make_args(max_steps=3), train_dataset=lm_data, optimizers=(optimizer, None))
    trainer.train()
    assert _unwrap(trainer.optimizer) is optimizer
    assert {g["initial_lr"] for g in optimizer.param_groups} == {3e-3}  # Trainer's scheduler wraps it as given
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), name
        else:
            assert_equal(p, before[name], msg=name)


def test_lora_adjust_lr_fn_sets_the_update_scale_of_the_lora_groups_only(make_model):
    model = lora_model(make_model, modules_to_save=["lm_head"])
    optimizer = create_root_optimizer(model, lr=1e-3, weight_decay=0.0, lora_adjust_lr_fn="original")
    for group in optimizer.param_groups:
        if group["use_root"]:
            assert group["adjust_lr_fn"] == "original"
        else:
            assert group["adjust_lr_fn"] == "match_rms_adamw"  # the optimizer's default: unused by AdamW anyway
    inherit = create_root_optimizer(lora_model(make_model), lr=1e-3, adjust_lr_fn=None)
    assert {g["adjust_lr_fn"] for g in inherit.param_groups} == {None}
    # "original" gives lora_B (out x r) sqrt(out / r) and lora_A (r x in) 1: the first B step has that spectral norm
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    b = _q_proj(model).lora_B.default.weight.detach()
    expected = 1e-3 * adjusted_lr_ratio("original", b.shape)
    assert math.isclose(float(torch.linalg.matrix_norm(b, 2)), expected, rel_tol=1e-3)


def test_lora_optim_args_are_parsed_and_reach_the_optimizer(make_model, make_args):
    args = make_args(optim="root", optim_args="lora_policy=none,lora_adjust_lr_fn=none")
    optimizer = create_root_optimizer(lora_model(make_model), args)
    assert all(not g["use_root"] for g in optimizer.param_groups)  # "none": no factor left on the ROOT branch
    args = make_args(optim="root", optim_args="lora_adjust_lr_fn=none")
    optimizer = create_root_optimizer(lora_model(make_model), args)
    assert {g["adjust_lr_fn"] for g in optimizer.param_groups if g["use_root"]} == {None}


# --------------------------------------------------------------------------------------------------------------------
# The first step: B = 0
# --------------------------------------------------------------------------------------------------------------------


def _first_step(make_model, optimizer_fn, **lora_config):
    """One step from PEFT's initialization; returns (model, q_proj input, q_proj output before, after, A before)."""
    model = lora_model(make_model, **lora_config)
    q = _q_proj(model)
    seen = {}
    handle = q.register_forward_hook(lambda module, inputs, output: seen.__setitem__("x", inputs[0].detach()))
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x).loss.backward()
    handle.remove()
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    with torch.no_grad():
        y_before = q(seen["x"])
    optimizer = optimizer_fn(model)
    optimizer.step()
    with torch.no_grad():
        y_after = q(seen["x"])
    return model, optimizer, seen["x"], y_before, y_after, a_before


@pytest.mark.parametrize("policy", ["both", "b_only"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_b_zero_first_step_leaves_a_exactly_unchanged_and_is_finite(make_model, policy, use_dora):
    def make(model):
        return create_root_optimizer(model, lr=1e-2, weight_decay=0.0, lora_policy=policy)

    model, optimizer, *_, a_before = _first_step(make_model, make, use_dora=use_dora)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert torch.isfinite(p).all(), name
        if ".lora_A." in name:
            assert_equal(p.grad, torch.zeros_like(p), msg=name)  # B = 0: A's gradient is exactly zero
            assert_equal(p, a_before[name], msg=name)  # and so is its update, on either branch
            state = optimizer.state[p]
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                if key in state:
                    assert_equal(state[key], torch.zeros_like(p), msg=f"{name} {key}")
        elif ".lora_B." in name:
            assert p.abs().sum() > 0, name


def test_lora_b_zero_first_step_with_weight_decay_only_decays_a(make_model):
    lr, wd = 1e-2, 0.1
    model, *_, a_before = _first_step(make_model, lambda m: create_root_optimizer(m, lr=lr, weight_decay=wd))
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            assert_equal(p, a_before[name] * (1 - lr * wd), msg=name)


def test_first_step_bounds_the_change_of_the_adapted_layer_output(make_model):
    """B's first update is an orthogonalized (r singular values at most the schedule's band) matrix scaled by
    lr * 0.2 sqrt(out): whatever the gradient's size, ``||dB||_2 <= lr * 0.2 sqrt(out) * band``, so the output of the
    adapted layer moves by at most ``(alpha / r) * ||dB||_2 * ||A x||``. At ROOT's default lr (1e-3) the q_proj
    output of this model moves by under 1%, over four times less than with AdamW's first step (lr * sign(g))."""
    lr = 1e-3  # ROOT's default
    model, _, x, y0, y1, _ = _first_step(make_model, lambda m: create_root_optimizer(m, lr=lr, weight_decay=0.0))
    q = _q_proj(model)
    b, a = q.lora_B.default.weight.detach(), q.lora_A.default.weight.detach()
    band = schedule_band(get_schedule(DEFAULT_SCHEDULE, b.shape, 5))[1]
    spectral_bound = lr * adjusted_lr_ratio("match_rms_adamw", b.shape) * band
    # the band is exact arithmetic; the default NS dtype is bf16 on CUDA and on bf16-native CPUs (rounding 2**-8)
    assert float(torch.linalg.matrix_norm(b, 2)) <= spectral_bound * (1 + 2**-7)
    dy = (y1 - y0).flatten(0, -2)
    ax = x.flatten(0, -2) @ a.T
    assert float(dy.norm()) <= (ALPHA / R) * spectral_bound * float(ax.norm()) * (1 + 1e-5)
    relative_root = float(dy.norm() / y0.norm())
    assert 0 < relative_root < 0.01

    adamw = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)
    *_, z0, z1, _ = _first_step(make_model, lambda m: adamw([p for p in m.parameters() if p.requires_grad]))
    relative_adamw = float((z1 - z0).norm() / z0.norm())
    assert relative_root < relative_adamw / 4


def test_warmup_makes_the_first_step_a_no_op_and_scales_the_first_b_update(make_model, make_args, lm_data):
    """Trainer's linear warm-up starts at lr 0: step 1 changes nothing (its gradient still enters B's momentum), and
    B's first real update (step 2) has spectral norm lr / warmup_steps * 0.2 sqrt(out) at most."""
    lr, warmup = 1e-2, 4
    model = lora_model(make_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = make_args(optim="root", learning_rate=lr, warmup_steps=warmup, max_steps=1, weight_decay=0.0)
    Trainer(model=model, args=args, train_dataset=lm_data).train()
    for name, p in model.named_parameters():
        assert_equal(p, before[name], msg=name)

    model = lora_model(make_model)
    args = make_args(optim="root", learning_rate=lr, warmup_steps=warmup, max_steps=2, weight_decay=0.0)
    Trainer(model=model, args=args, train_dataset=lm_data).train()
    b = _q_proj(model).lora_B.default.weight.detach()
    band = schedule_band(get_schedule(DEFAULT_SCHEDULE, b.shape, 5))[1]
    bound = lr / warmup * adjusted_lr_ratio("match_rms_adamw", b.shape) * band
    # the band is exact arithmetic; the default NS dtype is bf16 on CUDA and on bf16-native CPUs (rounding 2**-8)
    assert 0 < float(torch.linalg.matrix_norm(b, 2)) <= bound * (1 + 2**-7)


# --------------------------------------------------------------------------------------------------------------------
# Saving, reloading, resuming
# --------------------------------------------------------------------------------------------------------------------


def test_saved_adapter_and_optimizer_state_reload_and_continue_bitwise_identically(make_model, tmp_path):
    data = [torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(5)]

    def step(model, optimizer, x):
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model = lora_model(make_model, modules_to_save=["lm_head"])
    optimizer = create_root_optimizer(model, lr=1e-2, weight_decay=0.1)
    for x in data[:3]:
        step(model, optimizer, x)
    model.save_pretrained(tmp_path / "adapter")
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    for x in data[3:]:
        step(model, optimizer, x)

    base = make_model(seed=0)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    reloaded_optimizer = create_root_optimizer(reloaded, lr=1e-2, weight_decay=0.1)
    reloaded_optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    for x in data[3:]:
        step(reloaded, reloaded_optimizer, x)
    expected = dict(model.named_parameters())
    for name, p in reloaded.named_parameters():
        assert_equal(p, expected[name], msg=name)


def test_resume_from_checkpoint_with_lora_is_bitwise_identical(make_model, make_args, lm_data, tmp_path):
    common = dict(
        optim="root",
        optim_args="lora_policy=b_only",  # both branches hold LoRA state
        max_steps=6,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=3,
        lr_scheduler_type="linear",
        warmup_steps=1,
        weight_decay=0.1,
    )

    def build():  # the same frozen base and adapter initialization in every process that trains
        return lora_model(make_model, base_seed=1, modules_to_save=["lm_head"])

    full = build()
    uninterrupted = Trainer(
        model=full, args=make_args(output_dir=str(tmp_path / "a"), **common), train_dataset=lm_data
    )
    uninterrupted.train()

    class StopAtStep3(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    args_b = make_args(output_dir=str(tmp_path / "b"), **common)
    first = Trainer(model=build(), args=args_b, train_dataset=lm_data, callbacks=[StopAtStep3()])
    first.train()
    checkpoint = tmp_path / "b" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # adapters only: the base is not saved

    resumed_model = lora_model(make_model, seed=5, base_seed=1, modules_to_save=["lm_head"])  # adapters: from disk
    resumed = Trainer(model=resumed_model, args=args_b, train_dataset=lm_data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, p), q in zip(full.named_parameters(), resumed_model.parameters(), strict=True):
        assert_equal(p, q, msg=name)
    state_a = _unwrap(uninterrupted.optimizer).state_dict()["state"]
    state_b = _unwrap(resumed.optimizer).state_dict()["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for index, entry in state_a.items():
        for key, value in entry.items():
            assert_equal(value, state_b[index][key], msg=f"{index} {key}")


# --------------------------------------------------------------------------------------------------------------------
# The guide
# --------------------------------------------------------------------------------------------------------------------


def test_peft_guide_examples_run():
    """Every ```python block of docs/guides/peft.md runs, in order, in one namespace."""
    run_markdown_examples(REPO / "docs" / "guides" / "peft.md", min_blocks=4)
