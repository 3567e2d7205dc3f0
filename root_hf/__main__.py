"""`python -m root_hf`: version, the startup hook's state and how to switch it off, and `optim="root"` here.

Example:
    ```
    $ python -m root_hf
    root_hf 0.1.0 (/path/to/root_hf)
    startup hook: active (root_hf_autoload.pth in /path/to/site-packages); switch it off with ROOT_HF_AUTOLOAD=0
    optim="root": registered in this process (transformers 5.24.0): --optim root / optim: root work in any
        HfArgumentParser script, trl CLIs and YAML/JSON configs
    ```
"""

from __future__ import annotations

import argparse
import os
import site
import sys
from pathlib import Path

import _root_hf_autoload as autoload
import root_hf
from _root_hf_autoload import patches

PTH_NAME = "root_hf_autoload.pth"


def pth_files() -> list[Path]:
    """The `root_hf_autoload.pth` files in this interpreter's site directories (normally exactly one)."""
    dirs = [*site.getsitepackages(), site.getusersitepackages()] if hasattr(site, "getsitepackages") else []
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    found: list[Path] = []
    for d in dict.fromkeys(dirs):
        path = Path(d) / PTH_NAME
        if path.is_file() and path not in found:
            found.append(path)
    return found


def hook_line() -> str:
    """One line on the startup hook: active, switched off by the environment, or not installed."""
    files = pth_files()
    where = f"{PTH_NAME} in {files[0].parent}" if files else f"no {PTH_NAME} found in the site directories"
    state = autoload.autoload_state
    if state == "on":
        return f"startup hook: active ({where}); switch it off with {autoload.ENV_VAR}=0"
    if state == "off":
        return (
            f"startup hook: off ({autoload.ENV_VAR}={os.environ.get(autoload.ENV_VAR)!r}); unset it to switch it on. "
            "`import root_hf` still registers optim='root'"
        )
    if files:
        return f"startup hook: installed ({where}) but did not run in this process (python -S?)"
    return (
        "startup hook: not installed; install root_hf with pip (`pip install root-hf` or `pip install -e .`) to get "
        f"it, or `import root_hf` before building TrainingArguments. ({where})"
    )


def registration_line() -> str:
    """One line on `optim="root"` in this process (imports transformers to find out)."""
    try:  # the hook (or `import root_hf`) registers as these are imported
        import transformers.trainer_optimizer
        import transformers.training_args
    except ImportError:
        return 'optim="root": transformers is not installed (pip install "root-hf[hf]")'
    import transformers

    state = autoload.status()
    if state["registered"] and state["handler"]:
        if autoload.autoload_state != "on":
            return (
                f'optim="root": registered in this process (transformers {transformers.__version__}) only because '
                "this command imported root_hf; without the startup hook, scripts that do not `import root_hf` "
                "reject --optim root"
            )
        return (
            f'optim="root": registered in this process (transformers {transformers.__version__}): --optim root / '
            "optim: root work in any HfArgumentParser script, trl CLIs and YAML/JSON configs"
        )
    supported = patches.transformers_version_supported(transformers.__version__)
    why = "an upstream optimizer named 'root' or missing private hooks"
    if not supported:
        why = f"transformers {transformers.__version__} is outside the supported range"
    return f'optim="root": NOT registered ({why}); use root_hf.RootTrainer or RootOptimizerFactory instead'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m root_hf", description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    print(f"root_hf {root_hf.__version__} ({Path(root_hf.__file__).parent})")
    print(hook_line())
    print(registration_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
