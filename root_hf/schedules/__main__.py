"""Command line for Newton-Schulz schedules: `python -m root_hf.schedules show|model|table`.

Print schedules, their band and their predicted errors for given shapes:

```
python -m root_hf.schedules show 2048x8192 16x4096 --compare
```

Resolve the adaptive schedule of every matrix ROOT orthogonalizes in a model, LoRA factors included, and time the fits
of shapes missing from the shipped table:

```
python -m root_hf.schedules model path/to/config.json --lora-r 8 16
```

Regenerate the shipped table (to a file you name, or to stdout), or check it against a fresh fit:

```
python -m root_hf.schedules table --out root_hf/schedules/table.py
python -m root_hf.schedules table --check
```

The model shape data (`MODEL_DIMS`, `LORA_RANKS`) that defines the table's shapes lives here, not in the library.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import SCHEDULE_NAMES, fit, get_schedule, schedule_source, table
from .named import ADAPTIVE_BAND, SAFE_BAND, Schedule, check_schedule, shape_key

__all__ = [
    "LORA_RANKS",
    "MODEL_DIMS",
    "config_matrix_shapes",
    "layer_shapes",
    "main",
    "parse_shape",
    "table_shapes",
]

# Decoder dims (hidden, intermediate, attention heads, KV heads, head dim) from each model's config.json on the
# Hugging Face Hub; they define the shapes of the shipped table.
MODEL_DIMS: dict[str, tuple[int, int, int, int, int]] = {
    "SmolLM2-135M": (576, 1536, 9, 3, 64),
    "SmolLM2-360M": (960, 2560, 15, 5, 64),
    "SmolLM2-1.7B": (2048, 8192, 32, 32, 64),
    "Llama-2-7B": (4096, 11008, 32, 32, 128),
    "Llama-2-13B": (5120, 13824, 40, 40, 128),
    "Llama-3.1-8B": (4096, 14336, 32, 8, 128),
    "Llama-3.2-1B": (2048, 8192, 32, 8, 64),
    "Llama-3.2-3B": (3072, 8192, 24, 8, 128),
    "Mistral-7B-v0.1": (4096, 14336, 32, 8, 128),
    "Qwen2.5-0.5B": (896, 4864, 14, 2, 64),
    "Qwen2.5-1.5B": (1536, 8960, 12, 2, 128),
    "Qwen2.5-3B": (2048, 11008, 16, 2, 128),
    "Qwen2.5-7B": (3584, 18944, 28, 4, 128),
    "Qwen3-0.6B": (1024, 3072, 16, 8, 128),
    "Qwen3-1.7B": (2048, 6144, 16, 8, 128),
    "Qwen3-4B": (2560, 9728, 32, 8, 128),
    "Qwen3-8B": (4096, 12288, 32, 8, 128),
    "Gemma-2B": (2048, 16384, 8, 1, 256),
    "Gemma-7B": (3072, 24576, 16, 16, 256),
    "Gemma-2-2B": (2304, 9216, 8, 4, 256),
    "Gemma-2-9B": (3584, 14336, 16, 8, 256),
    "Gemma-3-1B": (1152, 6912, 4, 1, 256),
}
# LoRA ranks of the shipped table (PEFT's default r is 8; 4-64 covers common recipes).
LORA_RANKS: tuple[int, ...] = (4, 8, 16, 32, 64)
# Newton-Schulz steps of the shipped table (ROOT's default ns_steps).
_TABLE_STEPS = 5
# Families shown in compact tables (the three of the orthogonality benchmark).
_SHOWN = ("gaussian", "low-rank", "power-1")


def parse_shape(text: str) -> tuple[int, int]:
    """Parse a shape written as `"2048x8192"` (or `"2048,8192"`).

    Args:
        text: two positive integers joined by `x` or `,`.

    Returns:
        `(rows, cols)`.

    Raises:
        ValueError: naming the text and the expected form.
    """
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"Invalid shape: {text!r}. Must be two positive integers like '2048x8192'.")
    return int(parts[0]), int(parts[1])


def layer_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple]:
    """The `(out, in)` shapes of one decoder layer's matrices, with the fused QKV and gate-up variants.

    Args:
        hidden: hidden size.
        intermediate: MLP intermediate size.
        heads: attention heads.
        kv_heads: key/value heads.
        head_dim: dimension per head.

    Returns:
        Module name (`q_proj`, ..., `qkv_proj`, `gate_up_proj`) -> `(out, in)`.
    """
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "q_proj": (q, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, q),
        "gate_proj": (intermediate, hidden),
        "up_proj": (intermediate, hidden),
        "down_proj": (hidden, intermediate),
        "qkv_proj": (q + 2 * kv, hidden),
        "gate_up_proj": (2 * intermediate, hidden),
    }


def _lora_shapes(shape: tuple[int, int], ranks: Sequence[int]) -> list[tuple[int, int]]:
    out, inp = shape
    return [s for r in ranks for s in ((r, inp), (out, r))]


def table_shapes() -> list[tuple[int, int]]:
    """Every shape key of the shipped table: the layers of `MODEL_DIMS` and their LoRA factors of `LORA_RANKS`.

    Returns:
        Sorted `(min dim, max dim)` keys.
    """
    keys = set()
    for dims in MODEL_DIMS.values():
        for shape in layer_shapes(*dims).values():
            keys.add(shape_key(shape))
            keys.update(shape_key(s) for s in _lora_shapes(shape, LORA_RANKS))
    return sorted(keys)


def _config_dims(config: dict) -> tuple[int, int, int, int, int]:
    config = config.get("text_config", config) if "hidden_size" not in config else config
    try:
        if "hidden_size" in config:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            intermediate = int(config["intermediate_size"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
        else:  # GPT-2 style keys
            hidden, heads = int(config["n_embd"]), int(config["n_head"])
            intermediate, kv_heads = int(config.get("n_inner") or 4 * hidden), heads
    except KeyError as err:
        raise ValueError(
            f"Invalid model config: missing {err}. Expected Llama-style keys (hidden_size, intermediate_size, "
            "num_attention_heads) or GPT-2 keys (n_embd, n_head); install transformers to read any architecture."
        ) from None
    head_dim = int(config.get("head_dim") or hidden // heads)
    return hidden, intermediate, heads, kv_heads, head_dim


def config_matrix_shapes(path: str | Path, use_transformers: bool = True) -> dict[tuple[int, int], list[str]]:
    """The matrices ROOT orthogonalizes in a model: shape key -> parameter names.

    With transformers installed the model is built on the meta device from its config (no weights, no download) and
    routed with `root_hf.integrations.routing.route_parameters`, so every architecture is exact; otherwise the
    Llama-style keys of `config.json` give one decoder layer's matrices.

    Args:
        path: a `config.json` file or a directory holding one.
        use_transformers: build the model with transformers when it is installed (default: True).

    Returns:
        Shape key `(min dim, max dim)` -> names of the parameters of that shape.

    Raises:
        ValueError: if `path` holds no `config.json` or the config lacks the keys needed.
    """
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"Invalid model config: {str(path)!r}. Must be a config.json file or a folder holding one.")
    shapes: dict[tuple[int, int], list[str]] = {}
    if use_transformers:
        try:
            import transformers  # noqa: F401
        except ImportError:
            use_transformers = False
    if use_transformers:
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        from ..integrations.routing import route_parameters

        config = AutoConfig.from_pretrained(str(file.parent))
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = AutoModel.from_config(config)
        for routed in route_parameters(model).branch("root"):
            shapes.setdefault(shape_key(tuple(routed.param.shape)), []).append(routed.name)
        return shapes
    dims = _config_dims(json.loads(file.read_text()))
    for name, shape in layer_shapes(*dims).items():
        if name not in ("qkv_proj", "gate_up_proj"):
            shapes.setdefault(shape_key(shape), []).append(name)
    return shapes


def _fmt(value: float) -> str:
    return f"{value:.4f}" if value < 10 else f"{value:.3g}"


def _describe(name: str, shape: tuple[int, int], ns_steps: int) -> tuple[Schedule, dict[str, float], float]:
    schedule = get_schedule(name, shape, ns_steps)
    errors = fit.schedule_errors(schedule, shape)
    return schedule, errors, check_schedule(schedule, SAFE_BAND).max_bf16


def _show(args: argparse.Namespace) -> int:
    for text in args.shapes:
        shape = parse_shape(text)
        key = shape_key(shape)
        source = schedule_source(key, args.steps) if args.schedule == "adaptive" else "named"
        start = time.perf_counter()
        schedule = get_schedule(args.schedule, shape, args.steps)
        took = time.perf_counter() - start
        check = check_schedule(schedule, ADAPTIVE_BAND)
        print(
            f"shape {shape[0]} x {shape[1]}  ns_steps={args.steps}  schedule={args.schedule!r}  source: {source}",
            end="",
        )
        print(f" ({took:.2f} s)" if source == "fit" else "")
        print(f"  {'step':>4}  {'a':>20}  {'b':>20}  {'c':>20}")
        for k, (a, b, c) in enumerate(schedule, 1):
            print(f"  {k:>4}  {a:>20.15g}  {b:>20.15g}  {c:>20.15g}")
        print(
            "  output singular values for inputs in [0, 1]:"
            f" float64 [{check.min_float64:.4f}, {check.max_float64:.4f}],"
            f" bfloat16 [{check.min_bf16:.4f}, {check.max_bf16:.4f}]"
            + (f" (adaptive guarantee: [0, {ADAPTIVE_BAND[1]}])" if args.schedule == "adaptive" else "")
        )
        errors = fit.schedule_errors(schedule, key)
        print("  predicted relative error: " + "  ".join(f"{f} {_fmt(e)}" for f, e in errors.items()))
        if args.compare:
            print(f"  {'schedule':<16}" + "".join(f"{f:>11}" for f in fit.FAMILY_NAMES) + f"{'max bf16':>10}")
            for name in SCHEDULE_NAMES:
                _, errs, hi = _describe(name, shape, args.steps)
                print(f"  {name:<16}" + "".join(f"{_fmt(errs[f]):>11}" for f in fit.FAMILY_NAMES) + f"{hi:>10.3f}")
        print()
    return 0


def _model(args: argparse.Namespace) -> int:
    shapes = config_matrix_shapes(args.config, use_transformers=not args.no_transformers)
    if args.lora_r:
        for key, names in list(shapes.items()):
            for r in args.lora_r:
                for width in key:  # lora_A is (r, in), lora_B is (out, r)
                    shapes.setdefault(shape_key((r, width)), []).append(f"LoRA r={r} of {names[0]}")
    print(f"model config: {args.config}  ns_steps={args.steps}")
    head = "".join(f"{f + ' ours/PE/muon':>27}" for f in _SHOWN)
    print(f"{'shape':>13} {'count':>5}  {'source':<10} {'max':>6}{head}  example")
    total = 0.0
    for key in sorted(shapes):
        source = schedule_source(key, args.steps)
        start = time.perf_counter()
        ours = get_schedule("adaptive", key, args.steps)
        total += time.perf_counter() - start
        errs = {name: fit.schedule_errors(get_schedule(name, key, args.steps), key) for name in _NAMES3}
        cells = "".join(f"{'/'.join(_fmt(errs[n][f]) for n in _NAMES3):>27}" for f in _SHOWN)
        hi = check_schedule(ours).max_bf16
        names = shapes[key]
        example = names[0] + (f" (+{len(names) - 1})" if len(names) > 1 else "")
        print(f"{key[0]:>6}x{key[1]:<6} {len(names):>5}  {source:<10} {hi:>6.3f}{cells}  {example}")
    print(f"{len(shapes)} shapes resolved in {total:.2f} s (fits are kept in memory, for this process only)")
    return 0


_NAMES3 = ("adaptive", "polar-express", "muon")


def table_text(fitted: dict[tuple[int, int], fit.FitResult], command: str) -> str:
    """The source of `root_hf/schedules/table.py` for fitted schedules.

    Args:
        fitted: shape key -> fit result (5 steps).
        command: the command line that generated it, written into the header.

    Returns:
        Python source defining `TABLE_FITTER_VERSION`, `TABLE_NS_STEPS` and `TABLE` (literal triples).
    """
    lines = [
        f'"""GENERATED by `{command}`; do not edit by hand.',
        "",
        'The shipped "adaptive" Newton-Schulz schedules: shape key `(min dim, max dim)` -> one literal',
        "`(a, b, c)` triple per step, for `TABLE_NS_STEPS` steps, fitted by `root_hf.schedules.fit` (version",
        "`TABLE_FITTER_VERSION`; the table is used only while the fitter has that version). Shapes: every",
        "matrix of the decoder layers of `MODEL_DIMS` in `root_hf/schedules/__main__.py` (fused QKV and gate-up",
        f"projections included) and their LoRA factors of ranks {LORA_RANKS}. The comment on each entry gives",
        "the grid levels of its per-step fit intervals (`root_hf.schedules.fit.schedule_from_levels` rebuilds",
        "the triples from them).",
        '"""',
        "",
        f"TABLE_FITTER_VERSION = {fit.FITTER_VERSION}",
        f"TABLE_NS_STEPS = {_TABLE_STEPS}",
        "",
        "TABLE: dict[tuple[int, int], tuple[tuple[float, float, float], ...]] = {",
    ]
    for key, result in sorted(fitted.items()):
        lines.append(f"    {key}: (  # levels {result.levels}")
        lines += [f"        ({a!r}, {b!r}, {c!r})," for a, b, c in result.schedule]
        lines.append("    ),")
    lines += ["}", ""]
    return "\n".join(lines)


def _table(args: argparse.Namespace) -> int:
    keys = table_shapes()
    fitted: dict[tuple[int, int], fit.FitResult] = {}
    start = time.perf_counter()
    for key in keys:
        result = fit.fit_schedule(key, _TABLE_STEPS)
        if result.source != "fit":
            print(f"{key}: fit refused ({result.source}); fix the fitter before shipping a table", file=sys.stderr)
            return 1
        fitted[key] = result
    took = time.perf_counter() - start
    print(f"fitted {len(keys)} shapes in {took:.1f} s ({took / max(len(keys), 1):.3f} s per shape)", file=sys.stderr)
    if args.check:
        stale = [k for k in keys if table.TABLE.get(k) != fitted[k].schedule]
        extra = sorted(set(table.TABLE) - set(keys))
        same_version = table.TABLE_FITTER_VERSION == fit.FITTER_VERSION
        print(
            f"shipped table: {len(table.TABLE)} entries, {len(stale)} differ from a fresh fit, "
            f"{len(extra)} not in table_shapes(), fitter version {'matches' if same_version else 'differs'}"
        )
        for key in stale[:20]:
            print(f"  {key}: shipped {table.TABLE.get(key)}, fit {fitted[key].schedule}")
        return 1 if stale or extra or not same_version else 0
    command = "python -m root_hf.schedules table" + (f" --out {args.out}" if args.out != "-" else "")
    text = table_text(fitted, command)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m root_hf.schedules", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print schedules, bands and predicted errors for shapes like 2048x8192")
    show.add_argument("shapes", nargs="+", help="matrix shapes, e.g. 2048x8192 16x4096")
    show.add_argument("--steps", type=int, default=5, help="Newton-Schulz steps K (default: 5)")
    show.add_argument("--schedule", default="adaptive", choices=SCHEDULE_NAMES, help="schedule to print")
    show.add_argument("--compare", action="store_true", help="also compare the predicted errors of every schedule")
    model = sub.add_parser("model", help="fit and cache the schedules of every matrix of a model config")
    model.add_argument("config", help="a config.json file or a model folder holding one")
    model.add_argument("--steps", type=int, default=5, help="Newton-Schulz steps K (default: 5)")
    model.add_argument("--lora-r", type=int, nargs="*", default=[], help="add LoRA factors of these ranks")
    model.add_argument("--no-transformers", action="store_true", help="read config.json keys, not transformers")
    table_cmd = sub.add_parser("table", help="refit the table's shapes; write the generated module or check it")
    mode = table_cmd.add_mutually_exclusive_group()
    mode.add_argument("--out", default="-", help="file to write the generated module to (default: - for stdout)")
    mode.add_argument("--check", action="store_true", help="exit 1 when the shipped table differs from a refit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m root_hf.schedules`; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "steps", 5) < 0 or (args.command == "model" and any(r < 1 for r in args.lora_r)):
        parser.error("--steps must be >= 0 and --lora-r values >= 1")
    try:
        return {"show": _show, "model": _model, "table": _table}[args.command](args)
    except ValueError as err:
        parser.error(str(err))
    return 2


if __name__ == "__main__":
    sys.exit(main())
