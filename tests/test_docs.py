"""The documentation site builds with `mkdocs build --strict`; the BUILT HTML documents every public name, renders
math offline and shows no raw Sphinx markup; the examples run."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import root_hf
from tests.utils import run_markdown_examples

ROOT_DIR = Path(__file__).resolve().parents[1]
SPHINX_MARKUP = (":class:", ":math:", ".. math::", ":func:", ":mod:", ":meth:")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT_DIR,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def page_text(path: Path) -> str:
    """The visible text of a built page (tags stripped, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8")))


def test_api_reference_has_a_heading_for_every_public_name(site):
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    missing = [name for name in root_hf.__all__ if name != "__version__" and f'id="root_hf.{name}"' not in api]
    assert not missing, f"public names without a heading in the API reference: {missing}"
    assert "__version__" in page_text(site / "api" / "index.html")


def test_built_pages_show_no_raw_sphinx_markup(site):
    found = {
        str(page.relative_to(site)): [m for m in SPHINX_MARKUP if m in page_text(page)]
        for page in site.rglob("*.html")
    }
    assert not {page: marks for page, marks in found.items() if marks}


def test_math_renders_offline_with_the_vendored_mathjax(site):
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert 'class="arithmatex"' in api  # ROOT's update rule is a display formula, not a garbled paragraph
    scripts = re.findall(r'<script src="([^"]+)"', api)
    assert any(s.endswith("javascripts/mathjax/es5/tex-mml-chtml.js") for s in scripts)
    assert not [s for s in scripts if "mathjax" in s.lower() and s.startswith(("http:", "https:", "//"))]
    assert (site / "javascripts" / "mathjax" / "es5" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()


def test_docstring_examples_render_as_code_blocks(site):
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert api.count('class="highlight"') >= 5 and "&gt;&gt;&gt;" in api


def test_griffe_extension_rewrites_leftover_sphinx_markup():
    spec = importlib.util.spec_from_file_location("griffe_google", ROOT_DIR / "docs" / "_ext" / "griffe_google.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (
        "Uses :class:`~root_hf.ROOT`, :func:`f`, ``x``, :math:`a^2`.\n\n.. math::\n\n    y = x\n\nExample:\n    >>> 1"
    )
    assert module.google_markdown(text) == "Uses `ROOT`, `f`, `x`, $a^2$.\n\n$$\ny = x\n$$\n\nExamples:\n    >>> 1"


@pytest.mark.parametrize("page", ["index.md", "api/index.md"])
def test_python_examples_in_docs_run(page):
    """Every ```python block of the page runs, in order, in one namespace."""
    run_markdown_examples(ROOT_DIR / "docs" / page)
