"""The documentation site builds with `mkdocs build --strict` and its examples run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import run_markdown_examples

ROOT_DIR = Path(__file__).resolve().parents[1]


def test_docs_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("page", ["index.md"])
def test_python_examples_in_docs_run(page):
    """Every ```python block of the page runs, in order, in one namespace."""
    run_markdown_examples(ROOT_DIR / "docs" / page)
