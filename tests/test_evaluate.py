"""Frozen-embedding evaluation: probe and kNN against references, low-label subsets."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from jembed import evaluate


def _blobs(n_per_class, classes=4, dim=16, spread=0.3, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(classes, dim)) * 3
  y = np.repeat(np.arange(classes), n_per_class)
  x = centres[y] + spread * rng.normal(size=(len(y), dim))
  return x.astype(np.float32), y.astype(np.int32)


def test_probe_and_knn_separable_reach_100():
  x, y = _blobs(70, seed=0)
  test = np.arange(len(y)) % 7 == 0
  tr_x, tr_y, te_x, te_y = x[~test], y[~test], x[test], y[test]
  assert evaluate.linear_probe(tr_x, tr_y, te_x, te_y, steps=200) == 1.0
  assert evaluate.knn_accuracy(tr_x, tr_y, te_x, te_y) == 1.0


def test_probe_matches_sklearn_on_noisy_data():
  tr_x, tr_y = _blobs(60, spread=3.0, seed=1)
  te_x, te_y = _blobs(60, spread=3.0, seed=2)
  # Same centres (seed of the centres is the data seed): regenerate test points around train's.
  rng = np.random.default_rng(5)
  centres = np.stack([tr_x[tr_y == c].mean(0) for c in range(4)])
  te_y = np.repeat(np.arange(4), 60).astype(np.int32)
  te_x = (centres[te_y] + 3.0 * rng.normal(size=(len(te_y), 16))).astype(np.float32)
  ours = evaluate.linear_probe(tr_x, tr_y, te_x, te_y, steps=500, l2=1e-3, lr=0.05)
  mean, std = tr_x.mean(0), tr_x.std(0) + 1e-6
  ref = LogisticRegression(C=1.0 / (1e-3 * len(tr_x)), max_iter=2000).fit((tr_x - mean) / std, tr_y)
  ref_acc = (ref.predict((te_x - mean) / std) == te_y).mean()
  assert 0.5 < ref_acc < 1.0
  assert abs(ours - ref_acc) <= 0.02


def _knn_reference(tr_x, tr_y, te_x, k, t, classes):
  n = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
  sim = n(te_x) @ n(tr_x).T
  preds = []
  for row in sim:
    top = np.argsort(-row)[:k]
    votes = np.zeros(classes)
    for i in top:
      votes[tr_y[i]] += np.exp(row[i] / t)
    preds.append(votes.argmax())
  return np.array(preds)


def test_knn_matches_numpy_reference():
  rng = np.random.default_rng(3)
  tr_x = rng.normal(size=(200, 8)).astype(np.float32)
  tr_y = rng.integers(0, 5, 200).astype(np.int32)
  te_x = rng.normal(size=(50, 8)).astype(np.float32)
  te_y = rng.integers(0, 5, 50).astype(np.int32)
  for k, t in ((20, 0.07), (5, 0.5)):
    ref = (_knn_reference(tr_x, tr_y, te_x, k, t, 5) == te_y).mean()
    assert evaluate.knn_accuracy(tr_x, tr_y, te_x, te_y, k=k, temperature=t, chunk=16) == pytest.approx(ref)


def test_low_label_subset():
  y = np.array([0] * 30 + [1] * 5 + [2] * 12)
  idx = evaluate.low_label_subset(y, 10, seed=0)
  counts = np.bincount(y[idx])
  assert counts.tolist() == [10, 5, 10]
  assert np.array_equal(idx, evaluate.low_label_subset(y, 10, seed=0))
  assert not np.array_equal(idx, evaluate.low_label_subset(y, 10, seed=1))
  assert len(set(idx.tolist())) == len(idx)


def test_extract_features_pads_last_batch():
  calls = []

  def fwd(x):
    calls.append(len(x))
    return x.reshape(len(x), -1).sum(1, keepdims=True)

  images = np.arange(10 * 4, dtype=np.float32).reshape(10, 2, 2)
  out = evaluate.extract_features(fwd, images, 4)
  assert calls == [4, 4, 4]
  np.testing.assert_allclose(out[:, 0], images.reshape(10, -1).sum(1))


def test_frozen_eval_reports_random_beside_pretrained():
  tr_x, tr_y = _blobs(30, seed=0)
  te_x, te_y = _blobs(10, seed=0)
  rng = np.random.default_rng(0)
  noise = (rng.normal(size=tr_x.shape).astype(np.float32), rng.normal(size=te_x.shape).astype(np.float32))
  out = evaluate.feature_metrics(tr_x, tr_y, te_x, te_y, probe_steps=100, n_per_class=5)
  rnd = evaluate.feature_metrics(noise[0], tr_y, noise[1], te_y, probe_steps=100, n_per_class=5)
  out.update({f"random_{k}": v for k, v in rnd.items()})
  assert set(out) == {"probe_acc", "knn_acc", "probe_acc_5shot", "knn_acc_5shot", "random_probe_acc",
                      "random_knn_acc", "random_probe_acc_5shot", "random_knn_acc_5shot"}
  assert out["probe_acc"] == 1.0 and out["knn_acc_5shot"] == 1.0
  assert out["random_knn_acc"] < 0.6
  table = evaluate.format_table(out)
  assert "random init" in table and "probe_acc_5shot" in table


def test_retrieval_metrics_go_into_a_jembed_workdir_but_never_into_a_downloaded_model(tmp_path):
  from jembed import evaluate as evaluate_lib
  hf_dir, workdir = tmp_path / "all-MiniLM-L6-v2", tmp_path / "run"
  hf_dir.mkdir(), workdir.mkdir()
  (hf_dir / "config.json").write_text("{}")
  (workdir / "config.json").write_text("{}")
  (workdir / "model.json").write_text("{}")
  assert evaluate_lib.default_retrieval_output(str(hf_dir)) == "retrieval.json"
  assert evaluate_lib.default_retrieval_output(str(workdir)) == str(workdir / "retrieval.json")
