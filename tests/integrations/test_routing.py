"""Routing of parameters between the ROOT and AdamW branches: by role, PEFT-aware, with target_modules overrides."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers import Trainer

from root_hf import ROOT, route_parameters
from root_hf.integrations.routing import ROOT_ROLES

HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _roles(routing):
    return {r.name: (r.role, r.branch) for r in routing.params}


@pytest.mark.parametrize("tied", [False, True])
def test_llama_hidden_matrices_go_to_root_and_embeddings_head_norms_to_adamw(make_model, tied):
    model = make_model(tie_word_embeddings=tied)
    roles = _roles(route_parameters(model))
    assert roles.pop("model.embed_tokens.weight") == ("embedding", "adamw")
    if tied:
        assert "lm_head.weight" not in roles  # the same tensor as embed_tokens: listed once
    else:
        assert roles.pop("lm_head.weight") == ("lm_head", "adamw")
    for name, (role, branch) in roles.items():
        if any(h in name for h in HIDDEN):
            assert (role, branch) == ("hidden_matrix", "root"), name
        else:
            assert (role, branch) == ("norm", "adamw"), name


def test_decay_follows_the_trainer_rule(make_model):
    model = make_model()
    routing = route_parameters(model)
    trainer_decay = set(Trainer.get_decay_parameter_names(None, model))  # does not use self in transformers 5.x
    assert {r.name for r in routing.params if r.decay} == trainer_decay


def test_explicit_decay_names_override_the_default(make_model):
    model = make_model()
    routing = route_parameters(model, decay_parameter_names=["model.norm.weight"])
    assert [r.name for r in routing.params if r.decay] == ["model.norm.weight"]


def test_peft_roles_by_default_lora_b_to_root_lora_a_and_peft_extras_to_adamw(make_model):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"], use_dora=True
    )
    model = peft.get_peft_model(make_model(), config)
    routing = route_parameters(model)
    by_name = {r.name: r for r in routing.params}
    assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(routing.frozen) == {n for n, p in model.named_parameters() if not p.requires_grad}
    for name, r in by_name.items():
        if ".lora_A." in name or ".lora_B." in name:
            # the default lora_policy "b_only": lora_B orthogonalized, lora_A on the AdamW branch
            expected = ("lora_A", "adamw") if ".lora_A." in name else ("lora_B", "root")
        elif "lora_embedding_" in name:
            expected = ("lora_embedding", "adamw")
        elif "lora_magnitude_vector" in name:
            expected = ("dora_magnitude", "adamw")
        elif "modules_to_save" in name:
            expected = ("modules_to_save", "adamw")
        else:
            raise AssertionError(f"unexpected trainable parameter {name}")
        assert (r.role, r.branch) == expected, name
    assert {r.role for r in routing.params} == {
        "lora_A",
        "lora_B",
        "lora_embedding",
        "dora_magnitude",
        "modules_to_save",
    }


def test_peft_lora_model_trains_with_root_on_lora_factors(make_model):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    optimizer = ROOT(route_parameters(model).param_groups(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randint(0, 128, (2, 16))
    for _ in range(2):  # step 1: grad(lora_A) is exactly 0 (lora_B starts at 0); step 2 moves both
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all() and not torch.equal(p, before[name]), name


@pytest.mark.parametrize(
    ("target_modules", "expected_root"),
    [
        ("all-linear", set(HIDDEN)),  # every nn.Linear but the head
        ("all_linear", set(HIDDEN)),
        (r".*\.q_proj", {"q_proj"}),  # a string is a regex over whole module names
        (["mlp"], {"gate_proj", "up_proj", "down_proj"}),  # list entries also match as substrings
        (["q_proj", "lm_head"], {"q_proj", "lm_head"}),  # explicit: even the head goes to ROOT
        (["norm", "embed_tokens"], {"embed_tokens"}),  # matched 1-D params stay in AdamW
        ("mlp", {"gate_proj", "up_proj", "down_proj"}),  # a plain name matches module-name components
        ("q_proj,v_proj", {"q_proj", "v_proj"}),  # the command-line list form: comma-separated names
        ("self_attn.o_proj, mlp.down_proj", {"o_proj", "down_proj"}),  # dotted names, spaces ignored
        (r"model\.layers\.0\..*_proj", set(HIDDEN)),  # a regex string full-matches module names
    ],
)
def test_target_modules_override_routes_exactly_the_matching_matrices(make_model, target_modules, expected_root):
    model = make_model()
    routing = route_parameters(model, target_modules)
    assert {name.split(".")[-2] for name in routing.names("root")} == expected_root
    assert len(routing.params) == len(list(model.parameters()))


@pytest.mark.parametrize("bad", [3, ["q_proj", 4], [], "([unclosed"])
def test_invalid_target_modules_raise_value_error(make_model, bad):
    with pytest.raises(ValueError, match="target_modules"):
        route_parameters(make_model(), bad)


@pytest.mark.parametrize("target_modules", ["mlpx", ["attn_out"], r".*\.qproj"])
def test_target_modules_matching_nothing_is_an_error_naming_the_module_names(make_model, target_modules):
    with pytest.raises(
        ValueError, match=r"matched no trainable parameter's module.*model\.layers\.0\.self_attn\.q_proj"
    ):
        route_parameters(make_model(), target_modules)


def test_routing_summary_is_logged_at_warning_level_and_an_empty_root_branch_warns(make_model, caplog):
    routing = route_parameters(make_model(), ["norm"])  # matches, but only 1-D parameters: ROOT gets nothing
    with caplog.at_level(logging.WARNING, logger="root_hf"):
        routing.log_summary()
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert messages[0] == (logging.WARNING, f"ROOT routing: {routing.summary()}")
    assert messages[1][0] == logging.WARNING and "the ROOT branch is empty" in messages[1][1]
    assert "target_modules=['norm']" in messages[1][1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="root_hf"):
        route_parameters(make_model()).log_summary()
    assert len(caplog.records) == 1  # no warning when ROOT has matrices


def test_plain_torch_model_is_routed_by_module_type_and_head_name():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(10, 8)
            self.conv = nn.Conv1d(8, 8, 3)
            self.hidden = nn.Linear(8, 8)
            self.ln = nn.LayerNorm(8)
            self.scale = nn.Parameter(torch.ones(()))
            self.classifier = nn.Linear(8, 3)

    roles = _roles(route_parameters(Net()))
    assert roles == {
        "tok.weight": ("embedding", "adamw"),
        "conv.weight": ("hidden_matrix", "root"),
        "conv.bias": ("bias", "adamw"),
        "hidden.weight": ("hidden_matrix", "root"),
        "hidden.bias": ("bias", "adamw"),
        "ln.weight": ("norm", "adamw"),
        "ln.bias": ("norm", "adamw"),
        "scale": ("vector", "adamw"),
        "classifier.weight": ("lm_head", "adamw"),
        "classifier.bias": ("bias", "adamw"),
    }


def test_sequence_classification_score_head_goes_to_adamw(make_model):
    roles = _roles(route_parameters(make_model(num_labels=3)))
    assert roles["score.weight"] == ("lm_head", "adamw")


def test_frozen_parameters_get_no_group(make_model):
    model = make_model()
    model.model.embed_tokens.weight.requires_grad_(False)
    routing = route_parameters(model)
    assert routing.frozen == ["model.embed_tokens.weight"]
    grouped = {id(p) for g in routing.param_groups() for p in g["params"]}
    assert id(model.model.embed_tokens.weight) not in grouped
    assert len(grouped) == len(routing.params)


def test_param_groups_split_branches_and_decay_with_separate_adamw_settings(make_model):
    routing = route_parameters(make_model())
    groups = routing.param_groups(weight_decay=0.1, adamw_lr=5e-4, adamw_weight_decay=0.01)
    summary = [(g["use_root"], g.get("weight_decay"), g.get("lr"), len(g["params"])) for g in groups]
    assert summary == [(True, 0.1, None, 14), (False, 0.01, 5e-4, 2), (False, 0.0, 5e-4, 5)]
    assert all(r.role in ROOT_ROLES for r in routing.branch("root"))


def test_summary_counts_tensors_and_parameters_per_branch(make_model):
    routing = route_parameters(make_model())
    root_numel = sum(p.numel() for p in routing.param_groups()[0]["params"])
    assert routing.counts() == {"root": (14, root_numel), "adamw": (7, 8352)}
    assert routing.summary() == (
        f"ROOT: 14 tensors / {root_numel:,} params (hidden_matrix 14); "
        "AdamW: 7 tensors / 8,352 params (embedding 1, norm 5, lm_head 1)"
    )


def test_param_groups_put_root_lora_factors_in_groups_of_their_own_that_carry_lora_adjust_lr_fn(make_model):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    hidden = model.get_base_model().model.layers[0].mlp.down_proj.weight
    hidden.requires_grad_(True)  # a base matrix trained in full next to the adapters
    decay = [n for n, _ in model.named_parameters()]
    routing = route_parameters(model, decay_parameter_names=decay, lora_policy="both")
    groups = routing.param_groups(weight_decay=0.1, lora_adjust_lr_fn="original")
    assert [(g["use_root"], len(g["params"]), g.get("adjust_lr_fn", "-")) for g in groups] == [
        (True, 1, "-"),  # the hidden matrix keeps the optimizer's adjust_lr_fn
        (True, 8, "original"),  # lora_A and lora_B of q_proj and v_proj in 2 layers
    ]
    assert groups[0]["params"][0] is hidden
    inherit = routing.param_groups(weight_decay=0.1)
    assert all("adjust_lr_fn" not in g for g in inherit)
    with pytest.raises(ValueError, match=r"Invalid lora_adjust_lr_fn: 'sqrt'\. Must be one of"):
        routing.param_groups(lora_adjust_lr_fn="sqrt")


@pytest.mark.parametrize(
    ("policy", "root_roles"), [("both", {"lora_A", "lora_B"}), ("b_only", {"lora_B"}), ("none", set())]
)
def test_lora_policy_routes_the_factors_and_nothing_else(make_model, policy, root_roles):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        make_model(), peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    routing = route_parameters(model, lora_policy=policy)
    assert {r.role for r in routing.branch("root")} == root_roles
    assert routing.lora_policy == policy
    assert {r.role for r in routing.params} == {"lora_A", "lora_B", "modules_to_save"}
