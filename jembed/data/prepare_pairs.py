"""Contrastive pairs tokenized once into ArrayRecord shards that training streams from disk (what
`jembed.data.prepare` does for an MLM corpus), for pair sets too large for memory.

  python -m jembed.data.prepare --config configs/contrastive_text.py --out DIR [--shards 8] \
      --config.data.train='pairs/*.jsonl' [--config.data.eval=held.jsonl] [--config.init.hf=...]

The pair files are read one record at a time (data.train / data.eval / data.eval_fraction /
*_key / on_bad_record, read as training reads them). The tokenizer is data.tokenizer, else the
warm-start source's (config.init), else a WordPiece one trained on the training texts (the word
counts are the one thing that grows, with the number of distinct words). Each pair becomes one row
of (2 + K) * data.seq_len int32 ids: anchor, positive and its first K hard negatives (K =
data.num_negatives; -1: as many as every pair has), encoded exactly as the in-memory path encodes
them. Row j goes to shard j % N. The held-out pairs stay text (eval.jsonl): the retrieval evaluation
embeds their texts, and the held-out set is small. DIR is built under a temporary name and renamed
into place: it is complete or absent. Train on it with --config.data.prepared=DIR.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

import numpy as np

from jembed.data import encode, pairs as pairs_lib, pipeline, sources, wordpiece
from jembed.data import shards as shard_files
from jembed.errors import UserError

KIND = "pairs"
EVAL_FILE = "eval.jsonl"


def layout(seq_len: int, negatives: int) -> dict[str, list[int]]:
  """The columns one row holds, in order, and each one's shape."""
  out = {"anchor": [seq_len], "positive": [seq_len]}
  if negatives:
    out["negative"] = [negatives, seq_len]
  return out


def _streams(d) -> tuple[Callable[[], Iterator[pairs_lib.TextPair]],
                         Callable[[], Iterator[pairs_lib.TextPair]]]:
  """(train stream, held-out stream): fresh generators on every call."""
  train_spec, eval_spec = str(d.train or ""), str(d.eval or "")
  if not train_spec:
    raise UserError("jembed.data.prepare for pairs needs data.train (the pair files); the embedded "
                    "pairs are small enough for memory: train on them without preparing")
  keys = dict(anchor_key=str(d.anchor_key), positive_key=str(d.positive_key),
              negative_key=str(d.negative_key), on_bad_record=str(d.on_bad_record or "error"))
  read = lambda spec: pairs_lib.iter_pairs(spec, **keys)
  if eval_spec:
    return lambda: read(train_spec), lambda: read(eval_spec)
  # The in-memory split's rule (sources.split_by_hash on the anchors), one pair at a time.
  held = sources.held_out_rule(lambda: (p.anchor for p in read(train_spec)), float(d.eval_fraction))
  return ((lambda: (p for p in read(train_spec) if not held(p.anchor))),
          (lambda: (p for p in read(train_spec) if held(p.anchor))))


def _texts(pair: pairs_lib.TextPair) -> Iterator[str]:
  yield pair.anchor
  yield pair.positive
  yield from pair.negatives


def _negatives(train: Callable[[], Iterator[pairs_lib.TextPair]], setting: int) -> int:
  """K for every row, as the in-memory path decides it (tasks/contrastive_text._num_negatives)."""
  if setting == 0:
    return 0
  low, high, some = None, 0, 0
  for p in train():
    n = len(p.negatives)
    low = n if low is None else min(low, n)
    high, some = max(high, n), some + (n > 0)
  if low is None:
    return 0
  if setting < 0:
    if high and not low:
      raise UserError(f"{some} training pairs have hard negatives and others none; give every pair "
                      "one, or set data.num_negatives=0 to train without them")
    return low
  if low < setting:
    raise UserError(f"data.num_negatives={setting} but some pairs have only {low}; lower it")
  return setting


def prepare_pairs(config, out: str, *, shards: int, overwrite: bool, log) -> dict[str, Any]:
  d = config.data
  out, seq_len = shard_files.check_output(out, shards=shards, overwrite=overwrite,
                                         seq_len=int(d.seq_len))
  pipeline.reset_bad_records()
  train, held = _streams(d)
  tok = shard_files.task_tokenizer(config, lambda: (t for p in train() for t in _texts(p)), log)
  ids = wordpiece.special_ids(tok)
  k = _negatives(train, int(d.num_negatives))
  cols = layout(seq_len, k)
  meta: dict[str, Any] = {}

  def build(tmp: str) -> None:
    encode.save_tokenizer(tok, os.path.join(tmp, shard_files.TOKENIZER_FILE))
    rows = shard_files.Shards(tmp, shards, "pairs")
    pipeline.reset_bad_records()   # the passes above read the same records: count them once, here
    enc = lambda texts: encode.encode_texts(tok, texts, seq_len, ids)
    try:
      for chunk in shard_files.chunks(train()):
        parts = [enc([p.anchor for p in chunk]), enc([p.positive for p in chunk])]
        if k:
          parts.append(enc([n for p in chunk for n in p.negatives[:k]]).reshape(len(chunk), k * seq_len))
        rows.write(np.concatenate(parts, axis=1))
        log(f"jembed.prepare: {rows.written} pairs")
    finally:
      rows.close()
    rows.check_filled()
    skipped = pipeline.bad_records()["skipped"]   # of the train pass (held() reads the same files)
    eval_rows = 0
    with open(os.path.join(tmp, EVAL_FILE), "w", encoding="utf-8") as f:
      for p in held():
        f.write(json.dumps({"anchor": p.anchor, "positive": p.positive,
                            "negative": list(p.negatives)}) + "\n")
        eval_rows += 1
    if eval_rows == 0:
      raise UserError("the held-out split is empty; give data.eval or raise data.eval_fraction")
    if d.eval:
      skipped = pipeline.bad_records()["skipped"]   # plus those of the eval files
    meta.update(shard_files.write_metadata(tmp, tok, rows, EVAL_FILE, eval_rows, seq_len, skipped,
                                           kind=KIND, layout=cols, num_negatives=k))

  shard_files.write_directory(out, build)
  log(f"jembed.prepare: wrote {meta['train_rows']} train pairs in {shards} shards and "
      f"{meta['eval']['rows']} held-out pairs (seq_len={seq_len}, {k} hard negatives) to {out}")
  return meta
