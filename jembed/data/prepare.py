"""Tokenizes and packs a text corpus once, into ArrayRecord shards that training streams from disk.

  python -m jembed.data.prepare --config configs/mlm.py --out DIR [--shards 8] [--overwrite] \
      [--config.data.train='corpus/*.jsonl' --config.data.seq_len=128 ...]

Reads the config's text source (data.source / train / eval / eval_fraction / tfds_*, read the way
training reads it), uses data.tokenizer or trains the same WordPiece tokenizer training would, and
packs rows of data.seq_len exactly as `text.pack_documents` does. Files are read line by line and
rows written as they are made, so memory stays bounded whatever the corpus size (the word counts
for training a tokenizer are the one thing that grows, with the number of distinct words).

DIR then holds train-00000-of-000NN.array_record ... (row j in shard j % NN: shard sizes differ by
at most one row), eval.array_record (the held-out split), tokenizer.json and prepared.json (what
training checks and reads). Train on it with --config.data.prepared=DIR. DIR is built under a
temporary name and renamed into place: it is complete or absent.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from typing import Any, Callable, Iterator

import numpy as np

from jembed import fs
from jembed.data import pipeline
from jembed.data import text
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


# ---------------------------------------------------------------------------------------------------
# The split: `text.split_train_eval` applied one document at a time
# ---------------------------------------------------------------------------------------------------
def _split_rule(train_docs: Callable[[], Iterator[str]], eval_fraction: float
                ) -> Callable[[str], bool]:
  """Whether a document of the train stream is held out: its hash, plus split_train_eval's
  tiny-corpus fallback (hold out the lowest-hash document when none fell below the fraction and the
  corpus has two different documents), found by one pass that keeps O(1) documents in memory."""
  if not 0.0 <= eval_fraction < 1.0:
    raise UserError(f"data.eval_fraction={eval_fraction} is outside [0, 1); use e.g. 0.05")
  any_held, lowest, first, distinct = False, None, None, False
  for doc in train_docs():
    unit = text._doc_hash_unit(doc)
    if unit < eval_fraction:
      any_held = True
      break
    if lowest is None or (unit, doc) < lowest:
      lowest = (unit, doc)
    if first is None:
      first = doc
    elif doc != first:
      distinct = True
  if any_held or eval_fraction == 0 or not distinct:
    return lambda doc: text.is_held_out(doc, eval_fraction)
  held_doc = lowest[1]
  return lambda doc: doc == held_doc


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


def _filtered(stream: Callable[[], Iterator[str]], keep: Callable[[str], bool]):
  return lambda: (d for d in stream() if keep(d))


def _chunks(docs: Iterator[str], size: int = CHUNK_DOCS) -> Iterator[list[str]]:
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
  """Writes the prepared corpus of `config.data` into `out`; returns its prepared.json contents.
  A contrastive config's pairs go to jembed.data.prepare_pairs."""
  if config.get("task", "") == "contrastive_text":
    from jembed.data import prepare_pairs
    return prepare_pairs.prepare_pairs(config, out, shards=shards, overwrite=overwrite, log=log)
  from array_record.python import array_record_module
  d = config.data
  out, seq_len = check_output(out, shards=shards, overwrite=overwrite, seq_len=int(d.seq_len))
  pipeline.reset_bad_records()
  train_stream, eval_stream, description = text.document_streams(d)
  eval_fraction = float(d.get("eval_fraction", 0.05))
  carved = eval_stream is None   # eval carved from the train files: one more pass over them
  if carved:
    held = _split_rule(train_stream, eval_fraction)
    eval_stream = _filtered(train_stream, held)
    train_stream = _filtered(train_stream, lambda doc: not held(doc))
    description["eval_fraction"] = eval_fraction

  tokenizer_path = str(d.get("tokenizer", "") or "")
  if tokenizer_path:
    tok = text.build_tokenizer((), int(d.vocab_size), path=tokenizer_path)
  else:
    log("jembed.prepare: counting words to train the tokenizer")
    tok = text.tokenizer_from_word_counts(text.word_counts(train_stream()), int(d.vocab_size))
  ids = text.special_ids(tok)
  vocab = tok.get_vocab_size()
  pipeline.reset_bad_records()  # the passes above read the same records: count them once, below

  def build(tmp: str) -> None:
    nonlocal meta
    tok.save(os.path.join(tmp, TOKENIZER_FILE))
    names = [shard_name(i, shards) for i in range(shards)]
    writers = [array_record_module.ArrayRecordWriter(os.path.join(tmp, n), WRITER_OPTIONS)
               for n in names]
    counts = np.zeros(vocab, np.int64)
    rows_in, written = [0] * shards, [0]
    packer = text.Packer(tok, seq_len)

    def write(rows: np.ndarray) -> None:
      for row in rows:
        j = written[0] % shards
        writers[j].write(encode_row(row))
        rows_in[j] += 1
        written[0] += 1
      counts[:] += np.bincount(rows.ravel(), minlength=vocab)

    try:
      for chunk in _chunks(train_stream()):
        write(packer.add(chunk))
        log(f"jembed.prepare: {written[0]} rows")
      write(packer.finish())
    finally:
      for w in writers:
        w.close()
    total = written[0]
    if total < shards:
      raise UserError(f"the training split packs into {total} rows of seq_len={seq_len}, fewer than "
                      f"--shards={shards}; add data or use fewer shards")
    bad = pipeline.bad_records()   # the train pass read every record of the train files once
    eval_writer = array_record_module.ArrayRecordWriter(os.path.join(tmp, EVAL_FILE), WRITER_OPTIONS)
    eval_packer, eval_rows = text.Packer(tok, seq_len), 0
    try:
      for chunk in itertools.chain(_chunks(eval_stream()), [None]):  # None: the last row
        for row in (eval_packer.add(chunk) if chunk is not None else eval_packer.finish()):
          eval_writer.write(encode_row(row))
          eval_rows += 1
    finally:
      eval_writer.close()
    if eval_rows == 0:
      raise UserError("the held-out split is empty; give data.eval or raise data.eval_fraction")
    for i in ids.values():
      counts[i] = 0  # as text.token_frequencies: the baseline never predicts a special token
    with open(os.path.join(tmp, TOKENIZER_FILE), "rb") as f:
      tok_sha = hashlib.sha256(f.read()).hexdigest()
    if not carved:
      bad = pipeline.bad_records()   # plus those of the eval files
    meta = dict(format_version=FORMAT_VERSION, seq_len=seq_len, dtype="int32",
                shards=[dict(file=n, rows=r) for n, r in zip(names, rows_in)],
                train_rows=total, eval=dict(file=EVAL_FILE, rows=eval_rows),
                tokenizer=TOKENIZER_FILE, tokenizer_sha256=tok_sha, special_ids=ids,
                vocab_size=vocab, most_frequent=int(np.argmax(counts)),
                skipped_records=bad["skipped"], source=description)
    with open(os.path.join(tmp, PREPARED_FILE), "w") as f:
      json.dump(meta, f, indent=2)

  meta: dict[str, Any] = {}
  try:
    fs.swap_dir(out, build)   # the temporary directory is removed on any failure
  except RuntimeError as e:  # ArrayRecord's writer reports a full disk or an unwritable path so
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise UserError(f"cannot write {out} ({first}); free disk space or choose another --out "
                    "(nothing was written)") from None
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
      main_lib.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    for name in ("workdir", "compile_cache", "distributed"):
      if flags.FLAGS[name].present:
        main_lib.fail(f"--{name} is a flag of jembed.main; prepare takes --config, --out, "
                       "--shards and --overwrite")
    config = main_lib.load_config()
    if config is None:
      main_lib.fail("no config given; pass --config configs/mlm.py")
    if not out.value:
      main_lib.fail("no --out given; pass --out DIR (the prepared corpus goes there)")
    try:
      prepare(config, out.value, shards=n_shards.value, overwrite=overwrite.value,
              log=lambda line: print(line, flush=True))
    except UserError as e:
      main_lib.fail(str(e))

  app.run(action, flags_parser=main_lib.parse_flags)


if __name__ == "__main__":
  sys.exit(run())
