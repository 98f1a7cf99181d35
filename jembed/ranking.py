"""Ranking a catalogue for each user: top-k without the items a user has seen, and the full-catalogue
metrics of a two-tower (recall@10/100, ndcg@10, hit_rate@10, beside ranking by popularity). The
two-tower task reports them at eval steps; jembed/recommend.py serves the trained model.

All top-k goes through jembed.knn (exact, sharded over the local devices, bounded memory); items a
user has seen are left out by asking for k + (how many they have seen) and dropping them, with that
number rounded up to a power of two so only a few k compile.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jembed import knn

KS = (10, 100)   # the cut-offs of the evaluation: recall@10/100, ndcg@10, hit_rate@10
QUERY_GROUP = 256


# ----------------------------------------------------------------------------- top-k without seen items


def top_k_unseen(searcher, queries: np.ndarray, seen: Sequence[np.ndarray], k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(scores, rows) (Q, k) of each query's best rows of `searcher` (a jembed.knn.Searcher) not in
  its `seen` rows; -1 / -inf pad when fewer than k are left."""
  q = len(queries)
  out_s = np.full((q, k), -np.inf, np.float32)
  out_i = np.full((q, k), -1, np.int64)
  sizes = np.asarray([len(s) for s in seen], np.int64)
  order = np.argsort(sizes, kind="stable")   # users with similar histories share a k
  for lo in range(0, q, QUERY_GROUP):
    group = order[lo:lo + QUERY_GROUP]
    want = k + int(sizes[group].max())
    kk = min(searcher.count, 1 << (want - 1).bit_length())
    scores, rows = searcher.search(queries[group], kk)
    for j, u in enumerate(group):
      keep = ~np.isin(rows[j], seen[u]) & (rows[j] >= 0)
      s, r = scores[j][keep][:k], rows[j][keep][:k]
      out_s[u, :len(s)], out_i[u, :len(r)] = s, r
  return out_s, out_i


def ranking_metrics(top: np.ndarray, relevant: Sequence[set]) -> dict[str, float]:
  """recall@10, recall@100, ndcg@10 and hit_rate@10 (means over users) of ranked rows `top` (Q, >=
  100) against each user's held-out rows `relevant`. recall@K = found / held-out; nDCG with binary
  gains, the ideal ranking placing every held-out item first."""
  n = len(relevant)
  if n == 0:
    return {}
  hits = np.zeros((n, top.shape[1]), bool)
  for u, rel in enumerate(relevant):
    hits[u] = np.isin(top[u], list(rel))
  size = np.asarray([len(r) for r in relevant], np.float64)
  out = {f"recall@{k}": float(np.mean(hits[:, :k].sum(1) / size)) for k in KS}
  discount = 1.0 / np.log2(np.arange(2, 12))
  dcg = (hits[:, :10] * discount).sum(1)
  ideal = np.asarray([discount[:int(min(s, 10))].sum() for s in size])
  out["ndcg@10"] = float(np.mean(dcg / ideal))
  out["hit_rate@10"] = float(np.mean(hits[:, :10].any(1)))
  return out


def evaluate(user_vectors: np.ndarray, item_vectors: np.ndarray, item_counts: np.ndarray,
             seen: Sequence[np.ndarray], eval_user: np.ndarray, eval_item: np.ndarray,
             devices=None) -> dict[str, float]:
  """Full-catalogue metrics of the two-tower and, as `popularity_*`, of ranking every item by its
  training count, both with each user's training items left out."""
  users = np.unique(eval_user)
  if not len(users):
    return {}
  relevant = [set() for _ in users]
  where = {int(u): j for j, u in enumerate(users)}
  for u, i in zip(eval_user, eval_item):
    relevant[where[int(u)]].add(int(i))
  their_seen = [seen[int(u)] for u in users]
  k = min(max(KS), len(item_vectors))
  _, top = top_k_unseen(knn.Searcher(item_vectors, devices=devices), user_vectors[users], their_seen, k)
  out = ranking_metrics(_pad(top, max(KS)), relevant)
  # Popularity as a 1-d search: every query is [1], every item's vector its count.
  pop = knn.Searcher(item_counts.astype(np.float32)[:, None], devices=devices)
  _, top = top_k_unseen(pop, np.ones((len(users), 1), np.float32), their_seen, k)
  out.update({f"popularity_{m}": v for m, v in ranking_metrics(_pad(top, max(KS)), relevant).items()})
  return out


def _pad(top: np.ndarray, k: int) -> np.ndarray:
  if top.shape[1] >= k:
    return top
  return np.concatenate([top, np.full((len(top), k - top.shape[1]), -1, top.dtype)], axis=1)
