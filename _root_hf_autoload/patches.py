"""The patches that give transformers `optim="root"`: run by the startup hook (`_root_hf_autoload`) and root_hf.

Standard library only, and imported only once transformers is (so its size costs nothing at interpreter start-up).
It imports nothing of root_hf: what needs root_hf (and so torch) it reaches through one public function of the
package, `PACKAGE_ENTRY_POINT` (`root_hf.integrations.optim_root_hook`), resolved by name when it is first needed (a
`Trainer` builds its optimizer, a pickled `OptimizerNames("root")` is loaded). What it patches (private hooks of
transformers, see SPEC section 4; idempotent, version-guarded, an upstream `"root"` is never replaced, and a failure
becomes a warning, never a broken import):

- `transformers.training_args.OptimizerNames` gets a member `ROOT = "root"`, so `TrainingArguments(optim="root")`,
  `--optim root` and configs accept the name. The member pickles through the package's entry point (event
  `"optim_name"`), so a `training_args.bin` loads anywhere root_hf is installed.
- `transformers.trainer_optimizer._OPTIMIZER_HANDLERS["root"]` builds ROOT for the stock `Trainer` (event
  `"optimizer"`).
- `transformers.Trainer.get_optimizer_cls_and_kwargs` hands `optim="root"` to the package before transformers splits
  `optim_args` (a malformed item such as `"momentum"` is a `ValueError` naming the item and the `key=value` format,
  not transformers' bare unpacking error), and `Trainer.create_optimizer` lets the package put a
  `RootDiagnosticsCallback` in front of the reporting callbacks when the ROOT it built asks for diagnostics
  (`optim_args="diagnostics_steps=N"`, event `"optimizer_created"`), so they reach `log_history` and every tracker.
"""

import importlib
import sys
import threading

__all__ = [
    "OPTIM_NAME",
    "PACKAGE_ENTRY_POINT",
    "SUPPORTED_TRANSFORMERS",
    "add_enum_member",
    "patch_trainer",
    "register_handler",
    "register_name",
    "state",
    "transformers_version_supported",
]

OPTIM_NAME = "root"
_MEMBER_NAME = "ROOT"
_OWNED = "_root_hf_owned"

# Versions whose private hooks were read and tested (5.23, 5.24); 6.x may change them, so it needs a new release.
SUPPORTED_TRANSFORMERS = ((5, 0), (6, 0))  # [min, max)

_TRAINING_ARGS = "transformers.training_args"
_TRAINER_OPTIMIZER = "transformers.trainer_optimizer"
_TRAINER = "transformers.trainer"
# The one name by which this side reaches root_hf, "module:function". Resolved when first needed, never at start-up:
# importing root_hf imports torch.
PACKAGE_ENTRY_POINT = "root_hf.integrations:optim_root_hook"
_PACKAGE = PACKAGE_ENTRY_POINT.partition(".")[0]
_FALLBACKS = (
    "Use the fallbacks that need no registration: root_hf.RootTrainer (or RootTrainerMixin with any Trainer "
    "subclass), Trainer(optimizer_cls_and_kwargs=(root_hf.RootOptimizerFactory, {...})) or "
    "root_hf.create_root_optimizer(model, args)."
)
_warned = set()
_LOCK = threading.RLock()


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=3)


def state():
    """What the patches did in this process: a dict for `_root_hf_autoload.status()` and `python -m root_hf`.

    Keys: `registered` (None when transformers.training_args is not imported, else whether `OptimizerNames("root")`
    is root_hf's), `handler` (whether `_OPTIMIZER_HANDLERS["root"]` is root_hf's), `trainer_patched`.
    """
    training_args = sys.modules.get(_TRAINING_ARGS)
    trainer_optimizer = sys.modules.get(_TRAINER_OPTIMIZER)
    trainer = sys.modules.get(_TRAINER)
    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    return {
        "registered": None if training_args is None else _owned_member(training_args) is not None,
        "handler": None
        if handlers is None
        else getattr(handlers.get(OPTIM_NAME) if isinstance(handlers, dict) else None, _OWNED, False),
        "trainer_patched": None
        if trainer is None
        else getattr(getattr(getattr(trainer, "Trainer", None), "create_optimizer", None), _OWNED, False),
    }


def _package_entry_point():
    """`root_hf.integrations.optim_root_hook` (see `PACKAGE_ENTRY_POINT`), resolved by name: imports root_hf."""
    module_name, _, function_name = PACKAGE_ENTRY_POINT.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


# --------------------------------------------------------------------------------------------------------------------
# Version
# --------------------------------------------------------------------------------------------------------------------


def _version_tuple(version):
    parts = (version or "").split(".")
    if len(parts) < 2 or not parts[0].isdigit():
        return ()
    minor = ""
    for ch in parts[1]:
        if not ch.isdigit():
            break
        minor += ch
    return (int(parts[0]), int(minor)) if minor else ()


def transformers_version_supported(version):
    """Whether transformers `version` lies in `SUPPORTED_TRANSFORMERS` (`>=5.0, <6.0`).

    Example:
        >>> transformers_version_supported("5.23.0"), transformers_version_supported("6.0.0.dev0")
        (True, False)
    """
    parsed = _version_tuple(version)
    low, high = SUPPORTED_TRANSFORMERS
    return bool(parsed) and low <= parsed < high


def _check_version():
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


def _member_reduce_ex(protocol):
    # Pickled as a call of the package's entry point, which registers the name before it looks the member up.
    return (_package_entry_point(), ("optim_name", OPTIM_NAME))


def add_enum_member(enum_cls, member_name, value):
    """Add `member_name = value` to an existing `(str, Enum)` class, owned by root_hf.

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
    # Pickle through root_hf (an instance attribute wins over Enum.__reduce_ex__): see _member_reduce_ex.
    member.__dict__["__reduce_ex__"] = _member_reduce_ex
    enum_cls._member_map_[member_name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(member_name)
    type.__setattr__(enum_cls, member_name, member)
    return member


def _owned_member(training_args):
    enum_cls = getattr(training_args, "OptimizerNames", None)
    member = getattr(enum_cls, "_value2member_map_", {}).get(OPTIM_NAME)
    return member if member is not None and member.__dict__.get(_OWNED) else None


def register_name(training_args):
    """Add `OptimizerNames.ROOT` to the module `transformers.training_args`; True when `"root"` is root_hf's."""
    with _LOCK:
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
# The Trainer handler and the Trainer wrappers (each imports root_hf only when it runs)
# --------------------------------------------------------------------------------------------------------------------


def _root_handler(ctx):
    """`_OPTIMIZER_HANDLERS["root"]`: the package's `(RootOptimizerFactory, kwargs)` for `ctx.args`, `ctx.model`."""
    return _package_entry_point()("optimizer", ctx.args, ctx.model)


_root_handler._root_hf_owned = True


def register_handler(trainer_optimizer):
    """Add the `"root"` handler to `transformers.trainer_optimizer._OPTIMIZER_HANDLERS` (after `register_name`)."""
    with _LOCK:
        handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
        training_args = sys.modules.get(_TRAINING_ARGS)
        if not isinstance(handlers, dict) or getattr(training_args, "OptimizerNames", None) is None:
            _warn_once("hooks", f"root_hf: {_TRAINER_OPTIMIZER}._OPTIMIZER_HANDLERS not found. {_FALLBACKS}")
            return False
        member = _owned_member(training_args)
        if member is None:
            return False
        current = handlers.get(OPTIM_NAME)
        if current is not None and not getattr(current, _OWNED, False):
            return False  # an upstream handler: never replaced
        handlers[member] = _root_handler
        return True


def _is_root(args):
    optim = getattr(args, "optim", None)
    return getattr(optim, "value", optim) == OPTIM_NAME


def _wrap_get_optimizer_cls_and_kwargs(original):
    def get_optimizer_cls_and_kwargs(args, model=None):
        if _is_root(args):  # not through transformers' own "k=v" split, whose errors name neither item nor format
            return _package_entry_point()("optimizer", args, model)
        return original(args, model)

    get_optimizer_cls_and_kwargs.__wrapped__ = original
    get_optimizer_cls_and_kwargs.__doc__ = original.__doc__
    get_optimizer_cls_and_kwargs._root_hf_owned = True
    return staticmethod(get_optimizer_cls_and_kwargs)


def _wrap_create_optimizer(original):
    def create_optimizer(self, model=None):
        optimizer = original(self, model)
        if _PACKAGE in sys.modules:  # else root_hf did not build this optimizer: nothing to do, nothing to import
            _package_entry_point()("optimizer_created", self, optimizer)
        return optimizer

    create_optimizer.__wrapped__ = original
    create_optimizer.__doc__ = original.__doc__
    create_optimizer.__name__ = original.__name__
    create_optimizer.__qualname__ = original.__qualname__
    create_optimizer._root_hf_owned = True
    return create_optimizer


def patch_trainer(trainer_module):
    """Wrap `Trainer.get_optimizer_cls_and_kwargs` and `Trainer.create_optimizer` (see the module docstring)."""
    with _LOCK:
        trainer_cls = getattr(trainer_module, "Trainer", None)
        training_args = sys.modules.get(_TRAINING_ARGS)
        if trainer_cls is None or training_args is None or _owned_member(training_args) is None:
            return False
        create = trainer_cls.__dict__.get("create_optimizer")
        get_cls = trainer_cls.__dict__.get("get_optimizer_cls_and_kwargs")
        if getattr(create, _OWNED, False):
            return True  # already patched
        if not callable(create) or not isinstance(get_cls, staticmethod):
            _warn_once("trainer", "root_hf: transformers.Trainer changed; optim_args diagnostics need RootTrainer.")
            return False
        trainer_cls.get_optimizer_cls_and_kwargs = _wrap_get_optimizer_cls_and_kwargs(get_cls.__func__)
        trainer_cls.create_optimizer = _wrap_create_optimizer(create)
        return True
