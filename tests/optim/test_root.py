"""Properties of the fast ROOT optimizer (root_hf/optim/root.py)."""

import copy
import io
import math

import pytest
import torch

from root_hf import ROOT, RootReference
from root_hf.optim.functional import adjusted_lr_ratio
from tests.utils import assert_equal, clone_params

SHAPES = {
    "wide": [(6, 20)],
    "tall": [(20, 6)],
    "square": [(12, 12)],
    "conv": [(8, 3, 3, 3)],
    "same_shape_batch": [(10, 16), (10, 16), (10, 16)],
    "mixed_with_vector": [(10, 16), (16, 10), (7,)],
}


def _random_params(shapes, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _run(opt_a, params_a, opt_b, params_b, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for pa, pb in zip(params_a, params_b, strict=True):
            grad = torch.randn(pa.shape, generator=g, dtype=pa.dtype)
            pa.grad = grad.clone()
            pb.grad = grad.clone()
        opt_a.step()
        opt_b.step()


@pytest.mark.parametrize("shapes", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"nesterov": False, "clip_quantile": 0.8},
        {"clip_quantile": None, "ns_coefficients": "muon", "adjust_lr_fn": "original"},
        {"ns_coefficients": [(3.0, -3.2, 1.2), (3.4445, -4.775, 2.0315)], "ns_steps": 2, "adjust_lr_fn": None},
    ],
    ids=["defaults", "no_nesterov_q80", "muon_like", "per_step_schedule"],
)
def test_fast_path_matches_reference_in_float64(shapes, kwargs):
    params = _random_params(shapes)
    ref_params = clone_params(params)
    opt = ROOT(params, lr=0.02, weight_decay=0.1, **kwargs)
    ref = RootReference(ref_params, lr=0.02, weight_decay=0.1, **kwargs)
    _run(opt, params, ref, ref_params, steps=8)
    for p, r in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)


def test_degenerate_root_branch_is_normalized_sgd():
    """No momentum, no clipping, no orthogonalization, no lr scaling: each matrix moves by -lr G / (||G||_F + eps)
    (X_K = X_0 for K = 0, as `orthogonalize(ns_steps=0)`)."""
    params = _random_params([(8, 5), (3, 4, 2)], dtype=torch.float64)
    expected = clone_params(params)
    opt = ROOT(params, lr=0.1, weight_decay=0.0, momentum=0.0, clip_quantile=None, ns_steps=0, adjust_lr_fn=None)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, e in zip(params, expected, strict=True):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            e.data -= 0.1 * p.grad / (p.grad.norm() + 1e-7)
        opt.step()
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_ns_steps_zero_update_rms_does_not_follow_the_gradient_scale(scale):
    """Regression: `ns_steps=0` skipped the Frobenius normalization in the step (update RMS 1.94 at scale 1, 197 at
    scale 100 with lr 1); X_0 = B_t / (||B_t||_F + eps) has RMS 1 / sqrt(m n) whatever the scale."""
    w = torch.nn.Parameter(torch.zeros(16, 12))
    opt = ROOT([w], lr=1.0, weight_decay=0.0, ns_steps=0, adjust_lr_fn=None)
    w.grad = scale * torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    opt.step()
    rms = float(w.detach().square().mean().sqrt())
    assert rms == pytest.approx(1 / math.sqrt(16 * 12), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_branch_equals_torch_adamw(weight_decay, dtype):
    """Same values as `torch.optim.AdamW(foreach=False)`, to the rounding of the on-device bias corrections (float32
    for float32 params, float64 for float64); moments and step counts alike."""
    params = _random_params([(8, 5), (7,), ()], dtype=dtype)
    ref_params = clone_params(params)
    opt = ROOT([{"params": params, "use_root": False}], lr=1e-2, weight_decay=weight_decay, betas=(0.9, 0.95))
    adamw = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=weight_decay, betas=(0.9, 0.95), foreach=False)
    _run(opt, params, adamw, ref_params, steps=6)
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-13, "atol": 1e-15}
    for p, r in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, r, **tol)
    for p, r in zip(params, ref_params, strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[p][key], adamw.state[r][key], **tol)


def test_user_group_is_one_param_group_with_branch_by_ndim():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Conv1d(8, 2, 3))
    opt = ROOT(model.parameters())
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["use_root"] is None
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    branches = {tuple(p.shape): set(opt.state[p]) for p in model.parameters()}
    assert branches[(8, 4)] == branches[(2, 8, 3)] == {"momentum_buffer"}
    assert branches[(8,)] == branches[(2,)] == {"step", "exp_avg", "exp_avg_sq"}


def test_group_hyperparameters_override_defaults():
    w, b = _random_params([(4, 6), (4,)])
    opt = ROOT([{"params": [w]}, {"params": [b], "lr": 0.5}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]


def test_named_parameters_are_accepted():
    model = torch.nn.Linear(5, 3)
    opt = ROOT(model.named_parameters())
    assert [g["param_names"] for g in opt.param_groups] == [["weight", "bias"]]


def test_explicit_embedding_group_takes_adamw_branch():
    emb = torch.nn.Embedding(10, 4)
    opt = ROOT([{"params": emb.parameters(), "use_root": False}])
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    assert set(opt.state[emb.weight]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_zero_grads_with_zero_lr_change_nothing(weight_decay):
    """DCP's optimizer-state init step: zero grads, lr 0. Nothing may change and no NaN may appear."""
    params = _random_params([(6, 4), (6, 4), (5,)], dtype=torch.float32)
    before = [p.detach().clone() for p in params]
    opt = ROOT(params, lr=0.0, weight_decay=weight_decay)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(params, before, strict=True):
        assert_equal(p, b)
    for state in opt.state.values():
        for value in state.values():
            assert torch.isfinite(value).all()


def test_all_zero_grads_leave_params_unchanged_and_finite():
    """LoRA B = 0 at init makes grad(A) exactly 0: NS must return 0, not NaN."""
    params = _random_params([(8, 32), (32, 8), (4,)], dtype=torch.float32)
    before = [p.detach().clone() for p in params]
    opt = ROOT(params, lr=0.1, weight_decay=0.0)
    for _ in range(2):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, b in zip(params, before, strict=True):
        assert_equal(p, b)


def test_params_without_grad_are_untouched_and_get_no_state():
    a, b = _random_params([(4, 6), (4, 6)], dtype=torch.float32)
    b_before = b.detach().clone()
    opt = ROOT([a, b], lr=0.1)
    a.grad = torch.randn_like(a)
    opt.step()
    assert_equal(b, b_before)
    assert b not in opt.state


def test_flat_param_in_root_group_raises_at_construction():
    flat = torch.nn.Parameter(torch.randn(24))
    with pytest.raises(ValueError, match=r"FSDP1.*DeepSpeed ZeRO"):
        ROOT([{"params": [flat], "use_root": True}])


def test_flattened_param_swapped_in_after_construction_raises_at_step():
    """What FSDP1 / ZeRO do: the optimizer was built on matrices, then receives flat 1-D shards."""
    w = torch.nn.Parameter(torch.randn(4, 6))
    opt = ROOT([w])
    flat = torch.nn.Parameter(w.detach().reshape(-1).clone())
    flat.grad = torch.randn_like(flat)
    opt.param_groups[0]["params"][0] = flat
    with pytest.raises(ValueError, match="flattened"):
        opt.step()


def _state_snapshot(opt):
    return {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for p, st in opt.state.items()}


def _assert_state_equal(opt, snapshot):
    assert {id(p) for p in opt.state} == set(snapshot)
    for p, st in opt.state.items():
        assert set(st) == set(snapshot[id(p)])
        for k, v in st.items():
            assert_equal(v, snapshot[id(p)][k])


# "device": the accelerator path (the step gated on the device, no host sync), forced on the CPU; "host": the CPU path
# (the flag read from host memory at once, the step returns before any work).
GATES = pytest.mark.parametrize("gate", ["device", "host"])


@GATES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_grad_raises_and_changes_no_param_and_no_state(bad, nesterov, dtype, gate):
    """Params, momentum, moments and step counts keep their bits."""
    params = _random_params([(6, 4), (3, 2, 2), (5,)], dtype=dtype)
    opt = ROOT(params, lr=0.1, weight_decay=0.1, nesterov=nesterov)
    opt._gate_on_device = gate == "device"
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    before = [p.detach().clone() for p in params]
    state = _state_snapshot(opt)
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[0, 1, 1] = bad
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    for p, b in zip(params, before, strict=True):
        assert_equal(p, b)
    _assert_state_equal(opt, state)


@GATES
def test_nonfinite_grad_on_the_first_step_leaves_fresh_state(gate):
    params = _random_params([(6, 4), (5,)], dtype=torch.float32)
    before = [p.detach().clone() for p in params]
    opt = ROOT(params, lr=0.1)
    opt._gate_on_device = gate == "device"
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[2] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    for p, b in zip(params, before, strict=True):
        assert_equal(p, b)
    for st in opt.state.values():  # none (host), or created by the gated step at their initial values (device)
        assert all(bool((v == 0).all()) for v in st.values())


def test_nonfinite_grad_skip_mode_skips_the_step_with_a_warning():
    params = _random_params([(6, 4)], dtype=torch.float32)
    before = params[0].detach().clone()
    opt = ROOT(params, lr=0.1, nonfinite_grads="skip")
    params[0].grad = torch.full_like(params[0], float("nan"))
    with pytest.warns(UserWarning, match="skipped"):
        opt.step()
    assert_equal(params[0], before)


@GATES
def test_skipped_step_is_invisible_to_the_next_steps(gate):
    """skip mode: a run with a non-finite step in the middle equals the same run without that step, bitwise."""
    params = _random_params([(6, 4), (8, 8), (5,)], dtype=torch.float32)
    twin = clone_params(params)
    opt, ref = ROOT(params, lr=0.05, nonfinite_grads="skip"), ROOT(twin, lr=0.05, nonfinite_grads="skip")
    opt._gate_on_device = ref._gate_on_device = gate == "device"
    gen = torch.Generator().manual_seed(3)
    for k in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        if k == 2:
            for p in params:
                p.grad = torch.full_like(p, float("inf"))
            with pytest.warns(UserWarning, match="skipped 1 step"):
                opt.step()
        for p, r, g in zip(params, twin, grads, strict=True):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, r in zip(params, twin, strict=True):
        assert_equal(p, r)


def test_sparse_momentum_clip_keeps_the_nonzero_signal():
    """With 95% exact zeros the 0.90 quantile of |U| is 0; the threshold then comes from the non-zero entries."""
    w = torch.nn.Parameter(torch.zeros(40, 50, dtype=torch.float64))
    grad = torch.zeros_like(w)
    idx = torch.randperm(w.numel())[: w.numel() // 20]
    grad.view(-1)[idx] = torch.randn(len(idx), dtype=torch.float64)
    ref_w = torch.nn.Parameter(w.detach().clone())
    opt = ROOT([w], lr=0.1, weight_decay=0.0, momentum=0.0, ns_steps=0, adjust_lr_fn=None)
    ref = RootReference([ref_w], lr=0.1, weight_decay=0.0, momentum=0.0, ns_steps=0, adjust_lr_fn=None)
    w.grad, ref_w.grad = grad.clone(), grad.clone()
    opt.step()
    ref.step()
    eps = torch.quantile(grad.abs()[grad != 0], 0.9)
    clipped = grad.clamp(-eps, eps)
    torch.testing.assert_close(w, -0.1 * clipped / (clipped.norm() + 1e-7))
    torch.testing.assert_close(w, ref_w)
    assert (w != 0).sum() == len(idx)


INVALID = [
    ({"lr": -1.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.5}, "momentum"),
    ({"nesterov": "yes"}, "nesterov"),
    ({"clip_quantile": 0.0}, "clip_quantile"),
    ({"clip_quantile": 1.5}, "clip_quantile"),
    ({"ns_steps": -1}, "ns_steps"),
    ({"ns_steps": 2.5}, "ns_steps"),
    ({"ns_coefficients": "polar"}, "ns_coefficients"),
    ({"ns_coefficients": (1.0, 2.0)}, "coefficients"),
    ({"ns_coefficients": [(3.0, -3.0, 1.0)] * 3, "ns_steps": 5}, "ns_steps"),
    ({"adjust_lr_fn": "rms"}, "adjust_lr_fn"),
    ({"ns_dtype": "int8"}, "ns_dtype"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"adamw_eps": -1e-8}, "adamw_eps"),
    ({"nonfinite_grads": "warn"}, "nonfinite_grads"),
]


@pytest.mark.parametrize("kwargs,name", INVALID, ids=[name for _, name in INVALID])
def test_invalid_hyperparameters_raise_value_error_naming_the_value(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ROOT([torch.nn.Parameter(torch.randn(3, 3))], **kwargs)


def test_invalid_group_hyperparameter_raises():
    w = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="clip_quantile"):
        ROOT([{"params": [w], "clip_quantile": 2.0}])


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resume_from_state_dict_is_bitwise_identical():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    data = torch.randn(6, 8, 16)
    opt = ROOT(model.parameters(), lr=0.01)

    def train(m, o, batches):
        for x in batches:
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()

    train(model, opt, data[:3])
    resumed = copy.deepcopy(model)
    resumed_opt = ROOT(resumed.parameters(), lr=0.01)
    resumed_opt.load_state_dict(_roundtrip(opt.state_dict()))
    train(model, opt, data[3:])
    train(resumed, resumed_opt, data[3:])
    for p, r in zip(model.parameters(), resumed.parameters(), strict=True):
        assert_equal(p, r)


def test_half_precision_params_keep_float32_state_after_load_state_dict():
    params = _random_params([(8, 6), (6,)], dtype=torch.bfloat16)
    opt = ROOT(params, lr=0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    saved = _roundtrip(opt.state_dict())
    momentum = saved["state"][0]["momentum_buffer"].clone()
    assert momentum.dtype == torch.float32
    fresh = ROOT(params, lr=0.01)
    fresh.load_state_dict(saved)
    assert fresh.state[params[0]]["momentum_buffer"].dtype == torch.float32
    assert_equal(fresh.state[params[0]]["momentum_buffer"], momentum)
    assert fresh.state[params[1]]["exp_avg"].dtype == torch.float32


def test_bfloat16_params_train_with_float32_momentum():
    params = _random_params([(16, 24)], dtype=torch.bfloat16)
    before = params[0].detach().clone()
    opt = ROOT(params, lr=0.01, ns_dtype="bfloat16")
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    assert opt.state[params[0]]["momentum_buffer"].dtype == torch.float32
    assert params[0].dtype == torch.bfloat16
    assert torch.isfinite(params[0]).all() and not torch.equal(params[0], before)


def test_same_shape_matrices_batched_equal_one_at_a_time():
    params = _random_params([(12, 20)] * 3, dtype=torch.float64)
    single = clone_params(params)
    opt = ROOT(params, lr=0.05)
    opts = [ROOT([p], lr=0.05) for p in single]
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, s in zip(params, single, strict=True):
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            s.grad = p.grad.clone()
        opt.step()
        for o in opts:
            o.step()
    for p, s in zip(params, single, strict=True):
        torch.testing.assert_close(p, s, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "fn,shape,expected",
    [
        ("match_rms_adamw", (576, 1536), 0.2 * math.sqrt(1536)),
        ("original", (1536, 576), math.sqrt(1536 / 576)),
        ("original", (576, 1536), 1.0),
        (None, (576, 1536), 1.0),
        ("match_rms_adamw", (8, 3, 3, 3), 0.2 * math.sqrt(27)),
    ],
)
def test_adjusted_lr_ratio_follows_the_documented_rules(fn, shape, expected):
    assert adjusted_lr_ratio(fn, shape) == pytest.approx(expected)


def test_update_has_matched_rms_scale():
    """With match_rms_adamw the update RMS is about 0.2 * lr (Moonlight): the lr carries over from AdamW."""
    w = torch.nn.Parameter(torch.zeros(64, 256, dtype=torch.float64))
    opt = ROOT([w], lr=1.0, weight_decay=0.0, ns_coefficients="muon")
    w.grad = torch.randn_like(w)
    opt.step()
    rms = w.square().mean().sqrt().item()
    assert 0.15 < rms < 0.21


def test_diagnostics_are_collected_only_when_requested():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    opt = ROOT(model.parameters(), lr=0.01)
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    assert opt.last_diagnostics == {}
    opt.collect_diagnostics = True
    opt.step()
    d = opt.last_diagnostics
    assert set(d) == {
        "root/clip_fraction",
        "root/eps_over_rms",
        "root/update_rms",
        "root/ortho_error",
        "adamw/update_rms",
    }
    # The 0.90 quantile clips about 10% of the entries.
    assert 0.05 < d["root/clip_fraction"] <= 0.11
    assert all(math.isfinite(v) for v in d.values())


def test_trains_a_small_regression_model():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = x @ torch.randn(16, 4) + 0.01 * torch.randn(256, 4)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    opt = ROOT(model.parameters(), lr=0.02, weight_decay=0.0)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_closure_is_evaluated_and_its_loss_returned():
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = ROOT([w])

    def closure():
        opt.zero_grad()
        loss = w.square().sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and w.grad is not None


# -- torch.optim conformance and the redesign's properties (issue 12) -------------------------------------------------


def test_user_group_is_one_param_group_and_lambda_lr_takes_one_lambda_per_group():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = ROOT([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.5}], lr=0.1)
    assert len(opt.param_groups) == 2
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0, lambda s: 0.5])
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.25]


@pytest.mark.parametrize(
    "bad",
    [
        {"momentum": 1.5},
        {"params": [torch.nn.Parameter(torch.randn(6))], "use_root": True},
        {"matrix_split": [0, [1]]},
    ],
    ids=["momentum", "flat_param_on_root", "split_does_not_fit"],
)
def test_refused_group_leaves_no_trace(bad):
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = ROOT([w])
    before = (copy.deepcopy(opt.param_groups[0]["lr"]), len(opt.param_groups), dict(opt._schedules))
    group = {"params": [torch.nn.Parameter(torch.randn(5, 7))], **bad}
    with pytest.raises(ValueError):
        opt.add_param_group(group)
    assert (opt.param_groups[0]["lr"], len(opt.param_groups), opt._schedules) == before
    assert len(opt._added_ndims) == 1


def _trained(shapes=((6, 4), (4,)), dtype=torch.float32, **kwargs):
    params = _random_params(list(shapes), dtype=dtype)
    opt = ROOT(params, lr=0.01, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return params, opt


@pytest.mark.parametrize(("key", "value"), [("momentum", 1.5), ("ns_steps", -3), ("eps", float("inf"))])
def test_load_state_dict_refuses_invalid_hyperparameters_and_changes_nothing(key, value):
    _params, opt = _trained()
    saved = opt.state_dict()
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(saved)
    bad["param_groups"][0][key] = value
    with pytest.raises(ValueError, match=key):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for pid, entry in before["state"].items():
        for k, v in entry.items():
            assert_equal(after["state"][pid][k], v)


def test_load_state_dict_refuses_state_saved_for_a_differently_shaped_param():
    _, opt = _trained(((6, 4), (4,)))
    named = torch.nn.Linear(4, 6)
    other = ROOT(named.named_parameters(), lr=0.01)
    bad = opt.state_dict()
    bad["state"][0]["momentum_buffer"] = torch.zeros(4, 6)
    with pytest.raises(ValueError, match=r"'momentum_buffer' of parameter 'weight' has shape \(4, 6\)"):
        other.load_state_dict(bad)
    assert len(other.state) == 0


def test_plain_number_adamw_step_loads_and_continues_like_torch_adamw():
    params, opt = _trained(((5,),))
    ref_params = clone_params(params)
    ref = torch.optim.AdamW(ref_params, lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), foreach=False)
    saved = opt.state_dict()
    saved["state"][0]["step"] = 1  # older checkpoints: a plain number
    ref_saved = ref.state_dict()
    ref_saved["state"] = copy.deepcopy(saved["state"])
    opt.load_state_dict(saved)
    ref.load_state_dict(ref_saved)
    assert torch.is_tensor(opt.state[params[0]]["step"])
    _run(opt, params, ref, ref_params, steps=2)
    torch.testing.assert_close(params[0], ref_params[0], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_every_constructor_setting(how):
    _params, opt = _trained(nonfinite_grads="skip", process_group="default")
    opt.collect_diagnostics = True
    if how == "deepcopy":
        copied = copy.deepcopy(opt)
    else:
        buffer = io.BytesIO()
        torch.save(opt, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    assert (copied.nonfinite_grads, copied.process_group, copied.collect_diagnostics) == ("skip", "default", True)
    assert copied._schedules == opt._schedules


def test_load_pre_hook_result_is_honoured_for_half_precision_params():
    params, opt = _trained(dtype=torch.bfloat16)
    saved = _roundtrip(opt.state_dict())
    target = saved["state"][0]["momentum_buffer"] * 3 + 1e-3  # not representable in bfloat16

    def replace_momentum(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0]["momentum_buffer"] = target.clone()
        return state_dict

    fresh = ROOT(params, lr=0.01)
    fresh.register_load_state_dict_pre_hook(replace_momentum)
    fresh.load_state_dict(saved)
    assert fresh.state[params[0]]["momentum_buffer"].dtype == torch.float32
    assert_equal(fresh.state[params[0]]["momentum_buffer"], target)


def test_zero_size_params_are_a_noop():
    params = _random_params([(0, 16), (16, 0), (0,), (3, 0, 2), (4, 4)], dtype=torch.float32)
    opt = ROOT([*params, torch.nn.Parameter(torch.zeros(2, 0, 3))], lr=0.1)
    opt.param_groups[0]["matrix_view"] = "batched"
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    opt.collect_diagnostics = True
    opt.step()
    assert torch.isfinite(params[-1]).all()


def test_a_huge_finite_gradient_is_not_called_nonfinite():
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = ROOT([w], lr=0.01)
    w.grad = torch.randn_like(w)
    w.grad[0, 0] = 1e30  # its float32 squared norm overflows; the gradient is finite
    opt.step()
    assert torch.isfinite(w).all()


def test_nonfinite_error_names_the_trainer_option():
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = ROOT([w])
    w.grad = torch.full_like(w, float("nan"))
    with pytest.raises(FloatingPointError, match='optim_args="nonfinite_grads=skip"'):
        opt.step()


def test_distributed_strategy_is_single_without_a_process_group():
    opt = ROOT([torch.nn.Parameter(torch.randn(4, 4))])
    assert opt.distributed_strategy == "single"
    assert ROOT([torch.nn.Parameter(torch.randn(4, 4))], process_group="default").distributed_strategy == "single"


def test_schedules_are_resolved_when_params_are_added_never_in_step(monkeypatch):
    import root_hf.optim.functional as functional
    import root_hf.schedules as schedules

    opt = ROOT([torch.nn.Parameter(torch.randn(37, 91))], ns_coefficients="muon")
    assert (37, 91) in opt._schedules[("muon", 5)]
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, 5, 7))], "matrix_view": "batched"})
    assert (5, 7) in opt._schedules[("muon", 5)]
    saved = opt.state_dict()
    saved["param_groups"][1]["ns_coefficients"] = "polar-express"
    opt.load_state_dict(saved)
    assert (5, 7) in opt._schedules[("polar-express", 5)]

    def refuse(*args, **kwargs):
        raise AssertionError("get_schedule called inside step()")

    monkeypatch.setattr(functional, "get_schedule", refuse)
    monkeypatch.setattr(schedules, "get_schedule", refuse)
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    opt.step()


def test_step_writes_no_files_and_keeps_thread_count(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    opt = ROOT([torch.nn.Parameter(torch.randn(37, 91)), torch.nn.Parameter(torch.randn(5))])
    files = sorted(tmp_path.rglob("*"))
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(tmp_path.rglob("*")) == files
    assert calls == []


# -- regressions of issue 21 -----------------------------------------------------------------------------------------


def test_non_contiguous_momentum_buffer_gives_the_same_steps_as_a_contiguous_one():
    """A momentum buffer in another memory format (as loaded from such a checkpoint) made the step orthogonalize the
    previous step's momentum: the batch view was a copy taken before the in-place momentum update."""
    params = _random_params([(16, 8, 3, 3)], dtype=torch.float32)
    twin = clone_params(params)
    opt, ref = ROOT(params, lr=0.02), ROOT(twin, lr=0.02)
    gen = torch.Generator().manual_seed(0)
    for k in range(3):
        g = torch.randn(params[0].shape, generator=gen)
        params[0].grad, twin[0].grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        if k == 0:
            buf = opt.state[params[0]]["momentum_buffer"]
            opt.state[params[0]]["momentum_buffer"] = buf.to(memory_format=torch.channels_last)
            assert not opt.state[params[0]]["momentum_buffer"].is_contiguous()
    assert_equal(params[0], twin[0])
    assert_equal(opt.state[params[0]]["momentum_buffer"], ref.state[twin[0]]["momentum_buffer"])


def test_deleting_a_param_group_keeps_every_param_on_its_branch():
    """The branch was remembered by group position: after `del opt.param_groups[0]` a matrix took the AdamW branch."""
    vec = torch.nn.Parameter(torch.randn(8))
    mat = torch.nn.Parameter(torch.randn(8, 4))
    opt = ROOT([{"params": [vec]}, {"params": [mat]}], lr=0.01)
    del opt.param_groups[0]
    mat.grad = torch.randn_like(mat)
    opt.step()
    assert set(opt.state[mat]) == {"momentum_buffer"}
    assert opt.distributed_strategy == "single"


def test_sparse_gradient_raises_the_intended_value_error_under_the_nonfinite_check():
    w = torch.nn.Parameter(torch.randn(4, 3))
    w.grad = torch.randn(4, 3).to_sparse()
    opt = ROOT([w], lr=0.01)  # nonfinite_grads="raise": the check must not meet the sparse tensor first
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_diagnostics_move_to_the_host_before_casting_to_float64():
    """MPS has no float64: every `.double()` in the summary must act on a tensor already on the host."""
    from torch.overrides import TorchFunctionMode

    class Order(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.on_host: set[int] = set()
            self.bad: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = getattr(func, "__name__", "")
            if name == "cpu":
                self.on_host.add(id(out))
            elif name == "double" and id(args[0]) not in self.on_host:
                self.bad.append(name)
            return out

    params = _random_params([(8, 6), (6,)], dtype=torch.float32)
    opt = ROOT(params, lr=0.01)
    opt.collect_diagnostics = True
    for p in params:
        p.grad = torch.randn_like(p)
    with Order() as order:
        opt.step()
    assert order.bad == [] and opt.last_diagnostics["root/update_rms"] > 0
