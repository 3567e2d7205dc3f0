"""The schedule command line (root_hf/coefficients.py): ``python -m root_hf.coefficients``."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from root_hf.coefficients import config_matrix_shapes, layer_shapes, main, parse_shape, table_shapes
from root_hf.optim import adaptive

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 48,
    "intermediate_size": 136,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 97,
    "max_position_embeddings": 64,
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny ops: one intra-op thread keeps them fast, also on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROOT_HF_CACHE", str(tmp_path / "cache"))
    adaptive.clear_memory_cache()
    yield tmp_path / "cache" / "ns_schedules"
    adaptive.clear_memory_cache()


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "model" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TINY_LLAMA))
    return path


def test_show_prints_every_step_the_band_and_a_comparison(cache, capsys):
    assert main(["show", "16x4096", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "shape 16 x 4096" in out and "source: table" in out
    assert len(re.findall(r"^ +[1-5] +-?\d+\.\d+ +-\d+\.\d+ +-?\d+\.\d+$", out, flags=re.M)) == 5
    assert "adaptive guarantee: [0, 1.2]" in out
    for name in ("adaptive", "polar-express", "muon", "root-paper", "root-paper-safe"):
        assert f"  {name} " in out


def test_model_command_fits_and_caches_every_matrix_shape_of_a_config(cache, config, capsys):
    assert main(["model", str(config), "--no-transformers", "--lora-r", "4"]) == 0
    out = capsys.readouterr().out
    expected = {(48, 48), (16, 48), (48, 136), (4, 48), (4, 16), (4, 136)}
    for m, n in expected:
        assert f"{m:>6}x{n:<6}" in out
    cached = {p.name for p in cache.glob("*.json")}
    assert {f"adaptive-v{adaptive.FITTER_VERSION}-{m}x{n}-k5.json" for m, n in expected} <= cached
    assert main(["model", str(config.parent), "--no-transformers"]) == 0
    assert "disk cache" in capsys.readouterr().out  # the second run finds every fit on disk


def test_model_shapes_from_transformers_match_the_config_keys(config):
    pytest.importorskip("transformers")
    exact = config_matrix_shapes(config)
    assert set(exact) == set(config_matrix_shapes(config, use_transformers=False))
    assert len(exact[(48, 136)]) == 2 * 3  # gate, up, down in each of the 2 layers


def test_invalid_arguments_exit_with_a_message(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["show", "12y5"])
    assert exit_info.value.code == 2
    assert "Invalid shape: '12y5'. Must be two positive integers like '2048x8192'." in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["model", str(tmp_path / "missing.json")])
    assert "Invalid model config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["show", "8x8", "--steps", "-1"])


def test_shape_helpers():
    assert parse_shape("2048x8192") == (2048, 8192) and parse_shape("16,4096") == (16, 4096)
    shapes = layer_shapes(576, 1536, 9, 3, 64)
    assert shapes["k_proj"] == (192, 576) and shapes["qkv_proj"] == (960, 576) and shapes["down_proj"] == (576, 1536)
    keys = table_shapes()
    assert keys == sorted(set(keys)) and all(m <= n for m, n in keys)


def test_module_runs_as_a_script():
    out = subprocess.run(
        [sys.executable, "-m", "root_hf.coefficients", "show", "8x576"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ROOT_HF_CACHE": ""},
    )
    assert out.returncode == 0, out.stderr
    assert "shape 8 x 576" in out.stdout
