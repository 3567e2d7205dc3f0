"""Without the Hugging Face stack, `import root_hf` works and its HF names raise an ImportError naming the extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# sys.modules[name] = None makes `import name` raise ModuleNotFoundError, as on a machine without the package.
BLOCK = (
    "import sys; sys.modules['transformers'] = None; sys.modules['peft'] = None; sys.modules['accelerate'] = None; "
)


@pytest.mark.parametrize(
    "name", ["RootTrainer", "RootTrainerMixin", "create_root_optimizer", "RootDiagnosticsCallback"]
)
def test_hf_name_without_transformers_names_the_hf_extra(name):
    code = BLOCK + f"import root_hf; root_hf.ROOT; getattr(root_hf, {name!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and 'pip install "root-hf[hf]"' in result.stderr, result.stderr[-2000:]


def test_license_is_the_apache_2_text_and_ships_in_the_wheel_metadata():
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "END OF TERMS AND CONDITIONS" in text
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in pyproject and 'license-files = ["LICENSE"]' in pyproject
    assert '"transformers>=5.0,<6"' in pyproject
