"""Hugging Face integration: `optim="root"` for `Trainer` / TRL, parameter routing and live diagnostics.

Importing this package is light (standard library only); the modules that need `transformers` load on first access
of the names below.

- `optim_root`: `optim_root_hook`, the one function through which the startup hook (`_root_hf_autoload`, which owns
  the registration with transformers) reaches root_hf, and `register_root_optimizer`.
- `transformers`: the `Trainer` handler, `optim_args` parsing, `RootTrainer` / `RootTrainerMixin`,
  `create_root_optimizer` and `RootOptimizerFactory`.
- `routing`: which parameter goes to which branch (by name and role; PEFT-aware). Needs only torch.
- `callbacks`: `RootDiagnosticsCallback`, ROOT's statistics in the `Trainer` logs.
"""

from __future__ import annotations

import importlib
from typing import Any

from .optim_root import optim_root_hook, register_root_optimizer

_LAZY: dict[str, str] = {
    "OPTIM_ARGS": ".transformers",
    "ParamRouting": ".routing",
    "RootDiagnosticsCallback": ".callbacks",
    "RootOptimizerFactory": ".transformers",
    "RootTrainer": ".transformers",
    "RootTrainerMixin": ".transformers",
    "RoutedParam": ".routing",
    "add_root_diagnostics": ".callbacks",
    "check_root_compatible": ".transformers",
    "create_root_optimizer": ".transformers",
    "parse_root_optim_args": ".transformers",
    "route_parameters": ".routing",
}

__all__ = [
    "OPTIM_ARGS",
    "ParamRouting",
    "RootDiagnosticsCallback",
    "RootOptimizerFactory",
    "RootTrainer",
    "RootTrainerMixin",
    "RoutedParam",
    "add_root_diagnostics",
    "check_root_compatible",
    "create_root_optimizer",
    "optim_root_hook",
    "parse_root_optim_args",
    "register_root_optimizer",
    "route_parameters",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'root_hf.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
