"""Classification report vs scikit-learn, and the saved JSON/PNG."""
import json

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics

from jembed.errors import UserError
from jembed.report import classification_report, format_report, save_report


def _data(seed=0, n=300, classes=5):
  rng = np.random.default_rng(seed)
  y_true = rng.integers(0, classes, n)
  y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, classes, n))
  y_pred[y_pred == 3] = 1  # class 3 is never predicted: precision must be 0, not NaN
  return y_true, y_pred


def _check_against_sklearn(ours, ref, names):
  for name in names:
    for ours_key, ref_key in (("precision",) * 2, ("recall",) * 2, ("f1", "f1-score"),
                              ("support",) * 2):
      assert ours["per_class"][name][ours_key] == pytest.approx(ref[name][ref_key], abs=1e-12)
  for avg in ("macro avg", "weighted avg"):
    for ours_key, ref_key in (("precision",) * 2, ("recall",) * 2, ("f1", "f1-score"),
                              ("support",) * 2):
      assert ours[avg][ours_key] == pytest.approx(ref[avg][ref_key], abs=1e-12)
  assert ours["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
  assert ours["macro_f1"] == pytest.approx(ref["macro avg"]["f1-score"], abs=1e-12)


def test_matches_sklearn_with_names():
  y_true, y_pred = _data()
  names = ["cat", "dog", "bird", "never_predicted", "fish", "absent"]
  ours = classification_report(y_true, y_pred, names)
  labels = list(range(len(names)))
  ref = metrics.classification_report(y_true, y_pred, labels=labels, target_names=names,
                                      output_dict=True, zero_division=0)
  _check_against_sklearn(ours, ref, names)
  assert ours["per_class"]["never_predicted"]["precision"] == 0.0
  assert ours["per_class"]["absent"]["support"] == 0
  np.testing.assert_array_equal(ours["confusion_matrix"],
                                metrics.confusion_matrix(y_true, y_pred, labels=labels))
  # "absent" occurs nowhere, so sklearn reports micro avg instead of accuracy in text;
  # compare the text layout on the names that occur.
  ours5 = classification_report(y_true, y_pred, names[:5])
  assert format_report(ours5) == metrics.classification_report(
      y_true, y_pred, target_names=names[:5], zero_division=0)


def test_matches_sklearn_without_names():
  y_true, y_pred = _data(seed=1, classes=4)
  y_true, y_pred = y_true + 10, y_pred + 10  # labels need not start at 0
  ours = classification_report(y_true, y_pred)
  ref = metrics.classification_report(y_true, y_pred, output_dict=True, zero_division=0)
  _check_against_sklearn(ours, ref, ["10", "11", "12", "13"])
  assert format_report(ours) == metrics.classification_report(y_true, y_pred, zero_division=0)
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
