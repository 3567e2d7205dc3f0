"""root_hf's interpreter-startup hook: `optim="root"` in every Hugging Face entry point, with no import by the user.

The wheel (and the editable install) ships `root_hf_autoload.pth` into site-packages; its one line imports this
package and calls `autoload()` when Python starts (and does nothing when the package is gone, e.g. an editable
install whose checkout was moved: no traceback at every interpreter start). `autoload()` puts one finder first
in `sys.meta_path` and returns: this package's `__init__` needs only `os` and `sys` (already loaded at start-up),
never imports torch or transformers, and is kept small so that it costs well under a millisecond in processes that
never import transformers (measured figures: docs/guides/trainer.md). For any other module the finder costs one dict
look-up. When `transformers.training_args`, `transformers.trainer_optimizer` and `transformers.trainer` have
executed, it runs the matching function of `_root_hf_autoload.patches` (standard library only too), so a stock
`HfArgumentParser` script, `trl sft`, a YAML / JSON config, a notebook and every process that `accelerate launch` or
`torchrun` start accept `--optim root` / `optim: root`. root_hf itself is imported only when a `Trainer` builds the
optimizer, through the one public function that `patches.PACKAGE_ENTRY_POINT` names.

The dependency runs one way: root_hf imports this package's public names (`install`, and the patches behind
`root_hf.register_root_optimizer`); this package imports nothing of root_hf.

Switch it off with the environment variable `ROOT_HF_AUTOLOAD=0` (also `false`, `no`, `off`): then only
`import root_hf` registers the name, as it always does. `python -m root_hf` says whether the hook is active.

This is a top-level package (not part of `root_hf`) because importing anything under `root_hf` runs
`root_hf/__init__.py`, which imports torch.
"""

import os
import sys

__all__ = ["ENV_VAR", "autoload", "autoload_enabled", "install", "status"]

ENV_VAR = "ROOT_HF_AUTOLOAD"
_OFF = ("0", "false", "no", "off")

# What autoload() did in this process: None (never called: the .pth is not installed, or Python ran with -S),
# "on" (the hook is installed) or "off" (switched off by ROOT_HF_AUTOLOAD).
autoload_state = None

# Module -> function of _root_hf_autoload.patches to run once it has executed (in import order: trainer imports
# trainer_optimizer, which imports training_args).
WATCHED = {
    "transformers.training_args": "register_name",
    "transformers.trainer_optimizer": "register_handler",
    "transformers.trainer": "patch_trainer",
}


def _warn(message):
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=3)


def autoload_enabled(environ=None):
    """Whether the startup hook may run: False when `ROOT_HF_AUTOLOAD` is `0`, `false`, `no` or `off`.

    Example:
        >>> autoload_enabled({"ROOT_HF_AUTOLOAD": "0"}), autoload_enabled({})
        (False, True)
    """
    value = (os.environ if environ is None else environ).get(ENV_VAR, "1")
    return value.strip().lower() not in _OFF


def autoload():
    """Called by `root_hf_autoload.pth` at interpreter start: `install()` unless `ROOT_HF_AUTOLOAD=0`."""
    global autoload_state
    if not autoload_enabled():
        autoload_state = "off"
        return
    autoload_state = "on"
    try:
        install()
    except Exception as e:  # never break interpreter start-up
        _warn(f"root_hf: the startup hook failed ({type(e).__name__}: {e}).")


def _run(function_name, module):
    """Run `_root_hf_autoload.patches.<function_name>(module)`; a failure becomes a warning, never a broken import
    of transformers."""
    try:
        from . import patches

        getattr(patches, function_name)(module)
    except Exception as e:
        _warn(f"root_hf: registering optim='root' failed ({type(e).__name__}: {e}). Use root_hf.RootTrainer instead.")


class _CallbackLoader:
    """Wraps a module's loader: runs the real `exec_module`, then the hook's callback. The module's `__loader__`
    and `__spec__.loader` are set back to the real loader before its code runs, so nothing of the wrapper stays."""

    def __init__(self, loader, hook, fullname):
        self._loader = loader
        self._hook = hook
        self._fullname = fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._hook.fire(self._fullname, module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _PostImportHook:
    """A `sys.meta_path` finder that finds nothing itself: for the watched module names it asks the finders after it
    for the spec and wraps the loader, so that a callback (`callbacks[name](module)`) runs once the module has
    executed. Removes itself from `sys.meta_path` once every callback has run."""

    def __init__(self):
        self.callbacks = {}

    def find_spec(self, fullname, path=None, target=None):
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

    def fire(self, fullname, module):
        callback = self.callbacks.pop(fullname, None)
        if not self.callbacks and self in sys.meta_path:
            sys.meta_path.remove(self)
        if callback is not None:
            callback(module)


def _callback(function_name):
    return lambda module: _run(function_name, module)


_hook = _PostImportHook()


def install():
    """Register `optim="root"` now for the transformers modules already imported, and watch for the others.

    Idempotent and cheap: when transformers is not imported, it only puts one finder first in `sys.meta_path`.
    Called by `autoload()` at interpreter start and by `import root_hf`.
    """
    for name, function_name in WATCHED.items():
        module = sys.modules.get(name)
        if module is None:
            _hook.callbacks[name] = _callback(function_name)
        elif getattr(module, "__spec__", None) is not None and not getattr(module.__spec__, "_initializing", 0):
            _hook.callbacks.pop(name, None)
            _run(function_name, module)
    if _hook.callbacks and _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


def status():
    """A dict for `python -m root_hf`: whether the hook ran in this process, and whether `"root"` is registered.

    Keys: `autoload` (None, `"on"` or `"off"`), `env` (the value of `ROOT_HF_AUTOLOAD` or None), `watching` (the
    transformers modules the hook still waits for), and those of `_root_hf_autoload.patches.state()`: `registered`,
    `handler`, `trainer_patched`.
    """
    from . import patches

    return {
        "autoload": autoload_state,
        "env": os.environ.get(ENV_VAR),
        "watching": sorted(_hook.callbacks) if _hook in sys.meta_path else [],
        **patches.state(),
    }
