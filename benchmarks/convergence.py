"""Convergence and robustness study: does ROOT beat Muon and AdamW on this hardware?

Usage:
    python benchmarks/convergence.py                  # the full study, then docs/results.md and docs/img/*.png
    python benchmarks/convergence.py --quick          # smoke run in seconds: setting (a) on a tiny model, no
                                                      # ablations or speed; output under benchmarks/results/quick/
    python benchmarks/convergence.py --setting a      # one setting (a | b | all); --no-speed skips step_time
    python benchmarks/convergence.py --report-only    # re-render the page and plots from the cached runs

Same model, data order, steps, lr schedule and seeds for every optimizer:

- `AdamW`: `torch.optim.AdamW` on every parameter (betas 0.9/0.95, eps 1e-8).
- `Muon`: ROOT with both ROOT features off (`clip_quantile=None, ns_coefficients="muon"`): the same code path as
  ROOT, so only the clip and the coefficients differ. Non-matrix params go to ROOT's AdamW branch, as for ROOT.
- `ROOT-paper`: clip at the 0.90 quantile + the paper's per-shape coefficient table (`"root-paper"`).
- `ROOT`: the package defaults (clip 0.90 + the default schedule: `"adaptive"` once that schedule exists).

Settings: (a) a small Llama-style causal LM trained from scratch on the bytes of the chatterbot corpus (all 28
languages, held-out questions for eval); (b) LoRA fine-tuning of SmolLM2-135M-Instruct on the English chatterbot
question/answer pairs (answer tokens only). Each optimizer gets a small lr sweep at the first seed, then every seed at
its best lr; the robustness variant reruns the best lr with injected gradient outliers and label noise. Ablations
(setting a) vary one ROOT feature at a time at ROOT's best lr. Every run is cached as JSON under
`benchmarks/results/` (keyed by everything that changes its outcome), so an interrupted study resumes where it
stopped, and two configurations that are the same computation on the model's shapes share one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    MAIN_OPTIMIZERS,
    QUICK,
    REPO,
    RESULTS,
    SETTINGS,
    Setting,
    SettingStudy,
    default_schedule,
    library_versions,
    machine_dict,
    optimizer_specs,
    schedules,
)

# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def quick_settings() -> dict[str, Setting]:
    return {k: dataclasses.replace(v, **QUICK[k]) for k, v in SETTINGS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--setting", choices=["a", "b", "all"], default=None, help="which setting(s) to run (default: all; quick: a)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny budgets (results/quick, no docs)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on the project's 2 shared cores, 2 threads ran 2-10x slower while "
        "other jobs were running, because each op waits for a descheduled thread)",
    )
    parser.add_argument(
        "--optimizers",
        default=",".join(MAIN_OPTIMIZERS),
        help=f"comma-separated subset of {','.join(optimizer_specs())} (default: {','.join(MAIN_OPTIMIZERS)})",
    )
    parser.add_argument("--no-ablations", action="store_true", help="skip the ablations of setting (a)")
    parser.add_argument("--no-speed", action="store_true", help="skip benchmarks/step_time.py (speed + memory)")
    parser.add_argument(
        "--rerun-speed", action="store_true", help="re-measure speed and memory even if results/step_time.json exists"
    )
    parser.add_argument("--report-only", action="store_true", help="only re-render the page from cached results")
    parser.add_argument("--results", type=Path, default=None, help="cache folder (default benchmarks/results[/quick])")
    parser.add_argument("--docs", type=Path, default=None, help="output docs folder (default docs/, quick: results)")
    parser.add_argument("--verbose", action="store_true", help="print the eval loss of every run as it trains")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    settings = quick_settings() if args.quick else SETTINGS
    results = args.results or (RESULTS / "quick" if args.quick else RESULTS)
    docs = args.docs or (results / "docs" if args.quick else REPO / "docs")
    names = tuple(n.strip() for n in args.optimizers.split(",") if n.strip())
    unknown = [n for n in names if n not in optimizer_specs()]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {list(optimizer_specs())}")
    if args.setting is None:
        args.setting = "a" if args.quick else "all"
    if args.quick:
        args.no_ablations = True
    chosen = ("a", "b") if args.setting == "all" else (args.setting,)

    from benchmarks import report

    print(f"machine: {machine_dict()}")
    print(f"versions: {library_versions()}")
    print(f"ROOT (our defaults) uses ns_coefficients={default_schedule()!r}; schedules: {schedules.SCHEDULE_NAMES}")
    start = time.perf_counter()
    studies = {}
    for key in chosen:
        setting = settings[key]
        print(f"\n== setting {setting.title} ==")
        print(f"config: {dataclasses.asdict(setting)}")
        study = SettingStudy(setting, results, verbose=args.verbose)
        if not args.report_only:
            best = study.run_all(names, ablations=not args.no_ablations)
            print(f"best lr: {best}  ({study.executed} runs executed, the rest loaded from {study.dir})")
        studies[key] = study
    speed_json = results / "step_time.json"
    run_speed = not (args.report_only or args.no_speed or args.quick) and (args.rerun_speed or not speed_json.exists())
    if run_speed:
        from benchmarks import step_time

        print("\n== speed and memory: benchmarks/step_time.py ==")
        step_time.collect(threads=args.threads, steps=7, save=speed_json)
    page = report.render(studies, names, docs, speed_json if speed_json.exists() else None, args)
    print(f"\nwrote {page} ({time.perf_counter() - start:.0f} s in all)")
    print(report.summary_text(studies, names))


if __name__ == "__main__":
    main()
