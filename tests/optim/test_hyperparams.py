"""The one hyperparameter table (root_hf/optim/hyperparams.py) and everything derived from it."""

import inspect
import math

import pytest
import torch

from root_hf import ROOT, RootReference
from root_hf.integrations import transformers as hf
from root_hf.optim.hyperparams import (
    DEFAULTS,
    HYPERPARAMS,
    Hyperparam,
    markdown_table,
    parse_optim_args,
    validate_group,
)


@pytest.mark.parametrize("cls", [ROOT, RootReference])
def test_class_defaults_derive_from_the_table(cls):
    for name, parameter in inspect.signature(cls).parameters.items():
        if name in HYPERPARAMS:
            assert parameter.default == HYPERPARAMS[name].default, name


def test_every_default_passes_its_own_check_and_the_defaults_form_a_valid_group():
    for hp in HYPERPARAMS.values():
        assert isinstance(hp, Hyperparam)
        if hp.default is not None:
            hp.check(hp.default)
    group = dict(DEFAULTS)
    validate_group(group)
    assert group == DEFAULTS


def test_optim_args_are_typed():
    parsed = parse_optim_args(
        "momentum=0.9,nesterov=false,clip_quantile=none,ns_steps=3,ns_coefficients=muon,eps=1e-6,"
        "adjust_lr_fn=none,ns_dtype=bfloat16,adamw_eps=1e-9,nonfinite_grads=skip,lora_policy=both,diagnostics_steps=5"
    )
    assert parsed == {
        "momentum": 0.9,
        "nesterov": False,
        "clip_quantile": None,
        "ns_steps": 3,
        "ns_coefficients": "muon",
        "eps": 1e-6,
        "adjust_lr_fn": None,
        "ns_dtype": "bfloat16",
        "adamw_eps": 1e-9,
        "nonfinite_grads": "skip",
        "lora_policy": "both",
        "diagnostics_steps": 5,
    }
    assert parse_optim_args(None) == {} and parse_optim_args("") == {}
    assert parse_optim_args({"momentum": 0.5}) == {"momentum": 0.5}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("momentum", "'momentum'.*key=value"),
        (",,,", "key=value"),
        ("a=b=c", "'a=b=c'"),
        ("momentum=", "key=value"),
        ("=0.9", "key=value"),
        ("bogus=1", "Unknown optim_args key 'bogus'.*momentum"),
        ("betas=0.9", "Unknown optim_args key 'betas'"),
        ("momentum=1.5", r"momentum='1.5'.*\[0, 1\)"),
        ("eps=inf", "eps='inf'"),
        ("eps=nan", "eps='nan'"),
        ("ns_steps=2.5", "ns_steps"),
        ("nesterov=maybe", "nesterov"),
        ("ns_coefficients=polar", "ns_coefficients.*adaptive"),
        ("clip_quantile=true", "clip_quantile"),
    ],
)
def test_malformed_or_invalid_optim_args_raise_naming_the_item(text, match):
    with pytest.raises(ValueError, match=match):
        parse_optim_args(text)


def test_parse_root_optim_args_delegates_to_the_table():
    text = "momentum=0.9,lora_adjust_lr_fn=original,adamw_lr=0.001"
    assert hf.parse_root_optim_args(text) == parse_optim_args(text)
    assert set(hf.OPTIM_ARGS) == {name for name, hp in HYPERPARAMS.items() if hp.optim_args}


def test_lora_choices_match_the_routing():
    from root_hf.integrations import routing
    from root_hf.optim import hyperparams

    assert set(hyperparams.LORA_POLICIES) == set(routing.LORA_POLICIES)
    assert set(hyperparams.LORA_ADJUST_LR_FNS) == set(routing.LORA_ADJUST_LR_FNS)
    assert HYPERPARAMS["lora_policy"].default == routing.DEFAULT_LORA_POLICY


BAD_VALUES = [
    ("eps", math.inf),
    ("eps", math.nan),
    ("lr", math.inf),
    ("lr", torch.tensor(0.1)),
    ("clip_quantile", True),
    ("momentum", True),
    ("ns_steps", True),
    ("adamw_eps", math.inf),
    ("betas", (0.9,)),
    ("matrix_view", "experts"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_a_value_is_refused_the_same_way_everywhere(name, value):
    w = torch.nn.Parameter(torch.randn(4, 4))
    if HYPERPARAMS[name].constructor:
        with pytest.raises(ValueError, match=name):
            ROOT([w], **{name: value})
    with pytest.raises(ValueError, match=name):
        ROOT([{"params": [w], name: value}])
    opt = ROOT([w])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, 3))], name: value})
    state = opt.state_dict()
    state["param_groups"][0][name] = value
    with pytest.raises(ValueError, match=name):
        opt.load_state_dict(state)


def test_process_group_accepts_none_default_or_a_group_only():
    w = torch.nn.Parameter(torch.randn(4, 4))
    assert ROOT([w]).process_group is None
    assert ROOT([w], process_group="default").process_group == "default"
    for bad in ("bogus", "auto", 0):
        with pytest.raises(ValueError, match="process_group"):
            ROOT([w], process_group=bad)


@pytest.mark.parametrize("coefficients", [(100.0, -200.0, 100.0), [(3.4445, -4.775, 2.0315), (5.0, -1.0, 0.0)]])
def test_unsafe_ns_coefficients_are_refused_with_the_band_in_the_message(coefficients):
    steps = 2 if isinstance(coefficients, list) else 5
    with pytest.raises(ValueError, match=r"safe band \[0.0, 1.21\]"):
        ROOT([torch.nn.Parameter(torch.randn(4, 4))], ns_coefficients=coefficients, ns_steps=steps)


def test_markdown_table_has_one_row_per_hyperparameter():
    rows = markdown_table().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == list(HYPERPARAMS)


def test_the_docs_table_is_the_generated_one():
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "algorithm.md").read_text()
    start, end = "<!-- hyperparams-table:start -->\n", "\n<!-- hyperparams-table:end -->"
    assert text[text.index(start) + len(start) : text.index(end)] == markdown_table()
