"""Labelled text for classification tokenized once into ArrayRecord shards that training streams from
disk (what `jembed.data.prepare` does for an MLM corpus and for pairs), for data sets too large for
memory.

  python -m jembed.data.prepare --config configs/finetune_text.py --out DIR [--shards 8] \
      --config.data.train='train/*.jsonl' [--config.data.eval=test.jsonl] [--config.init.hf=...]

The examples are read one record at a time (data.train / data.eval / data.eval_fraction / text_key /
label_key / on_bad_record, or data.tfds_name; read as training reads them). The tokenizer is
data.tokenizer, else the warm-start source's (config.init), else a WordPiece one trained on the
training texts. The classes are the training labels, sorted as the in-memory path sorts them (or the
TFDS dataset's names), stored in prepared.json, so training and evaluation agree and the classifier
keeps its class names. Each example becomes one row of data.seq_len + 1 int32: its ids, encoded
exactly as the in-memory path encodes them, then its class index. Row j goes to shard j % N; the
held-out split is eval.array_record (same rows). DIR is built under a temporary name and renamed
into place: it is complete or absent. Train on it with --config.data.prepared=DIR.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from jembed.data import encode, labeled_text, pipeline, wordpiece
from jembed.data import shards as shard_files
from jembed.errors import UserError

KIND = "labeled_text"
EVAL_FILE = "eval.array_record"


def layout(seq_len: int) -> dict[str, list[int]]:
  """The columns one row holds, in order, and each one's shape (the label is a scalar)."""
  return {"tokens": [seq_len], "label": []}


def _rows(tok, ids, seq_len: int, examples: Iterator[tuple[str, Any]], index: labeled_text.LabelIndex,
          what: str) -> Iterator[np.ndarray]:
  """Blocks of rows (ids then class index) of `examples`; an example whose label `index` refuses
  (an eval label training lacks) is dropped."""
  seen = 0
  for chunk in shard_files.chunks(examples):
    kept = []
    for text, label in chunk:
      y = index(label, f"data.{what} example {seen}")
      seen += 1
      if y is not None:
        kept.append((text, y))
    if kept:
      tokens = encode.encode_texts(tok, [t for t, _ in kept], seq_len, ids)
      yield np.concatenate([tokens, np.asarray([[y] for _, y in kept], np.int32)], axis=1)


def prepare_labeled(config, out: str, *, shards: int, overwrite: bool, log) -> dict[str, Any]:
  d = config.data
  out, seq_len = shard_files.check_output(out, shards=shards, overwrite=overwrite,
                                         seq_len=int(d.seq_len))
  pipeline.reset_bad_records()
  streams = labeled_text.example_streams(d)
  if streams.description["source"] == "embedded":
    raise UserError("jembed.data.prepare for classification needs data.train (the labelled files) or "
                    "data.tfds_name; the embedded dataset is small enough for memory: train on it "
                    "without preparing")
  train, held = streams.carved()
  labels: set[str] = set()

  def texts() -> Iterator[str]:   # the tokenizer's pass also collects the labels
    for text, label in train():
      labels.add(str(label).strip())
      yield text
  tok = shard_files.task_tokenizer(config, texts, log)
  if streams.names is None and not labels:
    labels.update(str(label).strip() for _, label in train())
  classes = labeled_text.class_names(labels, streams.names)
  ids = wordpiece.special_ids(tok)
  meta: dict[str, Any] = {}

  def build(tmp: str) -> None:
    encode.save_tokenizer(tok, os.path.join(tmp, shard_files.TOKENIZER_FILE))
    index = labeled_text.LabelIndex(classes, d, by_position=streams.names is not None)
    rows = shard_files.Shards(tmp, shards, "examples")
    pipeline.reset_bad_records()   # the passes above read the same records: count them once, here
    try:
      for block in _rows(tok, ids, seq_len, train(), index, "train"):
        rows.write(block)
        log(f"jembed.prepare: {rows.written} examples")
    finally:
      rows.close()
    rows.check_filled()
    skipped = pipeline.bad_records()["skipped"]   # of the train pass (a carved eval reads it again)
    eval_rows = shard_files.write_rows(os.path.join(tmp, EVAL_FILE),
                                       _rows(tok, ids, seq_len, held(), index, "eval"))
    index.check()
    if eval_rows == 0:
      raise UserError("the held-out split is empty; give data.eval or raise data.eval_fraction")
    if streams.eval is not None:
      skipped = pipeline.bad_records()["skipped"]   # plus those of the eval set
    meta.update(shard_files.write_metadata(tmp, tok, rows, EVAL_FILE, eval_rows, seq_len, skipped,
                                           kind=KIND, layout=layout(seq_len), classes=classes,
                                           source=streams.description))

  shard_files.write_directory(out, build)
  log(f"jembed.prepare: wrote {meta['train_rows']} train examples in {shards} shards and "
      f"{meta['eval']['rows']} held-out examples ({len(classes)} classes, seq_len={seq_len}) to {out}")
  return meta
