"""Registration of `optim="root"` with `transformers`: the package's side of the startup hook.

The registration itself (the `OptimizerNames` member, the `Trainer` handler, the `Trainer` wrappers and the
`sys.meta_path` hook that runs them when `transformers` is imported) lives in the top-level, standard-library-only
package `_root_hf_autoload` (its `registration` module), so that the interpreter-startup hook
(`root_hf_autoload.pth`) can install it without importing torch. This module re-exports it for `import root_hf`
(which installs the hook too, whether or not `ROOT_HF_AUTOLOAD=0` switched the startup hook off), adds
`register_root_optimizer` and unpickles `OptimizerNames("root")`. Without registration, the documented fallbacks
still work: `RootTrainer`, `RootTrainerMixin`, `create_root_optimizer` and
`optimizer_cls_and_kwargs=(RootOptimizerFactory, {...})`.
"""

from __future__ import annotations

from typing import Any

from _root_hf_autoload import ENV_VAR, _CallbackLoader, _hook, _PostImportHook, autoload_enabled, install
from _root_hf_autoload import registration as _autoload
from _root_hf_autoload.registration import (
    _FALLBACKS,
    OPTIM_NAME,
    SUPPORTED_TRANSFORMERS,
    add_enum_member,
    transformers_version_supported,
)
from _root_hf_autoload.registration import register_handler as _register_handler
from _root_hf_autoload.registration import register_name as _register_name

__all__ = [
    "ENV_VAR",
    "OPTIM_NAME",
    "SUPPORTED_TRANSFORMERS",
    "add_enum_member",
    "autoload_enabled",
    "install_import_hook",
    "register_root_optimizer",
    "transformers_version_supported",
]

# Kept for code written against the earlier layout of this module.
_exported_for_compatibility = (_CallbackLoader, _PostImportHook, _hook, _register_handler, _FALLBACKS)
install_import_hook = install


def _restore_optim_name(value: str) -> Any:
    """Unpickle `OptimizerNames("root")`: registers the name first. Returns the plain string if it cannot be."""
    import transformers.training_args as training_args

    _register_name(training_args)
    try:
        return training_args.OptimizerNames(value)
    except ValueError:
        _autoload._warn_once("unpickle", f"root_hf: OptimizerNames({value!r}) could not be restored; keeping the str.")
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

    registered = bool(_register_name(training_args) and _register_handler(trainer_optimizer))
    install()
    return registered
