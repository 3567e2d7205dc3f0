"""Griffe extension for the API reference: docstrings render as the house style (Google + Markdown) intends.

- A Google `Example:` section is read as `Examples:`, so its `>>>` lines render as code (griffe reads only the
  plural as an examples section; the singular became one collapsed paragraph).
- Leftover Sphinx markup is rewritten to Markdown (`:math:` to `$...$`, `.. math::` blocks to `$$ ... $$`, the
  `:class:`/`:func:`/`:meth:`/`:mod:`/`:data:`/`:attr:`/`:exc:` roles and double backticks to code spans), so
  a docstring not yet converted still renders correctly. New docstrings should be written in Markdown directly.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`~?([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_DOUBLE_TICKS = re.compile(r"``([^`]+)``")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_MATH_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:(?P=indent)[ \t]+\S.*\n|[ \t]*\n)+)", re.M
)


def _math_block(match: re.Match[str]) -> str:
    indent = match.group("indent")
    lines = [line.strip() for line in match.group("body").splitlines() if line.strip()]
    return f"{indent}$$\n" + "".join(f"{indent}{line}\n" for line in lines) + f"{indent}$$\n\n"


def google_markdown(text: str) -> str:
    """The rewrite applied to every docstring (see the module docstring)."""
    text = _MATH_BLOCK.sub(_math_block, text if text.endswith("\n") else text + "\n")
    text = _MATH_ROLE.sub(r"$\1$", text)
    text = _ROLE.sub(lambda m: f"`{m.group(1).split('.')[-1] if m.group(0).count('~') else m.group(1)}`", text)
    text = _DOUBLE_TICKS.sub(r"`\1`", text)
    return _EXAMPLE.sub(r"\1Examples:", text).rstrip("\n")


class GoogleMarkdown(griffe.Extension):
    """Apply `google_markdown` to each object's docstring before mkdocstrings parses it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = google_markdown(obj.docstring.value)
