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
import json
import sys

import numpy as np

from jembed import fs, index_files, modelspec
from jembed.errors import UserError, run_cli
from jembed.fs import read_npz, write_npz  # noqa: F401  (recommend.write_npz, as before)
from jembed.ranking import KS, QUERY_GROUP, evaluate, ranking_metrics, top_k_unseen  # noqa: F401
from jembed.tasks.two_tower import tower_vectors



# ----------------------------------------------------------------------------- a trained model


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
    return index_files.write(directory, self.item_vectors, ids=self.items,
                             normalized=self.normalize, overwrite=overwrite)


def _check_k(k) -> None:
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise UserError(f"k={k!r} must be a positive integer")


def load(path: str, step: int | None = None) -> Recommender:
  """The Recommender of a two-tower workdir (what `jembed.load` returns for one)."""
  if not fs.isdir(path):
    raise UserError(f"model '{path}' does not exist; give a jembed workdir or a Hugging Face "
                    "model directory")
  spec = modelspec.read(path)
  if spec is None or spec.get("task") != "two_tower":
    raise UserError(f"'{path}' is not a two-tower workdir (train one with configs/two_tower.py)")
  spec, model, step = modelspec.load_model(path, step)
  return Recommender.from_workdir(path, spec, model, step)


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
