"""Registration of ``optim="root"`` with ``transformers``, and the import hook that makes it automatic.

This module is imported by ``import root_hf`` and therefore uses the standard library only: it never imports
``transformers`` itself. Two private hooks of ``transformers`` are extended (see SPEC section 4):

- the ``OptimizerNames`` enum of ``transformers.training_args`` gets a member ``ROOT = "root"``, so that
  ``TrainingArguments(optim="root")``, ``--optim root`` on ``HfArgumentParser`` / ``TrlParser`` and YAML configs accept
  the name. The member pickles through :func:`_restore_optim_name`, so a ``training_args.bin`` written with
  ``optim="root"`` loads in a process that never imported root_hf (unpickling imports it).
- ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` gets a handler for it, so the stock ``Trainer`` builds ROOT.

Both are done when the corresponding ``transformers`` module finishes executing: at once when it was imported before
root_hf, else by a one-shot ``sys.meta_path`` finder that runs a callback after the module's code. Registration is
idempotent, checks the ``transformers`` version, never replaces an upstream ``"root"``, and never breaks an import
(failures become warnings). Without it, the documented fallbacks need no registration: ``RootTrainer``,
``RootTrainerMixin``, ``create_root_optimizer`` and ``optimizer_cls_and_kwargs=(RootOptimizerFactory, {...})``.
"""

from __future__ import annotations

import re
import sys
import threading
import warnings
from collections.abc import Callable
from enum import Enum
from types import ModuleType
from typing import Any

__all__ = ["OPTIM_NAME", "SUPPORTED_TRANSFORMERS", "install_import_hook", "register_root_optimizer"]

OPTIM_NAME = "root"
_MEMBER_NAME = "ROOT"
_OWNED = "_root_hf_owned"

# Versions whose private hooks were read and tested (5.23); 6.x may change them, so it needs a new root_hf release.
SUPPORTED_TRANSFORMERS: tuple[tuple[int, int], tuple[int, int]] = ((5, 0), (6, 0))  # [min, max)

_TRAINING_ARGS = "transformers.training_args"
_TRAINER_OPTIMIZER = "transformers.trainer_optimizer"
_FALLBACKS = (
    "Use the fallbacks that need no registration: root_hf.RootTrainer (or RootTrainerMixin with any Trainer "
    "subclass), Trainer(optimizer_cls_and_kwargs=(root_hf.RootOptimizerFactory, {...})) or "
    "root_hf.create_root_optimizer(model, args)."
)
_lock = threading.RLock()
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _version_tuple(version: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else ()


def transformers_version_supported(version: str | None) -> bool:
    """Whether ``transformers`` ``version`` lies in :data:`SUPPORTED_TRANSFORMERS` (``>=5.0, <6.0``).

    Example:
        >>> transformers_version_supported("5.23.0"), transformers_version_supported("6.0.0.dev0")
        (True, False)
    """
    parsed = _version_tuple(version or "")
    low, high = SUPPORTED_TRANSFORMERS
    return bool(parsed) and low <= parsed < high


def _check_version() -> bool:
    version = getattr(sys.modules.get("transformers"), "__version__", None)
    if transformers_version_supported(version):
        return True
    low, high = SUPPORTED_TRANSFORMERS
    _warn_once(
        "version",
        f"root_hf: transformers {version} is outside the supported range >={low[0]}.{low[1]},<{high[0]}.{high[1]}; "
        f"optim='root' is not registered. {_FALLBACKS}",
    )
    return False


# --------------------------------------------------------------------------------------------------------------------
# The enum member
# --------------------------------------------------------------------------------------------------------------------


def _member_reduce_ex(protocol: int) -> tuple[Callable[[str], Any], tuple[str]]:
    return (_restore_optim_name, (OPTIM_NAME,))


def _restore_optim_name(value: str) -> Any:
    """Unpickle ``OptimizerNames("root")``: registers the name first (this import of root_hf already did, through
    the hook, when ``transformers.training_args`` is loaded). Returns the plain string if it cannot be registered."""
    import transformers.training_args as training_args

    _register_name(training_args)
    try:
        return training_args.OptimizerNames(value)
    except ValueError:
        _warn_once("unpickle", f"root_hf: OptimizerNames({value!r}) could not be restored; keeping the string.")
        return value


def add_enum_member(enum_cls: type[Enum], member_name: str, value: str) -> Enum | None:
    """Add ``member_name = value`` to an existing ``(str, Enum)`` class, owned by root_hf.

    Returns the member (the existing one if root_hf added it before: idempotent), or None, changing nothing, when the
    value or the name is already taken by someone else (an upstream member is never replaced).
    """
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing if existing.__dict__.get(_OWNED) else None
    if member_name in enum_cls._member_map_ or not issubclass(enum_cls, str):
        return None
    member = str.__new__(enum_cls, value)
    member._name_ = member_name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    member.__dict__[_OWNED] = True
    # Pickle through root_hf (an instance attribute wins over Enum.__reduce_ex__): see _restore_optim_name.
    member.__dict__["__reduce_ex__"] = _member_reduce_ex
    enum_cls._member_map_[member_name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(member_name)
    type.__setattr__(enum_cls, member_name, member)
    return member


def _register_name(training_args: ModuleType) -> bool:
    with _lock:
        enum_cls = getattr(training_args, "OptimizerNames", None)
        if enum_cls is None or not _check_version():
            return False
        existing = enum_cls._value2member_map_.get(OPTIM_NAME)
        if existing is not None and not existing.__dict__.get(_OWNED):
            _warn_once(
                "upstream",
                f"root_hf: transformers already defines optim={OPTIM_NAME!r}; root_hf leaves it in place, so "
                f"optim='root' means transformers' own optimizer. {_FALLBACKS}",
            )
            return False
        if existing is None:
            from importlib.util import find_spec

            if find_spec(_TRAINER_OPTIMIZER) is None:  # the handler table this registration needs is missing
                _warn_once("hooks", f"root_hf: {_TRAINER_OPTIMIZER} not found; optim='root' is not registered.")
                return False
        return add_enum_member(enum_cls, _MEMBER_NAME, OPTIM_NAME) is not None


# --------------------------------------------------------------------------------------------------------------------
# The Trainer handler
# --------------------------------------------------------------------------------------------------------------------


def _root_handler(ctx: Any) -> tuple[Any, dict[str, Any]]:
    """``_OPTIMIZER_HANDLERS["root"]``: delegates to :func:`.transformers.root_optimizer_handler` (imported lazily)."""
    from .transformers import root_optimizer_handler

    return root_optimizer_handler(ctx)


_root_handler._root_hf_owned = True  # type: ignore[attr-defined]


def _register_handler(trainer_optimizer: ModuleType) -> bool:
    with _lock:
        handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
        training_args = sys.modules.get(_TRAINING_ARGS)
        enum_cls = getattr(training_args, "OptimizerNames", None)
        if not isinstance(handlers, dict) or enum_cls is None:
            _warn_once("hooks", f"root_hf: {_TRAINER_OPTIMIZER}._OPTIMIZER_HANDLERS not found. {_FALLBACKS}")
            return False
        member = enum_cls._value2member_map_.get(OPTIM_NAME)
        if member is None or not member.__dict__.get(_OWNED):
            return False
        current = handlers.get(OPTIM_NAME)
        if current is not None and not getattr(current, _OWNED, False):
            return False  # an upstream handler: never replaced
        handlers[member] = _root_handler
        return True


def register_root_optimizer() -> bool:
    """Register ``optim="root"`` with ``transformers`` now (``import root_hf`` already does this automatically).

    Idempotent. Imports ``transformers.training_args`` and ``transformers.trainer_optimizer``. Returns True when
    ``optim="root"`` is root_hf's ROOT, False (with a warning) when it could not be registered: unsupported
    ``transformers`` version, missing private hooks, or an upstream ``"root"`` that is left in place.

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

    return _register_name(training_args) and _register_handler(trainer_optimizer)


# --------------------------------------------------------------------------------------------------------------------
# The import hook
# --------------------------------------------------------------------------------------------------------------------


class _CallbackLoader:
    """Wraps a module's loader: runs the real ``exec_module``, then the hook's callback. The module's ``__loader__``
    and ``__spec__.loader`` are set back to the real loader before its code runs, so nothing of the wrapper stays."""

    def __init__(self, loader: Any, hook: _PostImportHook, fullname: str) -> None:
        self._loader = loader
        self._hook = hook
        self._fullname = fullname

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._hook.fire(self._fullname, module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _PostImportHook:
    """A ``sys.meta_path`` finder that finds nothing itself: for the watched module names it asks the finders after it
    for the spec and wraps the loader, so that a callback runs once the module has executed. Removes itself from
    ``sys.meta_path`` once every callback has run."""

    def __init__(self) -> None:
        self.callbacks: dict[str, Callable[[ModuleType], Any]] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.callbacks:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _CallbackLoader(spec.loader, self, fullname)
        return spec

    def fire(self, fullname: str, module: ModuleType) -> None:
        callback = self.callbacks.pop(fullname, None)
        if not self.callbacks and self in sys.meta_path:
            sys.meta_path.remove(self)
        if callback is None:
            return
        try:
            callback(module)
        except Exception as e:  # never break the user's import of transformers
            _warn_once("hook", f"root_hf: registering optim='root' failed ({type(e).__name__}: {e}). {_FALLBACKS}")


_hook = _PostImportHook()


def install_import_hook() -> None:
    """Register ``optim="root"`` now if ``transformers`` is imported, else once it is. Called by ``import root_hf``.

    Cheap: when ``transformers`` is not imported yet, it only adds a finder to ``sys.meta_path``.
    """
    with _lock:
        for name, callback in ((_TRAINING_ARGS, _register_name), (_TRAINER_OPTIMIZER, _register_handler)):
            module = sys.modules.get(name)
            if module is None:
                _hook.callbacks[name] = callback
            elif getattr(module, "__spec__", None) is not None and not getattr(module.__spec__, "_initializing", 0):
                _hook.callbacks.pop(name, None)
                try:
                    callback(module)
                except Exception as e:
                    _warn_once("hook", f"root_hf: registering optim='root' failed ({type(e).__name__}: {e}).")
        if _hook.callbacks and _hook not in sys.meta_path:
            sys.meta_path.insert(0, _hook)
