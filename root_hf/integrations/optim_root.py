"""`optim="root"`, the package's side: `optim_root_hook`, the startup hook's one way in, and `register_root_optimizer`.

The registration itself (the `OptimizerNames` member, the `Trainer` handler, the `Trainer` wrappers and the
`sys.meta_path` hook that runs them when `transformers` is imported) belongs to the top-level, standard-library-only
package `_root_hf_autoload` (its `patches` module), so that the interpreter-startup hook (`root_hf_autoload.pth`)
installs it without importing torch. What needs root_hf it reaches through `optim_root_hook`, whose name it holds
as `_root_hf_autoload.patches.PACKAGE_ENTRY_POINT` and resolves only when a `Trainer` builds its optimizer or a
pickled `OptimizerNames("root")` is loaded. So the dependency runs one way: this module imports public names of
`_root_hf_autoload`, which imports nothing of root_hf. Without registration the documented fallbacks still work:
`RootTrainer`, `RootTrainerMixin`, `create_root_optimizer` and `optimizer_cls_and_kwargs=(RootOptimizerFactory,
{...})`.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from _root_hf_autoload import install
from _root_hf_autoload.patches import register_handler, register_name

__all__ = ["OPTIM_ROOT_EVENTS", "optim_root_hook", "register_root_optimizer"]

# The events of optim_root_hook, with the arguments each takes.
OPTIM_ROOT_EVENTS: dict[str, tuple[str, ...]] = {
    "optimizer": ("args", "model"),
    "optimizer_created": ("trainer", "optimizer"),
    "optim_name": ("value",),
}

_TRANSFORMERS_MODULE = "root_hf.integrations.transformers"


def optim_root_hook(event: str, *args: Any) -> Any:
    """The package's side of `optim="root"`: the one function the startup hook (`_root_hf_autoload`) calls.

    The startup hook holds this function's name (`_root_hf_autoload.patches.PACKAGE_ENTRY_POINT`,
    `"root_hf.integrations:optim_root_hook"`) and resolves it only when it needs root_hf:

    - `optim_root_hook("optimizer", args, model)`, from `Trainer.get_optimizer_cls_and_kwargs` and
      `_OPTIMIZER_HANDLERS["root"]` for `optim="root"`: `(RootOptimizerFactory, kwargs)`, see
      `root_hf.integrations.transformers.root_optimizer_cls_and_kwargs`.
    - `optim_root_hook("optimizer_created", trainer, optimizer)`, from `Trainer.create_optimizer` once it built the
      optimizer: the `RootDiagnosticsCallback` it attached (see `attach_root_diagnostics`), or None.
    - `optim_root_hook("optim_name", value)`, from unpickling `OptimizerNames("root")` (a `training_args.bin`): the
      member, after registering the name; the plain string if it cannot be.

    Raises:
        ValueError: an unknown event or a wrong number of arguments (the message lists the events); from
            `"optimizer"`, a malformed `optim_args` or a refused setup (DeepSpeed, FSDP1).

    Example:
        >>> optim_root_hook("optim_name", "root").value
        'root'
    """
    names = OPTIM_ROOT_EVENTS.get(event)
    if names is None or len(args) != len(names):
        accepted = "; ".join(f"{name!r} ({', '.join(params)})" for name, params in OPTIM_ROOT_EVENTS.items())
        raise ValueError(f"optim_root_hook: invalid event {event!r} with {len(args)} argument(s). Events: {accepted}.")
    if event == "optimizer":
        from .transformers import root_optimizer_cls_and_kwargs

        return root_optimizer_cls_and_kwargs(*args)
    if event == "optimizer_created":
        hf = sys.modules.get(_TRANSFORMERS_MODULE)  # imported if root_hf built this optimizer; else nothing to do
        return None if hf is None else hf.attach_root_diagnostics(*args)
    return _restore_optim_name(*args)


def _restore_optim_name(value: str) -> Any:
    """Unpickle `OptimizerNames(value)`: registers the name first. Returns the plain string if it cannot be."""
    import transformers.training_args as training_args

    register_name(training_args)
    try:
        return training_args.OptimizerNames(value)
    except ValueError:
        warnings.warn(f"root_hf: OptimizerNames({value!r}) could not be restored; keeping the str.", stacklevel=2)
        return value


def register_root_optimizer() -> bool:
    """Register `optim="root"` with `transformers` now (the startup hook and `import root_hf` already do).

    Idempotent. Imports `transformers.training_args` and `transformers.trainer_optimizer`; wraps
    `Trainer.create_optimizer` / `get_optimizer_cls_and_kwargs` now if `transformers.trainer` is imported, else when it
    is.
    Returns True when `optim="root"` is root_hf's ROOT, False (with a warning) when it could not be registered:
    unsupported `transformers` version, missing private hooks, or an upstream `"root"` that is left in place.

    Example:
        >>> import root_hf
        >>> root_hf.register_root_optimizer()
        True
        >>> from transformers import TrainingArguments
        >>> TrainingArguments("out", optim="root", report_to="none").optim.value
        'root'
    """
    import transformers.trainer_optimizer as trainer_optimizer
    import transformers.training_args as training_args

    registered = bool(register_name(training_args) and register_handler(trainer_optimizer))
    install()
    return registered
