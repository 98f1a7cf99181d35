"""Classification report: scikit-learn's numbers under the class names, and the saved JSON/PNG."""
import json

import numpy as np
import pytest
from PIL import Image

from jembed.errors import UserError
from jembed.report import classification_report, format_report, save_report


def _data(seed=0, n=300, classes=5):
  rng = np.random.default_rng(seed)
  y_true = rng.integers(0, classes, n)
  y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, classes, n))
  y_pred[y_pred == 3] = 1  # class 3 is never predicted: precision must be 0, not NaN
  return y_true, y_pred


def test_rows_are_named_by_class_and_match_a_hand_count():
  y_true, y_pred = _data()
  names = ["cat", "dog", "bird", "never_predicted", "fish", "absent"]
  ours = classification_report(y_true, y_pred, names)
  assert list(ours["per_class"]) == names
  for i, name in enumerate(names):
    tp = np.sum((y_true == i) & (y_pred == i))
    row = ours["per_class"][name]
    assert set(row) == {"precision", "recall", "f1-score", "support"}  # scikit-learn's keys
    assert row["support"] == np.sum(y_true == i)
    assert row["recall"] == pytest.approx(tp / max(np.sum(y_true == i), 1))
    assert row["precision"] == pytest.approx(tp / max(np.sum(y_pred == i), 1))
  assert ours["per_class"]["never_predicted"]["precision"] == 0.0
  assert ours["per_class"]["absent"]["support"] == 0
  assert ours["accuracy"] == pytest.approx(np.mean(y_true == y_pred))
  cm = np.asarray(ours["confusion_matrix"])
  assert cm.shape == (6, 6) and cm.sum() == len(y_true) and np.trace(cm) == np.sum(y_true == y_pred)
  text = format_report(ours)
  assert "never_predicted" in text and "macro avg" in text and "weighted avg" in text


def test_without_names_the_occurring_labels_are_the_rows():
  y_true, y_pred = _data(seed=1, classes=4)
  ours = classification_report(y_true + 10, y_pred + 10)  # labels need not start at 0
  assert list(ours["per_class"]) == ["10", "11", "12", "13"] and ours["labels"] == [10, 11, 12, 13]
  with pytest.raises(UserError):
    classification_report([0, 1, 5], [0, 1, 1], ["a", "b"])
  with pytest.raises(UserError):
    classification_report([0, 1], [0])


def test_save_report_writes_json_and_png(tmp_path):
  y_true, y_pred = _data(classes=4)
  report = classification_report(y_true, y_pred, ["a", "b", "c", "d"])
  save_report(report, str(tmp_path / "run"))
  loaded = json.loads((tmp_path / "run" / "classification_report.json").read_text())
  assert loaded == report
  img = Image.open(tmp_path / "run" / "confusion_matrix.png")
  assert img.format == "PNG" and img.size[0] > 200
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
      "classification_report.json", "confusion_matrix.png"]
