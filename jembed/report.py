"""Classification report: scikit-learn's per-class precision / recall / F1 and averages, with the
class names, plus the confusion matrix; saved as JSON (scikit-learn's keys) and a PNG.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn import metrics as sk_metrics

from jembed import fs
from jembed.errors import UserError

_ROW = ("precision", "recall", "f1-score", "support")


def classification_report(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                          class_names: list[str] | None = None, digits: int = 4) -> dict[str, Any]:
  """The report as a JSON-able dict: `per_class` {name: {precision, recall, f1-score, support}},
  `macro avg`, `weighted avg` (scikit-learn's rows, zero_division=0), `accuracy`, `macro_f1`,
  `confusion_matrix` (rows true, columns predicted), `labels`, and `text` (scikit-learn's table).

  With `class_names`, labels are 0..len(class_names)-1 (classes absent from both arrays still get
  a row with support 0); otherwise the sorted labels that occur.
  """
  y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
  if y_true.shape != y_pred.shape:
    raise UserError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}; pass one "
                    "prediction per example")
  if y_true.size == 0:
    raise UserError("classification_report got no examples; evaluate on a non-empty split")
  if class_names is not None:
    labels = np.arange(len(class_names))
    bad = np.setdiff1d(np.union1d(y_true, y_pred), labels)
    if bad.size:
      raise UserError(f"labels {bad[:5].tolist()} are outside 0..{len(class_names) - 1} "
                      f"({len(class_names)} class names); pass a name for every class")
    names = [str(n) for n in class_names]
  else:
    labels = np.union1d(y_true, y_pred)
    names = [str(l) for l in labels.tolist()]
  kwargs = dict(labels=labels.tolist(), target_names=names, zero_division=0)
  rows = sk_metrics.classification_report(y_true, y_pred, output_dict=True, **kwargs)
  as_row = lambda r: {k: (int(r[k]) if k == "support" else float(r[k])) for k in _ROW}
  return {
      "accuracy": float(np.mean(y_true == y_pred)),
      "macro_f1": float(rows["macro avg"]["f1-score"]),
      "per_class": {name: as_row(rows[name]) for name in names},
      "macro avg": as_row(rows["macro avg"]),
      "weighted avg": as_row(rows["weighted avg"]),
      "support": int(y_true.size),
      "confusion_matrix": sk_metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
      "labels": labels.tolist(),
      "text": sk_metrics.classification_report(y_true, y_pred, digits=digits, **kwargs),
  }


def format_report(report: dict[str, Any]) -> str:
  """scikit-learn's text table of the report."""
  return report["text"]


def _plot_confusion(report: dict[str, Any], path: str) -> None:
  # The Figure/Agg canvas API avoids pyplot's global state and backend selection.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  cm = np.asarray(report["confusion_matrix"])
  names = list(report["per_class"])
  n = len(names)
  size = min(4 + 0.45 * n, 30)
  fig = Figure(figsize=(size, size))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  im = ax.imshow(cm, cmap="Blues", interpolation="nearest")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  ax.set(xticks=range(n), yticks=range(n), xlabel="Predicted label", ylabel="True label",
         title=f"Confusion matrix (accuracy {report['accuracy']:.3f})")
  ax.set_xticklabels(names, rotation=45, ha="right")
  ax.set_yticklabels(names)
  if n <= 40:  # beyond that the counts are unreadable anyway
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n):
      for j in range(n):
        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                color="white" if cm[i, j] > threshold else "black")
  fig.tight_layout()
  fig.savefig(path, format="png", dpi=100)


def save_report(report: dict[str, Any], workdir: str) -> None:
  """WORKDIR/classification_report.json and WORKDIR/confusion_matrix.png, written atomically by
  process 0 (local or gs://)."""
  if not fs.is_writer():
    return
  fs.write_json(fs.join(workdir, "classification_report.json"), report)
  fs.write_with(fs.join(workdir, "confusion_matrix.png"), lambda tmp: _plot_confusion(report, tmp))
