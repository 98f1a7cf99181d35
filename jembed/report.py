"""Classification report: per-class precision/recall/F1, averages and confusion matrix.

Numbers match ``sklearn.metrics.classification_report(..., zero_division=0)``, computed
with NumPy so evaluation does not depend on scikit-learn.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jembed import fs
from jembed.errors import UserError

_HEADERS = ("precision", "recall", "f1-score", "support")  # text table columns
_KEYS = ("precision", "recall", "f1", "support")


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den with 0 where den == 0 (sklearn's zero_division=0)."""
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def classification_report(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                          class_names: list[str] | None = None) -> dict[str, Any]:
  """Report dict (plain Python numbers, JSON-serialisable).

  With ``class_names``, labels are 0..len(class_names)-1 (classes absent from both
  arrays still get a row with support 0); otherwise the sorted labels that occur.
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
  n = len(labels)
  t_idx, p_idx = np.searchsorted(labels, y_true), np.searchsorted(labels, y_pred)
  cm = np.zeros((n, n), np.int64)
  np.add.at(cm, (t_idx, p_idx), 1)

  tp = np.diag(cm).astype(np.float64)
  predicted, support = cm.sum(axis=0), cm.sum(axis=1)
  precision, recall = _div(tp, predicted), _div(tp, support)
  f1 = _div(2 * tp, predicted + support)  # == 2PR/(P+R), and 0 when tp == 0

  total = int(support.sum())
  avg = lambda w: [float(np.average(v, weights=w)) if np.sum(w) > 0 else 0.0
                   for v in (precision, recall, f1)]
  per_class = {name: {"precision": float(p), "recall": float(r), "f1": float(f),
                      "support": int(s)}
               for name, p, r, f, s in zip(names, precision, recall, f1, support)}
  macro = dict(zip(_KEYS, avg(np.ones(n)) + [total]))
  weighted = dict(zip(_KEYS, avg(support) + [total]))
  accuracy = float(np.mean(y_true == y_pred))
  return {
      "accuracy": accuracy,
      "macro_f1": macro["f1"],
      "per_class": per_class,
      "macro avg": macro,
      "weighted avg": weighted,
      "support": total,
      "confusion_matrix": cm.tolist(),
      "labels": labels.tolist(),
  }


def format_report(report: dict[str, Any], digits: int = 2) -> str:
  """Text table in the layout of sklearn's classification_report."""
  names = list(report["per_class"])
  width = max([len(n) for n in names] + [len("weighted avg"), digits])
  row = "{:>{w}s} " + " {:>9.{d}f}" * 3 + " {:>9}\n"
  text = ("{:>{w}s} " + " {:>9}" * 4).format("", *_HEADERS, w=width) + "\n\n"
  for name, r in report["per_class"].items():
    text += row.format(name, r["precision"], r["recall"], r["f1"], r["support"],
                       w=width, d=digits)
  text += "\n"
  text += ("{:>{w}s} " + " {:>9.{d}}" * 2 + " {:>9.{d}f} {:>9}\n").format(
      "accuracy", "", "", report["accuracy"], report["support"], w=width, d=digits)
  for key in ("macro avg", "weighted avg"):
    r = report[key]
    text += row.format(key, r["precision"], r["recall"], r["f1"], r["support"],
                       w=width, d=digits)
  return text


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
