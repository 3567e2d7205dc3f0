"""ROOT's hyperparameters, declared once: default, type, accepted values, help, where they may be set.

Everything else derives from `HYPERPARAMS`: the defaults of `ROOT` and `RootReference`, the validation of every param
group (constructor, `add_param_group`, `load_state_dict`: `validate_group`), the parsing of the Hugging Face
`optim_args` string (`parse_optim_args`), the keyword arguments the Hugging Face factory accepts, and the table in the
docs (`markdown_table`).

Each entry says where its value lives:

- `group=True`: a param-group key (the constructor argument, if any, is the default of every group);
- `group=False, constructor=True`: an optimizer-level keyword of `ROOT` (`nonfinite_grads`, `process_group`);
- `group=False, constructor=False`: read by the Hugging Face layer only (`optim_args`, `create_root_optimizer`).

Example:
    >>> parse_optim_args("momentum=0.9, nesterov=false, clip_quantile=none")
    {'momentum': 0.9, 'nesterov': False, 'clip_quantile': None}
    >>> HYPERPARAMS["momentum"].default
    0.95
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..schedules import DEFAULT_SCHEDULE, SAFE_BAND, SCHEDULE_NAMES, get_schedule, normalize_schedule_spec
from .newton_schulz import NS_DTYPES, NS_METHODS
from .views import MATRIX_VIEWS, normalize_matrix_split, normalize_matrix_view

__all__ = [
    "ADJUST_LR_FNS",
    "DEFAULTS",
    "HYPERPARAMS",
    "LORA_ADJUST_LR_FNS",
    "FUSED_PROJECTIONS",
    "LORA_POLICIES",
    "ROUTER_BRANCHES",
    "NONFINITE_MODES",
    "Hyperparam",
    "check_process_group",
    "markdown_table",
    "parse_optim_args",
    "validate_group",
]

ADJUST_LR_FNS: tuple[str | None, ...] = ("match_rms_adamw", "original", None)
NONFINITE_MODES: tuple[str, ...] = ("raise", "skip", "ignore")
# PEFT LoRA options of the Hugging Face routing (root_hf.integrations.routing applies them).
LORA_POLICIES: tuple[str, ...] = ("both", "b_only", "none")
LORA_ADJUST_LR_FNS: tuple[str | None, ...] = ("inherit", *ADJUST_LR_FNS)
# MoE and fused-projection options of the Hugging Face routing (root_hf.integrations.routing; docs/models.md).
ROUTER_BRANCHES: tuple[str, ...] = ("adamw", "root")
FUSED_PROJECTIONS: tuple[str, ...] = ("split", "whole")

_TRUE, _FALSE, _NONE = ("true", "1", "yes", "on"), ("false", "0", "no", "off"), ("none", "null")


@dataclass(frozen=True)
class Hyperparam:
    """One hyperparameter.

    Attributes:
        name: the keyword / param-group key.
        default: the default value.
        check: validates a Python value and returns its normalized, plain form (raises `ValueError`).
        from_text: converts an `optim_args` string to a Python value (raises `ValueError`); None if not settable there.
        accepted: the accepted values, in words (used in error messages and the docs table).
        help: one line on what it does.
        group: a param-group key (else optimizer-level or Hugging Face layer only).
        constructor: a keyword argument of `ROOT`.
    """

    name: str
    default: Any
    check: Callable[[Any], Any]
    from_text: Callable[[str], Any] | None
    accepted: str
    help: str
    group: bool = True
    constructor: bool = True

    @property
    def optim_args(self) -> bool:
        """Whether the Hugging Face `optim_args` string may set it."""
        return self.from_text is not None

    def error(self, value: Any) -> ValueError:
        return ValueError(f"Invalid {self.name}: {value!r}. Must be {self.accepted}.")


# -- checks and text converters ---------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = True, none: bool = False):
    """A finite real number in the interval, or None when `none`; ints are accepted, bools and tensors are not."""

    def check(value: Any) -> float | None:
        if value is None and none:
            return None
        if not _is_number(value) or not math.isfinite(value):
            raise ValueError
        ok_low = value > low if low_open else value >= low
        ok_high = value < high if high_open else value <= high
        if not (ok_low and ok_high):
            raise ValueError
        return float(value)

    return check


def _integer(low: int, high: int):
    def check(value: Any) -> int:
        if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
            raise ValueError
        return int(value)

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError
    return value


def _choice(options: tuple[Any, ...]):
    def check(value: Any) -> Any:
        if not (value is None or isinstance(value, str)) or value not in options:
            raise ValueError
        return value

    return check


def _optional_bool(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError
    return value


def _betas(value: Any) -> tuple[float, float]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError
    check = _number(0.0, 1.0)
    return (check(value[0]), check(value[1]))


def _ns_dtype(value: Any) -> str:
    if isinstance(value, torch.dtype):
        for name, dtype in NS_DTYPES.items():
            if dtype == value:
                return name  # plain string: param_groups stay loadable with torch.load(weights_only=True)
        raise ValueError
    if not isinstance(value, str) or value not in ("auto", *NS_DTYPES):
        raise ValueError
    return value


def _schedule_spec(value: Any) -> Any:
    try:
        return normalize_schedule_spec(value)
    except (ValueError, TypeError) as e:
        raise ValueError from e


def _text_number(check: Callable[[Any], Any], none: bool = False) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if none and text.lower() in _NONE:
            return None
        return check(float(text))

    return convert


def _text_integer(check: Callable[[Any], Any]) -> Callable[[str], Any]:
    return lambda text: check(int(text))


def _text_bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError


def _text_choice(options: tuple[Any, ...]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if text.lower() in _NONE and None in options:
            return None
        if text not in options:
            raise ValueError
        return text

    return convert


def check_process_group(value: Any) -> Any:
    """Validate `process_group`: None (no DDP work split), `"default"` (torch.distributed's default group) or a
    `ProcessGroup`; returns it.

    Raises:
        ValueError: for anything else.
    """
    if value is None or (isinstance(value, str) and value == "default"):
        return value
    if torch.distributed.is_available() and isinstance(value, torch.distributed.ProcessGroup):
        return value
    raise HYPERPARAMS["process_group"].error(value)


def _names(options: tuple[Any, ...]) -> str:
    return ", ".join("none" if o is None else str(o) for o in options)


_UNIT = _number(0.0, 1.0)
_NONNEG = _number(0.0)

HYPERPARAMS: dict[str, Hyperparam] = {
    hp.name: hp
    for hp in (
        Hyperparam(
            "lr", 1e-3, _NONNEG, None, "a finite float >= 0", "learning rate of both branches"
        ),  # lr and weight_decay come from TrainingArguments (learning_rate, weight_decay), not from optim_args
        Hyperparam(
            "weight_decay",
            0.1,
            _NONNEG,
            None,
            "a finite float >= 0",
            "decoupled weight decay, applied as W *= 1 - lr * weight_decay",
        ),
        Hyperparam(
            "momentum", 0.95, _UNIT, _text_number(_UNIT), "a float in [0, 1)", "momentum mu of the ROOT branch"
        ),
        Hyperparam(
            "nesterov", True, _boolean, _text_bool, "true or false", "Nesterov direction U = G + mu M (ROOT branch)"
        ),
        Hyperparam(
            "clip_quantile",
            0.90,
            _number(0.0, 1.0, low_open=True, high_open=False, none=True),
            _text_number(_number(0.0, 1.0, low_open=True, high_open=False), none=True),
            "a float in (0, 1], or none (outlier clipping off)",
            "quantile level q of the outlier soft-threshold",
        ),
        Hyperparam(
            "ns_steps",
            5,
            _integer(0, 100),
            _text_integer(_integer(0, 100)),
            "an integer in [0, 100] (0: orthogonalization off)",
            "Newton-Schulz steps K",
        ),
        Hyperparam(
            "ns_coefficients",
            DEFAULT_SCHEDULE,
            _schedule_spec,
            _text_choice(SCHEDULE_NAMES),
            f"one of {_names(SCHEDULE_NAMES)}, a triple (a, b, c) or one triple per step, whose composition stays in "
            f"the safe band [{SAFE_BAND[0]}, {SAFE_BAND[1]}]",
            "Newton-Schulz coefficient schedule",
        ),
        Hyperparam(
            "eps", 1e-7, _NONNEG, _text_number(_NONNEG), "a finite float >= 0", "added to ||B||_F before normalizing"
        ),
        Hyperparam(
            "adjust_lr_fn",
            "match_rms_adamw",
            _choice(ADJUST_LR_FNS),
            _text_choice(ADJUST_LR_FNS),
            f"one of {_names(ADJUST_LR_FNS)}",
            "scale s(m, n) of the orthogonalized update",
        ),
        Hyperparam(
            "ns_dtype",
            "auto",
            _ns_dtype,
            _text_choice(("auto", *NS_DTYPES)),
            f"one of auto, {', '.join(NS_DTYPES)} or that torch.dtype",
            "dtype of the Newton-Schulz iteration (auto: bfloat16 on CUDA and on CPUs with native bfloat16 matmul, "
            "else float32)",
        ),
        Hyperparam(
            "ns_method",
            "auto",
            _choice(NS_METHODS),
            _text_choice(NS_METHODS),
            f"one of {_names(NS_METHODS)}",
            "form of the Newton-Schulz iteration: standard, gram (on the k x k Gram matrix, k = min(m, n)) or auto "
            "(per matrix shape and dtype, the one the measured cost rule picks)",
        ),
        Hyperparam("betas", (0.9, 0.95), _betas, None, "two floats in [0, 1)", "AdamW branch (beta1, beta2)"),
        Hyperparam("adamw_eps", 1e-8, _NONNEG, _text_number(_NONNEG), "a finite float >= 0", "AdamW branch epsilon"),
        Hyperparam(
            "use_root",
            None,
            _optional_bool,
            None,
            "True, False or None",
            "branch of the group's params: True ROOT, False AdamW, None by ndim (>= 2: ROOT)",
            constructor=False,
        ),
        Hyperparam(
            "matrix_view",
            "flatten",
            normalize_matrix_view,
            None,
            f"one of {_names(MATRIX_VIEWS)}",
            "flatten: one (shape[0], -1) matrix; batched: one (out, in) matrix per index of the leading dims",
            constructor=False,
        ),
        Hyperparam(
            "matrix_split",
            None,
            normalize_matrix_split,
            None,
            "None or [axis, [size, ...]] (axis 0: rows, 1: columns)",
            "cut each matrix into independent blocks (fused projections)",
            constructor=False,
        ),
        Hyperparam(
            "nonfinite_grads",
            "raise",
            _choice(NONFINITE_MODES),
            _text_choice(NONFINITE_MODES),
            f"one of {_names(NONFINITE_MODES)}",
            "what a step does with an inf/NaN gradient: raise, skip the step with a warning, or no check",
            group=False,
        ),
        Hyperparam(
            "process_group",
            None,
            lambda value: check_process_group(value),
            None,
            "None, 'default' or a torch.distributed ProcessGroup",
            "DDP work split: None off (every rank computes everything), 'default' or a group: each matrix on one rank",
            group=False,
        ),
        # Read by the Hugging Face layer (root_hf.integrations), settable through optim_args.
        Hyperparam(
            "adamw_beta1",
            None,
            _number(0.0, 1.0, none=True),
            _text_number(_UNIT),
            "a float in [0, 1)",
            "AdamW branch beta1 (default: adam_beta1)",
            group=False,
            constructor=False,
        ),
        Hyperparam(
            "adamw_beta2",
            None,
            _number(0.0, 1.0, none=True),
            _text_number(_UNIT),
            "a float in [0, 1)",
            "AdamW branch beta2 (default: adam_beta2)",
            group=False,
            constructor=False,
        ),
        Hyperparam(
            "adamw_lr",
            None,
            _number(0.0, none=True),
            _text_number(_NONNEG),
            "a finite float >= 0",
            "AdamW branch lr (default: learning_rate)",
            group=False,
            constructor=False,
        ),
        Hyperparam(
            "adamw_weight_decay",
            None,
            _number(0.0, none=True),
            _text_number(_NONNEG),
            "a finite float >= 0",
            "AdamW branch weight decay (default: weight_decay)",
            group=False,
            constructor=False,
        ),
        Hyperparam(
            "diagnostics_steps",
            None,
            lambda v: None if v is None else _integer(0, 2**62)(v),
            _text_integer(_integer(0, 2**62)),
            "an integer >= 0 (0: off)",
            "log ROOT diagnostics every N optimizer steps (default: logging_steps)",
            group=False,
            constructor=False,
        ),
        Hyperparam(
            "lora_policy",
            "b_only",
            _choice(LORA_POLICIES),
            _text_choice(LORA_POLICIES),
            f"one of {_names(LORA_POLICIES)}",
            "which PEFT LoRA factors take the ROOT branch",
            group=False,
            constructor=False,
        ),
        Hyperparam(
            "lora_adjust_lr_fn",
            "inherit",
            _choice(LORA_ADJUST_LR_FNS),
            _text_choice(LORA_ADJUST_LR_FNS),
            f"one of {_names(LORA_ADJUST_LR_FNS)}",
            "scale of the LoRA factors' orthogonalized update (default: inherit adjust_lr_fn)",
            group=False,
            constructor=False,
        ),
        Hyperparam(
            "router_branch",
            "adamw",
            _choice(ROUTER_BRANCHES),
            _text_choice(ROUTER_BRANCHES),
            f"one of {_names(ROUTER_BRANCHES)}",
            "where MoE router weights go (docs/models.md)",
            group=False,
            constructor=False,
        ),
        Hyperparam(
            "fused_projections",
            "split",
            _choice(FUSED_PROJECTIONS),
            _text_choice(FUSED_PROJECTIONS),
            f"one of {_names(FUSED_PROJECTIONS)}",
            "orthogonalize each block of a fused projection (split) or the fused tensor as one matrix (whole)",
            group=False,
            constructor=False,
        ),
    )
}

# Defaults of every param group (the constructor's group-level arguments plus the group-only keys).
DEFAULTS: dict[str, Any] = {hp.name: hp.default for hp in HYPERPARAMS.values() if hp.group}


def _check(name: str, value: Any) -> Any:
    hp = HYPERPARAMS[name]
    if isinstance(value, torch.Tensor):
        raise ValueError(f"Invalid {name}: a Tensor {name} is not supported by ROOT. Pass a plain value.")
    try:
        return hp.check(value)
    except (ValueError, TypeError):
        raise hp.error(value) from None


def _check_schedule_safe(spec: Any, ns_steps: int) -> None:
    """Explicit coefficients must have `ns_steps` triples (or one) and keep every singular value in the safe band."""
    if not isinstance(spec, str):  # named schedules are resolved (and checked) per shape when a param is added
        get_schedule(spec, (1, 1), ns_steps)  # raises, naming the band, for unsafe or mis-sized coefficients


def validate_group(group: Mapping[str, Any]) -> None:
    """Validate the hyperparameters present in a param group and normalize them in place, all or nothing.

    Every present key of `HYPERPARAMS` with `group=True` is checked; unknown keys (e.g. `initial_lr` from LR
    schedulers, `param_names`) are left alone. Explicit `ns_coefficients` are checked against `ns_steps` and the safe
    band. On failure nothing is changed.

    Args:
        group: a param-group dict (its `params` are not looked at).

    Raises:
        ValueError: naming the first invalid value and what is accepted.
    """
    normalized = {name: _check(name, group[name]) for name, hp in HYPERPARAMS.items() if hp.group and name in group}
    if "ns_coefficients" in normalized:
        _check_schedule_safe(normalized["ns_coefficients"], normalized.get("ns_steps", DEFAULTS["ns_steps"]))
    group.update(normalized)  # type: ignore[attr-defined]


def parse_optim_args(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Parse an `optim_args` string `"key=value,key=value"` (spaces ignored) into typed, validated values.

    `none` means None where a key allows it; booleans are `true/false` (also `1/0`, `yes/no`, `on/off`). A mapping is
    parsed value by value (values converted from their `str`).

    Args:
        text: the string, a mapping, or None (nothing set).

    Returns:
        The settings, keyed by hyperparameter name.

    Raises:
        ValueError: for a malformed item (`"momentum"`, `"a=b=c"`, an empty item as in `",,,"`), an unknown key (the
            message lists the valid keys) or a bad value (the message says what the key accepts).

    Example:
        >>> parse_optim_args("momentum=0.9,ns_coefficients=muon,nonfinite_grads=skip")
        {'momentum': 0.9, 'ns_coefficients': 'muon', 'nonfinite_grads': 'skip'}
    """
    valid = ", ".join(name for name, hp in HYPERPARAMS.items() if hp.optim_args)
    if text is None:
        return {}
    if isinstance(text, Mapping):
        items = [(str(k), str(v)) for k, v in text.items()]
    elif isinstance(text, str):
        items = []
        stripped = text.replace(" ", "")
        for entry in stripped.split(",") if stripped else []:
            key, sep, value = entry.partition("=")
            if not sep or not key or not value or "=" in value:
                raise ValueError(
                    f"Invalid optim_args item {entry!r} in {text!r}: each comma-separated item must be key=value. "
                    f"Valid keys: {valid}."
                )
            items.append((key, value))
    else:
        raise ValueError(f"Invalid optim_args: {text!r}. Must be a 'key=value,key=value' string, a mapping or None.")
    parsed: dict[str, Any] = {}
    for key, value in items:
        hp = HYPERPARAMS.get(key)
        if hp is None or not hp.optim_args:
            raise ValueError(f"Unknown optim_args key {key!r}. Valid keys: {valid}.")
        try:
            parsed[key] = hp.from_text(value)  # type: ignore[misc]
        except (ValueError, TypeError, OverflowError):
            raise ValueError(f"Invalid optim_args value {key}={value!r}: must be {hp.accepted}.") from None
    return parsed


def markdown_table() -> str:
    """The hyperparameter table of the docs, as Markdown: name, default, accepted values, where it is set, help.

    Example:
        >>> markdown_table().splitlines()[0]
        '| name | default | accepted | set in | optim_args | what it does |'
    """
    lines = ["| name | default | accepted | set in | optim_args | what it does |", "|---|---|---|---|---|---|"]
    for hp in HYPERPARAMS.values():
        where = "param group" if hp.group else ("ROOT(...)" if hp.constructor else "Hugging Face layer")
        if hp.group and hp.constructor:
            where = "ROOT(...), param group"
        lines.append(
            f"| `{hp.name}` | `{hp.default!r}` | {hp.accepted} | {where} | {'yes' if hp.optim_args else 'no'} | "
            f"{hp.help} |"
        )
    return "\n".join(lines)
