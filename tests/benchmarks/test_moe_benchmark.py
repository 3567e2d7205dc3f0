"""benchmarks/moe.py --quick: the MoE and fused-projection studies run end to end in seconds and draw their plots."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
if importlib.util.find_spec("chatterbot_corpus") is None:
    pytest.skip("chatterbot-corpus is not installed", allow_module_level=True)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "moe.py"


def test_moe_benchmark_quick_mode_runs_every_configuration_and_plots(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmarks_moe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    out = module.main(["--quick", "--study", "all", "--out", str(tmp_path)])
    assert set(out["moe"]) == set(module.MOE_CONFIGS) and set(out["fused"]) == set(module.FUSED_CONFIGS)
    for rows in out.values():
        for row in rows.values():
            assert math.isfinite(row["eval"]) and math.isfinite(row["train"])
    assert (tmp_path / "moe.png").stat().st_size > 0 and (tmp_path / "moe_fused.png").stat().st_size > 0
    # the same seed, data and lr: per-expert ROOT and the old fused view start equal and then differ
    per_expert, fused = out["moe"]["root_per_expert"]["curves"], out["moe"]["root_fused_old"]["curves"]
    assert per_expert["evals"][0] == fused["evals"][0] and per_expert["train_loss"] != fused["train_loss"]
    # moe_split is root_per_expert's computation (the same spec): the harness hands back the same runs
    assert out["fused"]["moe_split"]["eval_seeds"] == out["moe"]["root_per_expert"]["eval_seeds"]
