"""A vector index of a model's embeddings: build it from a file, add to it, search it.

    python -m jembed.index build --model runs/ct --input docs.jsonl --output docs.index
    python -m jembed.index add --index docs.index --input more.jsonl
    python -m jembed.index search --index docs.index --queries q.jsonl --k 10 --output hits.jsonl

    from jembed.index import Index
    index = Index.load("docs.index")
    index.search(["how do I open a file"], k=10)   # [[{"id": ..., "score": ..., **fields}, ...]]
    index.similar(["doc7"], k=5); index.recommend(["doc1", "doc9"], k=5)

An index is a directory on a local disk:
    index.json      what the rows are: count, dim, dtype, metric (cosine when the model normalises, else
                    dot), the model's path and fingerprint, the byte lengths of the files below
    vectors.f32     (or .f16) the rows, raw little-endian, memory-mapped on load
    ids.jsonl       one JSON id a line (a string or an integer)
    fields.jsonl    one JSON object a line: what a hit returns besides id and score
    fields.offsets  int64 byte offset of each fields.jsonl line (random access for hits)
    .lock           held (flock) by the one process writing to the index
The files are only ever appended to; index.json, written atomically last, says how much of each is
the index. A build fills a temporary directory that is renamed into place only when complete, and an
interrupted `add` leaves extra bytes that index.json does not count (the next `add` cuts them), so a
reader never sees a half-written index. Search is exact (jembed.knn) on the local devices.
"""
from __future__ import annotations

import argparse
import builtins
import json
import os
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np

from jembed import fs, inputs
from jembed.errors import UserError, run_cli
from jembed.index_files import (CHUNK, FORMAT, INDEX_FILE, STORE_DTYPES, Writer, check_ids,  # noqa: F401
                                check_output, model_fingerprint, new_meta, read_ids, read_meta,
                                vector_file, write)

RESERVED = ("id", "score")   # keys every hit has; a stored field may not shadow them
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


# ---------------------------------------------------------------------------------------------------
# Inputs: (id, text or image path, stored fields) of each record
# ---------------------------------------------------------------------------------------------------
def read_items(path: str, *, modality: str = "text", id_field: str = "id",
               text_field: str = "text") -> Iterator[tuple[Any, str, dict]]:
  """Records of a .jsonl (`id_field`, `text_field`, other fields stored), a .txt (a text a line, the
  line number its id) or a .parquet file (columns as .jsonl fields), or the images of a folder for
  an image model (the relative path the id). Stored fields keep the text too, so hits show it."""
  if modality == "image":
    yield from _image_items(path)
    return
  if os.path.isdir(path):
    raise UserError(f"input '{path}' is a folder, but the model embeds text; give a .jsonl, .txt or "
                    ".parquet file (folders of images need an image model)")
  if not os.path.isfile(path):
    raise UserError(f"input file '{path}' does not exist; fix --input")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".txt":
    line_no = 0
    with builtins.open(path, encoding="utf-8") as f:
      try:
        for line_no, line in enumerate(f, 1):
          text = line.rstrip("\n")
          yield line_no, text, {text_field: text}
      except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text (after line {line_no}); convert it to UTF-8") from None
  elif ext == ".jsonl":
    for i, obj in inputs.json_lines(path):
      if not isinstance(obj, dict):
        raise UserError(f"{path}:{i} is not a JSON object; each line must be {{\"{id_field}\": ..., "
                        f"\"{text_field}\": ...}}")
      yield _item(obj, f"{path}:{i}", id_field, text_field)
  elif ext == ".parquet":
    try:
      import pyarrow.parquet as pq
    except ImportError:
      raise UserError("reading .parquet needs pyarrow: pip install pyarrow (or give .jsonl)") from None
    try:
      pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own types for a damaged file
      raise UserError(f"{path} is not a readable parquet file ({type(e).__name__}); fix --input") from None
    names = pf.schema_arrow.names
    for col, flag in ((id_field, "--id-field"), (text_field, "--text-field")):
      if col not in names:
        raise UserError(f"{path} has no column '{col}' (it has {names[:8]}); pass {flag} NAME")
    row = 0
    for batch in pf.iter_batches(batch_size=CHUNK):
      for obj in batch.to_pylist():
        row += 1
        yield _item(obj, f"{path} row {row}", id_field, text_field)
  else:
    raise UserError(f"input '{path}' is not .jsonl, .txt or .parquet; use one of those")


def _item(obj: dict, where: str, id_field: str, text_field: str) -> tuple[Any, str, dict]:
  if id_field not in obj:
    raise UserError(f"{where} has no field '{id_field}' (it has {sorted(obj)[:8]}); pass --id-field NAME")
  if text_field not in obj or obj[text_field] is None:
    raise UserError(f"{where} has no field '{text_field}' (it has {sorted(obj)[:8]}); pass "
                    "--text-field NAME")
  fields = {k: v for k, v in obj.items() if k != id_field}
  clash = [k for k in RESERVED if k in fields]
  if clash:
    raise UserError(f"{where} has a field '{clash[0]}', which hits use for themselves; rename it")
  return obj[id_field], str(obj[text_field]), fields


def _image_items(path: str) -> Iterator[tuple[Any, str, dict]]:
  if not os.path.isdir(path):
    raise UserError(f"image folder '{path}' does not exist (the model embeds images); fix --input")
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      if os.path.splitext(name)[1].lower() in IMAGE_EXTS:
        rel = os.path.relpath(os.path.join(root, name), path)
        yield rel, os.path.join(root, name), {"path": rel}


def _embed_chunk(model, payloads: list[str], batch_size: int, bar) -> np.ndarray:
  if model.modality == "text":
    return model._embed_rows(model.tokenize(payloads), batch_size, "float32", None, bar)
  # File paths: the model reads and preprocesses them as it declares (resize, crop, mean / std).
  out = model.embed(list(payloads), batch_size=batch_size)
  bar.update(len(payloads))
  return out


def build(model_path: str, input_path: str, output: str, *, id_field: str = "id",
          text_field: str = "text", dtype: str = "float32", batch_size: int = 32,
          overwrite: bool = False, model=None, progress: bool = True) -> dict:
  """Embeds every record of `input_path` with the model and writes the index directory `output`
  (atomically: it appears complete or not at all). Returns its index.json."""
  from jembed.embed import check_options
  check_output(output, overwrite)
  if dtype not in STORE_DTYPES:
    raise UserError(f"dtype '{dtype}' is not supported for an index; use one of {', '.join(STORE_DTYPES)}")
  model = model if model is not None else _load_model(model_path)
  check_options(batch_size=batch_size, dtype="float32", dim=None, width=model.dim)
  meta = new_meta(model.dim, dtype, model.normalize, model, model_path, id_field, text_field)
  items = lambda: read_items(input_path, modality=model.modality, id_field=id_field,  # noqa: E731
                             text_field=text_field)
  n = check_ids(items(), set(), input_path)

  def fill(tmp: str) -> None:
    nonlocal meta
    meta = _append(tmp, meta, model, items(), n, batch_size, progress)

  fs.swap_dir(output, fill)
  return meta


def add(index_dir: str, input_path: str, *, model_path: str | None = None, id_field: str | None = None,
        text_field: str | None = None, batch_size: int = 32, model=None, progress: bool = True) -> dict:
  """Appends the records of `input_path` to an index, embedded with the index's model (the same
  fingerprint is required); ids already there are refused before anything is written."""
  meta = read_meta(index_dir)
  if model is None:
    model = _load_model(model_path or _model_path(meta, index_dir))
  _check_fingerprint(meta, model, index_dir)
  id_field = id_field or meta.get("id_field", "id")
  text_field = text_field or meta.get("text_field", "text")
  items = lambda: read_items(input_path, modality=model.modality, id_field=id_field,  # noqa: E731
                             text_field=text_field)
  n = check_ids(items(), set(read_ids(index_dir, meta)), input_path)
  return _append(index_dir, meta, model, items(), n, batch_size, progress)


def _append(directory: str, meta: dict, model, items: Iterator, n: int, batch_size: int,
            progress: bool) -> dict:
  from jembed.embed import Progress
  w = Writer(directory, meta)
  bar = Progress(n, progress)
  try:
    while True:
      chunk = [x for _, x in zip(range(CHUNK), items)]
      if not chunk:
        break
      vectors = _embed_chunk(model, [p for _, p, _ in chunk], batch_size, bar)
      w.append(vectors, [i for i, _, _ in chunk], [f for _, _, f in chunk])
    bar.close()
    return w.commit()
  finally:
    w.close()


def _load_model(path: str):
  from jembed.embed import load
  return load(path)


# ---------------------------------------------------------------------------------------------------
# Reading and searching
# ---------------------------------------------------------------------------------------------------
def _model_path(meta: dict, directory: str) -> str:
  m = meta.get("model")
  if not m:
    raise UserError(f"index '{directory}' was written from vectors without a model; query it with "
                    "vectors (or similar/recommend), not texts")
  if not m.get("path") or not os.path.isdir(m["path"]):
    raise UserError(f"the index's model '{m.get('path')}' is gone; pass --model with the model the "
                    "index was built with")
  return m["path"]


def _check_fingerprint(meta: dict, model, directory: str) -> None:
  want = (meta.get("model") or {}).get("fingerprint")
  if want is None:
    raise UserError(f"index '{directory}' was written from vectors without a model, so no model's "
                    "queries can be checked against it; query it with vectors")
  got = model_fingerprint(model)
  if got != want:
    raise UserError(f"model {getattr(model, 'source', '') or '(given)'} (fingerprint {got[:12]}) is not "
                    f"the model index '{directory}' was built with ({want[:12]}, "
                    f"{meta['model'].get('source') or meta['model'].get('path')}); query with that model "
                    "or rebuild the index")


class Index:
  """A loaded index: rows memory-mapped, then placed on the devices (sharded by rows) for search."""

  def __init__(self, directory: str, meta: dict, model=None, devices=None):
    from jembed import knn
    self.directory, self.meta = directory, meta
    self._model = model
    self.ids = read_ids(directory, meta)
    self.vectors = np.memmap(os.path.join(directory, vector_file(meta)), np.dtype(meta["dtype"]),
                             mode="r", shape=(meta["count"], meta["dim"]))
    self._offsets = np.memmap(os.path.join(directory, "fields.offsets"), "<i8", mode="r",
                              shape=(meta["count"],))
    self._fields_fd = os.open(os.path.join(directory, "fields.jsonl"), os.O_RDONLY)
    self._rows: dict | None = None
    self.searcher = knn.Searcher(self.vectors, devices=devices)

  @classmethod
  def load(cls, directory: str, model=None, *, devices=None) -> "Index":
    """The index in `directory`. `model` (an already loaded jembed model) embeds text queries; it
    must be the model the index was built with. Without one, the index's own model is loaded the
    first time a text query comes."""
    meta = read_meta(directory)
    if model is not None:
      _check_fingerprint(meta, model, directory)
    if meta["count"] < 1:
      raise UserError(f"index '{directory}' is empty; rebuild it")
    return cls(directory, meta, model, devices)

  def __len__(self) -> int:
    return int(self.meta["count"])

  @property
  def dim(self) -> int:
    return int(self.meta["dim"])

  @property
  def metric(self) -> str:
    return self.meta["metric"]

  @property
  def model_fingerprint(self) -> str | None:
    return (self.meta.get("model") or {}).get("fingerprint")

  @property
  def model(self):
    if self._model is None:
      model = _load_model(_model_path(self.meta, self.directory))
      _check_fingerprint(self.meta, model, self.directory)
      self._model = model
    return self._model

  def close(self) -> None:
    if self._fields_fd is not None:
      os.close(self._fields_fd)
      self._fields_fd = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown
      pass

  # -- queries --
  def query_vectors(self, queries, *, batch_size: int = 32) -> np.ndarray:
    """(Q, D) float32 query vectors: texts embedded with the index's model, or given vectors
    (normalised when the index's metric is cosine)."""
    if isinstance(queries, str):
      queries = [queries]
    if isinstance(queries, (list, tuple)) and queries and all(isinstance(q, str) for q in queries):
      if self.meta.get("model") and self.meta["model"].get("modality") == "image":
        raise UserError("this index holds image embeddings; query it with vectors or similar(ids)")
      if not self.meta.get("model"):
        _model_path(self.meta, self.directory)   # raises: no model to embed texts with
      return self.model.embed(list(queries), batch_size=batch_size)
    if isinstance(queries, (list, tuple)) and not queries:
      return np.zeros((0, self.dim), np.float32)
    vectors = np.asarray(queries, np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != self.dim:
      raise UserError(f"query vectors of shape {vectors.shape} do not fit the index (it holds "
                      f"{self.dim}-d vectors); give a (Q, {self.dim}) array or a list of texts")
    if self.metric == "cosine":
      vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors

  def search(self, queries, k: int = 10, *, recall_target: float | None = None,
             batch_size: int = 32) -> list[list[dict]]:
    """The k best hits of each query, best first: {"id", "score", **stored fields}."""
    _check_k(k)
    vectors = self.query_vectors(queries, batch_size=batch_size)
    if not len(vectors):
      return []
    scores, rows = self.searcher.search(vectors, k, recall_target=recall_target)
    return [self._hits(s, r) for s, r in zip(scores, rows)]

  def similar(self, ids: Sequence, k: int = 10, *, recall_target: float | None = None) -> list[list[dict]]:
    """For each id, the k items most like it, itself excluded."""
    _check_k(k)
    rows = self.rows_of(ids)
    if not rows:
      return []
    vectors = np.asarray(self.vectors[rows], np.float32)
    scores, found = self.searcher.search(vectors, k + 1, recall_target=recall_target)
    return [self._hits(s, r, {own}, k) for s, r, own in zip(scores, found, rows)]

  def recommend(self, history_ids: Sequence, k: int = 10, *, recall_target: float | None = None):
    """Items for a user from their history: the mean of the history's normalised vectors as the
    query, the history itself excluded. One history (a list of ids) gives one hit list; a list of
    histories gives one hit list each."""
    _check_k(k)
    batched = bool(history_ids) and all(isinstance(h, (list, tuple)) for h in history_ids)
    histories = list(history_ids) if batched else [history_ids]
    rows = []
    for h in histories:
      if not h:
        raise UserError("a history is empty; give at least one id to recommend from")
      rows.append(self.rows_of(h))
    pooled = np.stack([_unit(np.asarray(self.vectors[r], np.float32)).mean(0) for r in rows])
    if self.metric == "cosine":
      pooled = _unit(pooled)
    extra = max(len(set(r)) for r in rows)
    scores, found = self.searcher.search(pooled, k + extra, recall_target=recall_target)
    out = [self._hits(s, f, set(r), k) for s, f, r in zip(scores, found, rows)]
    return out if batched else out[0]

  def recall(self, queries, k: int = 10, *, recall_target: float = 0.95) -> float:
    """Measured recall@k of the approximate search (`recall_target`) against the exact one on
    `queries`: the fraction of the exact top-k the approximate top-k finds."""
    _check_k(k)
    vectors = self.query_vectors(queries)
    _, exact = self.searcher.search(vectors, k)
    _, approx = self.searcher.search(vectors, k, recall_target=recall_target)
    found = sum(len(set(a) & set(e)) for a, e in zip(approx, exact))
    return found / exact.size

  def rows_of(self, ids: Sequence) -> list[int]:
    if isinstance(ids, (str, int)):
      ids = [ids]
    if self._rows is None:
      self._rows = {ident: row for row, ident in enumerate(self.ids)}
    rows = []
    for ident in ids:
      row = self._rows.get(ident) if isinstance(ident, (str, int)) else None
      if row is None:
        raise UserError(f"id {ident!r} is not in the index '{self.directory}'; give ids it holds")
      rows.append(row)
    return rows

  def fields(self, row: int) -> dict:
    start = int(self._offsets[row])
    end = int(self._offsets[row + 1]) if row + 1 < len(self) else self.meta["bytes"]["fields"]
    return json.loads(os.pread(self._fields_fd, end - start, start))

  def _hits(self, scores, rows, exclude: set | None = None, k: int | None = None) -> list[dict]:
    hits = []
    for s, r in zip(scores, rows):
      r = int(r)
      if r < 0 or (exclude and r in exclude):
        continue
      hits.append({"id": self.ids[r], "score": float(s), **self.fields(r)})
      if k is not None and len(hits) == k:
        break
    return hits


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _check_k(k) -> None:
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
    raise UserError(f"k={k!r} must be a positive integer")


def read_queries(path: str, id_field: str = "id", text_field: str = "text") -> list[tuple[Any, str]]:
  """(id, text) of each query: a .jsonl object (the id optional: the line number then) or a .txt
  line (its line number the id)."""
  if not os.path.isfile(path):
    raise UserError(f"queries file '{path}' does not exist; fix --queries")
  ext = os.path.splitext(path)[1].lower()
  out = []
  if ext == ".txt":
    with builtins.open(path, encoding="utf-8") as f:
      out = [(i, line.rstrip("\n")) for i, line in enumerate(f, 1)]
  elif ext == ".jsonl":
    for i, obj in inputs.json_lines(path):
      if not isinstance(obj, dict) or text_field not in obj:
        raise UserError(f"{path}:{i} has no field '{text_field}'; each line must be "
                        f"{{\"{id_field}\": ..., \"{text_field}\": ...}} (or pass --text-field)")
      out.append((obj.get(id_field, i), str(obj[text_field])))
  else:
    raise UserError(f"queries '{path}' is not .jsonl or .txt; use one of those")
  if not out:
    raise UserError(f"queries file '{path}' holds no queries; give a non-empty file")
  return out


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
def _run(args) -> str:
  t0 = time.perf_counter()
  if args.command == "build":
    meta = build(args.model, args.input, args.output, id_field=args.id_field, text_field=args.text_field,
                 dtype=args.dtype, batch_size=args.batch_size, overwrite=args.overwrite)
    return (f"{meta['count']} records -> {args.output} ({meta['dim']} dims, {meta['dtype']}, "
            f"{meta['metric']}, {time.perf_counter() - t0:.1f}s)")
  if args.command == "add":
    before = read_meta(args.index)["count"]
    meta = add(args.index, args.input, model_path=args.model, id_field=args.id_field,
               text_field=args.text_field, batch_size=args.batch_size)
    return f"{meta['count'] - before} records added to {args.index} ({meta['count']} in all)"
  return _search_cli(args, t0)


def _search_cli(args, t0: float) -> str:
  _check_k(args.k)
  if (args.query is None) == (args.queries is None):
    raise UserError("give exactly one of --query TEXT and --queries FILE")
  meta = read_meta(args.index)
  queries = ([(None, args.query)] if args.query is not None
             else read_queries(args.queries, args.id_field, args.text_field))
  index = Index.load(args.index, _load_model(args.model) if args.model else None)
  vectors = index.query_vectors([t for _, t in queries], batch_size=args.batch_size)
  hits = index.search(vectors, args.k, recall_target=args.recall_target)
  lines = "".join(json.dumps({"id": qid, "hits": h}, ensure_ascii=False, default=str) + "\n"
                  for (qid, _), h in zip(queries, hits))
  note = ""
  if args.recall_target is not None:
    sample = vectors[:1000]
    note = (f"; recall@{args.k} vs exact {index.recall(sample, args.k, recall_target=args.recall_target):.4f}"
            f" on {len(sample)} queries (target {args.recall_target})")
  summary = (f"{len(queries)} queries, k={args.k}, over {len(index)} {meta['metric']} rows "
             f"({time.perf_counter() - t0:.1f}s){note}")
  if args.output:
    fs.write_text(args.output, lines)
    return f"{summary} -> {args.output}"
  sys.stdout.write(lines)
  print(summary, file=sys.stderr)
  return ""


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jembed.index", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  b = sub.add_parser("build", help="embed a file (or image folder) into a new index directory")
  b.add_argument("--model", required=True, help="jembed workdir or export, or a Hugging Face dir")
  b.add_argument("--input", required=True, help=".jsonl, .txt (line number = id), .parquet, or an image folder")
  b.add_argument("--output", required=True, help="the index directory to create")
  b.add_argument("--dtype", default="float32", choices=STORE_DTYPES, help="how the vectors are stored")
  b.add_argument("--overwrite", action="store_true", help="replace an existing index at --output")
  a = sub.add_parser("add", help="append records to an index (same model)")
  a.add_argument("--index", required=True, help="the index directory")
  a.add_argument("--input", required=True, help="records to append (as for build)")
  a.add_argument("--model", default=None, help="default: the model the index was built with")
  s = sub.add_parser("search", help="the k best hits of each query")
  s.add_argument("--index", required=True, help="the index directory")
  s.add_argument("--query", default=None, help="one query text")
  s.add_argument("--queries", default=None, help=".jsonl ({\"id\", \"text\"}) or .txt, a query a line")
  s.add_argument("--k", type=int, default=10, help="hits per query")
  s.add_argument("--output", default=None, help="JSONL of hits (default: stdout)")
  s.add_argument("--model", default=None, help="default: the model the index was built with")
  s.add_argument("--recall-target", type=float, default=None,
                 help="approximate top-k (jax.lax.approx_max_k, fast on TPU) with this expected "
                      "recall; the measured recall is reported")
  for q in (b, a, s):
    q.add_argument("--id-field", default=None if q is a else "id", help="the field holding the id")
    q.add_argument("--text-field", default=None if q is a else "text", help="the field holding the text")
    q.add_argument("--batch-size", type=int, default=32, help="texts embedded together")
  return run_cli(p, _run)(argv)


if __name__ == "__main__":
  sys.exit(main())
