"""torch.optim's generic optimizer tests, run against ROOT through an `OptimizerInfo` of our own.

`torch.testing._internal.common_optimizers` (shipped in the torch wheel) provides `OptimizerInfo`, `OptimizerInput`,
`ErrorOptimizerInput` and `optim_db`; torch's own test file (`test/test_optim.py`, `TestOptimRenewed`) is not
installed, so this module is our harness around that machinery: `ROOT_INFO` is modelled on Muon's entry of `optim_db`
(no foreach/fused/differentiable implementations, no complex support), its optim inputs cover every ROOT
hyperparameter and its error inputs every refusal. Each generic test below checks one property that any
`torch.optim.Optimizer` has, for every optim input in turn; a failure lists every input that broke it.

Tests run on CPU; the CUDA variants skip without CUDA. Properties of the generic suite that do not apply to ROOT
(foreach/fused/differentiable/capturable/maximize flags, Tensor lr, complex and sparse parameters) are kept as
skipped tests whose reason says why, so the summary counts them.

Summary (run / passed / failed / skipped, each failure's first line): `python tests/optim/test_torch_suite.py`.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import Parameter

if __name__ == "__main__":  # run as a script: import this checkout's root_hf, as pytest's pythonpath=["."] does
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau, StepLR

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (pip install expecttest)")

from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
    optim_db,
)

from root_hf import ROOT

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu])]
GLOBAL_CLIQUEY_FLAGS = ("foreach", "fused", "differentiable")


# --------------------------------------------------------------------------------------------------------------------
# OptimizerInfo for ROOT
# --------------------------------------------------------------------------------------------------------------------

# Muon's unsafe-free triple (Jordan et al. 2024), https://kellerjordan.github.io/posts/muon/
MUON_TRIPLE = (3.4445, -4.7750, 2.0315)


def optim_inputs_func_root(device: str | torch.device, dtype: torch.dtype | None = None) -> list[OptimizerInput]:
    """Constructor kwargs covering every ROOT hyperparameter (params are supplied by each test)."""
    del device, dtype  # every config runs on every device and dtype
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "default"),
        ({"lr": 0.02, "weight_decay": 0.2}, "non-default lr and weight_decay"),
        ({"weight_decay": 0.0}, "no weight_decay"),
        ({"momentum": 0.8, "nesterov": False}, "momentum 0.8, plain (nesterov off)"),
        ({"momentum": 0.0}, "no momentum"),
        ({"clip_quantile": 0.5}, "clip_quantile 0.5"),
        ({"clip_quantile": 1.0, "eps": 1e-6}, "clip_quantile 1.0 (threshold = max), eps 1e-6"),
        ({"clip_quantile": None}, "clipping off"),
        ({"ns_steps": 0}, "orthogonalization off (ns_steps 0)"),
        ({"ns_steps": 3, "ns_coefficients": "polar-express"}, "ns_steps 3, polar-express"),
        ({"ns_steps": 6}, "ns_steps 6 (adaptive)"),
        ({"ns_coefficients": "muon", "adjust_lr_fn": None}, "muon coefficients, adjust_lr_fn None"),
        ({"ns_coefficients": "root-paper-safe", "adjust_lr_fn": "original"}, "root-paper-safe, adjust_lr_fn original"),
        ({"ns_coefficients": MUON_TRIPLE}, "one (a, b, c) triple"),
        ({"ns_coefficients": [MUON_TRIPLE] * 5, "ns_dtype": "float64"}, "one triple per step, ns_dtype float64"),
        ({"ns_dtype": "bfloat16"}, "ns_dtype bfloat16"),
        ({"betas": (0.8, 0.99), "adamw_eps": 1e-6}, "non-default AdamW betas and eps"),
        ({"nonfinite_grads": "skip"}, "nonfinite_grads skip"),
        ({"nonfinite_grads": "ignore", "process_group": None}, "nonfinite_grads ignore, process_group None"),
    ]
    return [OptimizerInput(params=None, kwargs=kwargs, desc=desc) for kwargs, desc in cases]


def _error(params: Any, kwargs: dict[str, Any], desc: str, error_type: type, regex: str, *, on_step: bool = False):
    return ErrorOptimizerInput(
        OptimizerInput(params=params, kwargs=kwargs, desc=desc),
        error_on=OptimizerErrorEnum.STEP_ERROR if on_step else OptimizerErrorEnum.CONSTRUCTION_ERROR,
        error_type=error_type,
        error_regex=regex,
    )


def optim_error_inputs_func_root(device: str | torch.device, dtype: torch.dtype) -> list[ErrorOptimizerInput]:
    """Inputs ROOT must refuse: torch's inputs for every optimizer, then each ROOT hyperparameter out of range."""
    error_inputs = [
        e
        for e in get_error_inputs_for_all_optims(device, dtype)
        # ROOT takes a float lr only (documented): its refusal of any Tensor lr is checked below instead.
        if e.optimizer_error_input.desc != "Tensor lr must be 1-element"
    ]
    param = torch.rand(2, 3, device=device, dtype=dtype)
    param.grad = torch.rand_like(param)
    vector = torch.rand(3, device=device, dtype=dtype)
    vector.grad = torch.rand_like(vector)
    complex_param = torch.rand(2, 3, device=device, dtype=torch.complex64)
    complex_param.grad = torch.rand_like(complex_param)
    sparse_param = torch.rand(2, 3, device=device, dtype=dtype)
    sparse_param.grad = torch.rand_like(sparse_param).to_sparse()
    inf, nan = math.inf, math.nan
    bad_values: list[tuple[str, Any]] = [
        ("lr", -1e-3),
        ("lr", inf),
        ("lr", nan),
        ("lr", torch.tensor(1e-3)),
        ("weight_decay", -0.1),
        ("weight_decay", nan),
        ("momentum", -0.1),
        ("momentum", 1.0),
        ("momentum", 1.5),
        ("nesterov", "yes"),
        ("clip_quantile", 0.0),
        ("clip_quantile", 1.5),
        ("clip_quantile", True),
        ("ns_steps", -1),
        ("ns_steps", 2.5),
        ("ns_steps", True),
        ("ns_coefficients", "bogus"),
        ("ns_coefficients", (1.0, 2.0)),
        ("ns_coefficients", (nan, 1.0, 1.0)),
        ("eps", -1.0),
        ("eps", inf),
        ("eps", nan),
        ("adjust_lr_fn", "arbitrary"),
        ("ns_dtype", "int8"),
        ("betas", (1.0, 0.9)),
        ("betas", (0.9,)),
        ("adamw_eps", -1.0),
        ("nonfinite_grads", "bogus"),
        ("process_group", "bogus"),
    ]
    for name, value in bad_values:
        # the message names the hyperparameter ("Newton-Schulz coefficients" counts for ns_coefficients)
        regex = "(?i)coefficients" if name == "ns_coefficients" else f"(?i){name}"
        error_inputs.append(_error([param], {name: value}, f"{name}={value!r}", ValueError, regex))
    error_inputs += [
        _error([{"params": [param], "use_root": "yes"}], {}, "use_root='yes'", ValueError, "use_root"),
        _error([{"params": [param], "matrix_view": "bogus"}], {}, "matrix_view='bogus'", ValueError, "matrix_view"),
        _error([{"params": [param], "matrix_split": [2, [1, 2]]}], {}, "split axis 2", ValueError, "matrix_split"),
        _error([{"params": [param], "matrix_split": [1, [1, 1]]}], {}, "split sizes", ValueError, "matrix_split"),
        _error([{"params": [vector], "use_root": True}], {}, "1-D param with use_root=True", ValueError, "use_root"),
        # Refusal at construction is as good as at step(): test_errors accepts either for step errors.
        _error([complex_param], {}, "complex param", (ValueError, RuntimeError), "(?i)complex", on_step=True),
        _error([sparse_param], {}, "sparse gradient", (ValueError, RuntimeError), "(?i)sparse", on_step=True),
    ]
    return error_inputs


_MUON_INFO = next(info for info in optim_db if info.name == "Muon")

ROOT_INFO = OptimizerInfo(
    ROOT,
    optim_inputs_func=optim_inputs_func_root,
    optim_error_inputs_func=optim_error_inputs_func_root,
    scheduler_inputs=(
        [lambda opt: StepLR(opt, gamma=0.9, step_size=10)],
        [lambda opt: ReduceLROnPlateau(opt)],
        [lambda opt: LambdaLR(opt, lr_lambda=lambda epoch: 0.95**epoch)],
        [lambda opt: StepLR(opt, gamma=0.99, step_size=10), lambda opt: ReduceLROnPlateau(opt)],
    ),
    supported_impls=_MUON_INFO.supported_impls,  # (): no foreach / fused / differentiable flag
    not_og_supported_flags=_MUON_INFO.not_og_supported_flags,
    supports_complex=False,
    supports_sparse=False,
    has_capturable_arg=False,
)


# --------------------------------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep any schedule cache the optimizer may write out of the user's home."""
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.delenv("ROOT_HF_CACHE", raising=False)


def _skip_without(device: str) -> None:
    if device == "cuda" and not CUDA:
        pytest.skip("needs CUDA")


def optim_inputs(device: str) -> list[OptimizerInput]:
    """Fresh copies of ROOT_INFO's inputs (tests may edit kwargs)."""
    return [
        OptimizerInput(params=None, kwargs=copy.deepcopy(o.kwargs), desc=o.desc)
        for o in ROOT_INFO.optim_inputs_func(device=device)
    ]


# Inputs for properties that do not depend on hyperparameters (hooks, printing): a few, to keep the suite fast.
SMOKE = ("default", "orthogonalization off (ns_steps 0)", "clipping off", "nonfinite_grads skip")


def smoke_inputs(device: str) -> list[OptimizerInput]:
    return [o for o in optim_inputs(device) if o.desc in SMOKE]


def for_each_input(device: str, check: Callable[[dict[str, Any]], None], inputs: list[OptimizerInput] | None = None):
    """Run `check(kwargs)` for every optim input; fail once at the end, naming every input that failed and why."""
    inputs = inputs if inputs is not None else optim_inputs(device)
    failures: dict[str, list[str]] = {}
    for optim_input in inputs:
        try:
            check(optim_input.kwargs)
        except pytest.skip.Exception:
            raise
        except Exception as exc:
            failures.setdefault(_first_line(exc), []).append(optim_input.desc)
    if failures:
        pytest.fail(_failure_report(failures, len(inputs), "optim input"), pytrace=False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _failure_report(failures: dict[str, list[str]], total: int, what: str) -> str:
    """One line per distinct failure message, with the inputs that hit it ("every ..." when all did)."""
    lines = []
    for message, descs in failures.items():
        who = f"every {what} ({total})" if len(descs) == total else ", ".join(descs)
        lines.append(f"{message}  <- {who}")
    return f"{sum(map(len, failures.values()))} of {total} {what}s failed:\n" + "\n".join(lines)


def assert_equal(actual: Any, expected: Any, msg: str = "") -> None:
    """Exact equality of tensors, or of nested containers of tensors and plain values."""
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=msg or None)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{msg}: {type(actual).__name__} is not a dict"
        extra, missing = sorted(set(actual) - set(expected), key=str), sorted(set(expected) - set(actual), key=str)
        assert not extra and not missing, f"{msg} keys differ: {extra} only in actual, {missing} only in expected"
        for key in expected:
            assert_equal(actual[key], expected[key], f"{msg}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{msg}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_equal(a, e, f"{msg}[{i}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert isinstance(actual, float) and math.isnan(actual), f"{msg}: {actual!r} != nan"
    else:
        assert actual == expected, f"{msg}: {actual!r} != {expected!r}"


def weight_bias(device: str, dtype: torch.dtype = torch.float32, contiguous: bool = True) -> tuple[Parameter, ...]:
    if contiguous:
        weight = Parameter(torch.randn((10, 5), device=device, dtype=dtype))
        bias = Parameter(torch.randn(10, device=device, dtype=dtype))
    else:
        weight = Parameter(torch.randn((10, 5, 2), device=device, dtype=dtype)[..., 0])
        bias = Parameter(torch.randn((10, 2), device=device, dtype=dtype)[..., 0])
    return weight, bias


def linear_loss(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (weight.mv(x) + bias).float().pow(2).sum()


def conv_bn_model(device: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))
    return model.to(device=device, dtype=dtype)


def fwd_bwd(optimizer: torch.optim.Optimizer, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad()
    loss = model(x).sum()
    loss.backward()
    return loss


def primed(kwargs: dict[str, Any], device: str, steps: int = 3, named: bool = False):
    """A conv + batch-norm model (ROOT and AdamW branches both used) and a ROOT that took `steps` steps on it."""
    model = conv_bn_model(device)
    x = torch.rand(1, 4, 16, 16, device=device)
    optimizer = ROOT(model.named_parameters() if named else model.parameters(), **kwargs)
    for _ in range(steps):
        fwd_bwd(optimizer, model, x)
        optimizer.step()
    return model, optimizer, x


# --------------------------------------------------------------------------------------------------------------------
# The OptimizerInfo itself
# --------------------------------------------------------------------------------------------------------------------


def test_optim_info_inputs_do_not_set_global_cliquey_flags() -> None:
    for optim_input in ROOT_INFO.optim_inputs_func(device="cpu"):
        assert not any(flag in optim_input.kwargs for flag in GLOBAL_CLIQUEY_FLAGS), optim_input.desc


@pytest.mark.parametrize("device", DEVICES)
def test_errors(device: str) -> None:
    """Every error input is refused with its error type and message; a step error may also come at construction."""
    _skip_without(device)
    failures: dict[str, list[str]] = {}
    error_inputs = ROOT_INFO.optim_error_inputs_func(device=device, dtype=torch.float32)
    for error_input in error_inputs:
        optim_input = error_input.optimizer_error_input
        params, kwargs = optim_input.params, optim_input.kwargs
        kind, regex = error_input.error_type, error_input.error_regex
        try:
            if isinstance(kind, type) and issubclass(kind, Warning):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        ROOT(params, **kwargs)
                    except ValueError as exc:  # refused outright where torch warns (a duplicated parameter): stricter
                        assert "pass each parameter once" in str(exc), f"unexpected refusal {str(exc)!r}"
                        continue
                assert any(issubclass(w.category, kind) and re.search(regex, str(w.message)) for w in caught), (
                    f"no {kind.__name__} matching {regex!r}"
                )
                continue
            if error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
                try:
                    optimizer = ROOT(params, **kwargs)
                except kind as exc:  # refused when it entered: stricter than torch asks
                    assert re.search(regex, str(exc)), f"message {str(exc)!r} does not match {regex!r}"
                    continue
                with pytest.raises(kind, match=regex):
                    optimizer.step()
            else:
                with pytest.raises(kind, match=regex):
                    ROOT(params, **kwargs)
        except BaseException as exc:  # pytest.raises' Failed is a BaseException
            if isinstance(exc, KeyboardInterrupt):
                raise
            failures.setdefault(_first_line(exc), []).append(optim_input.desc)
    if failures:
        pytest.fail(_failure_report(failures, len(error_inputs), "error input"), pytrace=False)


# --------------------------------------------------------------------------------------------------------------------
# Optimization goes the right way
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "contiguous"),
    [(torch.float32, True), (torch.float32, False), (torch.float64, True), (torch.bfloat16, True)],
    ids=["float32", "float32-noncontiguous", "float64", "bfloat16"],
)
def test_forloop_goes_right_direction(device: str, dtype: torch.dtype, contiguous: bool) -> None:
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        if dtype == torch.bfloat16:
            # bf16 has 8 mantissa bits: a step of lr 1e-3 rounds away on weights of size 1 (true of any optimizer
            # without stochastic rounding), so bf16 params take a larger lr.
            kwargs["lr"] = max(kwargs.get("lr", 0.0), 0.05)
        torch.manual_seed(0)
        weight, bias = weight_bias(device, dtype, contiguous)
        x = torch.randn(5, device=device, dtype=dtype)
        optimizer = ROOT([weight, bias], **kwargs)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = linear_loss(weight, bias, x)
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            optimizer.step(closure)
        final = closure().item()
        assert final < initial, f"loss went from {initial} to {final}"
        assert weight.dtype == dtype and bias.dtype == dtype

    for_each_input(device, check)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.gpu
def test_forloop_goes_right_direction_multigpu() -> None:
    def check(kwargs: dict[str, Any]) -> None:
        weight = Parameter(torch.randn((10, 5), device="cuda:0"))
        bias = Parameter(torch.randn(10, device="cuda:1"))
        x = torch.randn(5, device="cuda:0")
        optimizer = ROOT([weight, bias], **kwargs)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = (weight.mv(x).cuda(1) + bias).pow(2).sum()
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            optimizer.step(closure)
        assert closure().item() < initial

    for_each_input("cuda", check)


@pytest.mark.parametrize("device", DEVICES)
def test_param_group_with_lrscheduler_goes_right_direction(device: str) -> None:
    _skip_without(device)
    failures = []
    for schedulers_c in ROOT_INFO.scheduler_inputs:

        def check(kwargs: dict[str, Any], schedulers_c=schedulers_c) -> None:
            torch.manual_seed(0)
            weight, bias = weight_bias(device)
            x = torch.randn(5, device=device)
            optimizer = ROOT([{"params": [weight]}, {"params": [bias], "lr": 1e-2}], **kwargs)
            schedulers = [make(optimizer) for make in schedulers_c]

            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                loss = linear_loss(weight, bias, x)
                loss.backward()
                return loss

            initial = closure().item()
            for _ in range(20):
                optimizer.step(closure)
                for scheduler in schedulers:
                    if isinstance(scheduler, ReduceLROnPlateau):
                        scheduler.step(closure())
                    else:
                        scheduler.step()
            assert closure().item() < initial

        try:
            for_each_input(device, check)
        except pytest.fail.Exception as exc:
            names = "+".join(type(make(torch.optim.SGD([weight_bias("cpu")[0]]))).__name__ for make in schedulers_c)
            failures.append(f"{names}: {exc}")
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


@pytest.mark.parametrize("device", DEVICES)
def test_param_groups_weight_decay(device: str) -> None:
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        torch.manual_seed(0)
        weight, bias = weight_bias(device)
        x = torch.randn(5, device=device)
        optimizer = ROOT([dict(params=[weight], **kwargs), dict(params=[bias], **{**kwargs, "weight_decay": 0.0})])
        initial = linear_loss(weight, bias, x).item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = linear_loss(weight, bias, x)
            loss.backward()
            optimizer.step()
        assert loss.item() < initial

    # kwargs that are not group keys (nonfinite_grads, process_group) go to the constructor, not the groups
    for_each_input(
        device,
        check,
        [o for o in optim_inputs(device) if not ({"nonfinite_grads", "process_group"} & set(o.kwargs))],
    )


@pytest.mark.parametrize("device", DEVICES)
def test_param_groups_lr(device: str) -> None:
    """A group's own lr wins over the constructor's; a group with lr ~ 0 does not move."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        torch.manual_seed(0)
        group_kwargs = {k: v for k, v in kwargs.items() if k not in ("nonfinite_grads", "process_group")}
        group_kwargs["lr"] = group_kwargs.get("lr") or 1e-3
        weight, bias = weight_bias(device)
        irrelevant = Parameter(torch.randn(2, device=device))
        irrelevant_matrix = Parameter(torch.randn(3, 4, device=device))
        frozen = [irrelevant.detach().clone(), irrelevant_matrix.detach().clone()]
        x = torch.randn(5, device=device)
        optimizer = ROOT(
            [dict(params=[weight, bias], **group_kwargs), dict(params=[irrelevant, irrelevant_matrix])],
            lr=1e-28,
            weight_decay=0.0,
        )
        initial = linear_loss(weight, bias, x).item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = linear_loss(weight, bias, x)
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            irrelevant_matrix.grad = torch.rand_like(irrelevant_matrix)
            optimizer.step()
        assert loss.item() < initial
        assert_equal(irrelevant.detach(), frozen[0], "vector with lr 1e-28")
        assert_equal(irrelevant_matrix.detach(), frozen[1], "matrix with lr 1e-28")

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_param_groups_use_root_go_right_direction(device: str) -> None:
    """Groups with use_root True / False / None (per parameter) all train."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        torch.manual_seed(0)
        weight, bias = weight_bias(device)
        weight2 = Parameter(torch.randn(10, 5, device=device))
        x = torch.randn(5, device=device)
        optimizer = ROOT(
            [
                {"params": [weight], "use_root": True},
                {"params": [weight2], "use_root": False},
                {"params": [bias], "use_root": None},
            ],
            **kwargs,
        )
        assert len(optimizer.param_groups) == 3, f"3 user groups became {len(optimizer.param_groups)} param_groups"

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = linear_loss(weight + weight2, bias, x)
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            optimizer.step(closure)
        assert closure().item() < initial
        assert "momentum_buffer" in optimizer.state[weight], "use_root=True matrix is not on the ROOT branch"
        assert "exp_avg" in optimizer.state[weight2], "use_root=False matrix is not on the AdamW branch"
        assert "exp_avg" in optimizer.state[bias], "vector is not on the AdamW branch"

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_param_groups_matrix_views_go_right_direction(device: str) -> None:
    """Groups with matrix_view="batched" (fused experts) and matrix_split (fused projections) train and round-trip."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        torch.manual_seed(0)
        experts = Parameter(torch.randn(3, 6, 4, device=device))  # (E, out, in)
        fused = Parameter(torch.randn(8, 4, device=device))  # two (4, 4) blocks stacked along the rows
        x = torch.randn(4, device=device)
        groups = [
            {"params": [experts], "matrix_view": "batched"},
            {"params": [fused], "matrix_split": [0, [4, 4]]},
        ]
        optimizer = ROOT(groups, **kwargs)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = (experts @ x).pow(2).sum() + (fused @ x).pow(2).sum()
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            optimizer.step(closure)
        assert closure().item() < initial
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        assert [g["matrix_view"] for g in loaded["param_groups"]] == ["batched", "flatten"]
        assert [g["matrix_split"] for g in loaded["param_groups"]][1] in ([0, [4, 4]], (0, (4, 4)), (0, [4, 4]))
        clone = ROOT([{"params": [Parameter(p.detach().clone())]} for p in (experts, fused)])
        clone.load_state_dict(loaded)
        assert_equal(clone.state_dict(), optimizer.state_dict())

    for_each_input(device, check)


# --------------------------------------------------------------------------------------------------------------------
# step() semantics
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_step_is_noop_when_params_have_no_grad(device: str) -> None:
    _skip_without(device)
    params = [torch.randn(2, 3, device=device) for _ in range(2)] + [torch.randn(3, device=device)]
    old = [p.clone() for p in params]

    def check(kwargs: dict[str, Any]) -> None:
        optimizer = ROOT(params, **kwargs)
        optimizer.step(lambda: torch.tensor([1.0]))
        assert_equal(params, old)
        assert len(optimizer.state) == 0, "a step without grads created state"

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_step_is_noop_for_zero_grads(device: str) -> None:
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        if kwargs.get("weight_decay", 0.1) != 0:
            kwargs["weight_decay"] = 0.0  # decay moves params whatever the grads
        params = [Parameter(torch.randn(5, 1, device=device)), Parameter(torch.randn(5, device=device))]
        old = [p.detach().clone() for p in params]
        optimizer = ROOT(params, **kwargs)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        assert_equal([p.detach() for p in params], old)

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_step_with_closure_returns_loss(device: str) -> None:
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        weight, bias = weight_bias(device)
        x = torch.randn(5, device=device)
        optimizer = ROOT([weight, bias], **kwargs)
        calls = []

        def closure() -> torch.Tensor:
            calls.append(torch.is_grad_enabled())
            optimizer.zero_grad()
            loss = linear_loss(weight, bias, x)
            loss.backward()
            return loss

        expected = linear_loss(weight, bias, x).item()
        loss = optimizer.step(closure)
        assert calls == [True], f"closure called {len(calls)} times, grad mode {calls}"
        assert loss.item() == expected
        assert optimizer.step() is None

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(device: str, set_to_none: bool) -> None:
    _skip_without(device)
    weight, bias = weight_bias(device)
    optimizer = ROOT([weight, bias])
    linear_loss(weight, bias, torch.randn(5, device=device)).backward()
    optimizer.zero_grad(set_to_none=set_to_none)
    for p in (weight, bias):
        if set_to_none:
            assert p.grad is None
        else:
            assert_equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("device", DEVICES)
def test_grads_are_never_inplaced_into(device: str) -> None:
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        params = [Parameter(torch.randn(4, 3, device=device)), Parameter(torch.randn(3, device=device))]
        optimizer = ROOT(params, **kwargs)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            grads = [p.grad.clone() for p in params]
            optimizer.step()
            assert_equal([p.grad for p in params], grads, "grad changed by step()")

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_non_empty_state(device: str) -> None:
    """Every parameter with a grad has state after a step (momentum buffer or AdamW moments)."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        model, optimizer, _ = primed(kwargs, device, steps=1)
        for name, p in model.named_parameters():
            state = optimizer.state[p]
            assert state, f"{name} has no state"
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    assert torch.isfinite(value).all(), f"{name}.{key} not finite"

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_step_count_state(device: str) -> None:
    """AdamW-branch `step` is a float32 scalar tensor counting the steps that param took (not those without grad)."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        weight, bias = weight_bias(device)
        optimizer = ROOT([weight, bias], **kwargs)
        for i in range(4):
            weight.grad = torch.randn_like(weight)
            bias.grad = torch.randn_like(bias) if i != 2 else None
            optimizer.step()
        step = optimizer.state[bias]["step"]
        assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.numel() == 1, step
        assert step.item() == 3, f"step is {step.item()}, 3 steps had a grad"

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_param_dtypes_keep_dtype_and_state_policy(device: str, dtype: torch.dtype) -> None:
    """Params keep their dtype; floating state is float32 for half-precision params, else the param's own dtype."""
    _skip_without(device)
    state_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype

    def check(kwargs: dict[str, Any]) -> None:
        torch.manual_seed(0)
        params = [Parameter(torch.randn(6, 4, device=device, dtype=dtype)), Parameter(torch.randn(6, device=device))]
        params[1].data = params[1].data.to(dtype)
        optimizer = ROOT(params, **kwargs)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
        for p in params:
            assert p.dtype == dtype and torch.isfinite(p).all()
            for key, value in optimizer.state[p].items():
                if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                    assert value.dtype == state_dtype, f"state {key} is {value.dtype}, expected {state_dtype}"

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_size_params_are_noop(device: str) -> None:
    """Empty parameters (0 x 16, 16 x 0, (0,)) take a step without error and without changing anything else."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        torch.manual_seed(0)
        empties = [
            Parameter(torch.empty(0, 16, device=device)),
            Parameter(torch.empty(16, 0, device=device)),
            Parameter(torch.empty(0, device=device)),
        ]
        weight = Parameter(torch.randn(4, 4, device=device))
        optimizer = ROOT([*empties, weight], **kwargs)
        before = weight.detach().clone()
        for _ in range(2):
            for p in (*empties, weight):
                p.grad = torch.randn_like(p)
            optimizer.step()
        assert not torch.equal(weight.detach(), before), "the non-empty weight did not move"
        ROOT([*empties, weight], **kwargs).load_state_dict(optimizer.state_dict())

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_scalar_param(device: str) -> None:
    """A 0-dim parameter (torch's generic suite always adds one) takes AdamW steps."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        scalar = Parameter(torch.tensor(1.5, device=device))
        weight = Parameter(torch.randn(3, 2, device=device))
        optimizer = ROOT([weight, scalar], **kwargs)
        for _ in range(3):
            scalar.grad = torch.rand_like(scalar)
            weight.grad = torch.randn_like(weight)
            optimizer.step()
        assert scalar.item() < 1.5 and "exp_avg" in optimizer.state[scalar]

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_lr_step_on_zero_grads_changes_nothing(device: str) -> None:
    """lr 0 and zero grads (what torch.distributed.checkpoint does to initialize state) move nothing, make no NaN."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        kwargs["lr"] = 0.0
        model = conv_bn_model(device)
        optimizer = ROOT(model.parameters(), **kwargs)
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        assert_equal([p.detach() for p in model.parameters()], before)
        for state in optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    assert torch.isfinite(value).all(), f"state {key} not finite"

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtype_params_in_one_group(device: str) -> None:
    """Same-shape matrices of different dtypes in one group each train and keep their dtype."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        torch.manual_seed(0)
        dtypes = (torch.float32, torch.bfloat16, torch.float64)
        params = [Parameter(torch.randn(6, 4, device=device, dtype=d)) for d in dtypes]
        params += [Parameter(torch.randn(6, device=device, dtype=d)) for d in dtypes]
        optimizer = ROOT(params, **{**kwargs, "lr": max(kwargs.get("lr", 0.0), 0.05)})
        before = [p.detach().clone() for p in params]
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
        for p, b in zip(params, before, strict=True):
            assert p.dtype == b.dtype and torch.isfinite(p).all()
            assert not torch.equal(p.detach(), b), f"a {p.dtype} {tuple(p.shape)} param did not move"

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_param_groups_rewritten_in_place(device: str) -> None:
    """New tensors put into param_groups in place (as accelerate's FSDP2 preparation does) are the ones stepped."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        weight, bias = weight_bias(device)
        optimizer = ROOT([weight, bias], **kwargs)
        new = [Parameter(p.detach().clone()) for p in (weight, bias)]
        for group in optimizer.param_groups:
            group["params"] = [new[[id(weight), id(bias)].index(id(p))] for p in group["params"]]
        before = [p.detach().clone() for p in new]
        for _ in range(2):
            for p in new:
                p.grad = torch.randn_like(p)
            optimizer.step()
        assert all(not torch.equal(p.detach(), b) for p, b in zip(new, before, strict=True)), "new params not moved"
        ROOT([Parameter(p.detach().clone()) for p in new], **kwargs).load_state_dict(optimizer.state_dict())

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_steps_and_skips(device: str) -> None:
    """torch.amp.GradScaler drives the optimizer: finite steps apply, a step with inf grads is skipped."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        weight, bias = weight_bias(device)
        x = torch.randn(5, device=device)
        optimizer = ROOT([weight, bias], **kwargs)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
        before = [weight.detach().clone(), bias.detach().clone()]
        optimizer.zero_grad()
        scaler.scale(linear_loss(weight, bias, x)).backward()
        scaler.step(optimizer)
        scaler.update()
        assert not torch.equal(weight.detach(), before[0]), "a finite scaled step did not apply"
        moved = [weight.detach().clone(), bias.detach().clone()]
        optimizer.zero_grad()
        scaler.scale(linear_loss(weight, bias, x) * math.inf).backward()
        scaler.step(optimizer)  # found inf: the scaler skips optimizer.step()
        scaler.update()
        assert_equal([weight.detach(), bias.detach()], moved)
        assert scaler.get_scale() < 2.0**8

    for_each_input(device, check)


# --------------------------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------------------------


def _two_params(device: str) -> list[Parameter]:
    params = [Parameter(torch.randn(2, 3, device=device)), Parameter(torch.randn(3, device=device))]
    for p in params:
        p.grad = torch.rand_like(p)
    return params


@pytest.mark.parametrize("device", DEVICES)
def test_step_pre_hook(device: str) -> None:
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        optimizer = ROOT(_two_params(device), **kwargs)
        data = []
        handle = optimizer.register_step_pre_hook(lambda opt, args, kw: data.append(("pre", opt is optimizer)))
        optimizer.step()
        optimizer.step()
        handle.remove()
        optimizer.step()
        assert data == [("pre", True)] * 2

    for_each_input(device, check, smoke_inputs(device))


@pytest.mark.parametrize("device", DEVICES)
def test_step_post_hook(device: str) -> None:
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        optimizer = ROOT(_two_params(device), **kwargs)
        data = []
        handle = optimizer.register_step_post_hook(lambda opt, args, kw: data.append(("post", len(opt.state))))
        optimizer.step()
        handle.remove()
        optimizer.step()
        assert data == [("post", 2)], data

    for_each_input(device, check, smoke_inputs(device))


@pytest.mark.parametrize("device", DEVICES)
def test_step_all_hooks(device: str) -> None:
    """Global and per-optimizer step hooks run in order: global pre, pre, step, post, global post."""
    _skip_without(device)
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    def check(kwargs: dict[str, Any]) -> None:
        optimizer = ROOT(_two_params(device), **kwargs)
        data: list[str] = []
        handles = [
            register_optimizer_step_pre_hook(lambda opt, args, kw: data.append("global pre")),
            optimizer.register_step_pre_hook(lambda opt, args, kw: data.append("pre")),
            optimizer.register_step_post_hook(lambda opt, args, kw: data.append("post")),
            register_optimizer_step_post_hook(lambda opt, args, kw: data.append("global post")),
        ]
        try:
            optimizer.step()
        finally:
            for handle in handles:
                handle.remove()
        optimizer.step()
        assert data == ["global pre", "pre", "post", "global post"], data

    for_each_input(device, check, smoke_inputs(device))


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_pre_hook(device: str) -> None:
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        optimizer = ROOT(_two_params(device), **kwargs)
        optimizer.step()
        seen = []
        optimizer.register_state_dict_pre_hook(lambda opt: seen.append(len(opt.state)))
        optimizer.state_dict()
        assert seen == [2]

    for_each_input(device, check, smoke_inputs(device))


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_post_hook(device: str) -> None:
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        optimizer = ROOT(_two_params(device), **kwargs)
        optimizer.step()

        def post(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
            state_dict["ran_post_hook"] = True
            return state_dict

        optimizer.register_state_dict_post_hook(post)
        assert optimizer.state_dict().get("ran_post_hook") is True

    for_each_input(device, check, smoke_inputs(device))


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_pre_post_hook(device: str) -> None:
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        optimizer = ROOT(_two_params(device), **kwargs)
        optimizer.step()
        marker = {}
        optimizer.register_state_dict_pre_hook(lambda opt: marker.setdefault("pre", True))

        def post(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
            state_dict["ran_pre_hook"] = marker.get("pre", False)

        optimizer.register_state_dict_post_hook(post)
        assert optimizer.state_dict()["ran_pre_hook"] is True

    for_each_input(device, check, smoke_inputs(device))


def _scaled_state(state_dict: dict[str, Any], factor: float) -> dict[str, Any]:
    """A deep copy of `state_dict` with lr 0.003 and every floating state tensor (but `step`) times `factor`."""
    state_dict = copy.deepcopy(state_dict)
    state_dict["param_groups"][0]["lr"] = 0.003
    for p_state in state_dict["state"].values():
        for key, value in p_state.items():
            if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                p_state[key] = value * factor
    return state_dict


def assert_state_scaled(optimizer: torch.optim.Optimizer, saved: dict[str, Any], factor: float) -> None:
    """Every floating state tensor (but `step`) of `optimizer` is exactly `factor` times the saved one."""
    saved_ids = [i for group in saved["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in zip(saved_ids, params, strict=True):
        for key, value in saved["state"].get(i, {}).items():
            if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                loaded = optimizer.state[p][key]
                torch.testing.assert_close(loaded.float(), (value * factor).float(), rtol=0, atol=0, msg=key)


HOOK_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])


@pytest.mark.parametrize("device", DEVICES)
@HOOK_DTYPES
def test_load_state_dict_pre_hook_and_prepend(device: str, dtype: torch.dtype) -> None:
    """What a load pre-hook returns is what gets loaded (state included, for half-precision params too)."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        model, optimizer, _ = primed(kwargs, device)
        model.to(dtype)
        saved = optimizer.state_dict()
        model2 = conv_bn_model(device, dtype)
        optimizer2 = ROOT(model2.parameters(), **kwargs)

        def set_lr(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
            state_dict["param_groups"][0]["lr"] = 0.002

        optimizer2.register_load_state_dict_pre_hook(set_lr)
        optimizer2.register_load_state_dict_pre_hook(lambda opt, sd: _scaled_state(sd, 0.5), prepend=True)
        optimizer2.load_state_dict(saved)
        assert optimizer2.param_groups[0]["lr"] == 0.002, "the prepended hook did not run first"
        assert_state_scaled(optimizer2, saved, 0.5)

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_load_state_dict_post_hook(device: str) -> None:
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        _, optimizer, _ = primed(kwargs, device)
        saved = optimizer.state_dict()
        ran = []
        optimizer.register_load_state_dict_post_hook(lambda opt: ran.append(len(opt.state)))
        optimizer.load_state_dict(saved)
        assert ran == [4]

    for_each_input(device, check, smoke_inputs(device))


@pytest.mark.parametrize("device", DEVICES)
@HOOK_DTYPES
def test_load_state_dict_pre_post_hook(device: str, dtype: torch.dtype) -> None:
    """The post-hook sees the state the pre-hook returned."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        model, optimizer, _ = primed(kwargs, device)
        model.to(dtype)
        saved = optimizer.state_dict()
        seen = {}
        optimizer.register_load_state_dict_pre_hook(lambda opt, sd: _scaled_state(sd, 0.0))

        def post(opt: torch.optim.Optimizer) -> None:
            seen["lr"] = opt.param_groups[0]["lr"]
            seen["zero"] = all(
                not bool(v.any())
                for s in opt.state.values()
                for k, v in s.items()
                if k != "step" and isinstance(v, torch.Tensor) and v.is_floating_point()
            )

        optimizer.register_load_state_dict_post_hook(post)
        optimizer.load_state_dict(saved)
        assert seen == {"lr": 0.003, "zero": True}, seen
        assert_state_scaled(optimizer, saved, 0.0)  # and what the post-hook saw is what stays loaded

    for_each_input(device, check)


# --------------------------------------------------------------------------------------------------------------------
# state_dict, deepcopy, pickle
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_can_be_printed(device: str) -> None:
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        text = repr(ROOT(_two_params(device), **kwargs))
        assert text.startswith("ROOT (") and "lr:" in text

    for_each_input(device, check, smoke_inputs(device))


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_deterministic(device: str) -> None:
    """A second optimizer loaded from the first's state dict continues identically (both branches)."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        torch.manual_seed(0)
        weight = Parameter(torch.randn(2, 3, device=device))
        bias = Parameter(torch.randn(2, device=device))
        x = torch.randn(3, device=device)
        optimizer = ROOT([weight, bias], **kwargs)

        def closure_for(opt, w, b):
            def closure():
                opt.zero_grad()
                loss = linear_loss(w, b, x)
                loss.backward()
                return loss

            return closure

        for _ in range(10):
            optimizer.step(closure_for(optimizer, weight, bias))
        weight_c = Parameter(weight.detach().clone())
        bias_c = Parameter(bias.detach().clone())
        optimizer_c = ROOT([weight_c, bias_c], **kwargs)
        optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for _ in range(10):
            optimizer.step(closure_for(optimizer, weight, bias))
            optimizer_c.step(closure_for(optimizer_c, weight_c, bias_c))
            assert_equal([weight_c.detach(), bias_c.detach()], [weight.detach(), bias.detach()])
        assert_equal(optimizer_c.state_dict(), optimizer.state_dict())
        optimizer_c.param_groups.extend(optimizer_c.param_groups)
        assert_equal(optimizer_c.state_dict()["param_groups"][-1], optimizer.state_dict()["param_groups"][-1])

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_can_load_older_state_dict(device: str) -> None:
    """A state dict without the flags torch added later (maximize, foreach, ...) loads and steps."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        model, optimizer, x = primed(kwargs, device)
        old = copy.deepcopy(optimizer.state_dict())
        for group in old["param_groups"]:
            for flag in ("maximize", "foreach", "fused", "differentiable", "capturable"):
                group.pop(flag, None)
        optimizer.load_state_dict(old)
        fwd_bwd(optimizer, model, x)
        optimizer.step()

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_named_optim0", [True, False], ids=["named0", "unnamed0"])
@pytest.mark.parametrize("is_named_optim1", [True, False], ids=["named1", "unnamed1"])
def test_can_load_from_to_named_state_dict(device: str, is_named_optim0: bool, is_named_optim1: bool) -> None:
    """Named and unnamed optimizers load each other's state dicts; param_names stay those of the user's group."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        model, optimizer, x = primed(kwargs, device, named=is_named_optim0)
        saved = copy.deepcopy(optimizer.state_dict())
        optimizer2 = ROOT(model.named_parameters() if is_named_optim1 else model.parameters(), **kwargs)
        optimizer2.load_state_dict(saved)
        fwd_bwd(optimizer, model, x)
        optimizer.step()
        optimizer2.step()
        if is_named_optim0 or is_named_optim1:
            names = optimizer2.state_dict()["param_groups"][0].get("param_names")
            assert names == ["0.weight", "0.bias", "1.weight", "1.bias"], f"param_names of group 0: {names}"

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_save_load_equality_with_weights_only(device: str) -> None:
    """The state dict survives torch.save / torch.load(weights_only=True) unchanged and loads back."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        model, optimizer, _ = primed(kwargs, device)
        state_dict = optimizer.state_dict()
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        assert_equal(loaded, state_dict)
        ROOT(model.parameters(), **kwargs).load_state_dict(loaded)

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_load_nontensor_step(device: str) -> None:
    """A state dict whose `step` entries are plain numbers (older torch) loads and steps, as torch.optim.AdamW does."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        params = _two_params(device)
        optimizer = ROOT(params, **kwargs)
        for _ in range(3):
            optimizer.step()
        state_dict = copy.deepcopy(optimizer.state_dict())
        for p_state in state_dict["state"].values():
            if isinstance(p_state.get("step"), torch.Tensor):
                p_state["step"] = p_state["step"].item()
        optimizer.load_state_dict(state_dict)
        optimizer.step()

    for_each_input(device, check)


@pytest.mark.gpu
def test_state_dict_with_cuda_params() -> None:
    """A CPU optimizer's state dict loads into a CUDA optimizer, which then steps like the CPU one."""

    def check(kwargs: dict[str, Any]) -> None:
        kwargs.setdefault("ns_dtype", "float32")  # "auto" is bf16 on CUDA, fp32 on CPU
        params = [Parameter(torch.randn(2, 3)), Parameter(torch.randn(3))]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = ROOT(params, **kwargs)
        for _ in range(3):
            optimizer.step()
        params_cuda = [Parameter(p.detach().cuda()) for p in params]
        for p, pc in zip(params, params_cuda, strict=True):
            pc.grad = p.grad.cuda()
        optimizer_cuda = ROOT(params_cuda, **kwargs)
        state_dict = copy.deepcopy(optimizer.state_dict())
        optimizer_cuda.load_state_dict(copy.deepcopy(state_dict))
        for _ in range(3):
            optimizer.step()
            optimizer_cuda.step()
        for p, pc in zip(params, params_cuda, strict=True):
            torch.testing.assert_close(pc.detach().cpu(), p.detach(), rtol=1e-4, atol=1e-5)

    for_each_input("cuda", check)


def _public_attrs(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {k: v for k, v in optimizer.__dict__.items() if not k.startswith("_") and k not in ("state",)}


def _assert_same_optimizer(copied: torch.optim.Optimizer, original: torch.optim.Optimizer) -> None:
    before, after = _public_attrs(original), _public_attrs(copied)
    assert set(after) == set(before), f"public attributes {set(after) ^ set(before)} lost or gained"
    for key, value in before.items():
        if key in ("param_groups", "defaults", "last_diagnostics"):
            continue
        assert_equal(after[key], value, f"attribute {key}")
    # torch's Optimizer.__setstate__ adds defaults["differentiable"] = False: that is torch's, not a difference
    assert_equal(copied.defaults, {"differentiable": False, **original.defaults}, "defaults")
    assert_equal(copied.state_dict(), original.state_dict(), "state_dict")


@pytest.mark.parametrize("device", DEVICES)
def test_deepcopy_copies_all_public_attrs(device: str) -> None:
    """deepcopy keeps every public attribute with its value (constructor settings included) and the state."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        optimizer = ROOT(_two_params(device), **kwargs)
        for _ in range(3):
            optimizer.step()
        _assert_same_optimizer(copy.deepcopy(optimizer), optimizer)

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_pickle_round_trip(device: str) -> None:
    """pickle keeps every public attribute with its value (constructor settings included) and the state."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        optimizer = ROOT(_two_params(device), **kwargs)
        for _ in range(3):
            optimizer.step()
        _assert_same_optimizer(pickle.loads(pickle.dumps(optimizer)), optimizer)

    for_each_input(device, check)


# --------------------------------------------------------------------------------------------------------------------
# Param groups: add_param_group, schedulers, names
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_add_param_group(device: str) -> None:
    """An added group is one more param group, takes the defaults it does not set, steps and round-trips."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        weight, bias = weight_bias(device)
        weight2 = Parameter(torch.randn(3, 4, device=device))
        bias2 = Parameter(torch.randn(3, device=device))
        optimizer = ROOT([weight, bias], **kwargs)
        n_groups = len(optimizer.param_groups)
        optimizer.add_param_group({"params": [weight2, bias2], "lr": 0.01})
        assert len(optimizer.param_groups) == n_groups + 1, "one added group became several param_groups"
        added = optimizer.param_groups[-1]
        assert added["lr"] == 0.01
        for key in optimizer.defaults:
            if key != "lr":
                assert_equal(added[key], optimizer.param_groups[0][key], f"default {key}")
        for p in (weight, bias, weight2, bias2):
            p.grad = torch.randn_like(p)
        optimizer.step()
        clone = ROOT([weight, bias], **kwargs)
        clone.add_param_group({"params": [weight2, bias2], "lr": 0.01})
        clone.load_state_dict(optimizer.state_dict())
        assert_equal(clone.state_dict(), optimizer.state_dict())

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_lambda_lr_one_lambda_per_user_group(device: str) -> None:
    """LambdaLR(opt, [f1, f2]) works with two user groups that each hold a matrix and a vector."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        w1, b1 = weight_bias(device)
        w2, b2 = weight_bias(device)
        optimizer = ROOT([{"params": [w1, b1]}, {"params": [w2, b2], "lr": 0.01}], **kwargs)
        scheduler = LambdaLR(optimizer, [lambda epoch: 1.0, lambda epoch: 0.5**epoch])
        for p in (w1, b1, w2, b2):
            p.grad = torch.randn_like(p)
        optimizer.step()
        scheduler.step()
        assert [g["lr"] for g in optimizer.param_groups] == [kwargs.get("lr", 1e-3), 0.005]

    for_each_input(device, check)


@pytest.mark.parametrize("device", DEVICES)
def test_named_parameters_param_names_line_up(device: str) -> None:
    """ROOT(model.named_parameters()) has one group whose param_names are the model's names, in order."""
    _skip_without(device)

    def check(kwargs: dict[str, Any]) -> None:
        model, optimizer, _ = primed(kwargs, device, steps=1, named=True)
        names = [name for name, _ in model.named_parameters()]
        assert [g.get("param_names") for g in optimizer.param_groups] == [names]
        state_dict = optimizer.state_dict()
        assert [g.get("param_names") for g in state_dict["param_groups"]] == [names]
        assert sorted(state_dict["state"]) == list(range(len(names)))

    for_each_input(device, check)


# --------------------------------------------------------------------------------------------------------------------
# Parts of torch's generic suite that do not apply to ROOT (kept so the summary counts them)
# --------------------------------------------------------------------------------------------------------------------

NOT_APPLICABLE = {
    "test_foreach_matches_forloop": "ROOT has no foreach flag: it always batches same-shape matrices",
    "test_fused_matches_forloop": "ROOT has no fused implementation",
    "test_set_default_dtype_works_with_foreach": "ROOT has no foreach flag",
    "test_peak_memory_foreach": "ROOT has no foreach flag",
    "test_differentiable": "ROOT's step runs under no_grad; it has no differentiable flag",
    "test_maximize": "ROOT has no maximize flag",
    "test_capturable": "ROOT has no capturable flag (no CUDA-graph capture of the step)",
    "test_tensor_lr": "ROOT takes a float lr only; its refusal of a Tensor lr is in test_errors",
    "test_complex": "ROOT refuses complex parameters (supports_complex=False); the refusal is in test_errors",
    "test_rosenbrock_sparse": "ROOT refuses sparse gradients (supports_sparse=False); the refusal is in test_errors",
}


@pytest.mark.parametrize("name", sorted(NOT_APPLICABLE))
def test_not_applicable(name: str) -> None:
    assert ROOT_INFO.supported_impls == () and not ROOT_INFO.supports_complex and not ROOT_INFO.supports_sparse
    pytest.skip(f"{name}: {NOT_APPLICABLE[name]}")


# --------------------------------------------------------------------------------------------------------------------
# Summary: python tests/optim/test_torch_suite.py
# --------------------------------------------------------------------------------------------------------------------


class _Summary:
    def __init__(self) -> None:
        self.outcomes: dict[str, list[tuple[str, str]]] = {"passed": [], "failed": [], "skipped": []}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or (report.when == "setup" and not report.passed):
            outcome = "failed" if report.failed else report.outcome
            detail = ""
            if report.skipped and isinstance(report.longrepr, tuple):
                detail = report.longrepr[2]
            elif report.failed:
                detail = getattr(report.longrepr, "reprcrash", None)
                detail = detail.message if detail is not None else str(report.longrepr)
            self.outcomes[outcome].append((report.nodeid.split("::")[-1], detail))

    def print(self) -> None:
        passed, failed, skipped = (self.outcomes[k] for k in ("passed", "failed", "skipped"))
        print(
            f"\ntorch generic suite for ROOT: {len(passed) + len(failed)} run, {len(passed)} passed, "
            f"{len(failed)} failed, {len(skipped)} skipped"
        )
        for name, detail in failed:
            print(f"FAILED {name}\n    " + detail.replace("\n", "\n    "))


if __name__ == "__main__":
    summary = _Summary()
    code = pytest.main([__file__, "-q", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[summary])
    summary.print()
    sys.exit(int(code))
