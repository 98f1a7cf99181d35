"""Retrieval metrics against hand-worked cases, a NumPy full-matrix reference and pytrec_eval; blocked
top-k against one block; Spearman against scipy."""
import math

import numpy as np
import pytest

from jembed.errors import UserError
from jembed.retrieval import retrieval_metrics, spearman, top_k


def _reference(q, c, qrels, ks, similarity="cosine"):
  """Full score matrix, stable sort (ties: lower corpus index first), definitions by loop."""
  q, c = np.asarray(q, np.float64), np.asarray(c, np.float64)
  if similarity == "cosine":
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
  scores = q @ c.T
  out = {}
  for k in ks:
    rec, mrr, ndcg = [], [], []
    for i, rel in enumerate(qrels):
      ranking = list(np.argsort(-scores[i], kind="stable")[:k])
      rec.append(len(set(ranking) & set(rel)) / len(rel))
      first = [r for r, d in enumerate(ranking, start=1) if d in rel]
      mrr.append(1 / first[0] if first else 0.0)
      dcg = sum(1 / math.log2(r + 1) for r, d in enumerate(ranking, start=1) if d in rel)
      idcg = sum(1 / math.log2(r + 1) for r in range(1, min(len(rel), k) + 1))
      ndcg.append(dcg / idcg)
    out.update({f"recall@{k}": np.mean(rec), f"mrr@{k}": np.mean(mrr), f"ndcg@{k}": np.mean(ndcg)})
  return out


def _assert_metrics(got, want):
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-9, err_msg=key)


def test_hand_worked_ranks():
  # Dot scores on 1-d embeddings: corpus doc j scores 12 - j, so doc j is ranked j + 1.
  corpus = np.arange(12, 0, -1, dtype=np.float32)[:, None]
  queries = np.ones((3, 1), np.float32)
  qrels = [{1, 4},   # ranks 2 and 5
           {11},     # rank 12: nothing relevant in the top 10
           {0}]      # rank 1
  m = retrieval_metrics(queries, corpus, qrels, similarity="dot")
  ndcg_q0 = (1 / math.log2(3) + 1 / math.log2(6)) / (1 + 1 / math.log2(3))
  np.testing.assert_allclose(m["recall@1"], (0 + 0 + 1) / 3)
  np.testing.assert_allclose(m["recall@10"], (1 + 0 + 1) / 3)
  np.testing.assert_allclose(m["mrr@10"], (1 / 2 + 0 + 1) / 3)
  np.testing.assert_allclose(m["ndcg@10"], (ndcg_q0 + 0 + 1) / 3)
  np.testing.assert_allclose(m["mrr@1"], 1 / 3)
  assert set(m) == {"recall@1", "recall@10", "mrr@1", "mrr@10", "ndcg@1", "ndcg@10"}


def test_ties_rank_the_lower_index_first():
  # Docs 0..3 identical; query relevant to doc 2: ranked third of the tie.
  corpus = np.array([[1, 0]] * 4 + [[0, 1]] * 2, np.float32)
  m = retrieval_metrics(np.array([[1, 0]], np.float32), corpus, [{2}], ks=(1, 3), block_size=2)
  assert m["recall@1"] == 0.0 and m["recall@3"] == 1.0
  np.testing.assert_allclose(m["mrr@3"], 1 / 3)
  _, ids = top_k(np.array([[1, 0]], np.float32), corpus, 6, block_size=4)
  assert ids.tolist() == [[0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_matches_numpy_reference_with_several_relevant_and_blocks(similarity):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(9, 6)).astype(np.float32)
  c = rng.normal(size=(40, 6)).astype(np.float32) * rng.uniform(0.5, 2, size=(40, 1)).astype(np.float32)
  c[7] = c[3]  # a tie inside the corpus
  qrels = [set(rng.choice(40, size=rng.integers(1, 15), replace=False).tolist()) for _ in range(9)]
  want = _reference(q, c, qrels, (1, 5, 10), similarity)
  one_block = retrieval_metrics(q, c, qrels, ks=(1, 5, 10), similarity=similarity)
  _assert_metrics(one_block, want)
  # Blocks that do not divide the corpus; query blocks too.
  blocked = top_k(q, c, 10, similarity=similarity, block_size=7, query_block_size=4)
  whole = top_k(q, c, 10, similarity=similarity, block_size=1000)
  np.testing.assert_array_equal(blocked[1], whole[1])
  np.testing.assert_allclose(blocked[0], whole[0], rtol=1e-6)
  _assert_metrics(retrieval_metrics(q, c, qrels, ks=(1, 5, 10), similarity=similarity, block_size=7), want)
  # Cosine and dot really differ here (the corpus rows have different norms).
  other = _reference(q, c, qrels, (1, 5, 10), "dot" if similarity == "cosine" else "cosine")
  assert any(not np.isclose(other[k], want[k]) for k in want)


def test_corpus_smaller_than_k():
  rng = np.random.default_rng(1)
  q, c = rng.normal(size=(4, 3)), rng.normal(size=(5, 3))
  qrels = [{0}, {1, 2}, {4}, {3}]
  _assert_metrics(retrieval_metrics(q, c, qrels), _reference(q, c, qrels, (1, 10)))


def test_matches_pytrec_eval():
  pytrec_eval = pytest.importorskip("pytrec_eval")
  rng = np.random.default_rng(2)
  q = rng.normal(size=(12, 8)).astype(np.float32)
  c = rng.normal(size=(60, 8)).astype(np.float32)
  qrels = [set(rng.choice(60, size=rng.integers(1, 14), replace=False).tolist()) for _ in range(12)]
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  cn = c / np.linalg.norm(c, axis=1, keepdims=True)
  scores = (qn.astype(np.float64) @ cn.T.astype(np.float64))
  trec_qrels = {f"q{i}": {f"d{d}": 1 for d in rel} for i, rel in enumerate(qrels)}
  run = {f"q{i}": {f"d{d}": float(scores[i, d]) for d in range(60)} for i in range(12)}
  run10 = {qid: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:10]) for qid, docs in run.items()}
  full = pytrec_eval.RelevanceEvaluator(trec_qrels, {"recall.1,10", "ndcg_cut.10"}).evaluate(run)
  # recip_rank is uncut in trec_eval; on the top-10 run it is MRR@10.
  rr = pytrec_eval.RelevanceEvaluator(trec_qrels, {"recip_rank"}).evaluate(run10)
  mean = lambda d, key: np.mean([v[key] for v in d.values()])
  m = retrieval_metrics(q, c, qrels)
  np.testing.assert_allclose(m["recall@1"], mean(full, "recall_1"), rtol=1e-6)
  np.testing.assert_allclose(m["recall@10"], mean(full, "recall_10"), rtol=1e-6)
  np.testing.assert_allclose(m["ndcg@10"], mean(full, "ndcg_cut_10"), rtol=1e-6)
  np.testing.assert_allclose(m["mrr@10"], mean(rr, "recip_rank"), rtol=1e-6)


def test_bad_qrels_and_options():
  q, c = np.ones((2, 3)), np.ones((4, 3))
  with pytest.raises(UserError, match="query 1 has no relevant"):
    retrieval_metrics(q, c, [{0}, set()])
  with pytest.raises(UserError, match="outside the corpus of 4"):
    retrieval_metrics(q, c, [{0}, {4}])
  with pytest.raises(UserError, match="2 queries"):
    retrieval_metrics(q, c, [{0}])
  with pytest.raises(UserError, match="similarity"):
    retrieval_metrics(q, c, [{0}, {1}], similarity="l2")
  with pytest.raises(UserError, match="dim"):
    retrieval_metrics(q, np.ones((4, 2)), [{0}, {1}])


def test_spearman_matches_scipy_with_ties():
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(3)
  pred = rng.normal(size=50)
  gold = np.round(pred + rng.normal(size=50), 0)  # many ties in gold
  pred[:10] = pred[0]  # and in pred
  np.testing.assert_allclose(spearman(pred, gold), stats.spearmanr(pred, gold).statistic, rtol=1e-12)
  assert spearman([1, 2, 3, 4], [10, 20, 30, 35]) == pytest.approx(1.0)
  assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # Ties by hand: ranks of [1, 1, 2] are [1.5, 1.5, 3] -> Pearson with [1, 2, 3] is sqrt(3)/2.
  assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
  assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
  with pytest.raises(UserError):
    spearman([1, 2], [1, 2, 3])
