"""The on-disk format of a vector index (see jembed/index.py for building and searching one): its
index.json, the append-only files it counts, the writer that appends and commits them, and `write`,
an index of given vectors with no model (what a two-tower's item vectors become, jembed.recommend).
"""
from __future__ import annotations

import builtins
import fcntl
import hashlib
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np
from flax import nnx

from jembed import fs, tree
from jembed.errors import UserError

INDEX_FILE = "index.json"
FORMAT = "jembed-index/1"
STORE_DTYPES = ("float32", "float16")
CHUNK = 8192          # records read, embedded and appended together (bounded memory)


# ---------------------------------------------------------------------------------------------------
# The model's fingerprint
# ---------------------------------------------------------------------------------------------------
def model_fingerprint(model) -> str:
  """A short, stable hash of what decides a model's vector space: its parameters' names, shapes and
  an evenly spaced sample of their values (at most 1,024 per array, so cheap for any size), its
  pooling and normalisation, its tokenizer's vocabulary size. The same weights loaded from a workdir
  or an export agree; a retrained or different model does not."""
  h = hashlib.sha256()
  desc: dict[str, Any] = {"modality": model.modality, "dim": int(model.dim),
                          "normalize": bool(model.normalize)}
  if model.modality == "text":
    params = model._params
    desc.update(pooling=model.pooling, lowercase=bool(model.lowercase),
                vocab=int(model.tokenizer.get_vocab_size()))
  else:
    params = nnx.to_pure_dict(model._backbone[1])
    desc.update(image_shape=list(model.image_shape))
  h.update(json.dumps(desc, sort_keys=True).encode())
  for name, leaf in sorted(tree.flatten(params).items()):
    arr = np.asarray(leaf)
    flat = arr.reshape(-1)
    pick = flat[np.linspace(0, flat.size - 1, min(flat.size, 1024)).astype(np.int64)] if flat.size else flat
    h.update(f"{name}:{arr.shape}".encode())
    h.update(np.asarray(pick, np.float32).astype("<f4").tobytes())
  return h.hexdigest()[:32]


def check_ids(items: Iterable[tuple[Any, str, dict]], taken: set, where: str) -> int:
  """A first pass over the input (before anything is embedded or written): every id a string or an
  integer, none repeated and none already in the index. Returns the record count."""
  n, seen = 0, set()
  for ident, _, _ in items:
    n += 1
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
      raise UserError(f"record {n} of {where} has id {ident!r}; ids must be strings or integers")
    if ident in taken:
      raise UserError(f"id {ident!r} (record {n} of {where}) is already in the index; ids must be "
                      "unique: drop or rename the duplicate")
    if ident in seen:
      raise UserError(f"id {ident!r} appears twice in {where} (again at record {n}); ids must be "
                      "unique: drop or rename the duplicate")
    seen.add(ident)
  if n == 0:
    raise UserError(f"input '{where}' holds no records; give a non-empty file")
  return n


# ---------------------------------------------------------------------------------------------------
# Writing: append-only files, committed by index.json
# ---------------------------------------------------------------------------------------------------
def vector_file(meta: dict) -> str:
  return "vectors.f32" if meta["dtype"] == "float32" else "vectors.f16"


class Writer:
  """Appends rows to an index directory; `commit` publishes them by rewriting index.json."""

  def __init__(self, directory: str, meta: dict):
    self.directory, self.meta = directory, dict(meta)
    itemsize = np.dtype(meta["dtype"]).itemsize
    self.committed = {
        vector_file(meta): meta["count"] * meta["dim"] * itemsize,
        "ids.jsonl": meta["bytes"]["ids"],
        "fields.jsonl": meta["bytes"]["fields"],
        "fields.offsets": meta["count"] * 8,
    }
    self.files = {}
    try:
      # One writer at a time: an advisory lock the OS drops when the process dies, so a crash never
      # leaves a stale lock behind.
      self.files[".lock"] = builtins.open(os.path.join(directory, ".lock"), "a+b")
      try:
        fcntl.flock(self.files[".lock"].fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        self.close()
        raise UserError(f"another process is adding to index '{directory}'; wait for it to finish "
                        "and run this again") from None
      if os.path.exists(os.path.join(directory, INDEX_FILE)) and read_meta(directory) != meta:
        self.close()   # an add committed after `meta` was read: its ids were not checked against
        raise UserError(f"index '{directory}' changed while this add was reading its input; run "
                        "it again")
      for name, size in self.committed.items():
        f = builtins.open(os.path.join(directory, name), "a+b")
        f.truncate(size)   # bytes an interrupted add left past the committed end
        f.seek(size)
        self.files[name] = f
    except OSError as e:
      self.close()
      raise fs.write_error(directory, e) from None
    self.count, self.fields_end = meta["count"], meta["bytes"]["fields"]

  def append(self, vectors: np.ndarray, ids: list, fields: list[dict]) -> None:
    dtype = "<f4" if self.meta["dtype"] == "float32" else "<f2"
    try:
      self.files[vector_file(self.meta)].write(np.ascontiguousarray(vectors, dtype).tobytes())
      self.files["ids.jsonl"].write("".join(json.dumps(i) + "\n" for i in ids).encode())
      lines = [(json.dumps(f, ensure_ascii=False, default=str) + "\n").encode() for f in fields]
      offsets = self.fields_end + np.cumsum([0] + [len(b) for b in lines[:-1]], dtype=np.int64)
      self.files["fields.offsets"].write(offsets.astype("<i8").tobytes())
      self.files["fields.jsonl"].write(b"".join(lines))
    except OSError as e:
      raise fs.write_error(self.directory, e) from None
    self.fields_end += sum(len(b) for b in lines)
    self.count += len(ids)

  def commit(self) -> dict:
    try:
      for f in self.files.values():
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
      raise fs.write_error(self.directory, e) from None
    self.meta["count"] = self.count
    self.meta["bytes"] = {"ids": self.files["ids.jsonl"].tell(), "fields": self.fields_end}
    fs.write_json(os.path.join(self.directory, INDEX_FILE), self.meta)
    self.committed = None
    return self.meta

  def close(self) -> None:
    for name, f in self.files.items():
      if self.committed is not None and name in self.committed:   # not committed: cut back
        try:
          f.truncate(self.committed[name])
        except OSError:
          pass
      f.close()
    self.files = {}


def new_meta(dim: int, dtype: str, normalized: bool, model=None, model_path: str | None = None,
              id_field: str = "id", text_field: str = "text") -> dict:
  if dtype not in STORE_DTYPES:
    raise UserError(f"dtype '{dtype}' is not supported for an index; use one of {', '.join(STORE_DTYPES)}")
  return {
      "format": FORMAT, "count": 0, "dim": int(dim), "dtype": dtype,
      "normalized": bool(normalized), "metric": "cosine" if normalized else "dot",
      "model": None if model is None else {
          "path": os.path.abspath(model_path) if model_path else None,
          "source": getattr(model, "source", ""), "modality": model.modality,
          "fingerprint": model_fingerprint(model)},
      "id_field": id_field, "text_field": text_field,
      "bytes": {"ids": 0, "fields": 0},
  }


def check_output(output: str, overwrite: bool) -> None:
  if not fs.is_local(output):
    raise UserError(f"index '{output}' must be on a local disk (its vectors are memory-mapped); "
                    "build it locally and copy the directory")
  if os.path.exists(output) and not overwrite and (not os.path.isdir(output) or os.listdir(output)):
    raise UserError(f"'{output}' already exists; use `add` to append to an index, or --overwrite to "
                    "rebuild it")


def write(output: str, vectors: np.ndarray, ids: Sequence | None = None,
          fields: Sequence[dict] | None = None, *, normalized: bool = False, dtype: str = "float32",
          overwrite: bool = False) -> str:
  """An index of given vectors, with no model (queries are then vectors): for vectors made
  elsewhere, and for benchmarks. `ids` default to row numbers; `normalized` makes the metric cosine."""
  vectors = np.asarray(vectors)
  if vectors.ndim != 2 or len(vectors) == 0:
    raise UserError(f"vectors of shape {vectors.shape} cannot be indexed; give a non-empty (N, D) array")
  ids = list(range(len(vectors))) if ids is None else list(ids)
  fields = [{} for _ in ids] if fields is None else list(fields)
  if len(ids) != len(vectors) or len(fields) != len(vectors):
    raise UserError(f"{len(vectors)} vectors but {len(ids)} ids and {len(fields)} field records; "
                    "give one of each per vector")
  check_ids(((i, "", {}) for i in ids), set(), "the ids")
  check_output(output, overwrite)
  meta = new_meta(vectors.shape[1], dtype, normalized)

  def fill(tmp: str) -> None:
    w = Writer(tmp, meta)
    try:
      for lo in range(0, len(vectors), CHUNK * 8):
        hi = lo + CHUNK * 8
        w.append(np.asarray(vectors[lo:hi], np.float32), ids[lo:hi], fields[lo:hi])
      w.commit()
    finally:
      w.close()

  fs.swap_dir(output, fill)
  return output


def read_meta(directory: str) -> dict:
  path = os.path.join(directory, INDEX_FILE)
  if not os.path.isfile(path):
    raise UserError(f"'{directory}' is not an index (it has no {INDEX_FILE}); build one with "
                    "`python -m jembed.index build`")
  try:
    meta = json.loads(fs.read_text(path))
  except (OSError, ValueError) as e:
    raise UserError(f"{path} cannot be read ({type(e).__name__}); rebuild the index") from None
  if meta.get("format") != FORMAT:
    raise UserError(f"{path} is format {meta.get('format')!r}, not {FORMAT}; rebuild the index")
  return meta


def read_ids(directory: str, meta: dict) -> list:
  with builtins.open(os.path.join(directory, "ids.jsonl"), "rb") as f:
    data = f.read(meta["bytes"]["ids"])
  # One parse of all lines as a JSON array: several times faster than a json.loads per id.
  return json.loads(b"[" + data.rstrip(b"\n").replace(b"\n", b",") + b"]") if data else []
