"""Parameters ROOT cannot train are refused where they enter (constructor, `add_param_group`), by name or position."""

import warnings

import pytest
import torch

from root_hf import ROOT


def _model() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_parameter_is_refused_at_the_constructor_with_its_position(dtype):
    model = _model()
    counts = torch.zeros(4, 4, dtype=dtype)
    with pytest.raises(ValueError, match=rf"#2 of param group 0 has dtype {dtype}: .*floating point real tensors"):
        ROOT([model[0].weight, model[0].bias, counts])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_parameter_is_refused_at_the_constructor_with_its_name(dtype):
    model = _model()
    named = [*model.named_parameters(), ("spectrum", torch.zeros(4, 4, dtype=dtype, requires_grad=True))]
    with pytest.raises(ValueError, match=rf"'spectrum' has dtype {dtype}: .*floating point real tensors"):
        ROOT(named)


def test_integer_parameter_in_add_param_group_is_refused_and_leaves_the_optimizer_unchanged():
    model = _model()
    opt = ROOT(model[0].parameters())
    with pytest.raises(ValueError, match=r"#1 of param group 1 has dtype torch.int64"):
        opt.add_param_group({"params": [model[1].weight, torch.ones(3, dtype=torch.int64)]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": model[1].parameters()})  # the same floating point params are then accepted
    assert len(opt.param_groups) == 2


def test_parameter_listed_twice_in_one_group_is_refused_with_both_positions():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error at the entry, not torch's duplicate-parameter warning
        with pytest.raises(ValueError, match=r"#2 of param group 0 is the same tensor as parameter #0 of param group"):
            ROOT([model[0].weight, model[0].bias, model[0].weight])


def test_named_parameter_listed_twice_is_refused_with_both_names():
    model = _model()
    named = [*model.named_parameters(), ("tied.weight", model[0].weight)]
    with pytest.raises(ValueError, match=r"'tied.weight' is the same tensor as parameter '0.weight': pass each"):
        ROOT(named)


def test_parameter_already_in_an_earlier_group_is_refused_in_add_param_group():
    model = _model()
    opt = ROOT([{"params": model[0].parameters()}, {"params": [model[1].weight]}])
    state = opt.state_dict()
    with pytest.raises(ValueError, match=r"#1 of param group 2 is the same tensor as parameter #1 of param group 0"):
        opt.add_param_group({"params": [model[1].bias, model[0].bias]})
    assert opt.state_dict() == state
