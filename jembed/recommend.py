"""Recommendations from a trained two-tower workdir, its ranking metrics, and its item index.

    import jembed
    rec = jembed.load("runs/tt")                  # a workdir of task two_tower
    rec.recommend(["196", "186"], k=10)           # per user: [{"id": item, "score": ...}, ...], seen items left out
    rec.similar_items(["242"], k=10)              # per item: the items nearest by cosine, itself left out

    python -m jembed.recommend --model runs/tt --export-index runs/tt.items.index
    python -m jembed.recommend --model runs/tt --users 196,186 --k 10

Ids in and out are the original ones (strings, as read from the interactions file). All top-k goes
through jembed.knn (exact, sharded over the local devices, bounded memory); items a user has seen
are left out by asking for k + (how many they have seen) and dropping them, with that number
rounded up to a power of two so only a few k compile.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Sequence

import numpy as np

from jembed import fs
from jembed.errors import UserError, run_cli

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
  from jembed import knn
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


# ----------------------------------------------------------------------------- a trained model


def write_npz(path: str, **arrays) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  fs.write_bytes(path, buf.getvalue())


def read_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(fs.read_bytes(path))) as z:
    return {k: z[k] for k in z.files}


class Recommender:
  """A trained two-tower's user and item vectors with their original ids and training history."""

  modality = "recommendation"

  def __init__(self, user_vectors: np.ndarray, item_vectors: np.ndarray, users: list[str],
               items: list[str], seen: list[np.ndarray], *, normalize: bool = False, source: str = "",
               devices=None):
    from jembed import knn
    self.user_vectors, self.item_vectors = user_vectors, item_vectors
    self.users, self.items, self.seen = list(users), list(items), seen
    self.normalize, self.source = normalize, source
    self.dim = int(item_vectors.shape[1])
    self._user_row = {u: i for i, u in enumerate(self.users)}
    self._item_row = {t: i for i, t in enumerate(self.items)}
    self._devices = devices
    self._searcher = knn.Searcher(item_vectors, devices=devices)
    self._unit = None

  @classmethod
  def from_workdir(cls, path: str, spec: dict, model, step: int, devices=None) -> "Recommender":
    from jembed.tasks.two_tower import tower_vectors
    vocab = json.loads(fs.read_text(fs.join(path, spec["vocab"])))
    history = read_npz(fs.join(path, spec["history"]))
    users, items = vocab["users"], vocab["items"]
    from jembed.data.interactions import seen_items
    seen = seen_items(history["user"], history["item"], len(users))
    u, i = tower_vectors(model, len(users), len(items))
    return cls(u, i, users, items, seen, normalize=spec["backbone"]["normalize"],
               source=f"{path} step {step}", devices=devices)

  def _rows(self, ids, table: dict, kind: str) -> list[int]:
    if isinstance(ids, (str, int)):
      ids = [ids]
    rows = []
    for ident in ids:
      row = table.get(str(ident))
      if row is None:
        raise UserError(f"{kind} {ident!r} does not occur in the training interactions of "
                        f"{self.source or 'this model'}; give a known {kind} id")
      rows.append(row)
    return rows

  def recommend(self, user_ids, k: int = 10, *, exclude_seen: bool = True) -> list[list[dict]]:
    """For each user, the k items scoring highest by dot product, items seen in training left out."""
    _check_k(k)
    rows = self._rows(user_ids, self._user_row, "user")
    seen = [self.seen[r] if exclude_seen else np.zeros(0, np.int64) for r in rows]
    scores, found = top_k_unseen(self._searcher, self.user_vectors[rows], seen,
                                 min(k, len(self.items)))
    return [[{"id": self.items[int(i)], "score": float(s)} for s, i in zip(ss, ii) if i >= 0]
            for ss, ii in zip(scores, found)]

  def similar_items(self, item_ids, k: int = 10) -> list[list[dict]]:
    """For each item, the k items whose vectors have the highest cosine with it, itself left out."""
    from jembed import knn
    _check_k(k)
    rows = self._rows(item_ids, self._item_row, "item")
    if self._unit is None:
      unit = self.item_vectors / np.maximum(np.linalg.norm(self.item_vectors, axis=1, keepdims=True), 1e-12)
      self._unit = (unit, knn.Searcher(unit, devices=self._devices))
    unit, searcher = self._unit
    scores, found = top_k_unseen(searcher, unit[rows], [np.asarray([r]) for r in rows],
                                 min(k, len(self.items) - 1))
    return [[{"id": self.items[int(i)], "score": float(s)} for s, i in zip(ss, ii) if i >= 0]
            for ss, ii in zip(scores, found)]

  def export_index(self, directory: str, *, overwrite: bool = False) -> str:
    """The item vectors as a jembed.index directory (ids = the original item ids), so
    `Index.load(directory).similar(...)`, `.search(user_vector)` and the server can serve them.
    The vectors are stored as trained: a user vector as the query ranks items as `recommend` does."""
    from jembed import index
    return index.write(directory, self.item_vectors, ids=self.items,
                       normalized=self.normalize, overwrite=overwrite)


def _check_k(k) -> None:
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise UserError(f"k={k!r} must be a positive integer")


def load(path: str, step: int | None = None) -> Recommender:
  import jembed
  rec = jembed.load(path, step=step)
  # By attribute, not isinstance: under `python -m jembed.recommend` this module is __main__, and the
  # Recommender jembed.load builds is jembed.recommend's.
  if getattr(rec, "modality", "") != "recommendation":
    raise UserError(f"'{path}' is not a two-tower workdir (train one with configs/two_tower.py)")
  return rec


# ----------------------------------------------------------------------------- command line


def _run(args) -> str:
  rec = load(args.model)
  if args.export_index:
    rec.export_index(args.export_index, overwrite=args.overwrite)
    return f"{len(rec.items)} item vectors ({rec.dim}-d) -> {args.export_index}"
  if args.users:
    for user, hits in zip(args.users.split(","), rec.recommend(args.users.split(","), args.k)):
      print(json.dumps({"user": user, "items": hits}))
    return ""
  raise UserError("nothing to do; pass --export-index DIR or --users ID,ID")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jembed.recommend", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="a two_tower --workdir")
  p.add_argument("--export-index", default="", help="write the item vectors as a jembed.index here")
  p.add_argument("--overwrite", action="store_true", help="replace an existing index directory")
  p.add_argument("--users", default="", help="comma-separated user ids to recommend for (JSON lines out)")
  p.add_argument("--k", type=int, default=10)
  return run_cli(p, _run)(argv)


if __name__ == "__main__":
  sys.exit(main())
