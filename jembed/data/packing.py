"""Sequence packing for masked-language-model pretraining: documents concatenated into int32 rows
`[CLS] tokens... [SEP]`, so almost no compute is spent on padding.

`Packer` packs a stream of documents in bounded memory (jembed.data.prepare); `pack_documents` is the
same for documents held in memory.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import tokenizers

from jembed.data import encode
from jembed.data.wordpiece import SPECIAL_TOKENS, special_ids
from jembed.errors import UserError

# A last row with fewer real tokens than this is mostly padding: not worth a training slot.
MIN_LAST_ROW_TOKENS = 16


def pack_documents(docs: Sequence[str], tokenizer: tokenizers.Tokenizer,
                   seq_len: int) -> np.ndarray:
  """Packs `docs` into int32 rows [num_rows, seq_len] of `[CLS] ... [SEP]`.

  The token stream is `doc1 [SEP] doc2 [SEP] ...`; each row holds the next seq_len - 2
  tokens of it, so long documents span rows. Only the last row may be short: it is padded
  with [PAD] after its closing [SEP], or dropped if it has under 16 tokens. May return zero
  rows for a tiny corpus.
  """
  packer = Packer(tokenizer, seq_len)
  return np.concatenate([packer.add(docs), packer.finish()])


class Packer:
  """Packs a stream of documents in bounded memory: feed documents in chunks with `add` (it returns
  the rows completed so far), then `finish` (the short last row, if kept). The rows do not depend on
  how the documents are chunked (`pack_documents` is one chunk)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, seq_len: int):
    if seq_len < 3:
      raise UserError(f"seq_len={seq_len} is too short; need room for [CLS], a token and [SEP]")
    self.ids = special_ids(tokenizer)
    self.tokenizer = encode.plain(tokenizer)
    self.seq_len, self.body = seq_len, seq_len - 2
    self.pending = np.zeros(0, np.int32)   # tokens of the stream not yet in a row
    self.started = False

  def add(self, docs: Iterable[str]) -> np.ndarray:
    docs = [d for d in docs if d.strip()]
    if not docs:
      return np.zeros((0, self.seq_len), np.int32)
    parts = [self.pending]
    sep = np.asarray([self.ids["sep"]], np.int32)
    for enc in self.tokenizer.encode_batch(docs, add_special_tokens=False):
      if self.started:  # [SEP] goes between documents
        parts.append(sep)
      parts.append(np.asarray(enc.ids, np.int32))
      self.started = True
    stream = np.concatenate(parts)
    n = len(stream) // self.body
    self.pending = stream[n * self.body:].copy()
    return self._frame(stream[:n * self.body].reshape(n, self.body))

  def finish(self) -> np.ndarray:
    tail, self.pending = self.pending, np.zeros(0, np.int32)
    if len(tail) < min(MIN_LAST_ROW_TOKENS, self.body):
      return np.zeros((0, self.seq_len), np.int32)
    row = np.full(self.body, self.ids["pad"], np.int32)
    row[:len(tail)] = tail
    out = self._frame(row[None])
    out[0, 1 + len(tail)] = self.ids["sep"]
    out[0, 2 + len(tail):] = self.ids["pad"]
    return out

  def _frame(self, content: np.ndarray) -> np.ndarray:
    out = np.empty((content.shape[0], self.seq_len), np.int32)
    out[:, 0] = self.ids["cls"]
    out[:, 1:-1] = content
    out[:, -1] = self.ids["sep"]
    return out


def token_frequencies(rows: np.ndarray, vocab_size: int,
                      special: Iterable[int] | None = None) -> np.ndarray:
  """Counts of each token id in `rows` (int64 [vocab_size]), with special ids set to 0.

  `special` defaults to ids 0..4, where `build_tokenizer` puts SPECIAL_TOKENS; pass
  `special_ids(tok).values()` for a loaded tokenizer that places them elsewhere.
  """
  rows = np.asarray(rows)
  if rows.size and (rows.min() < 0 or rows.max() >= vocab_size):
    raise ValueError(f"token ids outside [0, {vocab_size}) in rows")
  counts = np.bincount(rows.ravel().astype(np.int64), minlength=vocab_size)
  special = range(len(SPECIAL_TOKENS)) if special is None else special
  for token_id in special:
    counts[token_id] = 0
  return counts
