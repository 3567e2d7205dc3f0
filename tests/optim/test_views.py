"""Per-parameter matrix views (root_hf/optim/views.py): fused experts and projections are independent matrices."""

import pytest
import torch

from root_hf import ROOT, RootReference
from root_hf.optim.views import param_view
from tests.utils import clone_params

E, OUT, IN = 4, 6, 10  # a fused (E, out, in) expert tensor


def _grads(shape, steps, seed=1, dtype=torch.float64, expert_scale=None, outlier=None):
    """Random grads; optionally one expert's gradient scaled (routing imbalance) and one huge entry in another."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        grad = torch.randn(shape, generator=g, dtype=dtype)
        if expert_scale is not None:
            grad[expert_scale[0]] *= expert_scale[1]
        if outlier is not None:
            grad[outlier] = 1e3
        out.append(grad)
    return out


def _step_all(opt, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()


GRAD_CASES = {
    "plain": {},
    "expert_10x_and_outlier": {"expert_scale": (1, 10.0), "outlier": (2, 3, 4)},
}
KWARGS = {
    "defaults": {},
    "no_nesterov_muon_original": {"nesterov": False, "ns_coefficients": "muon", "adjust_lr_fn": "original"},
}


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("grad_case", list(GRAD_CASES.values()), ids=list(GRAD_CASES))
@pytest.mark.parametrize("kwargs", list(KWARGS.values()), ids=list(KWARGS))
def test_batched_expert_tensor_equals_each_expert_as_its_own_param(steps, grad_case, kwargs):
    torch.manual_seed(0)
    fused = torch.nn.Parameter(torch.randn(E, OUT, IN, dtype=torch.float64))
    experts = [torch.nn.Parameter(fused.detach()[e].clone()) for e in range(E)]
    opt_fused = ROOT([{"params": [fused], "matrix_view": "batched"}], lr=0.02, **kwargs)
    opt_experts = ROOT(experts, lr=0.02, **kwargs)
    grads = _grads((E, OUT, IN), steps, **grad_case)
    _step_all(opt_fused, [fused], [[g] for g in grads])
    _step_all(opt_experts, experts, [list(g.unbind(0)) for g in grads])
    torch.testing.assert_close(fused.detach(), torch.stack([p.detach() for p in experts]), rtol=1e-12, atol=1e-12)
    assert opt_fused.state[fused]["momentum_buffer"].shape == fused.shape


def test_scaled_expert_does_not_change_the_clipping_of_the_others():
    """Each expert has its own threshold: 10x on expert 1 clips ~10% of every expert, not ~40% of expert 1 only."""
    fused = torch.nn.Parameter(torch.zeros(E, 64, 64))
    opt = ROOT([{"params": [fused], "matrix_view": "batched"}], lr=0.0)
    fused.grad = _grads((E, 64, 64), 1, dtype=torch.float32, expert_scale=(1, 10.0))[0]
    opt.collect_diagnostics = True
    opt.step()
    assert opt.last_diagnostics["root/clip_fraction"] == pytest.approx(0.1, abs=0.01)


def test_flatten_view_treats_the_expert_tensor_as_one_matrix():
    """The default stays the (shape[0], -1) view: the fused tensor equals one (E, out * in) matrix."""
    fused = torch.nn.Parameter(torch.randn(E, OUT, IN, dtype=torch.float64))
    flat = torch.nn.Parameter(fused.detach().reshape(E, -1).clone())
    opt_a, opt_b = ROOT([fused], lr=0.02), ROOT([flat], lr=0.02)
    grads = _grads((E, OUT, IN), 3)
    _step_all(opt_a, [fused], [[g] for g in grads])
    _step_all(opt_b, [flat], [[g.reshape(E, -1)] for g in grads])
    torch.testing.assert_close(fused.detach().reshape(E, -1), flat.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["conv2d", "channels_last"])
def test_flatten_default_is_unchanged_for_conv_kernels(layout):
    conv = torch.nn.Parameter(torch.randn(8, 3, 3, 3, dtype=torch.float64))
    if layout == "channels_last":
        conv = torch.nn.Parameter(conv.detach().to(memory_format=torch.channels_last))
    matrix = torch.nn.Parameter(conv.detach().reshape(8, -1).clone())
    opt_a, opt_b = ROOT([conv], lr=0.02), ROOT([matrix], lr=0.02)
    grads = _grads((8, 3, 3, 3), 3)
    _step_all(opt_a, [conv], [[g] for g in grads])
    _step_all(opt_b, [matrix], [[g.reshape(8, -1)] for g in grads])
    torch.testing.assert_close(conv.detach().reshape(8, -1), matrix.detach(), rtol=0, atol=0)


SPLITS = {
    "rows_gate_up": ((12, 10), "flatten", [0, [6, 6]], 0),
    "columns_c_attn": ((10, 15), "flatten", [1, [5, 5, 5]], 1),
    "uneven_rows": ((9, 10), "flatten", [0, [2, 7]], 0),
    "experts_gate_up": ((E, 12, 10), "batched", [0, [6, 6]], 1),
}


@pytest.mark.parametrize(("shape", "view", "split", "dim"), list(SPLITS.values()), ids=list(SPLITS))
def test_matrix_split_equals_separate_blocks(shape, view, split, dim):
    torch.manual_seed(0)
    fused = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    blocks = [torch.nn.Parameter(b.clone()) for b in torch.split(fused.detach(), split[1], dim=dim)]
    if view == "batched":
        blocks = [torch.nn.Parameter(x.clone()) for b in blocks for x in b.unbind(0)]
    opt_fused = ROOT([{"params": [fused], "matrix_view": view, "matrix_split": split}], lr=0.02)
    opt_blocks = ROOT(blocks, lr=0.02)
    grads = _grads(shape, 3, expert_scale=(0, 5.0))

    def block_grads(g):
        parts = torch.split(g, split[1], dim=dim)
        return [x for b in parts for x in b.unbind(0)] if view == "batched" else list(parts)

    _step_all(opt_fused, [fused], [[g] for g in grads])
    _step_all(opt_blocks, blocks, [block_grads(g) for g in grads])
    expected = [p.detach() for p in blocks]
    if view == "batched":
        expected = [torch.stack(expected[i * E : (i + 1) * E]) for i in range(len(split[1]))]
    torch.testing.assert_close(fused.detach(), torch.cat(expected, dim=dim), rtol=1e-12, atol=1e-12)


REFERENCE_CASES = {
    "experts": ((E, OUT, IN), "batched", None),
    "experts_tall": ((3, 12, 5), "batched", None),
    "experts_4d": ((2, 3, 5, 7), "batched", None),
    "experts_split_columns": ((E, OUT, IN), "batched", [1, [4, 6]]),
    "conv_flatten_split_rows": ((8, 3, 2, 2), "flatten", [0, [3, 5]]),
}


@pytest.mark.parametrize(("shape", "view", "split"), list(REFERENCE_CASES.values()), ids=list(REFERENCE_CASES))
def test_reference_agrees_with_fast_path_on_views(shape, view, split):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))]
    ref_params = clone_params(params)
    group = {"matrix_view": view, "matrix_split": split}
    opt = ROOT([{"params": params, **group}], lr=0.02)
    ref = RootReference([{"params": ref_params, **group}], lr=0.02)
    grads = _grads(shape, 6, expert_scale=(0, 10.0))
    _step_all(opt, params, [[g] for g in grads])
    _step_all(ref, ref_params, [[g] for g in grads])
    torch.testing.assert_close(params[0], ref_params[0], rtol=1e-10, atol=1e-12)
    assert ref.state[ref_params[0]]["momentum_buffer"].shape == params[0].shape


def test_diagnostics_count_each_expert_as_one_matrix():
    fused = torch.nn.Parameter(torch.randn(E, OUT, IN))
    experts = [torch.nn.Parameter(fused.detach()[e].clone()) for e in range(E)]
    opt_fused = ROOT([{"params": [fused], "matrix_view": "batched"}], lr=0.02)
    opt_experts = ROOT(experts, lr=0.02)
    grad = _grads((E, OUT, IN), 1, dtype=torch.float32, expert_scale=(1, 10.0))[0]
    fused.grad = grad.clone()
    for p, g in zip(experts, grad.unbind(0), strict=True):
        p.grad = g.clone()
    for opt in (opt_fused, opt_experts):
        opt.collect_diagnostics = True
        opt.step()
    for key, value in opt_experts.last_diagnostics.items():
        assert opt_fused.last_diagnostics[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize(
    ("group", "match"),
    [
        ({"matrix_view": "experts"}, "matrix_view"),
        ({"matrix_view": None}, "matrix_view"),
        ({"matrix_split": [2, [3, 3]]}, "matrix_split"),
        ({"matrix_split": [0, [3, -3]]}, "matrix_split"),
        ({"matrix_split": [0, []]}, "matrix_split"),
        ({"matrix_split": "0:3,3"}, "matrix_split"),
        ({"matrix_split": [0, [2, 2]]}, "sum to 4"),
        ({"matrix_split": [True, [3, 3]]}, "matrix_split"),
    ],
)
def test_invalid_matrix_view_or_split_is_refused(group, match):
    with pytest.raises(ValueError, match=match):
        ROOT([{"params": [torch.nn.Parameter(torch.randn(6, 5))], **group}])


def test_param_view_blocks():
    view = param_view((8, 6, 4), "batched", [0, [2, 4]])
    assert (view.batch, view.matrix, view.num_matrices) == (8, (6, 4), 16)
    assert [b.shape for b in view.blocks] == [(2, 4), (4, 4)]
    assert param_view((8, 3, 3, 3)).matrix == (8, 27)


def test_algorithm_page_examples_run():
    from pathlib import Path

    from tests.utils import run_markdown_examples

    run_markdown_examples(Path(__file__).parents[2] / "docs" / "algorithm.md")


@pytest.mark.parametrize("limit", [1, 2 * 16 * 8])
def test_bucket_cut_into_batches_equals_one_batch(monkeypatch, limit):
    """A same-shape bucket cut into smaller batches (the temporary-memory cap) gives the same step as one batch."""
    from root_hf.optim import functional

    torch.manual_seed(0)
    shapes = [(16, 8)] * 5 + [(3, 16, 8), (8, 16)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
    whole, cut = clone_params(params), clone_params(params)
    opt_whole, opt_cut = (
        ROOT([{"params": ps[:5] + ps[6:]}, {"params": [ps[5]], "matrix_view": "batched"}], lr=0.1)
        for ps in (whole, cut)
    )
    for _ in range(2):
        for ps in (whole, cut):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
        opt_whole.step()
        monkeypatch.setattr(functional, "MAX_BATCH_ELEMENTS_PER_THREAD", limit // torch.get_num_threads())
        opt_cut.step()
        monkeypatch.undo()
    for a, b in zip(whole, cut, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
