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

import os
import sys
from typing import Any, Callable, Iterator

import numpy as np

from jembed.data import documents, packing, pipeline, sources, wordpiece
from jembed.data import shards as shard_files
from jembed.errors import UserError


def _filtered(stream: Callable[[], Iterator[str]], keep: Callable[[str], bool]):
  return lambda: (d for d in stream() if keep(d))


# ---------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------
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
  out, seq_len = shard_files.check_output(out, shards=shards, overwrite=overwrite, seq_len=int(d.seq_len))
  pipeline.reset_bad_records()
  train_stream, eval_stream, description = documents.document_streams(d)
  eval_fraction = float(d.eval_fraction)
  carved = eval_stream is None   # eval carved from the train files: one more pass over them
  if carved:
    held = sources.held_out_rule(train_stream, eval_fraction)
    eval_stream = _filtered(train_stream, held)
    train_stream = _filtered(train_stream, lambda doc: not held(doc))
    description["eval_fraction"] = eval_fraction

  tokenizer_path = str(d.tokenizer or "")
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
    tok.save(os.path.join(tmp, shard_files.TOKENIZER_FILE))
    counts = np.zeros(vocab, np.int64)
    shards_out, packer = shard_files.Shards(tmp, shards, f"rows of seq_len={seq_len}"), packing.Packer(tok, seq_len)

    def write(rows: np.ndarray) -> None:
      shards_out.write(rows)
      counts[:] += np.bincount(rows.ravel(), minlength=vocab)

    try:
      for chunk in shard_files.chunks(train_stream()):
        write(packer.add(chunk))
        log(f"jembed.prepare: {shards_out.written} rows")
      write(packer.finish())
    finally:
      shards_out.close()
    shards_out.check_filled()
    bad = pipeline.bad_records()   # the train pass read every record of the train files once
    eval_packer = packing.Packer(tok, seq_len)

    def eval_blocks():
      yield from map(eval_packer.add, shard_files.chunks(eval_stream()))
      yield eval_packer.finish()   # the short last row
    eval_rows = shard_files.write_rows(os.path.join(tmp, shard_files.EVAL_FILE), eval_blocks())
    if eval_rows == 0:
      raise UserError("the held-out split is empty; give data.eval or raise data.eval_fraction")
    for i in ids.values():
      counts[i] = 0  # as packing.token_frequencies: the baseline never predicts a special token
    if not carved:
      bad = pipeline.bad_records()   # plus those of the eval files
    meta = shard_files.write_metadata(tmp, tok, shards_out, shard_files.EVAL_FILE, eval_rows, seq_len, bad["skipped"],
                          most_frequent=int(np.argmax(counts)), source=description)

  meta: dict[str, Any] = {}
  shard_files.write_directory(out, build)
  log(f"jembed.prepare: wrote {meta['train_rows']} train rows in {shards} shards and "
      f"{meta['eval']['rows']} eval rows of seq_len={seq_len} to {out}")
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
