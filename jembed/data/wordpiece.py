"""The WordPiece tokenizer of the text tasks: BERT's special tokens (or RoBERTa's spelling of them),
a lowercase BERT WordPiece vocabulary learnt deterministically from word counts, or a tokenizer.json
loaded from a path (local or gs://).

`build_tokenizer(docs, vocab_size)` trains on documents held in memory; `word_counts` +
`tokenizer_from_word_counts` do the same from a stream (jembed.data.prepare).
"""
from __future__ import annotations

import collections
import heapq
import os
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from jembed import fs
from jembed.errors import UserError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_SPECIAL_KEYS = ("pad", "unk", "cls", "sep", "mask")
# Longer "words" (hashes, URLs) encode as [UNK] anyway; BERT uses the same limit.
_MAX_WORD_CHARS = 100

# RoBERTa's spelling of the same five (XLM-RoBERTa's and MPNet's too): <s> ... </s> plays [CLS] ... [SEP].
ROBERTA_SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<mask>")


def special_ids(tokenizer: tokenizers.Tokenizer) -> dict[str, int]:
  """{"pad", "unk", "cls", "sep", "mask"} -> token id: BERT's token for each or, where the vocabulary
  lacks it, RoBERTa's (MPNet mixes the two: <s> </s> <pad> <mask> with [UNK])."""
  ids = {}
  for key, token, other in zip(_SPECIAL_KEYS, SPECIAL_TOKENS, ROBERTA_SPECIAL_TOKENS):
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
      token_id = tokenizer.token_to_id(other)
    if token_id is None:
      raise UserError(
          f"tokenizer has no {token} token; use a tokenizer.json that defines [PAD] [UNK] [CLS] [SEP] "
          "[MASK] (or RoBERTa's <pad> <unk> <s> </s> <mask>), or give no tokenizer path to train one")
    ids[key] = token_id
  return ids


def _new_wordpiece(vocab: dict[str, int] | None = None) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.WordPiece(
      vocab or {t: i for i, t in enumerate(SPECIAL_TOKENS)}, unk_token="[UNK]",
      continuing_subword_prefix="##", max_input_chars_per_word=_MAX_WORD_CHARS))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  return tok


def _word_counts(docs: Iterable[str], tok: tokenizers.Tokenizer) -> collections.Counter:
  normalizer, pre_tokenizer = tok.normalizer, tok.pre_tokenizer
  counts: collections.Counter = collections.Counter()
  for doc in docs:
    counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(doc)))
  return counts


def word_counts(docs: Iterable[str]) -> collections.Counter:
  """What `build_tokenizer` trains on: the count of each pre-tokenized, normalized word. Streams
  `docs` (a generator is fine), so a corpus larger than memory can be counted."""
  return _word_counts(docs, _new_wordpiece())


def tokenizer_from_word_counts(counts: dict[str, int], vocab_size: int) -> tokenizers.Tokenizer:
  """The WordPiece tokenizer `build_tokenizer` trains, from `word_counts` of the documents."""
  if vocab_size <= len(SPECIAL_TOKENS):
    raise UserError(f"data.vocab_size={vocab_size} is too small; use e.g. 8192")
  vocab = _learn_wordpiece_vocab(counts, vocab_size)
  tok = _new_wordpiece({t: i for i, t in enumerate(vocab)})
  # Registered as special so they are never split and can be skipped when decoding.
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  return tok


def _learn_wordpiece_vocab(word_counts: dict[str, int], vocab_size: int, prefix: str = "##",
                           limit_alphabet: int = 1000,
                           max_word_chars: int = _MAX_WORD_CHARS) -> list[str]:
  """Vocabulary for a WordPiece model, learnt by byte-pair-style merges (as BERT's was).

  Written here rather than using `tokenizers.trainers.WordPieceTrainer` because that one
  breaks count ties by hash-map order, so two runs on the same corpus give different
  vocabularies (huggingface/tokenizers#1794). Ties here go to the lexicographically
  smaller pair, so the result depends only on the word counts.
  """
  words = sorted((w, c) for w, c in word_counts.items() if 0 < len(w) <= max_word_chars)
  char_counts = collections.Counter()
  for word, count in words:
    for ch in word:
      char_counts[ch] += count
  alphabet = sorted(char_counts, key=lambda ch: (-char_counts[ch], ch))[:limit_alphabet]
  vocab = list(SPECIAL_TOKENS)
  index = {tok: i for i, tok in enumerate(vocab)}

  def token_id(token: str) -> int:
    if token not in index:
      index[token] = len(vocab)
      vocab.append(token)
    return index[token]

  # Both forms of every character, so that no word is [UNK] just because a character was
  # only ever seen at the other position.
  for ch in alphabet:
    token_id(ch)
  for ch in alphabet:
    token_id(prefix + ch)
  if len(vocab) >= vocab_size:
    return vocab[:vocab_size]

  kept = set(alphabet)
  seqs, freqs = [], []
  for word, count in words:
    chars = [ch for ch in word if ch in kept]
    if len(chars) < 2:
      continue
    seqs.append([index[chars[0]]] + [index[prefix + ch] for ch in chars[1:]])
    freqs.append(count)

  pair_counts = collections.defaultdict(int)
  where = collections.defaultdict(set)
  for wi, seq in enumerate(seqs):
    for pair in zip(seq, seq[1:]):
      pair_counts[pair] += freqs[wi]
      where[pair].add(wi)
  heap = [(-c, vocab[a], vocab[b], a, b) for (a, b), c in pair_counts.items()]
  heapq.heapify(heap)
  while heap and len(vocab) < vocab_size:
    neg_count, _, b_str, a, b = heapq.heappop(heap)
    if pair_counts.get((a, b), 0) != -neg_count or neg_count == 0:
      continue  # stale entry: the count changed after it was pushed
    merged = token_id(vocab[a] + b_str[len(prefix):])
    delta = collections.defaultdict(int)
    for wi in where.pop((a, b)):
      seq, f = seqs[wi], freqs[wi]
      new, i, hit = [], 0, False
      while i < len(seq):
        if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
          new.append(merged)
          i += 2
          hit = True
        else:
          new.append(seq[i])
          i += 1
      if not hit:
        continue
      for pair in zip(seq, seq[1:]):
        delta[pair] -= f
      for pair in zip(new, new[1:]):
        delta[pair] += f
        where[pair].add(wi)
      seqs[wi] = new
    for pair, d in delta.items():
      if d:
        pair_counts[pair] += d
        if pair_counts[pair] > 0:
          heapq.heappush(heap, (-pair_counts[pair], vocab[pair[0]], vocab[pair[1]]) + pair)
    pair_counts.pop((a, b), None)
  return vocab


def build_tokenizer(docs: Sequence[str], vocab_size: int, path: str | None = None,
                    save_to: str | None = None) -> tokenizers.Tokenizer:
  """Loads the tokenizer.json at `path`, or trains a lowercase BERT WordPiece one on `docs`.

  A trained tokenizer has SPECIAL_TOKENS at ids 0..4 and at most `vocab_size` tokens (fewer
  if the corpus is small: read the real size from `get_vocab_size()`). Training is
  deterministic: the same documents give the same tokenizer.json in every process. It is
  saved to `save_to` when given.
  """
  if path:
    path = os.path.expanduser(path)
    if not fs.exists(path) or fs.isdir(path):
      raise UserError(f"tokenizer file {path!r} does not exist; fix the path or leave it "
                      "empty to train one")
    try:
      tok = tokenizers.Tokenizer.from_str(fs.read_text(path))  # local or gs://
    except Exception as e:  # pylint: disable=broad-except
      first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise UserError(f"cannot read tokenizer {path!r} ({first_line}); point it at a "
                      "HuggingFace tokenizer.json") from None
    special_ids(tok)  # raises if a special token is missing
    # Packing needs raw token streams, not fixed-length padded/truncated encodings.
    tok.no_padding()
    tok.no_truncation()
  else:
    if vocab_size <= len(SPECIAL_TOKENS):
      raise UserError(f"data.vocab_size={vocab_size} is too small; use e.g. 8192")
    docs = list(docs)
    if not any(d.strip() for d in docs):
      raise UserError("cannot train a tokenizer on an empty corpus; add documents")
    tok = tokenizer_from_word_counts(word_counts(docs), vocab_size)
  if save_to and fs.is_writer():
    fs.write_with(save_to, tok.save)
  return tok

