"""optim="root" from every Hugging Face entry point with no code: the startup hook (root_hf_autoload.pth).

Every launched program is stock: a plain HfArgumentParser + Trainer script, `trl sft`, a YAML config, torchrun. None of
them imports root_hf; they get `--optim root` from the startup hook alone. The interpreter they run in is either this
one, when root_hf is installed here with the hook (the README's `pip install -e ".[dev]"` or the wheel), or an overlay
virtual environment built for the tests: its site-packages holds the real `root_hf_autoload.pth`, a path to this
checkout and a path to this interpreter's packages, so Python's `site` runs the hook exactly as after an install.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import _root_hf_autoload

REPO = Path(__file__).resolve().parents[2]
PTH = "root_hf_autoload.pth"

# A stock HfArgumentParser + Trainer script in the style of transformers' examples (run_clm.py): arguments from the
# command line, or from one YAML / JSON file; saves the model and trainer_state.json. It never imports root_hf.
STOCK_SCRIPT = """
import json
import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser, Trainer, TrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "model folder"})


def main():
    parser = HfArgumentParser((ModelArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        model_args, training_args = parser.parse_yaml_file(sys.argv[1])
    elif len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, training_args = parser.parse_json_file(sys.argv[1])
    else:
        model_args, training_args = parser.parse_args_into_dataclasses()
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    g = torch.Generator().manual_seed(0)
    data = []
    for start in torch.randint(0, 128, (16,), generator=g).tolist():
        ids = (start + torch.arange(16)) % 128
        data.append({"input_ids": ids, "labels": ids.clone()})
    trainer = Trainer(model=model, args=training_args, train_dataset=data)
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    summary = {
        "optimizer": type(opt).__name__,
        "strategy": getattr(opt, "distributed_strategy", None),
        "distributed_type": str(trainer.accelerator.state.distributed_type),
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "world_size": training_args.world_size,
        "fsdp_version_env": __import__("os").environ.get("FSDP_VERSION"),
    }
    if training_args.process_index == 0:
        with open(f"{training_args.output_dir}/summary.json", "w") as f:
            json.dump(summary, f)
    # Close the process group before exit, as accelerate's end_training() does: a gloo group left to interpreter
    # shutdown aborted one rank once ("terminate called without an active exception") after training had finished.
    # The DDP wrapper (its Reducer holds the group) goes first: freed after destroy_process_group, its gloo destructor
    # waited forever for a peer that had exited (one rank hung at exit in CI, py-spy: ~ProcessGroupGloo in ~Reducer).
    del trainer, model, opt
    __import__("gc").collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
"""

DIAGNOSTICS = ("root/clip_fraction", "root/eps_over_rms", "root/update_rms", "root/ortho_error", "adamw/update_rms")


# --------------------------------------------------------------------------------------------------------------------
# The interpreter with the hook, the tiny model and data
# --------------------------------------------------------------------------------------------------------------------


def _hook_installed_here() -> bool:
    """root_hf is installed in this interpreter with its startup hook, from this checkout."""
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    has_pth = any((Path(d) / PTH).is_file() for d in dirs)
    return has_pth and Path(_root_hf_autoload.__file__).resolve() == REPO / "_root_hf_autoload" / "__init__.py"


@pytest.fixture(scope="module")
def hook_python(tmp_path_factory) -> Path:
    """A Python interpreter that runs the startup hook of this checkout at start-up, as after `pip install`."""
    if _hook_installed_here():
        return Path(sys.executable)
    root = tmp_path_factory.mktemp("overlay-venv")
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(root)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    overlay_site = root / "lib" / version / "site-packages"
    assert overlay_site.is_dir(), overlay_site
    # "_overlay.pth" sorts before "root_hf_autoload.pth": the paths are on sys.path when the hook's line runs.
    paths = [str(REPO), *(p for p in site.getsitepackages() if Path(p).is_dir())]
    (overlay_site / "_overlay.pth").write_text("\n".join(paths) + "\n")
    shutil.copy(REPO / PTH, overlay_site / PTH)
    return root / "bin" / "python"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ROOT_HF_AUTOLOAD")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),  # this checkout's root_hf first (as an editable install of it would be)
    )
    env.update(extra)
    return env


def _run(command: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + "\n" + result.stderr[-5000:]
    return result.stdout


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama and a word-level tokenizer, saved with save_pretrained (no Hub)."""
    from tests.integrations.conftest import tiny_llama, tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stock_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scripts") / "train.py"
    path.write_text(STOCK_SCRIPT)
    return path


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    """A local dataset folder (one JSON-lines file) for `trl sft --dataset_name FOLDER`."""
    folder = tmp_path_factory.mktemp("sft-data")
    with open(folder / "train.jsonl", "w") as f:
        for s in range(16):
            f.write(json.dumps({"text": " ".join(f"t{(s + k) % 125}" for k in range(12))}) + "\n")
    return folder


def _train_flags(out: Path, model: Path) -> list[str]:
    return [
        "--model_name_or_path", str(model),
        "--output_dir", str(out),
        "--max_steps", "2",
        "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--use_cpu",
        "--disable_tqdm", "true",
        "--seed", "0",
    ]  # fmt: skip


def _log_history(path: Path) -> list[dict]:
    return json.loads(path.read_text())["log_history"]


def _assert_diagnostics_logged(history: list[dict]) -> None:
    steps = [h for h in history if "loss" in h]
    assert steps, history
    for entry in steps:
        for key in DIAGNOSTICS:
            assert key in entry, (key, entry)


# --------------------------------------------------------------------------------------------------------------------
# The hook itself
# --------------------------------------------------------------------------------------------------------------------


def test_startup_hook_runs_without_importing_torch_or_transformers(hook_python, tmp_path):
    code = (
        "import sys, _root_hf_autoload as a\n"
        "print(a.autoload_state, 'torch' in sys.modules, 'transformers' in sys.modules, 'root_hf' in sys.modules,"
        " any(type(f).__name__ == '_PostImportHook' for f in sys.meta_path))"
    )
    assert _ok(_run([str(hook_python), "-c", code], tmp_path)).split() == ["on", "False", "False", "False", "True"]
    off = _ok(_run([str(hook_python), "-c", code], tmp_path, ROOT_HF_AUTOLOAD="0")).split()
    assert off == ["off", "False", "False", "False", "False"]


def test_the_pth_file_is_one_import_line_shipped_in_the_wheel():
    lines = (REPO / PTH).read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("import ")  # site.py executes only lines starting with "import"
    assert "_root_hf_autoload.autoload()" in lines[0]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"{PTH}" = "{PTH}"' in pyproject and '"_root_hf_autoload"' in pyproject


def test_the_pth_line_is_silent_when_the_package_is_gone(tmp_path):
    # An editable install whose checkout was moved leaves the .pth behind: Python must start without a traceback.
    (tmp_path / PTH).write_text((REPO / PTH).read_text())
    code = "import site, sys; site.addsitedir(sys.argv[1]); print('ok')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-S", "-c", code, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok" and result.stderr == "", result.stderr


def test_training_args_accept_optim_root_with_no_import(hook_python, tmp_path):
    code = textwrap.dedent(
        """
        import sys
        from transformers import Trainer, TrainingArguments
        args = TrainingArguments("out", optim="root", report_to="none", use_cpu=True)
        cls, _ = Trainer.get_optimizer_cls_and_kwargs(args)
        print(args.optim.value, cls.__name__)
        """
    )
    assert _ok(_run([str(hook_python), "-c", code], tmp_path)).split() == ["root", "RootOptimizerFactory"]


def test_python_m_root_hf_reports_version_hook_and_registration(hook_python, tmp_path):
    out = _ok(_run([str(hook_python), "-m", "root_hf"], tmp_path))
    assert out.startswith("root_hf ")
    assert "startup hook: active" in out and "ROOT_HF_AUTOLOAD=0" in out
    assert 'optim="root": registered in this process' in out
    off = _ok(_run([str(hook_python), "-m", "root_hf"], tmp_path, ROOT_HF_AUTOLOAD="0"))
    assert "startup hook: off" in off


def test_off_switch_makes_stock_script_reject_optim_root(hook_python, stock_script, model_dir, tmp_path):
    command = [str(hook_python), str(stock_script), *_train_flags(tmp_path / "out", model_dir), "--optim", "root"]
    result = _run(command, tmp_path, ROOT_HF_AUTOLOAD="0")
    assert result.returncode != 0
    assert "argument --optim: invalid choice: 'root'" in result.stderr


# --------------------------------------------------------------------------------------------------------------------
# Stock scripts, configs, TRL's CLI, torchrun
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stock_script_with_optim_root_logs_diagnostics_in_trainer_state(
    hook_python, stock_script, model_dir, tmp_path
):
    out = tmp_path / "out"
    flags = [*_train_flags(out, model_dir), "--optim", "root", "--optim_args", "diagnostics_steps=1"]
    _ok(_run([str(hook_python), str(stock_script), *flags], tmp_path))
    assert json.loads((out / "summary.json").read_text())["optimizer"] == "ROOT"
    _assert_diagnostics_logged(_log_history(out / "trainer_state.json"))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_stock_script_config_file_with_optim_root(hook_python, stock_script, model_dir, tmp_path, fmt):
    out = tmp_path / "out"
    config = {
        "model_name_or_path": str(model_dir),
        "output_dir": str(out),
        "optim": "root",
        "optim_args": "momentum=0.9,diagnostics_steps=2",
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
    }
    path = tmp_path / f"config.{fmt}"
    if fmt == "yaml":
        path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    else:
        path.write_text(json.dumps(config))
    _ok(_run([str(hook_python), str(stock_script), str(path)], tmp_path))
    assert json.loads((out / "summary.json").read_text())["optimizer"] == "ROOT"
    history = [h for h in _log_history(out / "trainer_state.json") if "loss" in h]
    assert ["root/ortho_error" in h for h in history] == [False, True]  # every 2nd optimizer step


def _trl(hook_python: Path) -> list[str]:
    script = Path(hook_python).parent / "trl"
    return [str(script)] if script.is_file() else [str(hook_python), "-m", "trl.cli.main"]


def _sft_flags(out: Path, model: Path, data: Path) -> list[str]:
    return [
        "--model_name_or_path", str(model),
        "--dataset_name", str(data),
        "--output_dir", str(out),
        "--max_steps", "2",
        "--per_device_train_batch_size", "4",
        "--max_length", "32",
        "--logging_steps", "1",
        "--save_strategy", "steps",
        "--save_steps", "2",
        "--report_to", "none",
        "--use_cpu",
        "--bf16", "false",
        "--disable_tqdm", "true",
    ]  # fmt: skip


@pytest.mark.slow
def test_trl_sft_cli_with_optim_root(hook_python, model_dir, sft_data, tmp_path):
    """`trl sft` re-launches trl/scripts/sft.py through accelerate in a child process: the hook runs there too."""
    out = tmp_path / "sft"
    flags = [*_sft_flags(out, model_dir, sft_data), "--optim", "root", "--optim_args", "diagnostics_steps=1"]
    _ok(_run([*_trl(hook_python), "sft", *flags], tmp_path))
    _assert_diagnostics_logged(_log_history(out / "checkpoint-2" / "trainer_state.json"))


@pytest.mark.slow
def test_trl_sft_yaml_config_with_optim_root(hook_python, model_dir, sft_data, tmp_path):
    out = tmp_path / "sft"
    flags = _sft_flags(out, model_dir, sft_data)
    flags.remove("--use_cpu")  # the one flag without a value
    config = tmp_path / "sft.yaml"
    lines = [f"{key[2:]}: {value}" for key, value in zip(flags[::2], flags[1::2], strict=True)]
    config.write_text("\n".join([*lines, "use_cpu: true", "optim: root", "optim_args: diagnostics_steps=1", ""]))
    _ok(_run([*_trl(hook_python), "sft", "--config", str(config)], tmp_path))
    _assert_diagnostics_logged(_log_history(out / "checkpoint-2" / "trainer_state.json"))


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_gloo_processes_with_fsdp2_through_training_arguments(
    hook_python, stock_script, model_dir, tmp_path
):
    """`fsdp="full_shard", fsdp_config={"version": 2}` is FSDP2, not "FSDP1" (accelerate sets ACCELERATE_USE_FSDP
    without FSDP_VERSION); on CPU accelerate runs it as plain multi-process data parallelism (it shards only on
    accelerators), so ROOT gets the DDP process group. ROOT on real FSDP2 shards: tests/distributed/test_fsdp2.py."""
    out = tmp_path / "out"
    fsdp_config = tmp_path / "fsdp.json"
    fsdp_config.write_text(json.dumps({"version": 2}))
    flags = [
        *_train_flags(out, model_dir),
        "--optim", "root",
        "--optim_args", "diagnostics_steps=1",
        "--fsdp", "full_shard",
        "--fsdp_config", str(fsdp_config),
        "--ddp_backend", "gloo",
        "--per_device_train_batch_size", "2",
    ]  # fmt: skip
    command = [str(hook_python), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _ok(_run([*command, str(stock_script), *flags], tmp_path, timeout=600))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer"] == "ROOT" and summary["world_size"] == 2
    assert summary["fsdp_version_env"] is None  # root_hf sets no environment variable
    if summary["is_fsdp_enabled"]:  # on accelerators: DTensor shards
        assert summary["strategy"] == "fsdp2"
    else:  # on CPU: accelerate's MULTI_CPU data parallelism, so the handler passed process_group="default"
        assert "MULTI_CPU" in summary["distributed_type"]
        assert summary["strategy"] == "ddp"
    _assert_diagnostics_logged(_log_history(out / "trainer_state.json"))
