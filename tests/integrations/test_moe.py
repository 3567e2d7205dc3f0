"""Mixture-of-experts and other non-plain parameters: routing roles, matrix views, per-expert ROOT, PEFT on experts."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import transformers
from transformers import Trainer

import root_hf  # noqa: F401  (registers optim="root")
from root_hf import ROOT, route_parameters

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
E = 4  # experts

# family -> (config class, model class, config overrides, (gate_up layout of one expert, down layout), split axis)
MOE_FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(moe_intermediate_size=16, num_experts=E), 0),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=16, num_local_experts=E), 0),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=16, num_experts=E), 0),
    # GPT-OSS: transposed (E, in, out) and interleaved gate/up: no contiguous split
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(intermediate_size=16, num_local_experts=E, head_dim=8, layer_types=["full_attention"] * 2),
        None,
    ),
}
ROUTER = {"qwen3_moe": "mlp.gate", "mixtral": "mlp.gate", "olmoe": "mlp.gate", "gpt_oss": "mlp.router"}


def tiny_moe(family: str, seed: int = 0) -> nn.Module:
    config_cls, model_cls, extra, _ = MOE_FAMILIES[family]
    config = getattr(transformers, config_cls)(
        **SMALL, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra
    )
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config)


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_moe_routing_table_experts_batched_router_and_expert_biases_on_adamw(family):
    model = tiny_moe(family)
    table = route_parameters(model).table()
    axis = MOE_FAMILIES[family][3]
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp"
        gate_up = model.get_parameter(f"{prefix}.experts.gate_up_proj")
        half = gate_up.shape[1 + axis] // 2 if axis is not None else None
        expected_split = None if axis is None else (axis, (half, half))
        assert table.pop(f"{prefix}.experts.gate_up_proj") == ("expert_matrix", "root", "batched", expected_split)
        assert table.pop(f"{prefix}.experts.down_proj") == ("expert_matrix", "root", "batched", None)
        assert table.pop(f"{ROUTER[family]}.weight".replace("mlp", prefix)) == ("router", "adamw", "flatten", None)
        if family == "gpt_oss":
            for bias in ("gate_up_proj_bias", "down_proj_bias"):
                assert table.pop(f"{prefix}.experts.{bias}") == ("expert_bias", "adamw", "flatten", None)
    # everything else keeps the dense-model roles
    roles = {name: role for name, (role, *_rest) in table.items()}
    assert set(roles.values()) <= {"hidden_matrix", "embedding", "lm_head", "norm", "bias", "vector"}
    assert all(name.endswith(("_proj.weight",)) for name, role in roles.items() if role == "hidden_matrix")


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_param_groups_carry_the_views_and_expert_biases_never_decay(family):
    model = tiny_moe(family)
    decay_all = [n for n, _ in model.named_parameters()]  # even when the caller asks, expert biases do not decay
    groups = route_parameters(model, decay_parameter_names=decay_all).param_groups(weight_decay=0.1)
    by_id = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        group = by_id[id(p)]
        if name.endswith(("gate_up_proj", "down_proj")):
            assert group["use_root"] and group["matrix_view"] == "batched", name
        elif name.endswith("_bias"):
            assert not group["use_root"] and group["weight_decay"] == 0.0, name
        elif group["use_root"]:
            assert (group["matrix_view"], group["matrix_split"]) == ("flatten", None), name
    for group in groups:  # plain data only: survives torch.save / torch.load(weights_only=True)
        assert all(isinstance(v, (bool, int, float, str, list, type(None))) for k, v in group.items() if k != "params")


def test_router_branch_and_fused_projections_options(make_model):
    model = tiny_moe("qwen3_moe")
    table = route_parameters(model, router_branch="root", fused_projections="whole").table()
    assert table["model.layers.0.mlp.gate.weight"] == ("router", "root", "flatten", None)
    assert table["model.layers.0.mlp.experts.gate_up_proj"] == ("expert_matrix", "root", "batched", None)
    summary = route_parameters(model).summary()
    assert "views: batched 4, split 2 (fused_projections='split')" in summary
    assert "router_branch='adamw'" in summary
    for bad in ({"router_branch": "sgd"}, {"fused_projections": "halves"}):
        with pytest.raises(ValueError, match=f"Invalid {next(iter(bad))}: .* Must be one of"):
            route_parameters(model, **bad)


def test_fused_dense_projections_are_split_into_their_logical_blocks():
    phi3 = transformers.Phi3ForCausalLM(
        transformers.Phi3Config(**SMALL, intermediate_size=48, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    )
    table = route_parameters(phi3).table()
    # q: 4 heads x 8, k and v: 2 kv heads x 8; gate_up: (2 x 48, 32) halves
    assert table["model.layers.0.self_attn.qkv_proj.weight"] == ("hidden_matrix", "root", "flatten", (0, (32, 16, 16)))
    assert table["model.layers.0.mlp.gate_up_proj.weight"] == ("hidden_matrix", "root", "flatten", (0, (48, 48)))
    assert table["model.layers.0.mlp.down_proj.weight"][3] is None
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=128))
    table = route_parameters(gpt2).table()
    # Conv1D weight is (in, 3 * out): q, k, v are column blocks
    assert table["transformer.h.0.attn.c_attn.weight"] == ("hidden_matrix", "root", "flatten", (1, (32, 32, 32)))
    assert table["transformer.h.0.mlp.c_fc.weight"] == ("hidden_matrix", "root", "flatten", None)
    whole = route_parameters(gpt2, fused_projections="whole").table()
    assert all(split is None for *_rest, split in whole.values())


def test_depthwise_conv_goes_to_adamw_and_dense_conv_stays_on_root_with_the_flatten_view():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.depthwise = nn.Conv1d(8, 8, 4, groups=8)  # Mamba's conv1d: (C, 1, K)
            self.pointwise = nn.Conv1d(8, 16, 1)
            self.dense = nn.Conv2d(3, 8, 3)
            self.grouped = nn.Conv1d(8, 8, 3, groups=2)  # (8, 4, 3): not depthwise

    table = route_parameters(Net()).table()
    assert table["depthwise.weight"] == ("depthwise_conv", "adamw", "flatten", None)
    assert table["pointwise.weight"] == ("hidden_matrix", "root", "flatten", None)
    assert table["dense.weight"] == ("hidden_matrix", "root", "flatten", None)
    assert table["grouped.weight"] == ("hidden_matrix", "root", "flatten", None)


def test_dense_conv2d_step_is_unchanged_by_routing():
    """A Conv2d on the ROOT branch through route_parameters steps exactly as a plain ROOT(params) (flatten view)."""
    torch.manual_seed(0)
    a, b = nn.Conv2d(3, 8, 3, bias=False), nn.Conv2d(3, 8, 3, bias=False)
    b.load_state_dict(a.state_dict())
    opt_a = ROOT(route_parameters(a).param_groups(), lr=0.1)
    opt_b = ROOT(b.parameters(), lr=0.1)
    x = torch.randn(2, 3, 6, 6)
    for model, opt in ((a, opt_a), (b, opt_b)):
        model(x).square().sum().backward()
        opt.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


def test_dbrx_style_stacked_expert_matrices_are_split_per_expert():
    class DbrxExpertGLU(nn.Module):  # transformers' DBRX stores (E * ffn, H) stacks
        def __init__(self) -> None:
            super().__init__()
            self.moe_num_experts = 3
            self.w1 = nn.Parameter(torch.randn(3 * 5, 8))

    table = route_parameters(nn.Sequential(DbrxExpertGLU())).table()
    assert table["0.w1"] == ("expert_matrix", "root", "flatten", (0, (5, 5, 5)))


def test_lora_on_expert_parameters_routes_and_trains():
    peft = pytest.importorskip("peft")
    model = tiny_moe("qwen3_moe")
    config = peft.LoraConfig(
        r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    )
    model = peft.get_peft_model(model, config)
    routing = route_parameters(model, lora_policy="both")
    table = routing.table()
    expert_a = [n for n in table if ".experts." in n and ".lora_A." in n]
    expert_b = [n for n in table if ".experts." in n and ".lora_B." in n]
    assert len(expert_a) == len(expert_b) == 4  # gate_up and down in 2 layers
    for name in expert_a:  # PEFT stacks the E experts' A factors as (E * r, in) row blocks: one matrix each
        assert table[name] == ("lora_A", "root", "flatten", (0, (2,) * E)), name
    for name in expert_b:  # (out, r * E) with interleaved experts: orthogonalized whole
        assert table[name] == ("lora_B", "root", "flatten", None), name
    assert not any(r.role == "expert_matrix" for r in routing.params)  # the base experts are frozen
    optimizer = ROOT(routing.param_groups(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    x = _batch()
    for _ in range(2):  # step 1: lora_B = 0, so grad(lora_A) = 0; step 2 moves both
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all() and not torch.equal(p, before[name]), name


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_stock_trainer_optim_root_trains_a_tiny_moe(family, make_args, lm_data):
    model = tiny_moe(family)
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    trainer = Trainer(model=model, args=make_args(optim="root", max_steps=3), train_dataset=lm_data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for name, p in model.named_parameters():
        if name in experts:
            assert not torch.equal(p, experts[name]), name
    groups = trainer.optimizer.param_groups
    batched = [g for g in groups if g.get("matrix_view") == "batched"]
    assert sum(len(g["params"]) for g in batched) == 4


# --------------------------------------------------------------------------------------------------------------------
# One step of a fused expert tensor == ROOT on each expert (and each fused block) as its own 2-D parameter
# --------------------------------------------------------------------------------------------------------------------


def _pieces(t: torch.Tensor, split: tuple[int, tuple[int, ...]] | None) -> list[torch.Tensor]:
    """Expert e's matrix (and its fused blocks) as separate tensors, in (expert, block) order."""
    out = []
    for matrix in t.unbind(0):
        out += list(matrix.split(list(split[1]), dim=split[0])) if split is not None else [matrix]
    return out


def _expert_grads(family: str, imbalance: bool) -> list[tuple[str, torch.Tensor, torch.Tensor, object]]:
    """(name, weight, grad, split) of layer 0's fused expert tensors, from a real backward pass."""
    model = tiny_moe(family)
    x = _batch()
    model(input_ids=x, labels=x).loss.backward()
    table = route_parameters(model).table()
    out = []
    for leaf in ("gate_up_proj", "down_proj"):
        name = f"model.layers.0.mlp.experts.{leaf}"
        p = model.get_parameter(name)
        grad = p.grad.detach().clone()
        if imbalance:
            grad[1] *= 10  # routing imbalance: expert 1's gradient 10x larger
            grad[2, 0, 0] = grad[2].abs().max() * 1e3  # one outlier entry in expert 2
        out.append((name, p.detach().clone(), grad, table[name][3]))
    return out


@pytest.mark.parametrize("imbalance", [False, True], ids=["plain", "one_expert_10x_and_an_outlier"])
@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_batched_expert_step_equals_root_on_each_expert_as_its_own_matrix(family, imbalance):
    hyper = dict(lr=0.02, weight_decay=0.1, momentum=0.9, clip_quantile=0.9)
    for name, weight, grad, split in _expert_grads(family, imbalance):
        fused = nn.Parameter(weight.clone())
        pieces = [nn.Parameter(t.clone()) for t in _pieces(weight, split)]
        opt_fused = ROOT(
            [{"params": [fused], "use_root": True, "matrix_view": "batched", "matrix_split": _as_list(split)}], **hyper
        )
        opt_pieces = ROOT([{"params": pieces, "use_root": True}], **hyper)
        for step in range(2):  # the second step goes through the momentum buffers
            scale = 1.0 + step
            fused.grad = grad * scale
            for p, g in zip(pieces, _pieces(grad, split), strict=True):
                p.grad = g * scale
            opt_fused.step()
            opt_pieces.step()
            for got, want in zip(_pieces(fused.detach(), split), pieces, strict=True):
                torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6, msg=f"{name} step {step}")


def _as_list(split):
    return None if split is None else [split[0], list(split[1])]


def test_flatten_view_of_fused_experts_is_not_per_expert_root():
    """The old behaviour (one (E, out * in) matrix) differs from per-expert ROOT: the views matter."""
    (_name, weight, grad, _), *_ = _expert_grads("qwen3_moe", imbalance=True)
    results = []
    for view in ("flatten", "batched"):
        p = nn.Parameter(weight.clone())
        opt = ROOT([{"params": [p], "use_root": True, "matrix_view": view}], lr=0.02, weight_decay=0.0)
        p.grad = grad.clone()
        opt.step()
        results.append(p.detach() - weight)
    flat, batched = results
    assert (flat - batched).norm() / batched.norm() > 0.1


def test_trainer_optim_args_and_optim_target_modules_reach_the_routing(make_args, lm_data, caplog):
    args = make_args(optim="root", optim_args="router_branch=root,fused_projections=whole")
    with caplog.at_level(logging.WARNING):
        optimizer = Trainer(model=tiny_moe("qwen3_moe"), args=args, train_dataset=lm_data).create_optimizer()
    summary = optimizer.routing_summary
    assert "router 2" in summary.split(";")[0] and "split 0 (fused_projections='whole')" in summary
    assert any(r.levelno == logging.WARNING and summary in r.getMessage() for r in caplog.records)
    # the command-line form of optim_target_modules: one string, plain names matching module-name components
    args = make_args(optim="root", optim_target_modules="self_attn,gate_up_proj")
    optimizer = Trainer(model=tiny_moe("qwen3_moe"), args=args, train_dataset=lm_data).create_optimizer()
    assert optimizer.routing_summary.startswith("ROOT: 10 tensors")  # 4 attention matrices + 1 expert x 2 layers
    with pytest.raises(ValueError, match="matched no trainable parameter's module"):
        args = make_args(optim="root", optim_target_modules="attn_out")
        Trainer(model=tiny_moe("qwen3_moe"), args=args, train_dataset=lm_data).create_optimizer()


# --------------------------------------------------------------------------------------------------------------------
# Every MoE family of the installed transformers that builds from a generic tiny config
# --------------------------------------------------------------------------------------------------------------------

# Checked with transformers 5.24 (the families whose tiny config builds from the generic overrides below).
OTHER_MOE_FAMILIES = [
    "afmoe", "axk1", "bailing_hybrid", "cohere2_moe", "deepseek_v2", "deepseek_v3", "dots1", "ernie4_5_moe",
    "exaone_moe", "flex_olmo", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "granitemoe", "hunyuan_v1_moe", "jetmoe",
    "minimax", "phimoe", "qwen2_moe", "qwen3_next",
]  # fmt: skip
_GENERIC = dict(
    hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, vocab_size=128, num_experts=4, num_local_experts=4, n_routed_experts=4,
    num_experts_per_tok=2, moe_num_experts=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1,
    topk_group=1, first_k_dense_replace=0, shared_expert_intermediate_size=16, n_shared_experts=1,
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("family", OTHER_MOE_FAMILIES)
def test_every_fused_expert_tensor_of_other_moe_families_is_routed_per_expert(family):
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = CONFIG_MAPPING[family](**_GENERIC)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    routing = route_parameters(model)
    table = routing.table()
    for name, p in model.named_parameters():
        if not p.requires_grad:  # e.g. DeepSeek-style e_score_correction_bias
            continue
        role, branch, view, split = table[name]
        owner = model.get_submodule(name.rpartition(".")[0])
        if p.dim() >= 3 and not isinstance(owner, nn.modules.conv._ConvNd):
            assert (role, branch, view) == ("expert_matrix", "root", "batched"), name
            if name.endswith("gate_up_proj") and getattr(owner, "is_concatenated", False):
                assert split is not None and split[1][0] == split[1][1], name
        elif role == "expert_bias":
            assert branch == "adamw" and not routing.params[list(table).index(name)].decay, name
    roles = {role for role, *_rest in table.values()}
    assert {"expert_matrix", "router"} <= roles, roles


def test_models_page_examples_run():
    from pathlib import Path

    from tests.utils import run_markdown_examples

    namespace = run_markdown_examples(Path(__file__).resolve().parents[2] / "docs" / "models.md")
    assert namespace["opt"].param_groups[0]["matrix_view"] == "batched"
