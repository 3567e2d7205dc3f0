"""The benchmark harness: lr sweep (edge extension), run cache (keys, files, report-only), schedule, import graph.

Fast: fake run functions and a 4 -> 1 linear task, no model downloads.
"""

from __future__ import annotations

import ast
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.harness import (
    Plan,
    Study,
    Task,
    best_lr,
    claim,
    grid_step,
    lr_factor,
    run_key,
    sweep_lr,
    train_run,
)

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def bowl(best: float):
    """A fake run function: final eval loss |log10(lr / best)|, lowest at `best`; records the lrs it ran."""
    calls: list[float] = []

    def run(lr: float) -> dict:
        calls.append(lr)
        return {"final_eval": abs(math.log10(lr / best))}

    return run, calls


@pytest.mark.parametrize(
    ("grid", "best", "max_extra", "lr_range", "expected"),
    [
        ((1e-3, 3e-3, 1e-2), 3e-3, 2, (1e-9, 100.0), [1e-3, 3e-3, 1e-2]),  # best inside: no extension
        ((1e-3, 3e-3), 3e-2, 2, (1e-9, 100.0), [1e-3, 3e-3, 1e-2, 3e-2]),  # upwards, stops when the best is inside
        ((1e-3, 3e-3), 3e-2, 1, (1e-9, 100.0), [1e-3, 3e-3, 1e-2]),  # at most max_extra points
        ((1e-3, 3e-3), 1e-5, 2, (1e-9, 100.0), [1e-3, 3e-3, 3e-4, 1e-4]),  # downwards
        ((1e-3, 3e-3), 1e-5, 5, (3e-4, 100.0), [1e-3, 3e-3, 3e-4]),  # never outside lr_range
        ((1e-2,), 1.0, 3, (1e-9, 100.0), [1e-2]),  # a one-point grid has no edge
        ((1e-3, 3e-3), 3e-3, 2, (1e-9, 100.0), [1e-3, 3e-3, 1e-2]),  # best at the top edge, then inside
    ],
)
def test_sweep_extends_the_grid_past_the_edge_where_the_best_lr_sits(grid, best, max_extra, lr_range, expected):
    run, calls = bowl(best)
    sweep = sweep_lr(run, grid, max_extra, lr_range)
    assert calls == pytest.approx(expected)
    assert list(sweep) == sorted(sweep) and len(sweep) == len(expected)


def test_sweep_leaves_out_missing_runs_and_stops_without_any():
    assert sweep_lr(lambda lr: None, (1e-3, 3e-3), max_extra=2) == {}
    sweep = sweep_lr(lambda lr: {"final_eval": 1.0} if lr == 1e-3 else None, (1e-3, 3e-3), max_extra=0)
    assert list(sweep) == [1e-3]


def test_sweep_waits_for_every_grid_point_before_extending():
    # 3e-3 is missing (another worker trains it): 1e-3 looks best at the lower edge, but extending downwards now
    # could train a point the finished grid would never ask for
    run, calls = bowl(1e-5)
    sweep = sweep_lr(lambda lr: None if lr == 3e-3 else run(lr), (1e-3, 3e-3), max_extra=2)
    assert list(sweep) == [1e-3] and calls == [1e-3]


def test_best_lr_counts_diverged_runs_as_worst_and_breaks_ties_to_the_smaller_lr():
    inf, nan = float("inf"), float("nan")
    assert best_lr({1e-3: {"final_eval": 2.0}, 3e-3: {"final_eval": inf}, 1e-2: {"final_eval": nan}}) == 1e-3
    assert best_lr({1e-3: {"final_eval": 1.0}, 3e-3: {"final_eval": 1.0}}) == 1e-3


GRID_STEPS = [(1e-3, True, 3e-3), (3e-3, True, 1e-2), (1e-3, False, 3e-4), (3e-4, False, 1e-4), (2e-3, True, 3e-3)]


@pytest.mark.parametrize(("lr", "up", "expected"), [*GRID_STEPS, (0.3, True, 1.0)])
def test_grid_step_walks_the_1_3_10_grid(lr, up, expected):
    assert grid_step(lr, up) == expected


def test_run_key_is_a_function_of_what_changes_a_run():
    base = ({"steps": 10}, {"kind": "root", "clip_quantile": 0.9}, 1e-3, 0, "clean")
    assert run_key(*base) == run_key({"steps": 10}, {"clip_quantile": 0.9, "kind": "root"}, 1e-3, 0, "clean")
    changed = [
        ({"steps": 11}, *base[1:]),
        (base[0], {"kind": "root", "clip_quantile": None}, *base[2:]),
        (*base[:2], 3e-3, *base[3:]),
        (*base[:3], 1, base[4]),
        (*base[:4], "noisy"),
    ]
    assert len({run_key(*base), *(run_key(*c) for c in changed)}) == 1 + len(changed)


@pytest.mark.parametrize(("plan", "factors"), [
    (Plan(10, 5, warmup=2), [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 8))]),
    (Plan(10, 5, warmup=2, final_lr_frac=0.1), [0.5, 1.0, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 8))]),
])  # fmt: skip
def test_lr_factor_warms_up_linearly_then_decays_by_a_cosine_to_the_final_fraction(plan, factors):
    f = lr_factor(plan)
    assert [f(i) for i in range(4)] == pytest.approx(factors)
    assert f(plan.steps) == pytest.approx(plan.final_lr_frac)


class Linear(Task):
    """Least squares on a fixed random target: 4 -> 1, eval on one held-out batch."""

    plan = Plan(steps=6, eval_every=3, warmup=1)

    def build(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Linear(4, 1)

    def optimizers(self, model, spec, lr):
        return [torch.optim.SGD(model.parameters(), lr=lr * spec["scale"])]

    def batch(self, generator):
        x = torch.randn(8, 4, generator=generator)
        return {"x": x, "y": x.sum(1, keepdim=True)}

    def loss(self, model, batch):
        return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])

    @torch.no_grad()
    def evaluate(self, model):
        return float(self.loss(model, self.batch(torch.Generator().manual_seed(99))))


def test_train_run_is_deterministic_and_reports_curves_and_divergence():
    run = train_run(Linear(), {"scale": 1.0}, 0.05, seed=0)
    again = train_run(Linear(), {"scale": 1.0}, 0.05, seed=0)
    assert again["train_loss"] == run["train_loss"] and [e[::2] for e in again["evals"]] == [
        e[::2] for e in run["evals"]
    ]
    assert [e[0] for e in run["evals"]] == [0, 3, 6] and len(run["train_loss"]) == 6 and run["diverged"] is None
    assert run["final_eval"] == run["evals"][-1][2] < run["evals"][0][2]
    blown = train_run(Linear(), {"scale": 1.0}, 1e30, seed=0)
    assert blown["diverged"] and blown["final_eval"] == float("inf")


def test_study_caches_runs_by_content_and_reads_them_without_training_in_report_only_mode(tmp_path):
    built = []

    def make_task() -> Task:
        built.append(1)
        return Linear()

    study = Study(tmp_path, {"task": "linear"}, make_task)
    first = study.get("sgd", {"scale": 1.0}, 0.05, seed=0)
    same = study.get("same computation, other name", {"scale": 1.0}, 0.05, seed=0)
    assert study.executed == 1 and same is first and len(list(tmp_path.glob("*.json"))) == 1
    reader = Study(tmp_path, {"task": "linear"}, make_task, report_only=True)
    assert reader.get("sgd", {"scale": 1.0}, 0.05, seed=0)["final_eval"] == first["final_eval"]
    assert reader.get("sgd", {"scale": 1.0}, 0.05, seed=1) is None and reader.executed == 0 and len(built) == 1
    tuned = study.tune("sgd", {"scale": 1.0}, (0.01, 0.03), seeds=(0, 1), max_extra=1)
    assert tuned["best_lr"] in tuned["sweep"] and [r["seed"] for r in tuned["runs"]] == [0, 1]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_run_claimed_by_a_live_worker_is_skipped_and_a_dead_workers_claim_taken_over(tmp_path):
    study = Study(tmp_path, {"task": "linear"}, Linear)
    path = tmp_path / "probe.json"
    assert claim(path) and not claim(path)  # held by this process: a second claim fails
    path.with_suffix(".claim").unlink()
    # a live process (our parent) holds the run: skipped, counted, nothing trained
    study.get("probe", {"scale": 1.0}, 0.05, seed=0)  # trains and caches one run to learn its file name
    cached = next(tmp_path.glob("*.json"))
    cached.unlink()
    study._memory.clear()
    cached.with_suffix(".claim").write_text(f"{socket.gethostname()} {os.getppid()}")
    assert study.get("probe", {"scale": 1.0}, 0.05, seed=0) is None
    assert study.claimed_elsewhere == 1 and study.executed == 1 and not cached.exists()
    # its process is gone: the claim is taken over, the run trained, the claim released
    cached.with_suffix(".claim").write_text(f"{socket.gethostname()} {_dead_pid()}")
    assert study.get("probe", {"scale": 1.0}, 0.05, seed=0) is not None
    assert study.executed == 2 and cached.exists() and not list(tmp_path.glob("*.claim"))


def _benchmark_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "benchmarks":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("benchmarks."))
    return found - {path.stem}


def test_benchmarks_import_graph_has_no_cycle_and_the_harness_imports_no_study():
    graph = {p.stem: _benchmark_imports(p) for p in BENCHMARKS.glob("*.py")}
    assert graph["harness"] == set()
    state: dict[str, str] = {}

    def visit(node: str) -> None:
        state[node] = "open"
        for dep in graph.get(node, ()):
            assert state.get(dep) != "open", f"import cycle through benchmarks/{node}.py and benchmarks/{dep}.py"
            if dep not in state:
                visit(dep)
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert "convergence" not in graph["report"]
