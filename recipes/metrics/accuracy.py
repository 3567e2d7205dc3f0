"""Classification accuracy: the share of predicted labels equal to their reference label (any hashable labels given
as strings, e.g. class names).

A local `evaluate` module (no Hub download): `evaluate.load("recipes/metrics/accuracy.py")`, or
`recipes.metrics.load("accuracy")`. Predictions outside the label set count as wrong; `labels` restricts the
per-class breakdown.
"""

from __future__ import annotations

import datasets
import evaluate

_DESCRIPTION = "Share of predicted labels equal to the reference labels, with the share of valid predictions."
_KWARGS = """
Args:
    predictions: predicted labels (strings).
    references: reference labels (strings).
    labels: the label set (optional): `valid` is the share of predictions inside it.
Returns:
    accuracy: share of exact label matches, in [0, 1].
    valid: share of predictions that are one of `labels` (1.0 when `labels` is not given).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self, predictions: list[str], references: list[str], labels: list[str] | None = None
    ) -> dict[str, float]:
        n = len(predictions)
        if n == 0:
            return {"accuracy": float("nan"), "valid": float("nan")}
        hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
        valid = 1.0 if labels is None else sum(p.strip() in set(labels) for p in predictions) / n
        return {"accuracy": hits / n, "valid": valid}
