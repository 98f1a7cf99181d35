"""Text corpus, WordPiece tokenizer and sequence packing for masked-language-model pretraining.

Pipeline: `load_documents(config.data)` -> `build_tokenizer(train_docs, vocab_size)` ->
`pack_documents(docs, tokenizer, seq_len)` gives int32 rows `[CLS] tokens... [SEP]` with the
documents concatenated across rows, so almost no compute is spent on padding.
"""
from __future__ import annotations

import collections
import glob
import hashlib
import heapq
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from jembed.data.corpus_embedded import embedded_documents
from jembed import fs
from jembed.data import encode, pipeline, tfds_source
from jembed.errors import UserError

__all__ = [
    "SPECIAL_TOKENS", "load_documents", "embedded_documents", "build_tokenizer", "special_ids",
    "pack_documents", "token_frequencies", "split_train_eval",
]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_SPECIAL_KEYS = ("pad", "unk", "cls", "sep", "mask")
_EXTENSIONS = (".txt", ".jsonl")
# A last row with fewer real tokens than this is mostly padding: not worth a training slot.
MIN_LAST_ROW_TOKENS = 16
# Longer "words" (hashes, URLs) encode as [UNK] anyway; BERT uses the same limit.
_MAX_WORD_CHARS = 100


# ----------------------------------------------------------------------------- documents


def _field(config: Any, name: str, default: Any) -> Any:
  value = getattr(config, name, default) if config is not None else default
  return default if value is None else value


def _resolve_source(config: Any) -> str:
  source = str(_field(config, "source", "") or "").strip().lower()
  train = str(_field(config, "train", "")).strip()
  tfds_name = str(_field(config, "tfds_name", "")).strip()
  # "embedded" is the default, so a user who only sets data.train or data.tfds_name means
  # that source; "files"/"tfds" written explicitly are taken as they are.
  if source in ("", "embedded") and (train or tfds_name):
    if train and tfds_name:
      raise UserError(
          "data.train and data.tfds_name are both set; set data.source='files' or 'tfds' "
          "to choose one")
    return "files" if train else "tfds"
  if source in ("", "embedded"):
    return "embedded"
  if source not in ("files", "tfds"):
    raise UserError(
        f"unknown data.source {source!r}; use 'embedded', 'files' or 'tfds'")
  return source


def resolve_source(config: Any) -> str:
  """'embedded', 'files' or 'tfds': the source `load_documents` reads for `config`."""
  return _resolve_source(config)


def _doc_hash_unit(doc: str) -> float:
  digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64


def split_train_eval(docs: Sequence[str], eval_fraction: float) -> tuple[list[str], list[str]]:
  """Assigns each document to eval by a hash of its text: stable across runs and machines.

  Identical documents always land on the same side, so eval never leaks into train.
  """
  if not 0.0 <= eval_fraction < 1.0:
    raise UserError(
        f"data.eval_fraction={eval_fraction} is outside [0, 1); use e.g. 0.05")
  units = [_doc_hash_unit(d) for d in docs]
  train = [d for d, u in zip(docs, units) if u >= eval_fraction]
  held = [d for d, u in zip(docs, units) if u < eval_fraction]
  if eval_fraction > 0 and not held and len(set(docs)) > 1:
    # Tiny corpora: still hold out one document (the one with the smallest hash).
    lowest = min(zip(units, docs))[1]
    held = [d for d in docs if d == lowest]
    train = [d for d in docs if d != lowest]
  return train, held


def _expand_paths(spec: str, what: str) -> list[str]:
  paths: list[str] = []
  for pattern in (p.strip() for p in spec.split(",")):
    if not pattern:
      continue
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
      matches = sorted(
          os.path.join(pattern, f) for f in os.listdir(pattern) if f.endswith(_EXTENSIONS))
      if not matches:
        raise UserError(
            f"data.{what}: directory {pattern!r} has no .txt or .jsonl files; "
            "point it at the files or a glob such as 'dir/*.txt'")
    else:
      matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
      if not matches:
        raise UserError(
            f"data.{what}: {pattern!r} matches no files; check the path or glob "
            "(comma-separate several)")
    for path in matches:
      if not path.endswith(_EXTENSIONS):
        raise UserError(
            f"data.{what}: unsupported file type {path!r}; use .txt (one document per "
            "line) or .jsonl (one JSON object with a 'text' field per line)")
      if path not in paths:
        paths.append(path)
  if not paths:
    raise UserError(f"data.{what} is empty; set it to a .txt/.jsonl path or glob")
  return paths


def _read_file(path: str, config: Any = None) -> list[str]:
  return list(iter_file_documents(path, config))


def iter_file_documents(path: str, config: Any = None) -> Iterator[str]:
  """Documents of one .txt (one per line; blank lines are ignored) or .jsonl file, read line by
  line (memory does not grow with the file). A bad record (bytes that are not UTF-8, a JSON line
  that does not parse or lacks a string 'text' field) is an error naming file:line, or skipped and
  counted with data.on_bad_record='skip' (jembed.data.pipeline.bad_record). An empty document is
  always skipped, and counted."""
  jsonl = path.endswith(".jsonl")
  form = "each .jsonl line must be one JSON object with a non-empty string 'text' field"
  try:
    for line_no, line in pipeline.decoded_lines(path, config):
      where = f"{path}:{line_no}"
      if not line.strip():
        continue  # blank lines separate nothing; not a record
      if not jsonl:
        yield line.strip()
        continue
      record = pipeline.json_line(config, where, line, form)
      if record is None:
        continue
      if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        pipeline.bad_record(config, where, "no string 'text' field", form)
        continue
      if not record["text"].strip():
        pipeline.skipped_record(where, "an empty 'text'")  # nothing to train on, never an error
        continue
      yield record["text"].strip()
  except OSError as e:
    raise UserError(f"cannot read {path} ({e.strerror}); check the path and permissions") \
        from None


def _read_files(spec: str, what: str, config: Any = None) -> list[str]:
  docs = []
  for path in _expand_paths(spec, what):
    docs.extend(_read_file(path, config))
  if not docs:
    raise UserError(
        f"data.{what}={spec!r} contains no non-blank documents; add text to the files")
  return docs


def _tfds_documents(config: Any, split: str, what: str) -> list[str]:
  """Reads one split of a TFDS dataset that is already prepared under data.data_dir."""
  text_key = str(_field(config, "tfds_text_key", "text")) or "text"
  source, builder = tfds_source.open_split(config, split, what, "imdb_reviews")
  name = builder.info.name
  docs = []
  for i in range(len(source)):
    record = source[i]
    if text_key not in record:
      raise UserError(
          f"TFDS dataset {name!r} has no feature {text_key!r}; set data.tfds_text_key to "
          f"one of {sorted(record)}")
    value = record[text_key]
    if isinstance(value, np.ndarray):
      value = value.item()
    text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    if text.strip():
      docs.append(text.strip())
  if not docs:
    raise UserError(f"split {split!r} of TFDS dataset {name!r} has no non-blank text")
  return docs


def load_documents(data_config: Any) -> tuple[list[str], list[str]]:
  """Returns (train_docs, eval_docs) for `data_config` (an ml_collections.ConfigDict).

  Fields: source ('embedded' | 'files' | 'tfds'), train / eval (path, glob or comma-separated
  list of .txt / .jsonl), eval_fraction, tfds_name, tfds_split, tfds_eval_split,
  tfds_text_key, data_dir. Without an explicit eval set, eval is carved from the training
  documents by a hash of their text (`split_train_eval`).
  """
  source = _resolve_source(data_config)
  eval_fraction = float(_field(data_config, "eval_fraction", 0.05))
  held: list[str] | None = None
  if source == "embedded":
    docs = embedded_documents()
  elif source == "files":
    train_spec = str(_field(data_config, "train", "")).strip()
    if not train_spec:
      raise UserError("data.source='files' needs data.train, a .txt/.jsonl path or glob")
    docs = _read_files(train_spec, "train", data_config)
    eval_spec = str(_field(data_config, "eval", "")).strip()
    if eval_spec:
      held = _read_files(eval_spec, "eval", data_config)
  else:
    docs = _tfds_documents(
        data_config, str(_field(data_config, "tfds_split", "train")) or "train", "tfds_split")
    eval_split = str(_field(data_config, "tfds_eval_split", "")).strip()
    if eval_split:
      held = _tfds_documents(data_config, eval_split, "tfds_eval_split")
  if held is not None:
    return docs, held
  return split_train_eval(docs, eval_fraction)


def source_files(data_config: Any) -> tuple[list[str], list[str]]:
  """The (train, eval) file paths of data.source='files' (eval empty when carved from train)."""
  train_spec = str(_field(data_config, "train", "")).strip()
  if not train_spec:
    raise UserError("data.source='files' needs data.train, a .txt/.jsonl path or glob")
  eval_spec = str(_field(data_config, "eval", "")).strip()
  return _expand_paths(train_spec, "train"), (_expand_paths(eval_spec, "eval") if eval_spec else [])


def document_streams(data_config: Any) -> tuple[Callable[[], Iterator[str]],
                                                Callable[[], Iterator[str]] | None, dict]:
  """What `load_documents` reads, as re-iterable streams: (train, explicit eval or None, a
  description of the source). Files are read line by line, so a pass over them takes bounded
  memory; the embedded corpus and TFDS splits are read whole (they fit in memory)."""
  source = _resolve_source(data_config)
  if source == "embedded":
    docs = embedded_documents()
    return (lambda: iter(docs)), None, {"source": "embedded"}
  if source == "files":
    train, held = source_files(data_config)

    def chain(paths):
      return lambda: (d for p in paths for d in iter_file_documents(p, data_config))
    return chain(train), (chain(held) if held else None), {
        "source": "files", "train": train, "eval": held}
  split = str(_field(data_config, "tfds_split", "train")) or "train"
  docs = _tfds_documents(data_config, split, "tfds_split")
  eval_split = str(_field(data_config, "tfds_eval_split", "")).strip()
  held_docs = _tfds_documents(data_config, eval_split, "tfds_eval_split") if eval_split else None
  return ((lambda: iter(docs)), (lambda: iter(held_docs)) if held_docs is not None else None,
          {"source": "tfds", "name": str(_field(data_config, "tfds_name", "")), "split": split,
           "eval_split": eval_split})


def is_held_out(doc: str, eval_fraction: float) -> bool:
  """`split_train_eval`'s rule for one document (without its tiny-corpus fallback)."""
  return _doc_hash_unit(doc) < eval_fraction


# ----------------------------------------------------------------------------- tokenizer


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


# ----------------------------------------------------------------------------- packing


def pack_documents(docs: Sequence[str], tokenizer: tokenizers.Tokenizer,
                   seq_len: int) -> np.ndarray:
  """Packs `docs` into int32 rows [num_rows, seq_len] of `[CLS] ... [SEP]`.

  The token stream is `doc1 [SEP] doc2 [SEP] ...`; each row holds the next seq_len - 2
  tokens of it, so long documents span rows. Only the last row may be short: it is padded
  with [PAD] after its closing [SEP], or dropped if it has under 16 tokens. May return zero
  rows for a tiny corpus.
  """
  if seq_len < 3:
    raise UserError(f"seq_len={seq_len} is too short; need room for [CLS], a token and [SEP]")
  ids = special_ids(tokenizer)
  body = seq_len - 2
  docs = [d for d in docs if d.strip()]
  encodings = encode.plain(tokenizer).encode_batch(docs, add_special_tokens=False)
  lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(docs))
  stream = np.full(int(lengths.sum()), ids["sep"], dtype=np.int32)
  ends = np.cumsum(lengths)
  for enc, end, n in zip(encodings, ends, lengths):
    stream[end - n:end - 1] = enc.ids
  # Separators go between documents; the last row gets its own closing [SEP] below.
  stream = stream[:-1]
  num_full = len(stream) // body
  rows = [stream[:num_full * body].reshape(num_full, body)]
  tail = stream[num_full * body:]
  if len(tail) >= min(MIN_LAST_ROW_TOKENS, body):
    padded = np.full(body, ids["pad"], dtype=np.int32)
    padded[:len(tail)] = tail
    rows.append(padded[None])
  content = np.concatenate(rows, axis=0)
  out = np.empty((content.shape[0], seq_len), dtype=np.int32)
  out[:, 0] = ids["cls"]
  out[:, 1:-1] = content
  out[:, -1] = ids["sep"]
  if len(rows) == 2:
    # The short last row ends with [SEP] right after its tokens, then padding.
    out[-1, 1 + len(tail)] = ids["sep"]
    out[-1, 2 + len(tail):] = ids["pad"]
  return out


class Packer:
  """`pack_documents` over a stream of documents in bounded memory: feed documents in chunks with
  `add` (it returns the rows completed so far), then `finish` (the short last row, if kept). The
  rows, in order, are exactly those `pack_documents` gives for all the documents at once."""

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
