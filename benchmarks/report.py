"""Render the convergence study and the speed/memory figures into `docs/results.md` and `docs/img/*.png`.

Called by `benchmarks/convergence.py` (which runs or loads the runs first); everything here reads cached results
only. Verdicts are computed, not written by hand: a difference between two optimizers is called a win or a loss only
when it exceeds the larger of their two seed-to-seed standard deviations, else "within the seed spread".
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from root_hf import schedules

VARIANT_TITLES = {
    "clean": "clean",
    "noisy": "gradient outliers + label noise",
    "outliers": "gradient outliers only",
    "heavy-outliers": "heavy gradient outliers only",
}

# Figures are drawn in a fixed colour per optimizer so the plots of both settings read the same.
COLORS = {
    "AdamW": "#1f77b4",
    "Muon": "#ff7f0e",
    "ROOT-paper": "#2ca02c",
    "ROOT": "#d62728",
    "torch.optim.Muon": "#9467bd",
}


# --------------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float, int]:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values) or not values:
        return float("inf"), float("nan"), len(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return statistics.fmean(values), std, len(values)


def fmt(mean: float, std: float, n: int, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "diverged"
    if n < 2 or not math.isfinite(std):
        return f"{mean:.{digits}f} (n={n})"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def verdict(a: tuple[float, float, int], b: tuple[float, float, int]) -> tuple[float, str]:
    """Difference `a - b` of mean final losses and a word: lower / higher / within the seed spread."""
    diff = a[0] - b[0]
    if not math.isfinite(diff):
        return diff, "not comparable (a run diverged)"
    if a[2] < 2 or b[2] < 2:
        return diff, "not judged (a single seed gives no spread)"
    spread = max((s for s in (a[1], b[1]) if math.isfinite(s)), default=0.0)
    if abs(diff) <= spread:
        return diff, "within the seed spread"
    return diff, "lower (better)" if diff < 0 else "higher (worse)"


# --------------------------------------------------------------------------------------------------------------------
# Access to a study's runs
# --------------------------------------------------------------------------------------------------------------------


def runs_of(study: Any, name: str, variant: str, lr: float, seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    return [study.runs[(name, variant, lr, s)] for s in seeds if (name, variant, lr, s) in study.runs]


def best_lrs(study: Any, names: tuple[str, ...]) -> dict[str, float]:
    """Each optimizer's best lr among its clean runs at the first seed (the lr sweep)."""
    from benchmarks.harness import best_lr

    seed, out = study.setting.seeds[0], {}
    for name in names:
        sweep = {lr: r for (n, v, lr, sd), r in study.runs.items() if (n, v, sd) == (name, "clean", seed)}
        if sweep:
            out[name] = best_lr(sweep)
    return out


def load_cached(study: Any, names: tuple[str, ...]) -> None:
    """Fill `study.runs` from the cache without running anything (for --report-only): the study's own plan (lr
    sweep, seeds, variants, ablations), each run loaded if it is cached."""
    study.report_only = True
    study.run_all(names, ablations=True)


def curve(runs: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean eval curve over seeds: steps, mean wall-clock seconds, mean loss, std loss (at common eval steps)."""
    if not runs:
        return [], [], [], []
    length = min(len(r["evals"]) for r in runs)
    steps, secs, means, stds = [], [], [], []
    for i in range(length):
        points = [r["evals"][i] for r in runs]
        losses = [p[2] for p in points]
        steps.append(points[0][0])
        secs.append(statistics.fmean(p[1] for p in points))
        means.append(statistics.fmean(losses))
        stds.append(statistics.stdev(losses) if len(losses) > 1 else 0.0)
    return steps, secs, means, stds


def eval_at_fraction(run: dict[str, Any], fraction: float) -> float:
    target = fraction * run["evals"][-1][0]
    return min(run["evals"], key=lambda e: abs(e[0] - target))[2]


# --------------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------------


def plot_setting(study: Any, names: tuple[str, ...], best: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = study.setting
    variants = [v for v in s.variants if any(k[1] == v for k in study.runs)]
    fig, axes = plt.subplots(len(variants), 2, figsize=(11, 3.75 * len(variants)), sharey="row", squeeze=False)
    for row, variant in enumerate(variants):
        for col, xkey in enumerate(("step", "wall-clock")):
            ax = axes[row][col]
            for name in names:
                if name not in best:
                    continue
                steps, secs, means, stds = curve(runs_of(study, name, variant, best[name], s.seeds))
                if not steps:
                    continue
                x = steps if xkey == "step" else secs
                color = COLORS.get(name)
                ax.plot(x, means, label=f"{name} (lr {best[name]:g})", color=color, lw=1.6)
                lo = [m - d for m, d in zip(means, stds, strict=True)]
                hi = [m + d for m, d in zip(means, stds, strict=True)]
                ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
            title = VARIANT_TITLES.get(variant, variant)
            ax.set_title(f"{title}: held-out loss vs {xkey}", fontsize=10)
            ax.set_xlabel("optimizer step" if xkey == "step" else "training wall-clock [s] (shared CPU: noisy)")
            if col == 0:
                ax.set_ylabel("clean held-out loss (nats/token)")
            ax.grid(alpha=0.3)
            _zoom(ax)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{s.title}\nmean ± std over seeds {list(s.seeds)}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _zoom(ax: Any) -> None:
    """Y range from the curves' second points on, so the large step-0 loss does not flatten the interesting part."""
    ys = []
    for line in ax.get_lines():
        data = list(line.get_ydata())
        ys.extend(v for v in data[1:] if math.isfinite(v))
    if ys:
        lo, hi = min(ys), max(ys)
        pad = 0.05 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)


def plot_sweep(speed: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = speed["sweep"]["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in speed["sweep"]["optimizers"]:
        ax.plot([r["hidden"] for r in rows], [r["ms"][name] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("hidden size (one Llama-style layer, intermediate = 8/3 hidden)")
    ax.set_ylabel("optimizer step [ms] (median, shared CPU)")
    ax.set_xticks([r["hidden"] for r in rows], [str(r["hidden"]) for r in rows])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return [*out, ""]


def _shape_notes(study: Any) -> list[str]:
    """Which coefficients each named schedule gives on this model's matrix shapes."""
    from benchmarks.harness import default_schedule

    shapes = sorted(set(study.shapes()))
    muon = (schedules.MUON_COEFFICIENTS,) * 5
    names = ["root-paper", default_schedule()]
    lines = [f"Hidden-matrix shapes trained by the matrix branch: {', '.join(f'{m}x{n}' for m, n in shapes)}."]
    for name in dict.fromkeys(names):
        differ = [f"{m}x{n}" for m, n in shapes if schedules.get_schedule(name, (m, n), 5) != muon]
        lines.append(
            f"`{name}` differs from Muon's fixed triple on {len(differ)} of {len(shapes)} shapes"
            + (f" ({', '.join(differ)})." if differ else ": on this model it runs Muon's schedules.")
        )
    return lines


def _identical(study: Any, names: list[str], specs: dict[str, dict[str, Any]]) -> list[str]:
    from benchmarks.harness import behavior

    shapes = study.shapes()
    groups: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):
        if name in specs:
            groups.setdefault(json.dumps(behavior(specs[name], shapes), sort_keys=True), []).append(name)
    return [" = ".join(g) for g in groups.values() if len(g) > 1]


def setting_section(study: Any, names: tuple[str, ...], img_dir: Path, img_prefix: str) -> tuple[list[str], dict]:
    from benchmarks.harness import ABLATION_GROUPS, ablation_specs, noise_for, optimizer_specs

    s = study.setting
    specs = optimizer_specs()
    best = best_lrs(study, names)
    headline: dict[str, Any] = {"title": s.title, "rows": {}}
    out = [f"## {s.title}", ""]
    desc = study.task_description
    out += [
        f"- Budget: {s.steps} steps, batch {s.batch_size}, sequence length {s.seq_len}; lr schedule: linear warm-up "
        f"over {s.warmup_frac:.0%} of the steps, cosine decay to {s.final_lr_frac:g} x lr; weight decay "
        f"{s.weight_decay:g}; no gradient clipping.",
        f"- Model and data: {json.dumps(s.model)}; {json.dumps(desc)}.",
        f"- Seeds {list(s.seeds)} (a seed sets the initialization and the data order; every optimizer sees the same "
        "batches and the same injected noise for a seed). Eval: the clean held-out loss every "
        f"{s.eval_every} steps.",
        "- Robustness variants (noise seeded, identical for every optimizer of a seed; eval data stays clean; each "
        "optimizer keeps its best clean lr):",
    ]
    for v in s.variants[1:]:
        noise = noise_for(s, v)
        text = (
            f"on {noise.outlier_prob:.0%} of the steps, {noise.outlier_entries} random entries of every hidden-matrix "
            f"gradient are multiplied by {noise.outlier_scale:g} between backward and the optimizer step"
        )
        if noise.label_noise:
            text += f"; {noise.label_noise:.0%} of the training targets are replaced by uniformly random tokens"
        out.append(f"    - *{VARIANT_TITLES.get(v, v)}* (`{v}`): {text}.")
    out += ["- " + line for line in _shape_notes(study)]
    same = _identical(study, list(names), specs)
    if same:
        out.append("- Same computation on these shapes (they share their runs): " + "; ".join(same) + ".")
    out.append("")

    # lr sweep
    out += [f"### Learning-rate sweep (seed {s.seeds[0]}, clean, final held-out loss)", ""]
    rows = []
    for name in names:
        cells = []
        for lr in s.lrs:
            run = study.runs.get((name, "clean", lr, s.seeds[0]))
            if run is None:
                cells.append("-")
                continue
            text = "diverged" if run["diverged"] else f"{run['final_eval']:.4f}"
            cells.append(f"**{text}**" if best.get(name) == lr else text)
        rows.append([name, *cells])
    out += _table(["optimizer", *[f"lr {lr:g}" for lr in s.lrs]], rows)
    edge = [n for n, lr in best.items() if len(s.lrs) > 1 and lr in (min(s.lrs), max(s.lrs))]
    if edge:
        out += [
            f"Best lr at the edge of the grid for: {', '.join(edge)} (a wider sweep could move their results).",
            "",
        ]

    # main table
    mid = 0.5
    noisy_variants = [v for v in s.variants[1:] if any(k[1] == v for k in study.runs)]
    out += [f"### Final held-out loss at the best lr (mean ± std over seeds {list(s.seeds)})", ""]
    rows = []
    stats: dict[str, dict[str, tuple[float, float, int]]] = {}
    for name in names:
        if name not in best:
            continue
        clean = runs_of(study, name, "clean", best[name], s.seeds)
        c = mean_std([r["final_eval"] for r in clean])
        m = mean_std([eval_at_fraction(r, mid) for r in clean])
        stats[name] = {"clean": c}
        noise_cells = []
        for variant in noisy_variants:
            noisy = runs_of(study, name, variant, best[name], s.seeds)
            n = mean_std([r["final_eval"] for r in noisy])
            paired = [b["final_eval"] - a["final_eval"] for a in clean for b in noisy if a["seed"] == b["seed"]]
            d = mean_std(paired)
            stats[name][variant] = n
            stats[name][f"degradation/{variant}"] = d
            noise_cells += [fmt(*n), fmt(*d)]
        step_ms = statistics.median(x for r in clean for x in r["step_s"]) * 1e3 if clean else float("nan")
        opt_ms = statistics.median(x for r in clean for x in r["opt_s"]) * 1e3 if clean else float("nan")
        ppl = math.exp(c[0]) if math.isfinite(c[0]) else float("inf")
        rows.append(
            [
                name,
                f"{best[name]:g}",
                fmt(*m),
                fmt(*c),
                f"{ppl:.2f}",
                *noise_cells,
                f"{step_ms:.0f} / {opt_ms:.0f}",
            ]
        )
        headline["rows"][name] = {"lr": best[name], **stats[name], "step_ms": step_ms, "opt_ms": opt_ms}
    out += _table(
        [
            "optimizer",
            "lr",
            "loss at 50% of steps",
            "final loss (clean)",
            "ppl (clean)",
            *[
                cell
                for v in noisy_variants
                for cell in (f"final loss ({VARIANT_TITLES.get(v, v)})", f"degradation ({v} - clean)")
            ],
            "ms/step: train / optimizer (median)",
        ],
        rows,
    )
    img = img_dir / f"{img_prefix}.png"
    plot_setting(study, names, best, img)
    out += [f"![{s.title}](img/{img.name})", ""]

    # verdicts
    out += ["### Verdicts", ""]
    pairs = [("ROOT", "Muon"), ("ROOT", "AdamW"), ("ROOT", "ROOT-paper"), ("ROOT-paper", "Muon"), ("Muon", "AdamW")]
    same_groups = [set(g.split(" = ")) for g in same]
    keys = ["clean", *noisy_variants, *[f"degradation/{v}" for v in noisy_variants]]
    for key in keys:
        for a, b in pairs:
            if a not in stats or b not in stats:
                continue
            if key.startswith("degradation/"):
                what = f"degradation under {VARIANT_TITLES.get(key.split('/')[1])}"
            else:
                what = f"final loss, {VARIANT_TITLES.get(key, key)}"
            if any({a, b} <= g for g in same_groups):
                out.append(f"- {what}: {a} and {b} are the same computation on this model's shapes.")
                continue
            diff, word = verdict(stats[a][key], stats[b][key])
            out.append(f"- {what}: {a} - {b} = {diff:+.4f}: {a} is {word}.")
    out.append("")

    # ablations
    if s.ablation_seeds and "ROOT" in best:
        abl = ablation_specs()
        present = [
            (title, g)
            for title, g in ABLATION_GROUPS.items()
            if any(
                (row, v, best["ROOT"], sd) in study.runs
                for row in g["rows"]
                for v in g["variants"]
                for sd in s.ablation_seeds
            )
        ]
        if present:
            out += [
                f"### Ablations (ROOT's best lr {best['ROOT']:g}, not re-tuned; seeds {list(s.ablation_seeds)}; "
                "final held-out loss)",
                "",
            ]
            same = _identical(study, [r for _, g in present for r in g["rows"]], abl)
            if same:
                out += ["Same computation on these shapes (shared runs): " + "; ".join(same) + ".", ""]
            headline["ablations"] = {}
            for title, g in present:
                rows = []
                for row in g["rows"]:
                    if row not in abl:
                        continue
                    cells = []
                    for v in g["variants"]:
                        r = runs_of(study, row, v, best["ROOT"], s.ablation_seeds)
                        st = mean_std([x["final_eval"] for x in r]) if r else (float("nan"), float("nan"), 0)
                        cells.append(fmt(*st, digits=4) if r else "-")
                        headline["ablations"][f"{title}/{row}/{v}"] = st
                    spec = abl[row]
                    rows.append([row, str(spec["clip_quantile"]), f"`{spec['ns_coefficients']}`", *cells])
                out += [f"**{title}**", ""]
                out += _table(["configuration", "clip quantile", "coefficients", *g["variants"]], rows)
    headline["stats"] = stats
    return out, headline


def speed_section(speed: dict[str, Any], img_dir: Path) -> tuple[list[str], dict[str, Any]]:
    out = ["## Speed and memory (`benchmarks/step_time.py`)", ""]
    head: dict[str, Any] = {}
    cfg = speed["config"]
    load = [speed["machine"]["load_average_1m"], speed["machine"].get("load_average_1m_end")]
    busy = load[0] > 0.5 * speed["machine"]["cpus"]  # at the start: the end's figure includes the benchmark itself
    out += [
        f"Measured {speed['date']} on {speed['machine']['cpu']} ({speed['machine']['cpus']} cores), "
        f"torch {speed['versions']['torch']}, {cfg['threads']} torch thread(s); 1-minute load average "
        f"{load[0]} at the start, {load[1]} at the end "
        + ("(other jobs were running: wall-clock figures are noisy; " if busy else "(an otherwise idle machine; ")
        + "all figures are medians). Grads are fixed random tensors, so only the optimizer step is timed.",
        "",
    ]
    if "main" in speed:
        m = speed["main"]
        out += [
            f"### Step time: {m['layers']} layers of SmolLM2-135M hidden matrices ({m['params'] / 1e6:.1f}M params, "
            f"median of {m['steps']} steps)",
            "",
        ]
        out += _table(["optimizer", "ms/step"], [[k, f"{v:.1f}"] for k, v in m["ms"].items()])
        target = "met" if m["root_over_muon_bf16"] <= 1.0 else "not met"
        out += [
            f"- ROOT / `torch.optim.Muon` at equal NS dtype (bf16): **{m['root_over_muon_bf16']:.2f}x** "
            f"(target <= 1.0x: {target}).",
            f"- Clip share of ROOT's step: {m['clip_share_bf16']:.1%} (bf16 NS), "
            f"{m['clip_share_fp32']:.1%} (fp32 NS).",
            "",
        ]
        head["ratio"] = m["root_over_muon_bf16"]
        head["main_ms"] = m["ms"]
    if "breakdown" in speed:
        b = speed["breakdown"]
        out += [
            f"### Where ROOT's step goes ({b['layers']} SmolLM2 layers, {b['ns_gflop_per_step']:.1f} GFLOP of "
            "Newton-Schulz per step)",
            "",
            "Components timed separately, batched by shape exactly as `ROOT.step` does. NS FLOPs per matrix and step: "
            "`2 s^2 (2 l + s)` for `s = min(m, n)`, `l = max(m, n)` (Gram matrix, its square, the product), times 5 "
            "steps. The peak is the fastest of three square matmuls (2048, 3072 and 4096 cubed) of the same dtype "
            "measured in the same run.",
            "",
        ]
        rows = []
        for dtype, d in b["dtypes"].items():
            c = d["components_ms"]
            rows.append(
                [
                    dtype,
                    *[f"{c[k]:.1f}" for k in c],
                    f"{d['sum_ms']:.1f}",
                    f"{d['root_step_ms']:.1f}",
                    f"{d['peak_gflops']:.0f}",
                    f"{d['ns_gflops']:.0f} ({d['ns_peak_fraction']:.0%})",
                ]
            )
        comps = list(next(iter(b["dtypes"].values()))["components_ms"])
        out += _table(
            [
                "NS dtype",
                *[f"{c} [ms]" for c in comps],
                "sum [ms]",
                "ROOT.step [ms]",
                "peak GFLOP/s",
                "NS GFLOP/s (of peak)",
            ],
            rows,
        )
        rows = []
        for dtype, d in b["dtypes"].items():
            for shape, r in d["ns_by_shape"].items():
                rows.append(
                    [
                        dtype,
                        shape,
                        str(r["batch"]),
                        f"{r['ms']:.1f}",
                        f"{r['gflops']:.0f}",
                        f"{r['peak_fraction']:.0%}",
                    ]
                )
        out += ["Newton-Schulz alone, per same-shape batch:", ""]
        out += _table(["dtype", "shape", "batch", "ms", "GFLOP/s", "of peak"], rows)
        frac = {
            dt: min(d["ns_by_shape"][k]["peak_fraction"] for k in ("1536x576", "576x1536") if k in d["ns_by_shape"])
            for dt, d in b["dtypes"].items()
        }
        head["peak_fraction_576x1536"] = frac
        head["ns_by_shape"] = {
            dt: {k: d["ns_by_shape"][k]["peak_fraction"] for k in ("1536x576", "576x1536") if k in d["ns_by_shape"]}
            for dt, d in b["dtypes"].items()
        }
        head["ns_peak_fraction"] = {dt: d["ns_peak_fraction"] for dt, d in b["dtypes"].items()}
        out += [
            "- NS on the 576 x 1536 shapes (gate/up 1536x576, down 576x1536): worst of the two at "
            + ", ".join(f"{v:.0%} of the {k} peak" for k, v in frac.items())
            + f" (target >= 80%: {'met' if all(v >= 0.8 for v in frac.values()) else 'not met'}).",
            f"- `torch.optim.Muon`'s whole step runs {b['torch_muon_step_gflops']:.0f} GFLOP/s of NS work "
            f"({b['torch_muon_step_ms']:.1f} ms).",
            *_where_time_goes(b),
            "",
            "One ROOT step (bf16 NS) under `torch.profiler`, top operators by self CPU time:",
            "",
            "```text",
            *b["profile_bf16"].strip("\n").splitlines(),
            "```",
            "",
        ]
    if "sweep" in speed:
        sw = speed["sweep"]
        names = sw["optimizers"]
        out += ["### Step cost against hidden size (one Llama-style layer)", ""]
        rows = [
            [
                str(r["hidden"]),
                str(r["intermediate"]),
                f"{r['params'] / 1e6:.2f}M",
                f"{r['ns_gflop']:.1f}",
                *[f"{r['ms'][n]:.1f}" for n in names],
                f"{r['ms']['ROOT (bf16 NS)'] / r['ms']['torch.optim.Muon (bf16 NS)']:.2f}x",
            ]
            for r in sw["rows"]
        ]
        out += _table(
            ["hidden", "intermediate", "params", "NS GFLOP", *[f"{n} [ms]" for n in names], "ROOT bf16 / torch Muon"],
            rows,
        )
        plot_sweep(speed, img_dir / "step_time_sweep.png")
        out += ["![step time vs hidden size](img/step_time_sweep.png)", ""]
    if "memory" in speed:
        mem = speed["memory"]
        out += [
            f"### Optimizer state per parameter: SmolLM2-135M architecture ({mem['params'] / 1e6:.1f}M params, "
            f"{mem['matrix_params'] / 1e6:.1f}M of them in hidden matrices), fp32, read from the state after one step",
            "",
        ]
        rows = [
            [
                k,
                f"{v['bytes'] / 2**20:.1f}",
                f"{v['bytes_per_param']:.2f}",
                f"{v['bytes_per_matrix_param']:.2f}",
                f"{v['bytes_per_other_param']:.2f}",
            ]
            for k, v in mem["rows"].items()
        ]
        out += _table(
            [
                "optimizer",
                "state MiB",
                "bytes/param",
                "bytes/param (hidden matrices)",
                "bytes/param (embeddings, norms)",
            ],
            rows,
        )
        head["memory"] = {k: v["bytes_per_param"] for k, v in mem["rows"].items()}
    return out, head


def _where_time_goes(b: dict[str, Any]) -> list[str]:
    """Computed remarks on the breakdown: the largest components and the tall-vs-wide Newton-Schulz rate."""
    out = []
    for dtype, d in b["dtypes"].items():
        comps = d["components_ms"]
        total = sum(comps.values())
        shares = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(comps.items(), key=lambda kv: -kv[1]))
        out.append(f"- Where the time goes ({dtype} NS): {shares}.")
        shapes = d["ns_by_shape"]
        if "1536x576" in shapes and "576x1536" in shapes:
            tall, wide = shapes["1536x576"]["peak_fraction"], shapes["576x1536"]["peak_fraction"]
            if wide > tall + 0.1:
                out.append(
                    f"    - The same 576 x 1536 products run at {wide:.0%} of peak for the wide layout (down, "
                    f"576x1536) but {tall:.0%} for the tall one (gate/up, 1536x576), which pays for transposing the "
                    "batch into the wide form (or, in float32, forms the Gram matrix as `X^T X`)."
                )
    return out


def render(studies: dict[str, Any], names: tuple[str, ...], docs: Path, speed_json: Path | None, args: Any) -> Path:
    """Write `docs/results.md` (+ `docs/img`) from whatever is cached; return the page's path."""
    from benchmarks.harness import default_schedule, library_versions, machine_dict

    img_dir = docs / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    headlines = {}
    body: list[str] = []
    loads, threads = [], set()
    for key, study in studies.items():
        if not study.runs:
            load_cached(study, names)
        if not study.runs:
            continue
        study.task_description = _description(study)
        section, headline = setting_section(study, names, img_dir, f"convergence_{key}")
        headlines[key] = headline
        body += section
        loads += [r["load_average_1m"] for r in study.runs.values() if "load_average_1m" in r]
        threads |= {r.get("threads") for r in study.runs.values()}
    speed_head: dict[str, Any] = {}
    if speed_json is not None and speed_json.exists():
        speed = json.loads(speed_json.read_text())
        section, speed_head = speed_section(speed, img_dir)
        body += section
    quick = " --quick" if getattr(args, "quick", False) else ""
    head = [
        "# Results: does ROOT beat Muon and AdamW here?",
        "",
        "Generated by `python benchmarks/convergence.py" + quick + "` (convergence runs, ablations, then "
        "`benchmarks/step_time.py` for speed and memory); every run is cached under `benchmarks/results/`. "
        "See [Benchmarks](benchmarks.md) for what each figure measures.",
        "",
        f"- Machine: {machine_dict()['cpu']}, {machine_dict()['cpus']} cores **shared with other jobs** "
        f"(1-minute load average during the runs: {min(loads, default=float('nan')):.1f} to "
        f"{max(loads, default=float('nan')):.1f}), torch threads {sorted(t for t in threads if t)}; no GPU. "
        "Wall-clock figures are therefore noisy (medians are reported); losses are not affected.",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in library_versions().items())}.",
        "- Optimizers: **AdamW** = `torch.optim.AdamW` on every parameter (betas 0.9/0.95, eps 1e-8). **Muon** = ROOT "
        'with both ROOT features off (`clip_quantile=None, ns_coefficients="muon"`): the same code path as ROOT, '
        "so only the clip and the coefficients differ (not `torch.optim.Muon`). **ROOT-paper** = clip at the 0.90 "
        f'quantile + the paper\'s coefficient table (`"root-paper"`). **ROOT** = our defaults (clip 0.90, '
        f'`ns_coefficients="{default_schedule()}"`). In the three matrix optimizers embeddings, LM head, norms '
        "and biases go to ROOT's AdamW branch; Newton-Schulz runs in float32 (the CPU default), 5 steps, Nesterov "
        'momentum 0.95, `adjust_lr_fn="match_rms_adamw"` (so one lr grid serves every optimizer). In setting (b) '
        'the three matrix optimizers orthogonalize both LoRA factors (`lora_policy="both"`); the package default for '
        'PEFT models is `"b_only"` (A on the AdamW branch), chosen by `benchmarks/lora.py`: see '
        "[PEFT / LoRA](guides/peft.md#benchmark-smollm2-135m-instruct).",
        "- Verdict rule: a difference of mean final losses counts as a win or a loss only when it is larger than the "
        "larger of the two standard deviations over seeds; otherwise it is reported as within the seed spread. "
        "With 2-3 seeds this is a coarse test, not a significance test.",
        "",
    ]
    page = docs / "results.md"
    kept = _other_studies_sections(page)
    page.write_text("\n".join(head + _summary(headlines, speed_head) + body).rstrip() + "\n" + kept, encoding="utf-8")
    return page


def _other_studies_sections(page: Path) -> str:
    """The sections other studies generate into the same page (between their `<!-- NAME: start ... -->` and
    `<!-- NAME: end -->` markers, e.g. `benchmarks/finetune.py`'s), kept when this page is rewritten."""
    if not page.exists():
        return ""
    text = page.read_text(encoding="utf-8")
    spans = re.finditer(r"\n(<!-- ([\w.]+): start.*?-->.*?<!-- \2: end -->)\n", text, flags=re.S)
    return "".join("\n" + m.group(1) + "\n" for m in spans)


def _description(study: Any) -> dict[str, Any]:
    path = study.dir / "task.json"
    if path.exists():
        return json.loads(path.read_text())
    desc = study.task.describe()
    path.write_text(json.dumps(desc))
    return desc


def _degrades(d: tuple[float, float, int]) -> bool:
    """True if a mean degradation is positive and larger than its own standard deviation over seeds."""
    return math.isfinite(d[0]) and d[2] >= 2 and d[0] > (d[1] if math.isfinite(d[1]) else 0.0)


def _interpretation(headlines: dict[str, Any]) -> list[str]:
    """Sentences that read the measured numbers; each is emitted only when the numbers support it."""
    out = []
    for key, h in headlines.items():
        rows, stats = h["rows"], h["stats"]
        if not {"ROOT", "Muon", "AdamW"} <= set(stats):
            continue
        diff, word = verdict(stats["ROOT"]["clean"], stats["Muon"]["clean"])
        if word.startswith("lower"):
            text = f"ROOT reached a lower clean loss than Muon ({diff:+.3f})"
        elif word.startswith("higher"):
            text = f"ROOT reached a higher clean loss than Muon ({diff:+.3f}): here it does not beat Muon"
        else:
            text = f"ROOT did not beat Muon on clean data: the difference ({diff:+.3f}) is within the seed spread"
        adam_diff, adam_word = verdict(stats["ROOT"]["clean"], stats["AdamW"]["clean"])
        text += f"; against AdamW the difference is {adam_diff:+.3f} ({adam_word})."
        out.append(f"- Setting ({key}): {text}")
        outl, heavy = "degradation/outliers", "degradation/heavy-outliers"
        if outl in rows["Muon"] and not _degrades(rows["Muon"][outl]):
            out.append(
                f"- Setting ({key}): moderate sparse outliers did not measurably hurt Muon "
                f"(degradation {fmt(*rows['Muon'][outl])}). A plausible reason: a few huge entries take only a few "
                "singular directions of the momentum, and Newton-Schulz still lifts the remaining singular values "
                "towards 1, so most of the update survives; the clip has nothing to fix there."
            )
        if heavy in rows["Muon"] and _degrades(rows["Muon"][heavy]):
            root_d = rows["ROOT"][heavy]
            text = (
                f"- Setting ({key}): heavy outliers hurt Muon (degradation {fmt(*rows['Muon'][heavy])}) "
                f"{'and' if _degrades(root_d) else 'but not'} ROOT ({fmt(*root_d)}); AdamW: "
                f"{fmt(*rows['AdamW'][heavy])}."
            )
            off = h.get("ablations", {}).get("clip on/off/clip off/heavy-outliers")
            on = h.get("ablations", {}).get("clip on/off/ROOT (defaults)/heavy-outliers")
            if off and on:
                text += (
                    " The clip ablation isolates the cause: ROOT without its clip ends at "
                    f"{fmt(*off, digits=4)}, with it at {fmt(*on, digits=4)}; this is the regime where the paper's "
                    "robustness claim holds here."
                )
            out.append(text)
        if "degradation/noisy" in rows["Muon"] and "degradation/noisy" in rows["ROOT"]:
            d_muon, d_root = rows["Muon"]["degradation/noisy"], rows["ROOT"]["degradation/noisy"]
            _, w = verdict(d_root, d_muon)
            if w == "within the seed spread":
                out.append(
                    f"- Setting ({key}): under outliers + label noise ROOT and Muon degrade alike ({fmt(*d_root)} vs "
                    f"{fmt(*d_muon)}); label noise is not something a momentum clip can remove."
                )
    return out


def _summary(headlines: dict[str, Any], speed: dict[str, Any]) -> list[str]:
    out = ["## Summary", ""]
    for key, h in headlines.items():
        rows = h["rows"]
        if not rows:
            continue
        parts = [f"{n} {fmt(*r['clean'])}" for n, r in rows.items()]
        out.append(f"- Setting ({key}), final clean held-out loss: " + "; ".join(parts) + ".")
        variants = [v for v in VARIANT_TITLES if v != "clean" and all(v in r for r in rows.values())]
        for v in variants:
            parts = [f"{n} {fmt(*r[v])} (degradation {fmt(*r[f'degradation/{v}'])})" for n, r in rows.items()]
            out.append(f"- Setting ({key}) with {VARIANT_TITLES[v]}: " + "; ".join(parts) + ".")
        stats = h["stats"]
        if "ROOT" in stats:
            out.append(f"- Setting ({key}), differences of mean final loss (negative = ROOT lower):")
        for variant in ["clean", *variants]:
            if "ROOT" in stats and "Muon" in stats:
                diff, word = verdict(stats["ROOT"][variant], stats["Muon"][variant])
                out.append(f"    - {variant}: ROOT vs Muon {diff:+.4f} ({word}).")
            if "ROOT" in stats and "AdamW" in stats:
                diff, word = verdict(stats["ROOT"][variant], stats["AdamW"][variant])
                out.append(f"    - {variant}: ROOT vs AdamW {diff:+.4f} ({word}).")
    reading = _interpretation(headlines)
    if reading:
        out += ["", "Reading these numbers:", "", *reading, ""]
    if "ratio" in speed:
        met = "met" if speed["ratio"] <= 1.0 else "not met"
        out.append(
            f"- Step time, ROOT / `torch.optim.Muon` at equal NS dtype (bf16): {speed['ratio']:.2f}x "
            f"(target <= 1.0x: {met})."
        )
    if "ns_by_shape" in speed:
        parts = [
            f"{dtype} {', '.join(f'{shape} {frac:.0%}' for shape, frac in shapes.items())}"
            for dtype, shapes in speed["ns_by_shape"].items()
        ]
        worst = min(f for shapes in speed["ns_by_shape"].values() for f in shapes.values())
        out.append(
            "- Newton-Schulz on the 576 x 1536 shapes, fraction of the same-dtype matmul peak: "
            + "; ".join(parts)
            + f" (target >= 80%: {'met' if worst >= 0.8 else 'not met'})."
        )
    if "memory" in speed:
        out.append(
            "- Optimizer state, bytes per parameter (SmolLM2-135M): "
            + "; ".join(f"{k} {v:.2f}" for k, v in speed["memory"].items())
            + "."
        )
    return [*out, ""]


def summary_text(studies: dict[str, Any], names: tuple[str, ...]) -> str:
    """Short plain-text headline for the terminal."""
    lines = []
    for key, study in studies.items():
        best = best_lrs(study, names)
        for name in names:
            if name not in best:
                continue
            s = study.setting
            cells = []
            for v in s.variants:
                runs = runs_of(study, name, v, best[name], s.seeds)
                if runs:
                    cells.append(f"{v} {fmt(*mean_std([r['final_eval'] for r in runs]), digits=4):<22}")
            lines.append(f"  ({key}) {name:<12} lr {best[name]:<7g} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Re-render the page from the cached runs only (`convergence.py --report-only` does the same)."""
    import argparse

    from benchmarks.harness import MAIN_OPTIMIZERS, QUICK, REPO, RESULTS, SETTINGS, SettingStudy

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="render the --quick runs (results/quick, no docs/)")
    args = parser.parse_args(argv)
    results = RESULTS / "quick" if args.quick else RESULTS
    docs = results / "docs" if args.quick else REPO / "docs"
    settings = {k: dataclasses.replace(v, **QUICK[k]) for k, v in SETTINGS.items()} if args.quick else SETTINGS
    studies = {k: SettingStudy(s, results, report_only=True) for k, s in settings.items() if (results / k).is_dir()}
    if not studies:
        sys.exit(f"No cached runs under {results}: run `python benchmarks/convergence.py{' --quick' * args.quick}`.")
    speed_json = results / "step_time.json"
    print(f"wrote {render(studies, MAIN_OPTIMIZERS, docs, speed_json if speed_json.exists() else None, args)}")
    print(summary_text(studies, MAIN_OPTIMIZERS))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
