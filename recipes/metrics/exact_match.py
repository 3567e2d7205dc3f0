"""Exact match of generated strings: the share of predictions equal to their reference after stripping surrounding
whitespace (and, with `ignore_case=True`, lower-cased).

A local `evaluate` module (no Hub download): `evaluate.load("recipes/metrics/exact_match.py")`, or
`recipes.metrics.load("exact_match")`.
"""

from __future__ import annotations

import datasets
import evaluate

_DESCRIPTION = "Share of predictions equal to their reference (surrounding whitespace stripped)."
_KWARGS = """
Args:
    predictions: generated strings.
    references: reference strings, one per prediction.
    ignore_case: compare lower-cased strings (default False).
Returns:
    exact_match: the share in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str], ignore_case: bool = False) -> dict[str, float]:
        def norm(s: str) -> str:
            return s.strip().lower() if ignore_case else s.strip()

        hits = [norm(p) == norm(r) for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": sum(hits) / len(hits) if hits else float("nan")}
