"""One property test per defect of issue 12 (torch.optim conformance, validation, nothing hidden in step()).

Each test states the property the redesign promises (contract: one user param group is one param group, schedules
resolved when a parameter is added, validation atomic and the same at every entry point, explicit distributed mode)
and checks it through public interfaces only: `ROOT`, `torch.optim` machinery, `root_hf.optim.hyperparams` and the
schedule fitter (patched to observe when it runs).
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import math
import pickle
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import LambdaLR

from root_hf import ROOT

INF = math.inf
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def params_with_grads(*shapes: tuple[int, ...], dtype: torch.dtype = torch.float32) -> list[Parameter]:
    params = [Parameter(torch.randn(*shape, dtype=dtype)) for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def set_grads(params: list[torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def group_snapshot(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The param groups as plain data (params by identity), to compare before / after a refused call."""
    return [
        {**{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}, "params": [id(p) for p in g["params"]]}
        for g in optimizer.param_groups
    ]


def state_snapshot(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return {
        id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for p, s in optimizer.state.items()
    }


def assert_state_equal(actual: dict[int, dict[str, Any]], expected: dict[int, dict[str, Any]]) -> None:
    assert actual.keys() == expected.keys(), "state gained or lost parameters"
    for pid, state in expected.items():
        assert actual[pid].keys() == state.keys()
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(actual[pid][key], value, rtol=0, atol=0)
            else:
                assert actual[pid][key] == value


def floating_state(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in optimizer.state[p].items()
        if k != "step" and isinstance(v, torch.Tensor) and v.is_floating_point()
    }


def entry_points_accepting(key: str, value: Any, text: str | None = None) -> list[str]:
    """Which of the entry points a group value enters through accept `key=value` (each should raise ValueError)."""
    accepted = []

    def refused(fn: Callable[[], Any]) -> bool:
        try:
            fn()
        except ValueError:
            return True
        return False

    w = params_with_grads((4, 3))
    if not refused(lambda: ROOT(w, **{key: value})):
        accepted.append(f"ROOT({key}={value!r})")
    optimizer = ROOT(w)
    if not refused(lambda: optimizer.add_param_group({"params": params_with_grads((3, 2)), key: value})):
        accepted.append(f"add_param_group({{{key!r}: {value!r}}})")
    state_dict = copy.deepcopy(ROOT(w).state_dict())
    state_dict["param_groups"][0][key] = value
    if not refused(lambda: ROOT(w).load_state_dict(state_dict)):
        accepted.append(f"load_state_dict with {key}={value!r}")
    if text is not None:
        try:
            parse = importlib.import_module("root_hf.optim.hyperparams").parse_optim_args
        except (ImportError, AttributeError):
            accepted.append("parse_optim_args (missing: root_hf.optim.hyperparams.parse_optim_args)")
        else:
            if not refused(lambda: parse(text)):
                accepted.append(f"parse_optim_args({text!r})")
    return accepted


# The adaptive fitter: `root_hf.schedules.fit.fit_schedule` after the redesign (`root_hf.optim.adaptive` before it).
_FITTER_MODULES = ("root_hf.schedules.fit", "root_hf.optim.adaptive")


def _fitters() -> list[Callable[..., Any]]:
    found = []
    for name in _FITTER_MODULES:
        try:
            found.append(importlib.import_module(name).fit_schedule)
        except (ImportError, AttributeError):
            continue
    assert found, f"no schedule fitter found in {_FITTER_MODULES}"
    return found


def clear_schedule_cache() -> None:
    """Forget resolved schedules so that a fit becomes observable again."""
    for name, fn in (("root_hf.schedules", "clear_cache"), ("root_hf.optim.adaptive", "clear_memory_cache")):
        try:
            getattr(importlib.import_module(name), fn)()
        except (ImportError, AttributeError):
            continue


class FitSpy:
    """Replaces the fitter everywhere root_hf holds it; counts calls and refuses them while `forbid` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.forbid: str | None = None
        originals = _fitters()
        for module in [m for name, m in list(sys.modules.items()) if name.startswith("root_hf") and m is not None]:
            for attr, value in list(vars(module).items()):
                if any(value is f for f in originals):
                    monkeypatch.setattr(module, attr, self._wrap(value))

    def _wrap(self, fit: Callable[..., Any]) -> Callable[..., Any]:
        def spy(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(args)
            if self.forbid:
                raise AssertionError(f"the schedule fitter ran {self.forbid} (shape {args[0] if args else '?'})")
            return fit(*args, **kwargs)

        return spy


@pytest.fixture
def private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME, XDG_CACHE_HOME and the working directory in a fresh tmp dir (so any file written shows up there)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.delenv("ROOT_HF_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------------------------------------------------
# One user param group = one param group
# --------------------------------------------------------------------------------------------------------------------


def test_user_group_is_one_param_group() -> None:
    w1, b1, w2, b2 = params_with_grads((8, 4), (8,), (6, 8), (6,))
    optimizer = ROOT([{"params": [w1, b1]}, {"params": [w2, b2], "lr": 0.01}])
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == [[id(w1), id(b1)], [id(w2), id(b2)]]
    scheduler = LambdaLR(optimizer, [lambda epoch: 1.0, lambda epoch: 0.5**epoch])
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 0.005]
    # branch membership is per parameter inside the group
    assert "momentum_buffer" in optimizer.state[w1] and "exp_avg" not in optimizer.state[w1]
    assert "exp_avg" in optimizer.state[b1] and "momentum_buffer" not in optimizer.state[b1]


def test_named_param_groups_line_up() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    names = [n for n, _ in model.named_parameters()]
    optimizer = ROOT(model.named_parameters())
    assert [g["param_names"] for g in optimizer.param_groups] == [names]
    named = list(model.named_parameters())
    optimizer = ROOT([{"params": named[:2]}, {"params": named[2:], "lr": 0.01}])
    assert [g["param_names"] for g in optimizer.param_groups] == [names[:2], names[2:]]
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    state_dict = optimizer.state_dict()
    assert [g["param_names"] for g in state_dict["param_groups"]] == [names[:2], names[2:]]
    assert sorted(state_dict["state"]) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("use_root", "expected"),
    [
        (True, ["momentum_buffer", "momentum_buffer"]),
        (False, ["exp_avg", "exp_avg"]),
        (None, ["momentum_buffer", "exp_avg"]),
    ],
)
def test_use_root_decides_the_branch_of_every_param_in_the_group(use_root: bool | None, expected: list[str]) -> None:
    w, v = params_with_grads((5, 3), (5, 3) if use_root else (5,))
    group = {"params": [w, v]} if use_root is None else {"params": [w, v], "use_root": use_root}
    optimizer = ROOT([group])
    optimizer.step()
    assert len(optimizer.param_groups) == 1
    assert [k for p in (w, v) for k in optimizer.state[p] if k in ("momentum_buffer", "exp_avg")] == expected


def test_use_root_true_refuses_vectors() -> None:
    with pytest.raises(ValueError, match="use_root"):
        ROOT([{"params": params_with_grads((5,)), "use_root": True}])


# --------------------------------------------------------------------------------------------------------------------
# state_dict, deepcopy, pickle, hooks
# --------------------------------------------------------------------------------------------------------------------


def test_plain_number_adamw_step_state_loads_and_continues() -> None:
    """An AdamW-branch `step` stored as a plain number (older torch) loads and continues like the tensor form."""
    torch.manual_seed(0)
    w, b = params_with_grads((4, 3), (4,))
    optimizer = ROOT([w, b])
    for seed in range(3):
        set_grads([w, b], seed)
        optimizer.step()
    state_dict = copy.deepcopy(optimizer.state_dict())
    plain = copy.deepcopy(state_dict)
    for p_state in plain["state"].values():
        if "step" in p_state:
            p_state["step"] = p_state["step"].item()
    results = []
    for loaded in (state_dict, plain):
        clones = [Parameter(p.detach().clone()) for p in (w, b)]
        resumed = ROOT(clones)
        resumed.load_state_dict(loaded)
        for seed in (10, 11):
            set_grads(clones, seed)
            resumed.step()
        assert float(resumed.state[clones[1]]["step"]) == 5
        results.append([p.detach() for p in clones])
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


SETTINGS = [
    {"nonfinite_grads": "skip", "process_group": None},
    {"nonfinite_grads": "ignore"},
]


@pytest.mark.parametrize("kwargs", SETTINGS, ids=["skip", "ignore"])
@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_keep_constructor_settings(kwargs: dict[str, Any], copier: str) -> None:
    optimizer = ROOT(params_with_grads((4, 3), (4,)), **kwargs)
    optimizer.step()
    optimizer.collect_diagnostics = True
    copied = copy.deepcopy(optimizer) if copier == "deepcopy" else pickle.loads(pickle.dumps(optimizer))
    for name in ("nonfinite_grads", "process_group", "collect_diagnostics", "distributed_strategy"):
        if hasattr(optimizer, name):
            assert getattr(copied, name, "<missing>") == getattr(optimizer, name), f"{copier} changed {name}"
    assert copied.nonfinite_grads == kwargs["nonfinite_grads"]
    # and it behaves so: the copy skips (or ignores) a non-finite gradient instead of raising
    for p in (p for g in copied.param_groups for p in g["params"]):
        p.grad = torch.full_like(p, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copied.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_load_pre_hook_result_is_honoured_for_half_precision(dtype: torch.dtype) -> None:
    """What a load pre-hook returns is what gets loaded, for half-precision params too (state stays float32)."""
    torch.manual_seed(0)
    params = params_with_grads((6, 4), (6,), dtype=dtype)
    optimizer = ROOT(params)
    for seed in range(2):
        set_grads(params, seed)
        optimizer.step()
    saved = optimizer.state_dict()
    clones = [Parameter(p.detach().clone()) for p in params]
    resumed = ROOT(clones)
    seen_by_post_hook = {}

    def scale_state(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = copy.deepcopy(state_dict)
        for p_state in state_dict["state"].values():
            for key, value in p_state.items():
                if key != "step" and isinstance(value, torch.Tensor):
                    p_state[key] = value * 0.5
        return state_dict

    resumed.register_load_state_dict_pre_hook(scale_state)
    resumed.register_load_state_dict_post_hook(
        lambda opt: seen_by_post_hook.update({k: v.clone() for k, v in floating_state(opt, clones[0]).items()})
    )
    resumed.load_state_dict(saved)
    for i, p in enumerate(clones):
        for key, value in floating_state(resumed, p).items():
            assert value.dtype == torch.float32, f"state {key} of a {dtype} param is {value.dtype}"
            expected = saved["state"][i][key].float() * 0.5
            torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=f"param {i} state {key}")
    for key, value in seen_by_post_hook.items():
        torch.testing.assert_close(floating_state(resumed, clones[0])[key], value, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------------
# Validation: where input enters, atomic, the same everywhere
# --------------------------------------------------------------------------------------------------------------------

BAD_GROUPS = {
    "momentum=1.5": {"momentum": 1.5},
    "ns_steps=-3": {"ns_steps": -3},
    "eps=inf": {"eps": INF},
    "clip_quantile=True": {"clip_quantile": True},
    "lr=-1": {"lr": -1.0},
    "ns_coefficients='bogus'": {"ns_coefficients": "bogus"},
    "use_root=True with a vector": {"use_root": True},
}


@pytest.mark.parametrize("bad", list(BAD_GROUPS.values()), ids=list(BAD_GROUPS))
def test_refused_group_leaves_no_trace(bad: dict[str, Any]) -> None:
    optimizer = ROOT(params_with_grads((4, 3), (4,)))
    optimizer.step()
    groups, state = group_snapshot(optimizer), state_snapshot(optimizer)
    new = params_with_grads((3, 2), (3,))
    with pytest.raises(ValueError):
        optimizer.add_param_group({"params": new, **bad})
    assert group_snapshot(optimizer) == groups, "the refused group left a trace in param_groups"
    assert_state_equal(state_snapshot(optimizer), state)
    optimizer.add_param_group({"params": new})  # the same params are still free to add
    optimizer.step()


@pytest.mark.parametrize(
    ("key", "value"),
    [("momentum", 1.5), ("ns_steps", -3), ("eps", INF), ("clip_quantile", True), ("lr", -1.0), ("betas", (1.0, 0.9))],
)
def test_load_state_dict_refuses_bad_hyperparameters(key: str, value: Any) -> None:
    source = ROOT(params_with_grads((4, 3), (4,)))
    source.step()
    state_dict = copy.deepcopy(source.state_dict())
    state_dict["param_groups"][0][key] = value
    target = ROOT(params_with_grads((4, 3), (4,)))
    target.step()
    groups, state = group_snapshot(target), state_snapshot(target)
    with pytest.raises(ValueError, match=key):
        target.load_state_dict(state_dict)
    assert group_snapshot(target) == groups, "a refused load changed param_groups"
    assert_state_equal(state_snapshot(target), state)
    target.step()


@pytest.mark.parametrize(
    ("saved_shapes", "target_shapes"),
    [
        (((32, 32), (8,)), ((16, 64), (8,))),  # same numel, other matrix shape
        (((32, 32), (8,)), ((8, 8), (8,))),  # other numel
        (((4, 4), (8,)), ((4, 4), (4,))),  # AdamW branch
    ],
    ids=["same-numel", "other-numel", "adamw-branch"],
)
def test_load_state_dict_refuses_mismatched_state_shape(saved_shapes: tuple, target_shapes: tuple) -> None:
    source = ROOT(params_with_grads(*saved_shapes))
    source.step()
    target = ROOT(params_with_grads(*target_shapes))
    groups = group_snapshot(target)
    with pytest.raises(ValueError, match=r"(?i)shape|size"):
        target.load_state_dict(source.state_dict())
    assert group_snapshot(target) == groups and len(target.state) == 0, "a refused load left state behind"
    target.step()


def _refused_or_warned_with_band(make: Callable[[], Any]) -> str:
    """Run `make`; return the ValueError or warning text that names the band (fail if there is none)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            make()
        except ValueError as exc:
            assert "band" in str(exc), f"refused without naming the band: {exc}"
            return str(exc)
    texts = [str(w.message) for w in caught if "band" in str(w.message)]
    assert texts, f"accepted without a word about the band (warnings: {[str(w.message) for w in caught]})"
    return texts[0]


UNSAFE = {
    "(100, -200, 100)": (100.0, -200.0, 100.0),
    "per-step list": [(100.0, -200.0, 100.0)] * 5,
    "ROOT paper (2048, 2048) triple": (3.4916, -4.8224, 2.1095),
}


@pytest.mark.parametrize("spec", list(UNSAFE.values()), ids=list(UNSAFE))
def test_unsafe_ns_coefficients_refused_with_band(spec: Any) -> None:
    _refused_or_warned_with_band(lambda: ROOT(params_with_grads((8, 8)), ns_coefficients=spec))
    optimizer = ROOT(params_with_grads((8, 8)))
    _refused_or_warned_with_band(
        lambda: optimizer.add_param_group({"params": params_with_grads((4, 4)), "ns_coefficients": spec})
    )


def test_safe_ns_coefficients_are_accepted_silently() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ROOT(params_with_grads((8, 8)), ns_coefficients=(3.4445, -4.7750, 2.0315)).step()


def test_eps_inf_refused_everywhere() -> None:
    accepted = entry_points_accepting("eps", INF, "eps=inf")
    from root_hf.integrations.transformers import parse_root_optim_args

    try:
        parse_root_optim_args("eps=inf")
        accepted.append("parse_root_optim_args('eps=inf')")
    except ValueError:
        pass
    assert not accepted, f"eps=inf accepted by: {accepted}"


@pytest.mark.parametrize("value", [True, False])
def test_clip_quantile_bool_refused(value: bool) -> None:
    accepted = entry_points_accepting("clip_quantile", value)
    assert not accepted, f"clip_quantile={value} accepted by: {accepted}"


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("momentum", 1.5, "momentum=1.5"),
        ("ns_steps", -3, "ns_steps=-3"),
        ("eps", math.nan, "eps=nan"),
        ("weight_decay", -0.1, "weight_decay=-0.1"),
        ("adamw_eps", INF, "adamw_eps=inf"),
        ("lr", INF, None),
    ],
)
def test_bad_value_refused_at_every_entry(key: str, value: Any, text: str | None) -> None:
    accepted = entry_points_accepting(key, value, text)
    assert not accepted, f"{key}={value!r} accepted by: {accepted}"


def test_validate_group_is_atomic() -> None:
    hyperparams = importlib.import_module("root_hf.optim.hyperparams")
    group = {**ROOT(params_with_grads((2, 2))).defaults, "params": [], "ns_dtype": torch.float32, "momentum": 1.5}
    before = dict(group)
    with pytest.raises(ValueError, match="momentum"):
        hyperparams.validate_group(group)
    assert group == before, "validate_group changed the group it refused"


def test_hyperparameter_table_drives_constructor_defaults() -> None:
    hyperparams = importlib.import_module("root_hf.optim.hyperparams")
    signature = inspect.signature(ROOT).parameters
    optimizer = ROOT(params_with_grads((2, 2)))
    in_table = {name for name, h in hyperparams.HYPERPARAMS.items() if getattr(h, "constructor", True)}
    assert set(signature) - {"params"} == in_table, "ROOT's keywords and the table's constructor entries differ"
    for name in in_table:
        h = hyperparams.HYPERPARAMS[name]
        assert signature[name].default == h.default, f"{name}: signature {signature[name].default!r} != {h.default!r}"
        if h.group:
            assert optimizer.defaults[name] == h.default, f"{name}: ROOT.defaults {optimizer.defaults[name]!r}"
    table = hyperparams.markdown_table()
    assert all(f"`{name}`" in table or name in table for name in in_table)


# --------------------------------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_root", [None, True], ids=["by-ndim", "use_root"])
def test_zero_size_parameter_is_noop(use_root: bool | None) -> None:
    empties = params_with_grads((0, 16), (16, 0), (0, 4, 3)) + ([] if use_root else params_with_grads((0,)))
    weight = params_with_grads((4, 4))[0]
    group = {"params": [*empties, weight]} if use_root is None else {"params": [*empties, weight], "use_root": True}
    optimizer = ROOT([group])
    before = weight.detach().clone()
    optimizer.step()
    optimizer.step()
    assert all(p.numel() == 0 for p in empties)
    assert not torch.equal(weight.detach(), before)
    ROOT([group]).load_state_dict(optimizer.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_finite_huge_gradient_is_not_nonfinite(dtype: torch.dtype) -> None:
    w, b = params_with_grads((8, 8), (8,), dtype=dtype)
    w.grad = torch.zeros_like(w)
    w.grad[0, 0] = 1e30
    b.grad = torch.zeros_like(b)
    b.grad[0] = 1e30
    assert torch.isfinite(w.grad).all() and torch.isfinite(b.grad).all()
    optimizer = ROOT([w, b])
    optimizer.step()  # nonfinite_grads="raise": must not call this gradient non-finite
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    w.grad[1, 1] = math.inf  # control: a real inf is still refused
    with pytest.raises(FloatingPointError):
        optimizer.step()


def test_nonfinite_error_names_optim_args_and_keyword() -> None:
    w = params_with_grads((4, 4))[0]
    w.grad[0, 0] = math.nan
    with pytest.raises(FloatingPointError) as info:
        ROOT([w]).step()
    message = str(info.value)
    assert 'optim_args="nonfinite_grads=skip"' in message or "optim_args='nonfinite_grads=skip'" in message, message
    assert "nonfinite_grads=" in message.replace('optim_args="nonfinite_grads=skip"', ""), message


# --------------------------------------------------------------------------------------------------------------------
# Distributed mode is explicit
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """An initialized single-rank gloo default group (a process group exists, as under torchrun)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_process_group_default_is_no_split(one_rank_group: None) -> None:
    assert inspect.signature(ROOT).parameters["process_group"].default is None
    functional = importlib.import_module("root_hf.optim.functional")
    parameters = inspect.signature(functional.root).parameters
    assert parameters["process_group"].default is None, "functional root(process_group=...) default"
    optimizer = ROOT(params_with_grads((4, 3), (4,)))
    assert optimizer.distributed_strategy == "single"
    optimizer.step()
    assert optimizer.distributed_strategy == "single"


@pytest.mark.parametrize("value", ["bogus", "auto", 3, True])
def test_process_group_bogus_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="process_group"):
        ROOT(params_with_grads((4, 3)), process_group=value)


# --------------------------------------------------------------------------------------------------------------------
# Nothing hidden in step(): no fit, no files, no global state
# --------------------------------------------------------------------------------------------------------------------


def test_step_writes_no_files_and_keeps_thread_count(private_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An off-table shape (37 x 91): construction may fit; step() writes no file; neither touches threads or RNG."""
    clear_schedule_cache()
    calls: list[tuple[str, int]] = []
    phase = ["construction"]
    real_set_num_threads = torch.set_num_threads

    def recording_set_num_threads(n: int) -> None:
        calls.append((phase[0], n))
        real_set_num_threads(n)

    monkeypatch.setattr(torch, "set_num_threads", recording_set_num_threads)
    threads = torch.get_num_threads()
    params = params_with_grads((37, 91), (91, 37))
    rng = torch.get_rng_state()
    optimizer = ROOT(params)
    files = listing(private_home)
    phase[0] = "step()"
    optimizer.step()
    optimizer.step()
    problems = []
    if listing(private_home) != files:
        problems.append(f"step() wrote {sorted(set(listing(private_home)) - set(files))}")
    if torch.get_num_threads() != threads:
        problems.append(f"thread count {threads} -> {torch.get_num_threads()}")
    if calls:
        problems.append(f"torch.set_num_threads called: {calls}")
    if not torch.equal(torch.get_rng_state(), rng):
        problems.append("the global RNG state changed (a fit must use its own generator)")
    assert not problems, "; ".join(problems)


def test_first_step_takes_no_fit(private_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clear_schedule_cache()
    spy = FitSpy(monkeypatch)
    optimizer = ROOT(params_with_grads((41, 83)))
    spy.forbid = "in step()"
    optimizer.step()


def test_schedule_resolved_at_construction_and_add_param_group(
    private_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off-table shapes are fitted when added (constructor, add_param_group, load_state_dict), never in step()."""
    clear_schedule_cache()
    spy = FitSpy(monkeypatch)
    optimizer = ROOT(params_with_grads((29, 53)))
    assert len(spy.calls) >= 1, "the constructor did not resolve the off-table shape's schedule"
    spy.forbid = "in step() after the constructor"
    optimizer.step()
    spy.forbid = None
    n = len(spy.calls)
    optimizer.add_param_group({"params": params_with_grads((31, 59))})
    assert len(spy.calls) > n, "add_param_group did not resolve the off-table shape's schedule"
    spy.forbid = "in step() after add_param_group"
    optimizer.step()
    spy.forbid = None
    state_dict = copy.deepcopy(optimizer.state_dict())
    state_dict["param_groups"][1]["ns_steps"] = 4  # a (shape, steps) pair not resolved yet
    n = len(spy.calls)
    optimizer.load_state_dict(state_dict)
    assert len(spy.calls) > n, "load_state_dict did not resolve the new ns_steps' schedule"
    spy.forbid = "in step() after load_state_dict"
    optimizer.step()


# --------------------------------------------------------------------------------------------------------------------
# Layering
# --------------------------------------------------------------------------------------------------------------------


def test_reference_imports_nothing_from_the_fast_path() -> None:
    """`RootReference` specifies the fast path, so it must not import it (root.py, functional.py)."""
    tree = ast.parse((REPO / "root_hf" / "optim" / "reference.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    fast = {".root", ".functional", "root_hf.optim.root", "root_hf.optim.functional"}
    assert not imported & fast, f"reference.py imports {imported & fast}"
