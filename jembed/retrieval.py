"""Retrieval and similarity metrics of embeddings: recall@k, MRR@k and nDCG@k (the BEIR / pytrec_eval
definitions, binary relevance) and Spearman correlation for scored pairs (STS).

The corpus is scored in blocks, keeping a running top-k per query, so a large corpus never needs
the full (queries x corpus) score matrix in memory.
"""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jembed.errors import UserError


@functools.partial(jax.jit, static_argnames=("k",))
def _block_top_k(queries, block, start, n_valid, best_scores, best_ids, *, k):
  """Merges one corpus block into the running top-k of every query."""
  scores = queries @ block.T
  ids = start + jnp.arange(block.shape[0])
  scores = jnp.where(ids[None, :] < n_valid, scores, -jnp.inf)  # padding rows of the last block
  # Earlier blocks first: top_k prefers the lower position among equal scores, so ties go to the
  # lower corpus index everywhere.
  scores = jnp.concatenate([best_scores, scores], axis=1)
  ids = jnp.concatenate([best_ids, jnp.broadcast_to(ids, (queries.shape[0], block.shape[0]))], axis=1)
  top, pos = jax.lax.top_k(scores, k)
  return top, jnp.take_along_axis(ids, pos, axis=1)


def _as_matrix(x, what: str) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or not len(x):
    raise UserError(f"retrieval_metrics: {what} embeddings must be a non-empty (n, dim) array, got shape {x.shape}")
  return x


def top_k(query_emb, corpus_emb, k: int, *, similarity: str = "cosine",
          block_size: int = 16384, query_block_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """(scores, corpus indices) of the k best documents per query, best first, (Q, k) each.

  similarity: "cosine" (rows L2-normalised) or "dot". Equal scores rank the lower corpus index
  first. Scores are computed `query_block_size x block_size` at a time.
  """
  q, c = _as_matrix(query_emb, "query"), _as_matrix(corpus_emb, "corpus")
  if q.shape[1] != c.shape[1]:
    raise UserError(f"retrieval_metrics: query dim {q.shape[1]} != corpus dim {c.shape[1]}; embed both with one model")
  if similarity == "cosine":
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
  elif similarity != "dot":
    raise UserError(f"similarity={similarity!r} is not known; use 'cosine' or 'dot'")
  n = len(c)
  k = min(int(k), n)
  block = min(int(block_size), n)
  qb = min(int(query_block_size), len(q))
  if block <= 0 or qb <= 0 or k <= 0:
    raise UserError(f"top_k: k={k}, block_size={block_size} and query_block_size={query_block_size} must be positive")
  # Fixed block shapes (the last ones zero-padded) so one compiled program serves every block.
  c = np.concatenate([c, np.zeros((-n % block, c.shape[1]), np.float32)])
  q_pad = np.concatenate([q, np.zeros((-len(q) % qb, q.shape[1]), np.float32)])
  scores, ids = [], []
  for qs in range(0, len(q_pad), qb):
    queries = jnp.asarray(q_pad[qs:qs + qb])
    best = jnp.full((qb, k), -jnp.inf, jnp.float32)
    best_ids = jnp.full((qb, k), n, jnp.int32)  # placeholders; -inf scores lose to any real one
    for start in range(0, len(c), block):
      best, best_ids = _block_top_k(queries, jnp.asarray(c[start:start + block]), jnp.int32(start),
                                    jnp.int32(n), best, best_ids, k=k)
    scores.append(np.asarray(best))
    ids.append(np.asarray(best_ids))
  return np.concatenate(scores)[:len(q)], np.concatenate(ids)[:len(q)]


def retrieval_metrics(query_emb, corpus_emb, qrels: Sequence[Iterable[int]], ks: Sequence[int] = (1, 10), *,
                      similarity: str = "cosine", block_size: int = 16384) -> dict[str, float]:
  """Mean over queries of recall@k, mrr@k and ndcg@k for every k in `ks`.

  qrels[i]: the corpus indices relevant to query i (binary relevance; every query needs at least
  one). Ranking: by descending score (`similarity` "cosine" or "dot"), equal scores by ascending
  corpus index. Definitions as pytrec_eval / BEIR: recall@k = |rel ∩ top-k| / |rel|;
  mrr@k = 1 / rank of the first relevant document in the top k, else 0; ndcg@k = DCG@k / IDCG@k
  with gain 1 per relevant document, discount 1 / log2(rank + 1), and IDCG@k over min(|rel|, k)
  relevant documents ranked first.
  """
  ks = sorted({int(k) for k in ks})
  if not ks or ks[0] <= 0:
    raise UserError(f"retrieval_metrics: ks={ks} must be positive integers, e.g. (1, 10)")
  n_queries, n_docs = len(query_emb), len(corpus_emb)
  if len(qrels) != n_queries:
    raise UserError(f"retrieval_metrics: {len(qrels)} qrels for {n_queries} queries; give one set of "
                    "relevant corpus indices per query")
  relevant = []
  for i, rel in enumerate(qrels):
    rel = {int(r) for r in rel}
    if not rel:
      raise UserError(f"retrieval_metrics: query {i} has no relevant document; drop it or add its "
                      "relevant corpus indices")
    if min(rel) < 0 or max(rel) >= n_docs:
      raise UserError(f"retrieval_metrics: query {i} names corpus index {max(rel) if max(rel) >= n_docs else min(rel)} "
                      f"outside the corpus of {n_docs}")
    relevant.append(rel)
  _, ids = top_k(query_emb, corpus_emb, max(ks), similarity=similarity, block_size=block_size)
  hits = np.array([[int(d) in rel for d in row] for row, rel in zip(ids, relevant)], np.float64)
  n_rel = np.array([len(r) for r in relevant], np.float64)
  out = {}
  for k in ks:
    h = hits[:, :k]  # (Q, <=k): the corpus may be smaller than k
    discount = 1.0 / np.log2(np.arange(2, h.shape[1] + 2))
    first = np.where(h.any(1), h.argmax(1) + 1, np.inf)
    ideal = np.array([discount[:int(min(r, k))].sum() for r in n_rel])
    out[f"recall@{k}"] = float(np.mean(h.sum(1) / n_rel))
    out[f"mrr@{k}"] = float(np.mean(1.0 / first))
    out[f"ndcg@{k}"] = float(np.mean((h * discount).sum(1) / ideal))
  return out


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks, ties given the mean of the ranks they span (scipy's rankdata 'average')."""
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  # Start of every run of equal values, then the mean rank of each run.
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], len(x)]
  run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.repeat(run_rank, ends - starts)
  return ranks


def spearman(pred_scores, gold_scores) -> float:
  """Spearman's rank correlation (Pearson of average ranks), as scipy.stats.spearmanr; NaN when
  either side is constant (the correlation is undefined there)."""
  pred = np.asarray(pred_scores, np.float64).ravel()
  gold = np.asarray(gold_scores, np.float64).ravel()
  if pred.shape != gold.shape or len(pred) < 2:
    raise UserError(f"spearman: needs two equally long score lists of at least 2, got {len(pred)} and {len(gold)}")
  if not (np.isfinite(pred).all() and np.isfinite(gold).all()):
    raise UserError("spearman: scores must be finite numbers; check for NaN/inf in the scores")
  a, b = _average_ranks(pred), _average_ranks(gold)
  a, b = a - a.mean(), b - b.mean()
  denom = np.sqrt((a * a).sum() * (b * b).sum())
  return float((a * b).sum() / denom) if denom > 0 else float("nan")
