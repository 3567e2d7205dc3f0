"""ROOT in the Hugging Face Trainer: optim="root", optim_args, RootTrainer, factory, TRL, CLI, resume, refusals."""

from __future__ import annotations

import doctest
import enum
import importlib
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import HfArgumentParser, Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402

import _root_hf_autoload  # noqa: E402
import root_hf  # noqa: E402
from _root_hf_autoload import patches  # noqa: E402
from root_hf import ROOT, RootOptimizerFactory, RootTrainer, create_root_optimizer, parse_root_optim_args  # noqa: E402
from root_hf.integrations.transformers import OPTIM_ARGS, check_root_compatible  # noqa: E402
from tests.utils import run_markdown_examples  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _unwrap(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _run_subprocess(code: str, cwd: Path, timeout: int = 180) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    command = [sys.executable, "-c", textwrap.dedent(code)]
    out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


# --------------------------------------------------------------------------------------------------------------------
# Training with the stock Trainer, RootTrainer, the factory, TRL
# --------------------------------------------------------------------------------------------------------------------


def test_stock_trainer_optim_root_trains_hidden_matrices_with_root_and_the_rest_with_adamw(
    make_model, make_args, lm_data
):
    model = make_model()
    before = _snapshot(model)
    trainer = Trainer(model=model, args=make_args(optim="root", max_steps=8), train_dataset=lm_data)
    trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    optimizer = _unwrap(trainer.optimizer)
    assert isinstance(optimizer, ROOT)
    branch = {id(p): g["use_root"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"
        state = optimizer.state[p]
        if any(h in name for h in HIDDEN):
            assert branch[id(p)] is True and "momentum_buffer" in state and "exp_avg" not in state, name
        else:  # embed_tokens, lm_head, norms
            assert branch[id(p)] is False and "exp_avg" in state and "momentum_buffer" not in state, name


def test_root_trainer_needs_no_registration_and_logs_diagnostics(make_model, make_args, lm_data):
    model = make_model()
    before = _snapshot(model)
    args = make_args(max_steps=2)  # default optim (adamw_torch): RootTrainer uses ROOT anyway
    trainer = RootTrainer(model=model, args=args, train_dataset=lm_data)
    trainer.train()
    assert isinstance(_unwrap(trainer.optimizer), ROOT)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert "root/clip_fraction" in trainer.state.log_history[0]


def test_factory_in_optimizer_cls_and_kwargs_builds_root(make_model, make_args, lm_data):
    model = make_model()
    trainer = Trainer(
        model=model,
        args=make_args(max_steps=2),
        train_dataset=lm_data,
        optimizer_cls_and_kwargs=(RootOptimizerFactory, {"lr": 3e-3, "momentum": 0.9}),
    )
    trainer.train()
    optimizer = _unwrap(trainer.optimizer)
    assert isinstance(optimizer, ROOT)
    assert {g["momentum"] for g in optimizer.param_groups} == {0.9}
    assert {g["initial_lr"] for g in optimizer.param_groups} == {3e-3}


def test_sft_trainer_with_optim_root_trains(make_model, make_tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    texts = [" ".join(f"t{(s + k) % 125}" for k in range(12)) for s in range(32)]
    model = make_model()
    before = _snapshot(model)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        optim="root",
        optim_args="clip_quantile=0.9",
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        max_length=32,
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=make_tokenizer(),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert isinstance(_unwrap(trainer.optimizer), ROOT)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_root_trainer_mixin_works_with_sft_trainer(make_model, make_tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")

    class RootSFTTrainer(root_hf.RootTrainerMixin, trl.SFTTrainer):
        pass

    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=8,
        max_length=32,
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    texts = [" ".join(f"t{(s + k) % 125}" for k in range(12)) for s in range(16)]
    trainer = RootSFTTrainer(
        model=make_model(),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=make_tokenizer(),
    )
    trainer.train()
    assert isinstance(_unwrap(trainer.optimizer), ROOT)
    assert "root/update_rms" in trainer.state.log_history[0]


def test_routing_summary_is_logged_when_the_optimizer_is_built(make_model, make_args, lm_data, caplog):
    trainer = Trainer(model=make_model(), args=make_args(optim="root"), train_dataset=lm_data)
    with caplog.at_level(logging.INFO, logger="root_hf"):
        trainer.create_optimizer()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("root_hf")]
    assert len(lines) == 1
    assert "ROOT: 14 tensors" in lines[0] and "AdamW: 7 tensors" in lines[0]


# --------------------------------------------------------------------------------------------------------------------
# Hyperparameters: TrainingArguments and optim_args
# --------------------------------------------------------------------------------------------------------------------


def test_trainer_hyperparameters_are_honoured(make_model, make_args, lm_data):
    args = make_args(
        optim="root", learning_rate=3e-3, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-6
    )
    trainer = Trainer(model=make_model(), args=args, train_dataset=lm_data)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, ROOT)
    for group in optimizer.param_groups:
        assert group["lr"] == 3e-3
        assert group["betas"] == (0.8, 0.9) and group["adamw_eps"] == 1e-6
    decays = {(g["use_root"], g["weight_decay"]) for g in optimizer.param_groups}
    assert decays == {(True, 0.05), (False, 0.05), (False, 0.0)}  # norms get no decay, as in Trainer


# (optim_args, where to look, expected)
OPTIM_ARGS_CASES = [
    ("momentum=0.8", "root", "momentum", 0.8),
    ("nesterov=false", "root", "nesterov", False),
    ("clip_quantile=none", "root", "clip_quantile", None),
    ("clip_quantile=0.5", "root", "clip_quantile", 0.5),
    ("ns_steps=3", "root", "ns_steps", 3),
    ("ns_coefficients=muon", "root", "ns_coefficients", "muon"),
    ("eps=1e-6", "root", "eps", 1e-6),
    ("adjust_lr_fn=none", "root", "adjust_lr_fn", None),
    ("adjust_lr_fn=original", "root", "adjust_lr_fn", "original"),
    ("ns_dtype=float64", "root", "ns_dtype", "float64"),
    ("ns_method=gram", "root", "ns_method", "gram"),
    ("adamw_beta1=0.7", "adamw", "betas", (0.7, 0.999)),
    ("adamw_beta1=0.7,adamw_beta2=0.95", "adamw", "betas", (0.7, 0.95)),
    ("adamw_eps=1e-5", "adamw", "adamw_eps", 1e-5),
    ("adamw_lr=0.5", "adamw", "lr", 0.5),
    ("adamw_lr=0.5", "root", "lr", 1e-2),
    ("adamw_weight_decay=0.3", "adamw_decay", "weight_decay", 0.3),
    ("nonfinite_grads=skip", "optimizer", "nonfinite_grads", "skip"),
    ("diagnostics_steps=5", "optimizer", "diagnostics_steps", 5),
    # on a PEFT model (LoRA on q_proj and v_proj): "lora" = the groups of the LoRA factors on the ROOT branch
    ("lora_policy=b_only", "optimizer", "routing_summary", "lora_policy='b_only'"),
    ("lora_adjust_lr_fn=original", "lora", "adjust_lr_fn", "original"),
    ("lora_adjust_lr_fn=none", "lora", "adjust_lr_fn", None),
    ("lora_adjust_lr_fn=inherit,adjust_lr_fn=original", "lora", "adjust_lr_fn", "original"),
    # on a tiny Qwen3-MoE model (router and fused expert gate_up_proj)
    ("router_branch=root", "optimizer", "routing_summary", "router_branch='root'"),
    ("fused_projections=whole", "optimizer", "routing_summary", "split 0 (fused_projections='whole')"),
]


@pytest.mark.parametrize(("optim_args", "where", "key", "expected"), OPTIM_ARGS_CASES)
def test_optim_args_keys_reach_the_optimizer(make_model, make_args, optim_args, where, key, expected):
    model = make_model()
    if optim_args.startswith("lora_"):
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    if optim_args.startswith(("router_branch", "fused_projections")):
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        config = Qwen3MoeConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
            moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        )  # fmt: skip
        model = Qwen3MoeForCausalLM(config)
    optimizer = create_root_optimizer(model, make_args(optim="root", weight_decay=0.1, optim_args=optim_args))
    if where == "optimizer":
        value = getattr(optimizer, key)
        assert expected in value if isinstance(value, str) else value == expected
        return
    groups = {
        "lora": [g for g in optimizer.param_groups if g["use_root"]],  # only LoRA factors are trainable
        "root": [g for g in optimizer.param_groups if g["use_root"]],
        "adamw": [g for g in optimizer.param_groups if not g["use_root"]],
        "adamw_decay": [g for g in optimizer.param_groups if not g["use_root"] and g["weight_decay"] != 0],
    }[where]
    assert groups and all(g[key] == expected for g in groups)


def test_every_optim_args_key_is_covered_by_a_test_case():
    covered = {entry.split("=")[0] for case in OPTIM_ARGS_CASES for entry in case[0].split(",")}
    assert covered == set(OPTIM_ARGS)


def test_unknown_optim_args_key_raises_value_error_naming_the_valid_keys(make_model, make_args, lm_data):
    args = make_args(optim="root", optim_args="momentum=0.9,clip_quantlie=0.8")
    trainer = Trainer(model=make_model(), args=args, train_dataset=lm_data)
    with pytest.raises(ValueError, match="clip_quantlie") as err:
        trainer.create_optimizer()
    for key in ("momentum", "clip_quantile", "ns_steps", "adamw_lr"):
        assert key in str(err.value)
    with pytest.raises(ValueError, match="Valid keys"):  # RootTrainer validates at construction
        RootTrainer(model=make_model(), args=args, train_dataset=lm_data)


@pytest.mark.parametrize(
    ("optim_args", "accepted"),
    [
        ("momentum=abc", r"\[0, 1\)"),
        ("momentum=1.5", r"\[0, 1\)"),
        ("nesterov=maybe", "(?i)true or false"),
        ("clip_quantile=0", "(?i)none"),
        ("ns_steps=2.5", "integer"),
        ("ns_coefficients=polar", "root-paper-safe"),
        ("adjust_lr_fn=sqrt", "match_rms_adamw"),
        ("ns_dtype=int8", "bfloat16"),
        ("adamw_eps=-1", ">= 0"),
        ("nonfinite_grads=warn", "raise"),
        ("diagnostics_steps=-2", ">= 0"),
        ("lora_policy=a_only", "b_only"),
        ("lora_adjust_lr_fn=spectral", "inherit"),
        ("momentum", "key=value"),
    ],
)
def test_bad_optim_args_value_raises_value_error_saying_what_is_accepted(optim_args, accepted):
    with pytest.raises(ValueError, match=accepted):
        parse_root_optim_args(optim_args)


@pytest.mark.parametrize(
    ("optim_args", "message"),
    [
        ("momentum", r"'momentum'.*key=value"),
        ("momentum=0.9,nesterov", r"'nesterov'.*key=value"),
        ("momentum=0.9=1", r"0\.9=1"),
        (",,,", r"key=value"),
    ],
)
def test_malformed_optim_args_through_the_stock_trainer_name_the_item_and_the_format(
    make_model, make_args, lm_data, optim_args, message
):
    """transformers splits "k=v" pairs itself before any handler runs; its errors ("not enough values to unpack")
    name neither the item nor the format. root_hf checks ROOT's optim_args first."""
    trainer = Trainer(model=make_model(), args=make_args(optim="root", optim_args=optim_args), train_dataset=lm_data)
    with pytest.raises(ValueError, match=message) as err:
        trainer.create_optimizer()
    assert "unpack" not in str(err.value)
    with pytest.raises(ValueError, match=message):
        Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)


def test_optim_args_diagnostics_reach_log_history_and_every_tracker_with_the_stock_trainer(
    make_model, make_args, lm_data
):
    class Tracker(transformers.TrainerCallback):  # stands for TensorBoard / W&B / trackio: reads what on_log gets
        def __init__(self):
            self.logged = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logged.append(dict(logs or {}))

    tracker = Tracker()
    args = make_args(optim="root", optim_args="diagnostics_steps=2", max_steps=4, logging_steps=1)
    trainer = Trainer(model=make_model(), args=args, train_dataset=lm_data, callbacks=[tracker])
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert ["root/ortho_error" in h for h in history] == [False, True, False, True]
    assert ["root/ortho_error" in h for h in tracker.logged if "loss" in h] == [False, True, False, True]
    assert all(0 <= h["root/clip_fraction"] <= 1 for h in history if "root/clip_fraction" in h)


def test_stock_trainer_without_diagnostics_steps_adds_no_callback(make_model, make_args, lm_data):
    trainer = Trainer(model=make_model(), args=make_args(optim="root", max_steps=1), train_dataset=lm_data)
    trainer.create_optimizer()
    assert not any(isinstance(cb, root_hf.RootDiagnosticsCallback) for cb in trainer.callback_handler.callbacks)


def test_nonfinite_gradient_error_names_the_trainer_option(make_model, make_args, lm_data):
    model = make_model()
    model.model.layers[0].mlp.down_proj.weight.register_hook(lambda grad: grad * float("nan"))
    trainer = Trainer(model=model, args=make_args(optim="root", max_steps=1), train_dataset=lm_data)
    with pytest.raises(FloatingPointError) as err:
        trainer.train()
    assert 'optim_args="nonfinite_grads=skip"' in str(err.value)


def test_create_root_optimizer_rejects_unknown_overrides(make_model):
    with pytest.raises(ValueError, match=r"momentun.*Valid: lr"):
        create_root_optimizer(make_model(), momentun=0.9)


# --------------------------------------------------------------------------------------------------------------------
# Registration, CLI, pickling
# --------------------------------------------------------------------------------------------------------------------


def test_registration_twice_is_harmless():
    members = len(OptimizerNames)
    handler = _OPTIMIZER_HANDLERS["root"]
    assert root_hf.register_root_optimizer() is True
    assert root_hf.register_root_optimizer() is True
    assert len(OptimizerNames) == members
    assert OptimizerNames("root") is OptimizerNames.ROOT
    assert _OPTIMIZER_HANDLERS["root"] is handler
    assert [m.value for m in OptimizerNames].count("root") == 1


def test_startup_hook_reaches_root_hf_through_one_public_entry_point():
    assert patches.PACKAGE_ENTRY_POINT == "root_hf.integrations:optim_root_hook"
    assert patches._package_entry_point() is root_hf.integrations.optim_root_hook
    assert "optim_root_hook" in root_hf.integrations.__all__
    assert _OPTIMIZER_HANDLERS["root"].__module__ == Trainer.create_optimizer.__module__ == patches.__name__


def test_optim_root_hook_refuses_an_unknown_event_naming_the_events():
    with pytest.raises(ValueError, match=r"invalid event 'optimiser'.*'optimizer' \(args, model\)"):
        root_hf.integrations.optim_root_hook("optimiser", None, None)
    with pytest.raises(ValueError, match=r"invalid event 'optim_name' with 2 argument"):
        root_hf.integrations.optim_root_hook("optim_name", "root", "extra")


def test_registration_never_replaces_an_upstream_member():
    class Upstream(str, enum.Enum):
        ADAMW = "adamw"
        ROOT = "root"

    assert patches.add_enum_member(Upstream, "ROOT", "root") is None
    assert patches.add_enum_member(Upstream, "OTHER_ROOT", "root") is None
    assert Upstream("root").__dict__.get("_root_hf_owned") is None and len(Upstream) == 2

    class Fresh(str, enum.Enum):
        ADAMW = "adamw"

    added = patches.add_enum_member(Fresh, "ROOT", "root")
    assert added is Fresh("root") is Fresh.ROOT is Fresh["ROOT"]
    assert patches.add_enum_member(Fresh, "ROOT", "root") is added
    assert [m.value for m in Fresh] == ["adamw", "root"]


def test_registration_leaves_an_upstream_root_and_its_handler_alone(monkeypatch):
    monkeypatch.setattr(patches, "_warned", set())

    class Upstream(str, enum.Enum):
        ROOT = "root"

    with pytest.warns(RuntimeWarning, match="already defines optim='root'"):
        assert patches.register_name(types.SimpleNamespace(OptimizerNames=Upstream)) is False

    def upstream_handler(ctx):
        return None

    handlers = {"root": upstream_handler}
    assert patches.register_handler(types.SimpleNamespace(_OPTIMIZER_HANDLERS=handlers)) is False
    assert handlers == {"root": upstream_handler}


def test_unsupported_transformers_version_registers_nothing_and_warns(monkeypatch):
    monkeypatch.setattr(patches, "_warned", set())
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "6.1.0")

    class Fresh(str, enum.Enum):
        ADAMW = "adamw"

    with pytest.warns(RuntimeWarning, match="outside the supported range"):
        assert patches.register_name(types.SimpleNamespace(OptimizerNames=Fresh)) is False
    assert [m.value for m in Fresh] == ["adamw"]


def test_import_hook_runs_its_callback_after_the_module_executes_and_leaves_no_trace(tmp_path, monkeypatch):
    (tmp_path / "root_hf_hook_probe.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = _root_hf_autoload._PostImportHook()
    hook.callbacks["root_hf_hook_probe"] = lambda module: seen.append(module.VALUE)
    sys.meta_path.insert(0, hook)
    try:
        import root_hf_hook_probe
    finally:
        sys.modules.pop("root_hf_hook_probe", None)
        if hook in sys.meta_path:
            sys.meta_path.remove(hook)
    assert seen == [42]
    assert type(root_hf_hook_probe.__loader__).__name__ == "SourceFileLoader"
    assert root_hf_hook_probe.__spec__.loader is root_hf_hook_probe.__loader__
    assert hook.callbacks == {}


@pytest.mark.parametrize(
    ("version", "supported"),
    [("5.0.0", True), ("5.23.0", True), ("5.99.1.dev0", True), ("4.57.1", False), ("6.0.0", False), ("x", False)],
)
def test_registration_checks_the_transformers_version(version, supported):
    assert patches.transformers_version_supported(version) is supported


def test_training_arguments_round_trip_through_dict_and_json(make_args):
    args = make_args(optim="root", optim_args="momentum=0.9")
    assert args.to_dict()["optim"] == "root"
    assert '"optim": "root"' in args.to_json_string()
    assert TrainingArguments(**{**args.to_dict(), "output_dir": args.output_dir}).optim is OptimizerNames.ROOT


def test_cli_parses_optim_root(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "root", "--optim_args", "momentum=0.9,ns_steps=4", "--use_cpu"]
    )
    assert args.optim is OptimizerNames.ROOT
    assert parse_root_optim_args(args.optim_args) == {"momentum": 0.9, "ns_steps": 4}
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path}\noptim: root\noptim_args: clip_quantile=0.8\nuse_cpu: true\n")
    (from_yaml,) = parser.parse_yaml_file(str(config))
    assert from_yaml.optim is OptimizerNames.ROOT


def test_trl_cli_and_yaml_config_parse_optim_root(tmp_path):
    trl = pytest.importorskip("trl")
    config = tmp_path / "sft.yaml"
    config.write_text(f"output_dir: {tmp_path}\noptim: root\noptim_args: momentum=0.9\nuse_cpu: true\n")
    parser = trl.TrlParser((trl.SFTConfig,))
    (from_yaml,) = parser.parse_args_and_config(["--config", str(config)])
    (from_cli,) = parser.parse_args_and_config(["--output_dir", str(tmp_path), "--optim", "root", "--use_cpu"])
    assert from_yaml.optim is OptimizerNames.ROOT and from_yaml.optim_args == "momentum=0.9"
    assert from_cli.optim is OptimizerNames.ROOT


def test_training_args_bin_loads_in_a_process_that_never_imported_root_hf(make_model, make_args, lm_data, tmp_path):
    trainer = Trainer(model=make_model(), args=make_args(optim="root"), train_dataset=lm_data)
    trainer.save_model(str(tmp_path / "saved"))
    path = tmp_path / "saved" / "training_args.bin"
    assert path.is_file()
    pickled = tmp_path / "args.pkl"
    pickled.write_bytes(pickle.dumps(trainer.args))
    assert b"optim_root_hook" in pickled.read_bytes()  # the member pickles through root_hf's entry point
    out = _run_subprocess(
        f"""
        import pickle, sys
        import torch
        assert "root_hf" not in sys.modules
        args = torch.load({str(path)!r}, weights_only=False)
        with open({str(pickled)!r}, "rb") as f:
            again = pickle.load(f)
        print(type(args.optim).__name__, args.optim.value, again.optim is args.optim, "root_hf" in sys.modules)
        """,
        cwd=tmp_path,
    )
    assert out.split() == ["OptimizerNames", "root", "True", "True"]


@pytest.mark.parametrize("order", ["transformers_first", "root_hf_first", "lazy_transformers_first"])
def test_optim_root_works_whichever_is_imported_first(order, tmp_path):
    imports = {
        "transformers_first": "from transformers import TrainingArguments, Trainer\nimport root_hf",
        "root_hf_first": "import root_hf\nfrom transformers import TrainingArguments, Trainer",
        "lazy_transformers_first": "import transformers\nimport root_hf\nfrom transformers import TrainingArguments, "
        "Trainer",
    }[order]
    out = _run_subprocess(
        imports
        + f"""
args = TrainingArguments({str(tmp_path)!r}, optim="root", report_to="none", use_cpu=True)
cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
print(args.optim.value, cls.__name__)
""",
        cwd=tmp_path,
    )
    assert out.split() == ["root", "RootOptimizerFactory"]


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_from_checkpoint_is_bitwise_identical(make_model, make_args, lm_data, tmp_path, grad_accum):
    common = dict(
        optim="root",
        optim_args="diagnostics_steps=2",
        max_steps=6,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=grad_accum,
        save_strategy="steps",
        save_steps=3,
        lr_scheduler_type="linear",
        warmup_steps=1,
        weight_decay=0.1,
    )
    full = make_model(seed=1)
    args_a = make_args(output_dir=str(tmp_path / "a"), **common)
    uninterrupted = Trainer(model=full, args=args_a, train_dataset=lm_data)
    uninterrupted.train()

    class StopAtStep3(transformers.TrainerCallback):  # an interruption right after checkpoint-3 was written
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    args_b = make_args(output_dir=str(tmp_path / "b"), **common)
    first = Trainer(model=make_model(seed=1), args=args_b, train_dataset=lm_data, callbacks=[StopAtStep3()])
    first.train()
    assert first.state.global_step == 3
    assert (tmp_path / "b" / "checkpoint-3" / "optimizer.pt").is_file()

    resumed_model = make_model(seed=2)  # weights come from the checkpoint
    resumed = Trainer(model=resumed_model, args=args_b, train_dataset=lm_data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    for (name, p), q in zip(full.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q), name
    state_a = _unwrap(uninterrupted.optimizer).state_dict()["state"]
    state_b = _unwrap(resumed.optimizer).state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for index, entry in state_a.items():
        for key, value in entry.items():
            assert torch.equal(value, state_b[index][key]), (index, key)


# --------------------------------------------------------------------------------------------------------------------
# Refused setups
# --------------------------------------------------------------------------------------------------------------------


def _deepspeed_args(make_args):
    args = make_args(optim="root")
    args.deepspeed = {"zero_optimization": {"stage": 2}}  # constructing it for real needs the deepspeed package
    return args


def _accelerate_shared_state(monkeypatch, **state):
    """Pretend accelerate's AcceleratorState says ``state`` (restored after the test)."""
    accelerate_state = pytest.importorskip("accelerate.state")
    monkeypatch.setattr(accelerate_state.AcceleratorState, "_shared_state", dict(state))
    monkeypatch.setattr(accelerate_state.PartialState, "_shared_state", {})


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("deepspeed_args", "DeepSpeed"),
        ("fsdp1_args", "FSDP1"),
        ("deepspeed_env", "DeepSpeed"),
        ("fsdp1_accelerate_state", "FSDP1"),
        ("deepspeed_accelerate_state", "DeepSpeed"),
        ("deepspeed_param", "DeepSpeed"),
        ("flat_param", "FSDP1"),
    ],
)
def test_flat_parameter_setups_are_refused_with_the_fix(make_model, make_args, monkeypatch, setup, match):
    model = make_model()
    args = make_args(optim="root")
    if setup == "deepspeed_args":
        args = _deepspeed_args(make_args)
    elif setup == "fsdp1_args":
        args = make_args(optim="root", fsdp=True, fsdp_config={"version": 1})
    elif setup == "deepspeed_env":
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    elif setup == "fsdp1_accelerate_state":  # as `accelerate launch` with an FSDP1 config leaves it
        _accelerate_shared_state(
            monkeypatch, distributed_type="FSDP", fsdp_plugin=types.SimpleNamespace(fsdp_version=1), num_processes=2
        )
    elif setup == "deepspeed_accelerate_state":
        _accelerate_shared_state(monkeypatch, distributed_type="DEEPSPEED", num_processes=2)
    elif setup == "deepspeed_param":
        model.model.layers[0].self_attn.q_proj.weight.ds_id = 7
    elif setup == "flat_param":
        model.register_parameter("_flat_param", torch.nn.Parameter(torch.zeros(10)))
    with pytest.raises(ValueError, match=match) as err:
        Trainer.get_optimizer_cls_and_kwargs(args, model)
    assert "DDP" in str(err.value)
    with pytest.raises(ValueError, match=match):
        create_root_optimizer(model, args)


def test_plain_single_process_setup_is_accepted(make_model, make_args):
    check_root_compatible(make_args(optim="root"), make_model())


@pytest.mark.parametrize(
    "setup",
    [
        "fsdp2_args",  # TrainingArguments(fsdp="full_shard", fsdp_config={"version": 2})
        "fsdp_args_default_version",  # transformers' default FSDP version is 2
        "fsdp2_accelerate_state",  # accelerate launch with an FSDP2 config
        "accelerate_use_fsdp_env_without_version",  # what accelerate leaves behind after an FSDP2 run
    ],
)
def test_fsdp2_setups_are_accepted(make_model, make_args, monkeypatch, setup):
    """FSDP2 hands ROOT DTensor row shards, which it gathers to whole matrices (tests/distributed/test_fsdp2.py)."""
    args = make_args(optim="root")
    if setup == "fsdp2_args":
        args = make_args(optim="root", fsdp="full_shard", fsdp_config={"version": 2})
    elif setup == "fsdp_args_default_version":
        args = make_args(optim="root", fsdp="full_shard")
    elif setup == "fsdp2_accelerate_state":
        _accelerate_shared_state(
            monkeypatch, distributed_type="FSDP", fsdp_plugin=types.SimpleNamespace(fsdp_version=2), num_processes=2
        )
    elif setup == "accelerate_use_fsdp_env_without_version":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        monkeypatch.delenv("FSDP_VERSION", raising=False)
    check_root_compatible(args, make_model())
    cls, _ = Trainer.get_optimizer_cls_and_kwargs(args, make_model())
    assert cls is RootOptimizerFactory


@pytest.mark.parametrize(
    ("distributed_type", "num_processes", "ddp"),
    [("MULTI_CPU", 2, True), ("MULTI_GPU", 4, True), ("MULTI_CPU", 1, False), ("NO", 1, False), ("FSDP", 2, False)],
)
def test_ddp_is_recognised_from_accelerate_state(monkeypatch, distributed_type, num_processes, ddp):
    from root_hf.integrations import transformers as hf

    _accelerate_shared_state(monkeypatch, distributed_type=distributed_type, num_processes=num_processes)
    assert hf.runs_ddp() is ddp
    expected = {"process_group": "default"} if ddp and hf._root_accepts_default_group() else {}
    assert hf.ddp_process_group_kwargs() == expected


# --------------------------------------------------------------------------------------------------------------------
# The guide
# --------------------------------------------------------------------------------------------------------------------


def test_trainer_guide_examples_run(capsys):
    """Every ```python block of docs/guides/trainer.md runs, in order, in one namespace."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    namespace = run_markdown_examples(REPO / "docs" / "guides" / "trainer.md", min_blocks=8)
    assert "Unknown optim_args key 'clip_quantlie'" in capsys.readouterr().out
    assert isinstance(namespace["sft"].optimizer.optimizer, ROOT)


@pytest.mark.parametrize("module", ["optim_root", "callbacks", "routing", "transformers"])
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(importlib.import_module(f"root_hf.integrations.{module}"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_create_root_optimizer_takes_every_root_keyword():
    """Its keywords derive from ROOT's signature: a new hyperparameter (ns_method) reaches it with no second list."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    optimizer = create_root_optimizer(model, ns_method="gram")
    assert {g["ns_method"] for g in optimizer.param_groups} == {"gram"}
