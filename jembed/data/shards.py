"""The on-disk format of prepared text (jembed.data.prepare and its pairs and labelled-text kinds):
shard names, row encoding, the shard writers, prepared.json, and the checks every prepare makes
before it reads any data. Training reads the same format back through jembed.data.streaming."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Iterator

import numpy as np

from jembed import fs
from jembed.data import wordpiece
from jembed.errors import UserError

FORMAT_VERSION = 1
PREPARED_FILE = "prepared.json"
TOKENIZER_FILE = "tokenizer.json"
EVAL_FILE = "eval.array_record"
# Documents tokenized per call (encode_batch runs them in parallel; bounded memory).
CHUNK_DOCS = 2048
# One record per group: what grain needs for fast random access (it logs an error otherwise).
WRITER_OPTIONS = "group_size:1"


def shard_name(index: int, count: int) -> str:
  return f"train-{index:05d}-of-{count:05d}.array_record"


def encode_row(row: np.ndarray) -> bytes:
  return np.asarray(row, "<i4").tobytes()


def decode_row(record: bytes) -> np.ndarray:
  return np.frombuffer(record, "<i4").astype(np.int32)


def _allow_open_files(needed: int) -> None:
  """Every shard is open while rows are dealt to them: raise the soft open-file limit as far as the
  hard one allows, and refuse a shard count beyond it."""
  import resource
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  if soft != resource.RLIM_INFINITY and soft < needed:
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
      resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
      soft = target
    except (ValueError, OSError):
      pass
  if soft != resource.RLIM_INFINITY and soft < needed:
    raise UserError(f"--shards={needed - 64} needs {needed} open files but the limit is {soft}; use "
                    "fewer shards (a few per host is enough) or raise `ulimit -n`")


class Shards:
  """Rows dealt round-robin into `count` ArrayRecord shards in `directory` (row j in shard j % count),
  written as they come; `close` ends every file, `entries` lists them for prepared.json."""

  def __init__(self, directory: str, count: int, unit: str = "rows"):
    from array_record.python import array_record_module
    self.names = [shard_name(i, count) for i in range(count)]
    self.writers = [array_record_module.ArrayRecordWriter(os.path.join(directory, n), WRITER_OPTIONS)
                    for n in self.names]
    self.rows = [0] * count
    self.written = 0
    self.unit = unit

  def write(self, rows: np.ndarray) -> None:
    for row in rows:
      j = self.written % len(self.writers)
      self.writers[j].write(encode_row(row))
      self.rows[j] += 1
      self.written += 1

  def close(self) -> None:
    for w in self.writers:
      w.close()

  def check_filled(self) -> None:
    """Refuses a training split with fewer rows than shards (a shard would be empty)."""
    if self.written < len(self.writers):
      raise UserError(f"the training split gives {self.written} {self.unit}, fewer than "
                      f"--shards={len(self.writers)}; add data or use fewer shards")

  def entries(self) -> list[dict]:
    return [dict(file=n, rows=r) for n, r in zip(self.names, self.rows)]


def write_rows(path: str, rows: Iterator[np.ndarray]) -> int:
  """Writes every row of the row blocks `rows` into one ArrayRecord file (a held-out split); returns
  how many."""
  from array_record.python import array_record_module
  writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
  count = 0
  try:
    for block in rows:
      for row in block:
        writer.write(encode_row(row))
        count += 1
  finally:
    writer.close()
  return count


def write_metadata(directory: str, tokenizer, rows: Shards, eval_file: str, eval_rows: int,
                   seq_len: int, skipped: int, **fields: Any) -> dict[str, Any]:
  """Writes prepared.json (what training checks and reads) last, once everything else is in
  `directory`, and returns it: the fields every kind has, then the kind's own `fields`."""
  with open(os.path.join(directory, TOKENIZER_FILE), "rb") as f:
    tok_sha = hashlib.sha256(f.read()).hexdigest()
  meta = dict(format_version=FORMAT_VERSION, seq_len=seq_len, dtype="int32",
              shards=rows.entries(), train_rows=rows.written,
              eval=dict(file=eval_file, rows=eval_rows), tokenizer=TOKENIZER_FILE,
              tokenizer_sha256=tok_sha, special_ids=wordpiece.special_ids(tokenizer),
              vocab_size=tokenizer.get_vocab_size(), skipped_records=skipped, **fields)
  with open(os.path.join(directory, PREPARED_FILE), "w") as f:
    json.dump(meta, f, indent=2)
  return meta


def write_directory(out: str, build: Callable[[str], None]) -> None:
  """Builds `out` through `build(tmp)` beside it and swaps it in: complete or absent, with a full disk
  or an unwritable path as one line."""
  try:
    fs.swap_dir(out, build)   # the temporary directory is removed on any failure
  except RuntimeError as e:  # ArrayRecord's writer reports a full disk or an unwritable path so
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise UserError(f"cannot write {out} ({first}); free disk space or choose another --out "
                    "(nothing was written)") from None


def task_tokenizer(config, texts: Callable[[], Iterator[str]], log):
  """The tokenizer a text task would use, for rows prepared ahead of training: data.tokenizer, else
  the warm-start source's (config.init), else a WordPiece one trained on `texts()` (the word counts
  are the one thing that grows, with the number of distinct words)."""
  d = config.data
  path = str(d.tokenizer or "")
  if path:
    return wordpiece.build_tokenizer((), int(d.vocab_size), path=path)
  from jembed import init as init_lib
  source = init_lib.source_from_config(config)
  if source is not None and source.tokenizer is not None:
    from jembed.data import encode
    return encode.plain(source.tokenizer)
  log("jembed.prepare: counting words to train the tokenizer")
  return wordpiece.tokenizer_from_word_counts(wordpiece.word_counts(texts()), int(d.vocab_size))


def chunks(docs: Iterator[str], size: int = CHUNK_DOCS) -> Iterator[list[str]]:
  chunk = []
  for doc in docs:
    chunk.append(doc)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


# ---------------------------------------------------------------------------------------------------
# The checks every prepare makes first
# ---------------------------------------------------------------------------------------------------
def check_output(out: str, *, shards: int, overwrite: bool, seq_len: int) -> tuple[str, int]:
  """(absolute output directory, seq_len), after the checks every prepare makes before reading any
  data: the shard count (and that many files may be open), a local and empty (or --overwrite)
  output directory, and room for [CLS], a token and [SEP]."""
  if shards < 1:
    raise UserError(f"--shards={shards} must be at least 1")
  _allow_open_files(shards + 64)
  if not fs.is_local(out):
    raise UserError(f"--out={out} is not a local path; prepare locally, then copy the directory")
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
    raise UserError(f"--out={out} exists and is not empty; choose a new directory or pass "
                    "--overwrite to replace it")
  if seq_len < 3:
    raise UserError(f"data.seq_len={seq_len} is too short; need room for [CLS], a token and [SEP]")
  return out, seq_len


# ---------------------------------------------------------------------------------------------------
# Reading back (training side)
# ---------------------------------------------------------------------------------------------------
def read_metadata(directory: str) -> dict[str, Any]:
  """prepared.json of a prepared directory, checked (one-line UserError when it is not one)."""
  path = fs.join(fs.absolute(directory), PREPARED_FILE)
  if not fs.is_file(path):
    raise UserError(f"data.prepared={directory} has no {PREPARED_FILE}; make it with "
                    "`python -m jembed.data.prepare --config ... --out DIR`")
  try:
    meta = json.loads(fs.read_text(path))
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path} ({e}); run jembed.data.prepare again") from None
  if meta.get("format_version") != FORMAT_VERSION:
    raise UserError(f"{path} has format version {meta.get('format_version')}, this jembed reads "
                    f"{FORMAT_VERSION}; run jembed.data.prepare again")
  return meta
