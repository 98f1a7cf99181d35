"""Tokenizes and packs a text corpus once, into ArrayRecord shards that training streams from disk.
The same command prepares contrastive pairs (jembed/data/prepare_pairs.py) and labelled text for
classification (jembed/data/prepare_labeled.py): the config's task says which.

  python -m jembed.data.prepare --config configs/mlm.py --out DIR [--shards 8] [--overwrite] \
      [--config.data.train='corpus/*.jsonl' --config.data.seq_len=128 ...]

Reads the config's text source (data.source / train / eval / eval_fraction / tfds_*, read the way
training reads it), uses data.tokenizer or trains the same WordPiece tokenizer training would, and
packs rows of data.seq_len exactly as `packing.pack_documents` does. Files are read line by line and
rows written as they are made, so memory stays bounded whatever the corpus size (the word counts
for training a tokenizer are the one thing that grows, with the number of distinct words).

DIR then holds train-00000-of-000NN.array_record ... (row j in shard j % NN: shard sizes differ by
at most one row), eval.array_record (the held-out split), tokenizer.json and prepared.json (what
training checks and reads). Train on it with --config.data.prepared=DIR. DIR is built under a
temporary name and renamed into place: it is complete or absent.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Callable, Iterator

import numpy as np

from jembed import fs
from jembed.data import pipeline
from jembed.data import documents, packing, sources, wordpiece
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


def _filtered(stream: Callable[[], Iterator[str]], keep: Callable[[str], bool]):
  return lambda: (d for d in stream() if keep(d))


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
# prepare
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


def prepare(config, out: str, *, shards: int = 8, overwrite: bool = False,
            log: Callable[[str], None] = print) -> dict[str, Any]:
  """Writes the prepared data of `config.data` into `out`; returns its prepared.json contents. The
  config's task says what is prepared: an MLM corpus (packed rows, here), contrastive pairs
  (jembed.data.prepare_pairs) or labelled text for classification (jembed.data.prepare_labeled)."""
  task = config.task
  if task == "contrastive_text":
    from jembed.data import prepare_pairs
    return prepare_pairs.prepare_pairs(config, out, shards=shards, overwrite=overwrite, log=log)
  if task == "classification" and config.data.modality == "text":
    from jembed.data import prepare_labeled
    return prepare_labeled.prepare_labeled(config, out, shards=shards, overwrite=overwrite, log=log)
  if task != "mlm":
    raise UserError(f"jembed.data.prepare prepares text for the mlm, contrastive_text and text "
                    f"classification tasks, not {task!r}{' (images)' if task == 'classification' else ''}"
                    "; train on this config's data directly")
  d = config.data
  out, seq_len = check_output(out, shards=shards, overwrite=overwrite, seq_len=int(d.seq_len))
  pipeline.reset_bad_records()
  train_stream, eval_stream, description = documents.document_streams(d)
  eval_fraction = float(d.get("eval_fraction", 0.05))
  carved = eval_stream is None   # eval carved from the train files: one more pass over them
  if carved:
    held = sources.held_out_rule(train_stream, eval_fraction)
    eval_stream = _filtered(train_stream, held)
    train_stream = _filtered(train_stream, lambda doc: not held(doc))
    description["eval_fraction"] = eval_fraction

  tokenizer_path = str(d.get("tokenizer", "") or "")
  if tokenizer_path:
    tok = wordpiece.build_tokenizer((), int(d.vocab_size), path=tokenizer_path)
  else:
    log("jembed.prepare: counting words to train the tokenizer")
    tok = wordpiece.tokenizer_from_word_counts(wordpiece.word_counts(train_stream()), int(d.vocab_size))
  ids = wordpiece.special_ids(tok)
  vocab = tok.get_vocab_size()
  pipeline.reset_bad_records()  # the passes above read the same records: count them once, below

  def build(tmp: str) -> None:
    nonlocal meta
    tok.save(os.path.join(tmp, TOKENIZER_FILE))
    counts = np.zeros(vocab, np.int64)
    shards_out, packer = Shards(tmp, shards, f"rows of seq_len={seq_len}"), packing.Packer(tok, seq_len)

    def write(rows: np.ndarray) -> None:
      shards_out.write(rows)
      counts[:] += np.bincount(rows.ravel(), minlength=vocab)

    try:
      for chunk in chunks(train_stream()):
        write(packer.add(chunk))
        log(f"jembed.prepare: {shards_out.written} rows")
      write(packer.finish())
    finally:
      shards_out.close()
    shards_out.check_filled()
    bad = pipeline.bad_records()   # the train pass read every record of the train files once
    eval_packer = packing.Packer(tok, seq_len)

    def eval_blocks():
      yield from map(eval_packer.add, chunks(eval_stream()))
      yield eval_packer.finish()   # the short last row
    eval_rows = write_rows(os.path.join(tmp, EVAL_FILE), eval_blocks())
    if eval_rows == 0:
      raise UserError("the held-out split is empty; give data.eval or raise data.eval_fraction")
    for i in ids.values():
      counts[i] = 0  # as packing.token_frequencies: the baseline never predicts a special token
    if not carved:
      bad = pipeline.bad_records()   # plus those of the eval files
    meta = write_metadata(tmp, tok, shards_out, EVAL_FILE, eval_rows, seq_len, bad["skipped"],
                          most_frequent=int(np.argmax(counts)), source=description)

  meta: dict[str, Any] = {}
  write_directory(out, build)
  log(f"jembed.prepare: wrote {meta['train_rows']} train rows in {shards} shards and "
      f"{meta['eval']['rows']} eval rows of seq_len={seq_len} to {out}")
  return meta


# ---------------------------------------------------------------------------------------------------
# Reading back (training side)
# ---------------------------------------------------------------------------------------------------
def read_metadata(directory: str) -> dict[str, Any]:
  """prepared.json of a prepared directory, checked (one-line UserError when it is not one)."""
  path = os.path.join(os.path.expanduser(directory), PREPARED_FILE)
  if not os.path.isfile(path):
    raise UserError(f"data.prepared={directory} has no {PREPARED_FILE}; make it with "
                    "`python -m jembed.data.prepare --config ... --out DIR`")
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path} ({e}); run jembed.data.prepare again") from None
  if meta.get("format_version") != FORMAT_VERSION:
    raise UserError(f"{path} has format version {meta.get('format_version')}, this jembed reads "
                    f"{FORMAT_VERSION}; run jembed.data.prepare again")
  return meta


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
def run() -> None:
  from absl import app, flags
  from jembed import main as main_lib  # its --config flag and one-line flag/config errors
  out = flags.DEFINE_string("out", None, "Directory to write (must not exist or be empty).")
  n_shards = flags.DEFINE_integer("shards", 8, "Training shards to write; a multiple of the "
                                  "data.streams training will use.")
  overwrite = flags.DEFINE_boolean("overwrite", False, "Replace an existing --out.")

  def action(argv) -> None:
    if len(argv) > 1:
      main_lib._fail(f"unexpected arguments: {' '.join(argv[1:])}")  # pylint: disable=protected-access
    for name in ("workdir", "compile_cache", "distributed"):
      if flags.FLAGS[name].present:
        main_lib._fail(f"--{name} is a flag of jembed.main; prepare takes --config, --out, "  # pylint: disable=protected-access
                       "--shards and --overwrite")
    config = main_lib._load_config()  # pylint: disable=protected-access
    if config is None:
      main_lib._fail("no config given; pass --config configs/mlm.py")  # pylint: disable=protected-access
    if not out.value:
      main_lib._fail("no --out given; pass --out DIR (the prepared corpus goes there)")  # pylint: disable=protected-access
    try:
      prepare(config, out.value, shards=n_shards.value, overwrite=overwrite.value,
              log=lambda line: print(line, flush=True))
    except UserError as e:
      main_lib._fail(str(e))  # pylint: disable=protected-access

  app.run(action, flags_parser=main_lib._parse_flags)  # pylint: disable=protected-access


if __name__ == "__main__":
  sys.exit(run())
