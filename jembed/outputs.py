"""Where `python -m jembed.embed` puts vectors: .npy (memory-mapped, with OUTPUT.ids.txt or
OUTPUT.paths.txt beside it), .jsonl (one {"id" | "path", "embedding"} object a line) or .parquet
(the same two columns; needs pyarrow). Rows are written a chunk at a time into a temporary file that
replaces OUTPUT only when complete (jembed.fs.write_with; gs:// is uploaded at the end), so an
interrupted or failed run leaves nothing half written.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from jembed import fs
from jembed.errors import UserError

FORMATS = (".npy", ".jsonl", ".parquet")


def format_of(path: str) -> str:
  """The output format `path` names; refuses others (and .parquet without pyarrow) before any work."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in FORMATS:
    raise UserError(f"--output '{path}' must end in {', '.join(FORMATS)}")
  if ext == ".parquet":
    try:
      import pyarrow  # noqa: F401
      import pyarrow.parquet  # noqa: F401
    except ImportError:
      raise UserError("writing .parquet needs pyarrow (pip install pyarrow); or write .npy or "
                      ".jsonl") from None
  return ext


def write_vectors(path: str, n: int, width: int, key: str,
                  chunks: Callable[[], Iterator[tuple[Sequence[str], np.ndarray]]]) -> None:
  """Writes `n` rows of `width` float32s that `chunks()` yields as (names, vectors) pairs, in order.
  `key` ("id" or "path") names the column of the names; names that are all empty are left out."""
  ext = format_of(path)
  names: list[str] = []

  def write(tmp: str) -> None:
    lo = 0
    if ext == ".npy":
      out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, width))
      for chunk_names, vectors in chunks():
        out[lo:lo + len(vectors)] = vectors
        names.extend(chunk_names)
        lo += len(vectors)
      out.flush()
      del out
    elif ext == ".jsonl":
      with open(tmp, "w", encoding="utf-8") as f:
        for chunk_names, vectors in chunks():
          for name, vec in zip(chunk_names, vectors):
            row = {key: name} if name else {}
            row["embedding"] = [float(x) for x in vec]
            f.write(json.dumps(row) + "\n")
          lo += len(vectors)
    else:
      import pyarrow as pa
      import pyarrow.parquet as pq
      schema = pa.schema([(key, pa.string()), ("embedding", pa.list_(pa.float32(), width))])
      with pq.ParquetWriter(tmp, schema) as w:
        for chunk_names, vectors in chunks():
          flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1), pa.float32())
          w.write_table(pa.table({key: pa.array([str(s) for s in chunk_names], pa.string()),
                                  "embedding": pa.FixedSizeListArray.from_arrays(flat, width)},
                                 schema=schema))
          lo += len(vectors)
    if lo != n:
      raise UserError(f"the input changed while it was read ({lo} rows, {n} counted); run again")

  fs.write_with(path, write)
  if ext == ".npy" and any(names):
    fs.write_text(sidecar(path, key), "\n".join(names) + "\n")


def sidecar(path: str, key: str) -> str:
  """OUTPUT.ids.txt / OUTPUT.paths.txt: the names of a .npy's rows, one a line."""
  return path[:-len(".npy")] + f".{key}s.txt"
