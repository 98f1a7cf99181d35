"""Texts to token-id rows for the text tasks and `embed`: [CLS] word pieces [SEP] [PAD]...

The word pieces come from the tokenizer without its own special tokens, padding or truncation; the
special tokens and the truncation (to `max_len` ids including [CLS] and [SEP]) are added here, the
way BERT and sentence-transformers do, so an imported Hugging Face tokenizer gives their ids.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tokenizers


def plain(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  """The tokenizer without padding or truncation (a copy when it had either)."""
  if tokenizer.padding is None and tokenizer.truncation is None:
    return tokenizer
  copy = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  copy.no_padding()
  copy.no_truncation()
  return copy


def save_tokenizer(tokenizer: tokenizers.Tokenizer, path: str) -> None:
  """Writes tokenizer.json atomically (local or gs://; jembed/fs.py)."""
  from jembed import fs
  fs.write_with(path, tokenizer.save)


def token_ids(tokenizer: tokenizers.Tokenizer, texts: Sequence[str], max_len: int,
              ids: dict[str, int]) -> list[np.ndarray]:
  """[CLS] + the first max_len - 2 word pieces + [SEP] of each text, as int32 arrays."""
  out = []
  for enc in plain(tokenizer).encode_batch(list(texts), add_special_tokens=False):
    body = np.asarray(enc.ids[:max_len - 2], np.int32)
    out.append(np.concatenate([[ids["cls"]], body, [ids["sep"]]]).astype(np.int32))
  return out


def pad_rows(rows: Sequence[np.ndarray], length: int, pad_id: int) -> np.ndarray:
  out = np.full((len(rows), length), pad_id, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def encode_texts(tokenizer: tokenizers.Tokenizer, texts: Sequence[str], seq_len: int,
                 ids: dict[str, int]) -> np.ndarray:
  """(N, seq_len) int32 rows; longer texts are truncated."""
  return pad_rows(token_ids(tokenizer, texts, seq_len, ids), seq_len, ids["pad"])
