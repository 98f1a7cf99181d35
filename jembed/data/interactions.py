"""User-item interactions for recommendation: files in, id vocabularies and a train/eval split out.

Formats (by file name, else extension; `data.format` forces one):
  u.data, .tsv     tab-separated; MovieLens-100k's `u.data` is `user item rating timestamp` with no
                   header. A first line holding `data.user_key` and `data.item_key` is a header.
  ratings.dat      MovieLens-1M/10M: `user::item::rating::timestamp`, no header.
  .csv             a header row: `data.user_key` / `data.item_key` / `data.rating_key` /
                   `data.timestamp_key`, or MovieLens' ratings.csv names (userId, movieId, rating,
                   timestamp).
  .jsonl           one object a line with those keys.
rating and timestamp are optional (absent: every row kept; file order is the time order).

A bad row (a missing field, a rating or timestamp that is not a number, JSON that does not parse)
raises a one-line UserError naming file:line, or with data.on_bad_record=skip is counted and skipped
(jembed.data.pipeline). `data.min_rating` (0 = off) keeps rows rated at least that. A user-item pair
seen twice keeps its first (earliest) occurrence.

Split (`data.split`): `last` holds out each user's latest interaction (users with at least two),
`random` a seeded `data.eval_fraction` of all interactions; a separate `data.eval` file replaces
either. The vocabularies (original id strings -> contiguous ints) come from the training split; an
eval row whose user or item never occurs in training cannot be scored and is skipped and counted.

`stdlib_interactions()` is the default needing no download: real co-occurrence behaviour from
CPython's own standard library. Users are the standard library's modules (each .py file under
`sysconfig.get_paths()['stdlib']`, tests, IDLE and lib2to3 left out), items the absolute modules
each one imports (`import a.b` and `from a.b import c` both give `a.b`, found with `ast`), and the
timestamp is the line of the first import, so leave-last-out asks for the module a file imports last
from the ones it imported before. Deterministic: files are walked in sorted order.
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import functools
import math
import os
import sysconfig

import numpy as np

from jembed import fs
from jembed.data import pipeline
from jembed.errors import UserError

FORMATS = ("auto", "tsv", "dat", "csv", "jsonl")
SPLITS = ("last", "random")
# MovieLens' ratings.csv column names, accepted when the configured ones are absent.
MOVIELENS_CSV = {"user": "userId", "item": "movieId", "rating": "rating", "timestamp": "timestamp"}
STDLIB_SKIP = ("site-packages", "__pycache__", "test", "tests", "idle_test", "idlelib", "lib2to3")


@dataclasses.dataclass
class Rows:
  """Interactions as parallel lists: original ids (strings), rating and time (NaN when absent)."""
  user: list
  item: list
  rating: list
  time: list

  def __len__(self) -> int:
    return len(self.user)


@dataclasses.dataclass
class Interactions:
  """The split, in contiguous ids: `train_user`/`train_item` (and `eval_*`) are int32 arrays
  indexing `users` / `items` (original id strings)."""
  users: list[str]
  items: list[str]
  train_user: np.ndarray
  train_item: np.ndarray
  eval_user: np.ndarray
  eval_item: np.ndarray
  skipped_eval: int = 0

  def item_counts(self) -> np.ndarray:
    return np.bincount(self.train_item, minlength=len(self.items)).astype(np.int64)

  def seen(self) -> list[np.ndarray]:
    """Each user's training items (sorted)."""
    return seen_items(self.train_user, self.train_item, len(self.users))


def seen_items(user: np.ndarray, item: np.ndarray, n_users: int) -> list[np.ndarray]:
  """For each of `n_users` users, the sorted int64 items of its (user, item) pairs."""
  order = np.lexsort((item, user))
  bounds = np.searchsorted(user[order], np.arange(n_users + 1))
  items = item[order].astype(np.int64)
  return [items[bounds[u]:bounds[u + 1]] for u in range(n_users)]


# ----------------------------------------------------------------------------- reading files


def file_format(path: str, forced: str = "auto") -> str:
  if forced not in FORMATS:
    raise UserError(f"data.format='{forced}' is unknown; use one of {', '.join(FORMATS)}")
  if forced != "auto":
    return forced
  name = os.path.basename(path).lower()
  ext = os.path.splitext(name)[1]
  if name == "u.data" or name.endswith(".base") or name.endswith(".test") or ext == ".tsv":
    return "tsv"
  if ext == ".dat":
    return "dat"
  if ext in (".csv", ".jsonl"):
    return ext[1:]
  raise UserError(f"cannot tell the format of '{path}' from its name; use .csv, .tsv, .jsonl, "
                  "u.data or ratings.dat, or set --config.data.format")


def read_file(path: str, config) -> Rows:
  """Every good row of an interactions file (bad ones raise or are skipped, per data.on_bad_record)."""
  if not fs.exists(path):
    raise UserError(f"interactions file '{path}' does not exist; fix --config.data.train / data.eval")
  fmt = file_format(path, config.format)
  keys = {f: config[f"{f}_key"] for f in ("user", "item", "rating", "timestamp")}
  rows = Rows([], [], [], [])
  with fs.open(path, "r") as f:
    text = f.read()
  lines = text.splitlines()
  if fmt == "jsonl":
    records = ((i, pipeline.json_line(config, f"{path}:{i}", line, _form(keys)))
               for i, line in enumerate(lines, 1) if line.strip())
    records = ((i, r) for i, r in records if r is not None)
    cols = keys
  elif fmt == "csv":
    reader = csv.reader(lines)
    header = next(reader, None) or []
    cols = keys if keys["user"] in header and keys["item"] in header else MOVIELENS_CSV
    if cols["user"] not in header or cols["item"] not in header:
      raise UserError(f"{path} has no '{keys['user']}' and '{keys['item']}' columns (its header is "
                      f"{header[:8]}); set --config.data.user_key / item_key")
    records = ((i, dict(zip(header, r))) for i, r in enumerate(reader, 2) if r)
  else:
    sep = "\t" if fmt == "tsv" else "::"
    split = [(i, line.split(sep)) for i, line in enumerate(lines, 1) if line.strip()]
    positional = ("user", "item", "rating", "timestamp")
    if split and keys["user"] in split[0][1] and keys["item"] in split[0][1]:
      header, split = split[0][1], split[1:]
      cols = keys
    else:
      header, cols = list(positional), {f: f for f in positional}
    records = ((i, dict(zip(header, parts))) for i, parts in split)
  for i, rec in records:
    _add(rows, rec, cols, f"{path}:{i}", config)
  return rows


def _form(keys: dict) -> str:
  return f'write one {{"{keys["user"]}": ..., "{keys["item"]}": ...}} object a line'


def _add(rows: Rows, rec, cols: dict, where: str, config) -> None:
  if not isinstance(rec, dict):
    pipeline.bad_record(config, where, "not a JSON object", _form(cols))
    return
  user, item = rec.get(cols["user"]), rec.get(cols["item"])
  missing = [cols[f] for f, v in (("user", user), ("item", item)) if v is None or str(v).strip() == ""]
  if missing:
    pipeline.bad_record(config, where, f"no '{missing[0]}' field", "give every row a user and an item")
    return
  values = []
  for field in ("rating", "timestamp"):
    raw = rec.get(cols[field])
    if raw is None or str(raw).strip() == "":
      values.append(math.nan)
      continue
    try:
      values.append(float(raw))
    except (TypeError, ValueError):
      pipeline.bad_record(config, where, f"{field} {str(raw)[:40]!r} is not a number",
                          f"fix the {cols[field]} column")
      return
  rows.user.append(str(user).strip())
  rows.item.append(str(item).strip())
  rows.rating.append(values[0])
  rows.time.append(values[1])


# ----------------------------------------------------------------------------- the default data


@functools.lru_cache(maxsize=2)
def _stdlib_rows(root: str) -> tuple:
  users, items, times = [], [], []
  for directory, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP)
    for name in sorted(files):
      if not name.endswith(".py"):
        continue
      path = os.path.join(directory, name)
      module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
      try:
        with open(path, "rb") as f:
          tree = ast.parse(f.read())
      except (SyntaxError, ValueError, OSError):
        continue  # a file this interpreter cannot parse (e.g. a template) imports nothing we can read
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
          found = [node.module]
        else:
          continue
        for imported in found:
          users.append(module)
          items.append(imported)
          times.append(float(node.lineno))
  return tuple(users), tuple(items), tuple(times)


def stdlib_interactions(root: str | None = None) -> Rows:
  """The default interactions: modules under `root` (default: this interpreter's standard library)
  as users, the modules they import as items."""
  users, items, times = _stdlib_rows(root or sysconfig.get_paths()["stdlib"])
  return Rows(list(users), list(items), [math.nan] * len(users), list(times))


# ----------------------------------------------------------------------------- the split


def _paths(spec: str) -> list[str]:
  return [p.strip() for p in str(spec).split(",") if p.strip()]


def read_rows(spec: str, config) -> Rows:
  rows = Rows([], [], [], [])
  for path in _paths(spec):
    r = read_file(path, config)
    for a, b in ((rows.user, r.user), (rows.item, r.item), (rows.rating, r.rating), (rows.time, r.time)):
      a.extend(b)
  return rows


def _filter(rows: Rows, min_rating: float) -> Rows:
  """Rows rated >= min_rating (0 = no filter; an unrated row is kept), then the first occurrence of
  each user-item pair in time order (file order breaks ties and stands in for missing times)."""
  n = len(rows)
  rating = np.asarray(rows.rating, np.float64)
  keep = np.ones(n, bool) if not min_rating else ~(rating < min_rating)
  time = np.asarray(rows.time, np.float64)
  order = np.lexsort((np.arange(n), np.where(np.isnan(time), np.arange(n), time)))
  out, seen = Rows([], [], [], []), set()
  for i in order:
    if not keep[i] or (rows.user[i], rows.item[i]) in seen:
      continue
    seen.add((rows.user[i], rows.item[i]))
    out.user.append(rows.user[i])
    out.item.append(rows.item[i])
    out.rating.append(rows.rating[i])
    out.time.append(rows.time[i])
  return out


def load(config, seed: int = 0) -> Interactions:
  """The train/eval split `config` (the `data` section) describes, with id vocabularies; `seed`
  draws the random split."""
  split = config.split
  if split not in SPLITS:
    raise UserError(f"data.split='{split}' is unknown; use one of {', '.join(SPLITS)}")
  min_rating = float(config.min_rating)
  rows = _filter(read_rows(config.train, config) if config.train else stdlib_interactions(), min_rating)
  if not len(rows):
    raise UserError(f"no interactions left in '{config.train or 'the standard library'}' (after "
                    f"data.min_rating={min_rating}); give a file with rows or lower data.min_rating")
  if config.eval:
    train_idx = np.arange(len(rows))
    held = _filter(read_rows(config.eval, config), min_rating)
    eval_pairs = list(zip(held.user, held.item))
  else:
    train_idx, eval_idx = _split(rows, split, float(config.eval_fraction), seed)
    eval_pairs = [(rows.user[i], rows.item[i]) for i in eval_idx]
  users = sorted({rows.user[i] for i in train_idx})
  items = sorted({rows.item[i] for i in train_idx})
  u_of, i_of = {u: n for n, u in enumerate(users)}, {t: n for n, t in enumerate(items)}
  eu, ei, skipped = [], [], 0
  for u, t in eval_pairs:
    if u not in u_of or t not in i_of:
      skipped += 1
      pipeline.skipped_record("eval", f"user {u!r} or item {t!r} never occurs in training")
      continue
    eu.append(u_of[u])
    ei.append(i_of[t])
  as_ints = lambda xs: np.asarray(xs, np.int32)
  return Interactions(users=users, items=items,
                      train_user=as_ints([u_of[rows.user[i]] for i in train_idx]),
                      train_item=as_ints([i_of[rows.item[i]] for i in train_idx]),
                      eval_user=as_ints(eu), eval_item=as_ints(ei), skipped_eval=skipped)


def _split(rows: Rows, split: str, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train row indices, eval row indices). Rows are already in time order."""
  n = len(rows)
  if split == "random":
    if not 0.0 < fraction < 1.0:
      raise UserError(f"data.eval_fraction={fraction} must be in (0, 1)")
    perm = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * fraction))
    return np.sort(perm[cut:]), np.sort(perm[:cut])
  last: dict = {}
  count: dict = {}
  for i, u in enumerate(rows.user):
    last[u] = i
    count[u] = count.get(u, 0) + 1
  held = np.asarray(sorted(i for u, i in last.items() if count[u] >= 2), np.int64)
  mask = np.ones(n, bool)
  mask[held] = False
  return np.flatnonzero(mask), held
