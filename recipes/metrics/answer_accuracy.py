"""answer_accuracy: how well a chat model predicts the reference answers, token by token (teacher forcing).

A local ``evaluate`` metric, loaded offline by absolute path::

    metric = evaluate.load("/abs/path/recipes/metrics/answer_accuracy.py", keep_in_memory=True)
    metric.compute(predictions=[[5, 7, 9]], references=[[5, 7, 8]])
    # {'token_accuracy': 0.666..., 'exact_match': 0.0}

Each example is one assistant answer: ``references`` are its token ids and ``predictions`` are the model's greedy
(argmax) next-token predictions at the same positions, given the prompt and the reference answer so far. The recipe
``recipes/sft.py`` builds both from the eval logits over the assistant tokens only (prompt tokens are masked out).
"""

from __future__ import annotations

import datasets
import evaluate

_DESCRIPTION = """\
Teacher-forced answer accuracy of a chat model. For each reference answer (a sequence of token ids) the prediction is
the sequence of the model's argmax next-token ids at the answer's positions. Returns:

- token_accuracy: correct answer tokens / all answer tokens, over the whole eval set (micro average);
- exact_match: fraction of answers whose every token is predicted correctly.

Both are in [0, 1]; higher is better. Unlike perplexity they count only the top-1 choice, so they show whether
training changed what the model would actually say.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (list of list of int): argmax token ids at each answer position, one list per answer.
    references (list of list of int): the reference answer token ids, one list per answer, same lengths.
Returns:
    token_accuracy (float): micro-averaged fraction of correct tokens.
    exact_match (float): fraction of answers predicted entirely correctly.
Example:
    >>> metric = evaluate.load("recipes/metrics/answer_accuracy.py")
    >>> metric.compute(predictions=[[1, 2], [3, 4]], references=[[1, 2], [3, 5]])
    {'token_accuracy': 0.75, 'exact_match': 0.5}
"""

_CITATION = """\
@misc{root_hf_answer_accuracy,
  title = {answer_accuracy: teacher-forced token accuracy of chat answers},
  note = {root_hf recipes},
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AnswerAccuracy(evaluate.Metric):
    """Teacher-forced token accuracy and exact match of assistant answers."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
            license="Apache-2.0",
        )

    def _compute(self, predictions: list[list[int]], references: list[list[int]]) -> dict[str, float]:
        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} predictions for {len(references)} references; they must match.")
        correct = total = exact = 0
        for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
            if len(pred) != len(ref):
                raise ValueError(
                    f"Example {i}: {len(pred)} predicted tokens for {len(ref)} reference tokens; each prediction "
                    "must hold one token id per reference answer token."
                )
            hits = sum(int(p == r) for p, r in zip(pred, ref, strict=True))
            correct += hits
            total += len(ref)
            exact += int(hits == len(ref))
        if not references or total == 0:
            raise ValueError("answer_accuracy needs at least one reference answer with at least one token.")
        return {"token_accuracy": correct / total, "exact_match": exact / len(references)}
