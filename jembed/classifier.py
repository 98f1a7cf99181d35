"""What a loaded classifier answers: raw scores, probabilities and the top-k label names.

`jembed.load(M)` of a fine-tuned classifier (text or image) has `classes`, `logits(inputs)`,
`predict_proba(inputs)` and `predict(inputs, k=1)`, shared by both modalities through `Classifies`;
a model without a classifier head refuses them with one line naming what to load instead.

`predict` returns one dict per input, the form Hugging Face's text-classification pipeline uses for
its best answer, with the k best next to it (what `python -m jembed.predict` writes as JSON lines):

    {"label": "cat", "score": 0.91, "top_k": [{"label": "cat", "score": 0.91},
                                              {"label": "dog", "score": 0.06}]}

`predict_proba` is scikit-learn's (N, classes) array, columns in `classes` order.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from jembed.errors import UserError


def softmax(logits: np.ndarray) -> np.ndarray:
  """Row-wise softmax in float64 (then float32), stable for large scores."""
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


def top_k(probs: np.ndarray, classes: list[str], k: int | None) -> list[dict[str, Any]]:
  """One {"label", "score", "top_k"} per row of `probs`; k None = every class, best first. Ties go to
  the lower class index (as argmax), so `label` is always the argmax of the logits."""
  n_classes = probs.shape[1]
  k = n_classes if k is None else min(int(k), n_classes)
  order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
  out = []
  for row, idx in zip(probs, order):
    best = [{"label": classes[i], "score": float(row[i])} for i in idx]
    out.append({"label": best[0]["label"], "score": best[0]["score"], "top_k": best})
  return out


class Classifies:
  """Prediction on top of a model's `_logits(inputs, **options)`; the model sets `class_names`
  (None when it has no classifier head) and `source`."""

  class_names: list[str] | None = None
  source: str = ""

  @property
  def classes(self) -> list[str]:
    self._require_head("classes")
    return list(self.class_names)

  @property
  def has_head(self) -> bool:
    return self.class_names is not None

  def _require_head(self, what: str) -> None:
    if self.class_names is None:
      raise UserError(f"{self.source or 'this model'} has no classifier head, so it has no {what}; "
                      "load the workdir of a classification fine-tuning run (configs/finetune_text.py "
                      "or configs/finetune_image.py), or use embed() for vectors")

  def logits(self, inputs, *, batch_size: int = 32, **options) -> np.ndarray:
    """(N, classes) float32 raw scores, one row per input in input order."""
    self._require_head("logits")
    return self._logits(inputs, batch_size=batch_size, **options)

  def predict_proba(self, inputs, *, batch_size: int = 32, **options) -> np.ndarray:
    """(N, classes) float32 probabilities (softmax of the logits), columns in `classes` order."""
    return softmax(self.logits(inputs, batch_size=batch_size, **options))

  def predict(self, inputs, *, k: int | None = 1, batch_size: int = 32, **options
              ) -> list[dict[str, Any]]:
    """Per input {"label", "score", "top_k": [{"label", "score"}, ...]}: the best class, its
    probability and the k best (k None = all classes), in input order."""
    self._require_head("predict")
    if k is not None and (not isinstance(k, (int, np.integer)) or k < 1):
      raise UserError(f"k={k!r} must be a positive integer (or None for every class)")
    return top_k(self.predict_proba(inputs, batch_size=batch_size, **options), self.class_names, k)
