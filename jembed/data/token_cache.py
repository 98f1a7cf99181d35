"""A cache of packed token rows for text read from files, so a restarted run does not read and
tokenize its corpus again.

Where: data.cache_dir ('' = WORKDIR/cache; 'none' turns the cache off); local or gs:// alike
(jembed.fs). An entry is tokens-<corpus>-<key>.npz: <corpus> names the input files (their paths),
<key> hashes everything the rows depend on: the tokenizer's JSON, seq_len, the eval settings and
each input file's path, size and modification time (ns). A changed file or tokenizer is a new key,
so a miss; the entry it replaces (same corpus, other key) is deleted when the new one is written.
Only the writer process (process 0) writes, atomically, once every check of the run has passed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import numpy as np

from jembed import fs

OFF = "none"


def cache_root(data_config: Any, workdir: str) -> str | None:
  """The cache directory for `data_config`, or None when data.cache_dir='none'."""
  where = str(data_config.get("cache_dir", "") or "")
  if where.strip().lower() == OFF:
    return None
  return where or fs.join(workdir, "cache")


def _file_stat(path: str) -> list:
  st = os.stat(path)
  return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


class TokenCache:
  """The cache entry of one corpus (its files) under `root`."""

  def __init__(self, root: str, train_files: list[str], eval_files: list[str], data_config: Any):
    self.root = root
    self.files = {"train": [os.path.abspath(p) for p in train_files],
                  "eval": [os.path.abspath(p) for p in eval_files]}
    self.corpus = hashlib.sha256(json.dumps(self.files).encode()).hexdigest()[:16]
    self.settings = dict(seq_len=int(data_config.seq_len),
                         eval_fraction=float(data_config.get("eval_fraction", 0.05)),
                         on_bad_record=str(data_config.get("on_bad_record", "error") or "error"))
    # Stat once, before reading: a file changed while it is read makes a key that no later run
    # matches, so the rows are tokenized again rather than trusted.
    self.stats = {k: [_file_stat(p) for p in v] for k, v in self.files.items()}

  def key(self, tokenizer) -> str:
    blob = json.dumps(dict(settings=self.settings, stats=self.stats,
                           tokenizer=hashlib.sha256(tokenizer.to_str().encode()).hexdigest()),
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]

  def path(self, tokenizer) -> str:
    return fs.join(self.root, f"tokens-{self.corpus}-{self.key(tokenizer)}.npz")

  def load(self, tokenizer) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(train rows, eval rows, the bad-record summary of the read that made them) of a valid
    entry, or None (a miss; an unreadable entry is one)."""
    path = self.path(tokenizer)
    if not fs.exists(path):
      return None
    try:
      with np.load(io.BytesIO(fs.read_bytes(path))) as z:
        return z["train"], z["eval"], json.loads(str(z["bad_records"]))
    except (OSError, ValueError, KeyError):
      return None

  def save(self, tokenizer, train: np.ndarray, held: np.ndarray, bad_records: dict) -> str:
    """Writes the entry (writer process only) and deletes this corpus's stale entries."""
    path = self.path(tokenizer)
    if not fs.is_writer():
      return path
    buf = io.BytesIO()
    np.savez(buf, train=train, eval=held, bad_records=np.asarray(json.dumps(bad_records)))
    fs.write_bytes(path, buf.getvalue())
    name = os.path.basename(path)
    for old in fs.path(self.root).glob(f"tokens-{self.corpus}-*.npz"):
      if old.name != name:
        old.unlink()
    return path
