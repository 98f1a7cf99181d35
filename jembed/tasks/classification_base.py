"""Supervised classification on top of a (pretrained) backbone, any tuning: the shared part.

`config.data.modality` picks the subclass (jembed/tasks/classification.py): text (jembed/tasks/classification_text.py) or images
(jembed/tasks/classification_image.py). Both put a fresh linear `head` on the backbone's pooled
features; the backbone keeps the attribute name of the pretraining models (`encoder` / `backbone`),
so a warm start (config.init) restores it. At the end of training the whole eval split is predicted
and a classification report (per-class precision, recall, F1) is printed and saved.
"""
from __future__ import annotations

import abc
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jembed import report as report_lib
from jembed.tasks.base import Task


class ClassificationBase(Task):
  """What text and image classification share (jembed/tasks/classification.py picks one)."""

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    self._predict = None

  # -- objective --
  @abc.abstractmethod
  def logits(self, model, batch) -> jax.Array:
    """(B, classes) logits of a batch: how each modality's inputs reach its model."""

  def loss(self, model, batch, rng, train):
    logits = self.logits(model, batch).astype(jnp.float32)
    labels = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"loss": loss, "accuracy": (logits.argmax(-1) == labels).mean()}

  # -- reporting --
  def predict(self, model, columns: dict[str, np.ndarray]) -> np.ndarray:
    """Predicted class of every example in `columns` (the last batch padded so one compile serves)."""
    graphdef, state = nnx.split(model)
    if self._predict is None:
      self._predict = jax.jit(lambda g, s, b: self.logits(nnx.merge(g, s), b).argmax(-1),
                              static_argnums=0)
    batch = int(self.config.batch_size)
    n = len(columns["label"])
    preds = []
    for lo in range(0, n, batch):
      chunk = {k: v[lo:lo + batch] for k, v in columns.items() if k != "label"}
      real = len(next(iter(chunk.values())))
      chunk = {k: np.concatenate([v, np.zeros((batch - real,) + v.shape[1:], v.dtype)])
               for k, v in chunk.items()}
      preds.append(np.asarray(jax.device_get(self._predict(graphdef, state, chunk)))[:real])
    return np.concatenate(preds)

  def eval_predictions(self, model) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predicted classes) of the whole eval split."""
    return self.eval_columns["label"], self.predict(model, self.eval_columns)

  def final_summary(self, model, eval_metrics, logger) -> None:
    labels, preds = self.eval_predictions(model)
    report = report_lib.classification_report(labels, preds, self.class_names)
    method = self.config.peft.method
    report["method"] = method
    if jax.process_index() == 0:
      report_lib.save_report(report, self.workdir)
    logger.info(f"classification report on the whole eval split ({len(preds)} examples, "
                f"peft.method={method}):\n{report_lib.format_report(report)}"
                f"accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}; saved "
                f"{os.path.join(self.workdir, 'classification_report.json')} and confusion_matrix.png")
