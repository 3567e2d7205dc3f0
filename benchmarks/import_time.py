"""How much `import root_hf` costs, with and without the Hugging Face stack (a benchmark, not a test).

`import root_hf` must stay light for users of the bare optimizer (torch only), and registering `optim="root"`
with `transformers` must cost next to nothing. Each figure is the median wall time of fresh interpreters:

- `torch`: `import torch` alone (the floor: root_hf needs torch);
- `torch + root_hf`: `import torch, root_hf` (root_hf's own cost is the difference);
- `transformers stack`: `from transformers import TrainingArguments, Trainer`;
- `root_hf, then stack`: `import root_hf` first, so registration runs through the import hook;
- `stack, then root_hf`: `transformers` first, so `import root_hf` registers at once.

It also prints `python -X importtime`'s cumulative figure for root_hf (which includes torch) and root_hf's self time.

Usage::

    python benchmarks/import_time.py --repeats 7
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "torch": "import torch",
    "torch + root_hf": "import torch, root_hf",
    "transformers stack": "from transformers import TrainingArguments, Trainer",
    "root_hf, then stack": "import root_hf\nfrom transformers import TrainingArguments, Trainer",
    "stack, then root_hf": "from transformers import TrainingArguments, Trainer\nimport root_hf",
}
# Every case that ends with root_hf and transformers loaded checks that optim="root" works.
CHECK = (
    "\nimport sys\nif {'root_hf', 'transformers'} <= set(sys.modules):"
    " TrainingArguments('/tmp/_root_hf_bench', optim='root', report_to='none')"
)
_TIMER = "import time\n_t = time.perf_counter()\n{code}\nprint(time.perf_counter() - _t)\n"
# In-process costs of registration: the hook's callbacks (root_hf first) and `import root_hf` after the stack.
_HOOK_COST = """
import time
import root_hf
from _root_hf_autoload import WATCHED, patches
spent = []
def timed(function):
    def run(module):
        start = time.perf_counter()
        function(module)
        spent.append(time.perf_counter() - start)
    return run
for name in WATCHED.values():  # the hook looks each one up in patches when its module has executed
    setattr(patches, name, timed(getattr(patches, name)))
from transformers import TrainingArguments, Trainer
TrainingArguments("/tmp/_root_hf_bench", optim="root", report_to="none")
print(len(spent), sum(spent))
"""
_LATE_IMPORT_COST = """
import time
from transformers import TrainingArguments, Trainer
start = time.perf_counter()
import root_hf
spent = time.perf_counter() - start
TrainingArguments("/tmp/_root_hf_bench", optim="root", report_to="none")
print(spent)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def wall_time(code: str) -> float:
    """Seconds that `code` takes in a fresh interpreter (interpreter start-up excluded)."""
    out = subprocess.run(
        [sys.executable, "-c", _TIMER.format(code=code)], env=_env(), capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def importtime(code: str) -> dict[str, tuple[int, int]]:
    """`python -X importtime -c code`: {module name: (self us, cumulative us)}."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {}
    for line in out.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s+)(\S+)", line)
        if match:
            rows[match.group(4)] = (int(match.group(1)), int(match.group(2)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="fresh interpreters per case (default: 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: one interpreter per case")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    if args.repeats < 1:
        raise ValueError(f"Invalid --repeats: {args.repeats}. Must be >= 1.")

    import torch
    import transformers

    print(f"machine: {platform.machine()} cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f}")
    versions = f"python {platform.python_version()}, torch {torch.__version__}"
    versions += f", transformers {transformers.__version__}"
    print(f"versions: {versions}")
    print(f"repeats: {args.repeats} fresh interpreters per case, median wall time (interpreter start-up excluded)\n")

    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):  # interleaved rounds, so that a change in machine load hits every case alike
        for name, code in CASES.items():
            times[name].append(wall_time(code + CHECK))
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name in CASES:
        spread = f"(min {min(times[name]) * 1000:.0f}, max {max(times[name]) * 1000:.0f})"
        print(f"{name:<22} {medians[name] * 1000:8.0f} ms   {spread}")
    print()
    print(f"root_hf over torch:               {(medians['torch + root_hf'] - medians['torch']) * 1000:+8.0f} ms")
    print(
        "root_hf + hook, HF imported after: "
        f"{(medians['root_hf, then stack'] - medians['transformers stack']) * 1000:+8.0f} ms"
    )
    print(
        "root_hf, HF imported before:      "
        f"{(medians['stack, then root_hf'] - medians['transformers stack']) * 1000:+8.0f} ms"
    )

    rows = importtime("import root_hf")
    own = sum(v[0] for k, v in rows.items() if k == "root_hf" or k.startswith("root_hf."))
    print("\npython -X importtime -c 'import root_hf' (one run):")
    print(f"  root_hf cumulative (includes torch): {rows['root_hf'][1] / 1000:8.1f} ms")
    print(f"  torch cumulative:                    {rows['torch'][1] / 1000:8.1f} ms")
    print(f"  root_hf modules, self time summed:   {own / 1000:8.1f} ms")
    heavy = [m for m in ("transformers", "accelerate", "peft", "datasets") if m in rows]
    print(f"  optional dependencies imported:      {heavy or 'none'}")
    hook = subprocess.run([sys.executable, "-c", _HOOK_COST], env=_env(), capture_output=True, text=True, check=True)
    calls, seconds = hook.stdout.split()
    print(f"registration through the hook (root_hf first): {calls} callbacks, {float(seconds) * 1000:.2f} ms in all")
    late = subprocess.run(
        [sys.executable, "-c", _LATE_IMPORT_COST], env=_env(), capture_output=True, text=True, check=True
    )
    print(f"import root_hf with the stack already loaded (registers at once): {float(late.stdout) * 1000:.0f} ms")
    for label, code in (
        ("root_hf, then stack", CASES["root_hf, then stack"]),
        ("stack, then root_hf", CASES["stack, then root_hf"]),
    ):
        rows = importtime(code + CHECK)
        own = sum(v[0] for k, v in rows.items() if k == "root_hf" or k.startswith("root_hf."))
        print(f"python -X importtime, {label}: root_hf modules, self time summed {own / 1000:.1f} ms")


if __name__ == "__main__":
    main()
