"""Answer token accuracy and answer exact match of teacher-forced predictions.

Inputs are per-sequence token ids: `predictions` the argmax of the logits at each position, already shifted so that
position t is the prediction of `references[t]`; `references` the target ids with `ignore_index` (-100) outside the
answer. `token_accuracy` is the share of answer tokens predicted right (every answer token counts once, as TRL's
`mean_token_accuracy`); `answer_exact_match` the share of sequences whose every answer token is right.

A local `evaluate` module (no Hub download): `evaluate.load("recipes/metrics/token_accuracy.py")`, or
`recipes.metrics.load("token_accuracy")`.
"""

from __future__ import annotations

import datasets
import evaluate

_DESCRIPTION = "Teacher-forced answer token accuracy and answer exact match."
_KWARGS = """
Args:
    predictions: per sequence, the predicted token id at each target position.
    references: per sequence, the target ids (`ignore_index` where there is no target).
    ignore_index: the id of positions without a target (default -100).
Returns:
    token_accuracy: share of target tokens predicted right, in [0, 1].
    answer_exact_match: share of sequences (with at least one target) whose targets are all right, in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class TokenAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(
        self, predictions: list[list[int]], references: list[list[int]], ignore_index: int = -100
    ) -> dict[str, float]:
        right = total = whole = sequences = 0
        for pred, ref in zip(predictions, references, strict=True):
            pairs = [(p, r) for p, r in zip(pred, ref, strict=True) if r != ignore_index]
            if not pairs:
                continue
            hits = sum(p == r for p, r in pairs)
            right, total = right + hits, total + len(pairs)
            whole, sequences = whole + (hits == len(pairs)), sequences + 1
        nan = float("nan")
        return {
            "token_accuracy": right / total if total else nan,
            "answer_exact_match": whole / sequences if sequences else nan,
        }
