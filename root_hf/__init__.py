"""root_hf: the ROOT optimizer (Robust Orthogonalized Optimizer, arXiv 2511.20626) for PyTorch and Hugging Face.

`import root_hf` needs only torch: the Hugging Face pieces listed in `_LAZY` load on first access (they need
`pip install "root-hf[hf]"`). It also makes `optim="root"` available to `transformers.TrainingArguments`, whether
`transformers` is imported before or after root_hf: at once if it is already imported, else when it is (a cheap
`sys.meta_path` hook, the startup hook's `_root_hf_autoload.install`; see `root_hf.integrations.optim_root`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from _root_hf_autoload import install as _install_import_hook

from .optim import ROOT, RootReference, orthogonalize
from .schedules import get_schedule, schedule_band

__version__ = "0.1.0"

if TYPE_CHECKING:  # the lazy names, for type checkers and the API reference (mkdocstrings reads them statically)
    from .integrations.callbacks import RootDiagnosticsCallback, add_root_diagnostics
    from .integrations.optim_root import register_root_optimizer
    from .integrations.routing import ParamRouting, route_parameters
    from .integrations.transformers import (
        RootOptimizerFactory,
        RootTrainer,
        RootTrainerMixin,
        create_root_optimizer,
        parse_root_optim_args,
    )

# Public names that live in modules needing optional dependencies: name -> module, imported on first access.
_LAZY: dict[str, str] = {
    "ParamRouting": "root_hf.integrations.routing",
    "RootDiagnosticsCallback": "root_hf.integrations.callbacks",
    "RootOptimizerFactory": "root_hf.integrations.transformers",
    "RootTrainer": "root_hf.integrations.transformers",
    "RootTrainerMixin": "root_hf.integrations.transformers",
    "add_root_diagnostics": "root_hf.integrations.callbacks",
    "create_root_optimizer": "root_hf.integrations.transformers",
    "parse_root_optim_args": "root_hf.integrations.transformers",
    "register_root_optimizer": "root_hf.integrations.optim_root",
    "route_parameters": "root_hf.integrations.routing",
}

__all__ = [
    "ParamRouting",
    "ROOT",
    "RootDiagnosticsCallback",
    "RootOptimizerFactory",
    "RootReference",
    "RootTrainer",
    "RootTrainerMixin",
    "__version__",
    "add_root_diagnostics",
    "create_root_optimizer",
    "get_schedule",
    "orthogonalize",
    "parse_root_optim_args",
    "register_root_optimizer",
    "route_parameters",
    "schedule_band",
]

# Register optim="root" with transformers now or when it gets imported (stdlib only; never imports transformers).
_install_import_hook()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'root_hf' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "root_hf":
            raise
        raise ImportError(
            f"root_hf.{name} needs the Hugging Face stack, but {exc.name!r} is not installed. Install it with: "
            'pip install "root-hf[hf]"'
        ) from exc
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
