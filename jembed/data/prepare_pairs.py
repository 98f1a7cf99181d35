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

import hashlib
import json
import os
from typing import Any, Callable, Iterator

import numpy as np

from jembed import fs
from jembed.data import encode, labeled_text, pairs as pairs_lib, text
from jembed.data import prepare as prepare_lib
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
                         Callable[[], Iterator[pairs_lib.TextPair]], list[int]]:
  """(train stream, held-out stream, skipped counter): fresh generators on every call."""
  get = lambda k, default: d.get(k, default) if d.get(k, default) is not None else default
  train_spec, eval_spec = str(get("train", "")), str(get("eval", ""))
  if not train_spec:
    raise UserError("jembed.data.prepare for pairs needs data.train (the pair files); the embedded "
                    "pairs are small enough for memory: train on them without preparing")
  keys = dict(anchor_key=str(get("anchor_key", "anchor")),
              positive_key=str(get("positive_key", "positive")),
              negative_key=str(get("negative_key", "negative")),
              on_bad_record=str(get("on_bad_record", "error")))
  skipped = [0]
  read = lambda spec: pairs_lib.iter_pairs(spec, skipped, **keys)
  if eval_spec:
    return lambda: read(train_spec), lambda: read(eval_spec), skipped
  fraction = float(get("eval_fraction", 0.1))
  if not 0.0 < fraction < 1.0:
    raise UserError(f"data.eval_fraction={fraction} must be in (0, 1) when no data.eval is given")
  held = lambda p: labeled_text._hash_unit(p.anchor) < fraction  # pylint: disable=protected-access
  return ((lambda: (p for p in read(train_spec) if not held(p))),
          (lambda: (p for p in read(train_spec) if held(p))), skipped)


def _texts(pair: pairs_lib.TextPair) -> Iterator[str]:
  yield pair.anchor
  yield pair.positive
  yield from pair.negatives


def _tokenizer(config, train: Callable[[], Iterator[pairs_lib.TextPair]], log):
  d = config.data
  path = str(d.get("tokenizer", "") or "")
  if path:
    return text.build_tokenizer((), int(d.vocab_size), path=path)
  from jembed import init as init_lib
  source = init_lib.source_from_config(config)
  if source is not None and source.tokenizer is not None:
    return encode.plain(source.tokenizer)
  log("jembed.prepare: counting words to train the tokenizer")
  texts = (t for p in train() for t in _texts(p))
  return text.tokenizer_from_word_counts(text.word_counts(texts), int(d.vocab_size))


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
  from array_record.python import array_record_module
  d = config.data
  out, seq_len = prepare_lib.check_output(out, shards=shards, overwrite=overwrite,
                                         seq_len=int(d.seq_len))
  train, held, skipped = _streams(d)
  tok = _tokenizer(config, train, log)
  ids = text.special_ids(tok)
  k = _negatives(train, int(d.get("num_negatives", -1)))
  cols = layout(seq_len, k)
  meta: dict[str, Any] = {}

  def build(tmp: str) -> None:
    encode.save_tokenizer(tok, os.path.join(tmp, prepare_lib.TOKENIZER_FILE))
    names = [prepare_lib.shard_name(i, shards) for i in range(shards)]
    writers = [array_record_module.ArrayRecordWriter(os.path.join(tmp, n), prepare_lib.WRITER_OPTIONS)
               for n in names]
    rows_in, written = [0] * shards, 0
    skipped[0] = 0   # the passes above read the same records: count them once, here
    try:
      for chunk in prepare_lib._chunks(train()):  # pylint: disable=protected-access
        enc = lambda texts: encode.encode_texts(tok, texts, seq_len, ids)
        parts = [enc([p.anchor for p in chunk]), enc([p.positive for p in chunk])]
        if k:
          parts.append(enc([n for p in chunk for n in p.negatives[:k]]).reshape(len(chunk), k * seq_len))
        for row in np.concatenate(parts, axis=1):
          writers[written % shards].write(prepare_lib.encode_row(row))
          rows_in[written % shards] += 1
          written += 1
        log(f"jembed.prepare: {written} pairs")
    finally:
      for w in writers:
        w.close()
    if written < shards:
      raise UserError(f"the training split has {written} pairs, fewer than --shards={shards}; add "
                      "data or use fewer shards")
    eval_rows = 0
    with open(os.path.join(tmp, EVAL_FILE), "w", encoding="utf-8") as f:
      for p in held():
        f.write(json.dumps({"anchor": p.anchor, "positive": p.positive,
                            "negative": list(p.negatives)}) + "\n")
        eval_rows += 1
    if eval_rows == 0:
      raise UserError("the held-out split is empty; give data.eval or raise data.eval_fraction")
    with open(os.path.join(tmp, prepare_lib.TOKENIZER_FILE), "rb") as f:
      tok_sha = hashlib.sha256(f.read()).hexdigest()
    meta.update(format_version=prepare_lib.FORMAT_VERSION, kind=KIND, seq_len=seq_len,
                dtype="int32", layout=cols, num_negatives=k,
                shards=[dict(file=n, rows=r) for n, r in zip(names, rows_in)], train_rows=written,
                eval=dict(file=EVAL_FILE, rows=eval_rows), tokenizer=prepare_lib.TOKENIZER_FILE,
                tokenizer_sha256=tok_sha, special_ids=ids, vocab_size=tok.get_vocab_size(),
                skipped_records=skipped[0])
    with open(os.path.join(tmp, prepare_lib.PREPARED_FILE), "w") as f:
      json.dump(meta, f, indent=2)

  try:
    fs.swap_dir(out, build)   # the temporary directory is removed on any failure
  except RuntimeError as e:  # ArrayRecord's writer reports a full disk or an unwritable path so
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise UserError(f"cannot write {out} ({first}); free disk space or choose another --out "
                    "(nothing was written)") from None
  log(f"jembed.prepare: wrote {meta['train_rows']} train pairs in {shards} shards and "
      f"{meta['eval']['rows']} held-out pairs (seq_len={seq_len}, {k} hard negatives) to {out}")
  return meta
