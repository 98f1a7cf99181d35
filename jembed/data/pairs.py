"""Text pairs for contrastive training and retrieval evaluation, and scored pairs for Spearman (STS).

Files: `.jsonl` (one object a line) or `.csv` (a header row), comma-separated globs allowed.
  pairs:        anchor, positive, optional negative (JSONL: a string or a list of strings; CSV: one
                string, an empty cell meaning none)
  scored pairs: text1, text2, score
Field names are configurable. A bad record (not JSON, a missing field, an empty text, a score that
is not a number) raises a one-line UserError naming file and line, or with on_bad_record="skip" is
skipped and counted, the count returned so the caller can log it.

`retrieval_set(pairs)` turns pairs into a retrieval task (queries = distinct anchors, corpus = every
distinct positive and negative, qrels = each anchor's positives). `embedded_pairs()` is a default
pair set that needs no download: docstrings of the installed standard library, anchor = a
docstring's summary paragraph, positive = the rest of it (find the explanation a summary belongs
to), split into train and held-out pairs by a hash of the anchor.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import math
import re
import warnings
from typing import Any, Iterator

from jembed.data import labeled_text, pipeline, sources
from jembed.errors import UserError

ON_BAD_RECORD = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class TextPair:
  anchor: str
  positive: str
  negatives: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ScoredPair:
  text1: str
  text2: str
  score: float


class _BadRecord(Exception):
  """One record's problem; becomes a bad record (jembed.data.pipeline.bad_record): an error naming
  file and line, or skipped and counted."""


# ----------------------------------------------------------------------------- files

FORMATS = {".jsonl": "one JSON object a line", ".csv": "a header row naming the fields",
           ".txt": "unsupervised: a text a line"}


def _text(record: dict, key: str) -> str:
  value = record.get(key)
  if value is None:
    raise _BadRecord(f"missing field '{key}'")
  if not isinstance(value, str):
    raise _BadRecord(f"field '{key}' is {type(value).__name__}, not a string")
  if not value.strip():
    raise _BadRecord(f"field '{key}' is an empty text")
  return value


def _iter_read(spec: str, required: tuple[str, ...], parse, on_bad_record: str):
  """The parsed records of every file, one at a time (memory independent of the files' size); a bad
  record raises or is skipped and counted by jembed.data.pipeline (the one counter)."""
  if on_bad_record not in ON_BAD_RECORD:
    raise UserError(f"on_bad_record={on_bad_record!r}; use 'error' or 'skip'")
  policy = {"on_bad_record": on_bad_record}
  form = "fix the record"
  for path in sources.expand_paths(spec, None, FORMATS):
    sources.require_columns(path, required, "name those columns or set the field names")
    for where, record in sources.file_records(path, policy, form):
      if path.endswith(".txt"):
        # Unsupervised pairs (SimCSE): each line is its own positive; dropout makes two views.
        record = {k: record["text"] for k in required[:2]}
      try:
        yield parse(record, path.endswith(".csv"))
      except _BadRecord as e:
        pipeline.bad_record(policy, where, str(e), form)


def _read(spec: str, required: tuple[str, ...], parse, on_bad_record: str, what: str):
  before = pipeline.bad_records()["skipped"]
  out = list(_iter_read(spec, required, parse, on_bad_record))
  skipped = pipeline.bad_records()["skipped"] - before
  if not out:
    raise UserError(f"{spec!r} holds no valid {what} ({skipped} bad records skipped); check the files "
                    "and field names")
  return out, skipped


def load_pairs(spec: str, *, anchor_key: str = "anchor", positive_key: str = "positive",
               negative_key: str = "negative", on_bad_record: str = "error") -> tuple[list[TextPair], int]:
  """(pairs, number of bad records skipped) from .jsonl/.csv files (comma-separated globs)."""
  return _read(spec, (anchor_key, positive_key),
               _pair_parser(negative_key, anchor_key, positive_key), on_bad_record, "pairs")


def iter_pairs(spec: str, *, anchor_key: str = "anchor", positive_key: str = "positive",
               negative_key: str = "negative", on_bad_record: str = "error") -> Iterator[TextPair]:
  """The pairs of `load_pairs`, streamed one at a time (bad records skipped are counted by
  jembed.data.pipeline)."""
  return _iter_read(spec, (anchor_key, positive_key),
                    _pair_parser(negative_key, anchor_key, positive_key), on_bad_record)


def _pair_parser(negative_key: str, anchor_key: str, positive_key: str):

  def parse(record: dict, is_csv: bool) -> TextPair:
    negatives = record.get(negative_key)
    if negatives is None or (is_csv and negatives == ""):
      negatives = []  # optional; an empty CSV cell is the only way to leave it out of a CSV row
    elif isinstance(negatives, str):
      negatives = [negatives]
    elif not isinstance(negatives, list):
      raise _BadRecord(f"field '{negative_key}' must be a string or a list of strings")
    for n in negatives:
      if not isinstance(n, str) or not n.strip():
        raise _BadRecord(f"field '{negative_key}' holds an empty or non-string text")
    return TextPair(_text(record, anchor_key), _text(record, positive_key), tuple(negatives))

  return parse


def load_scored_pairs(spec: str, *, text1_key: str = "text1", text2_key: str = "text2",
                      score_key: str = "score", on_bad_record: str = "error") -> tuple[list[ScoredPair], int]:
  """(scored pairs, number of bad records skipped): gold similarity scores for Spearman."""

  def parse(record: dict, is_csv: bool) -> ScoredPair:
    score = record.get(score_key)
    if score is None:
      raise _BadRecord(f"missing field '{score_key}'")
    if isinstance(score, bool) or not isinstance(score, (int, float, str)):
      raise _BadRecord(f"field '{score_key}' must be a number")
    try:
      score = float(score)
    except ValueError:
      raise _BadRecord(f"field '{score_key}'={score!r} is not a number") from None
    if not math.isfinite(score):
      raise _BadRecord(f"field '{score_key}' is not finite")
    return ScoredPair(_text(record, text1_key), _text(record, text2_key), score)

  return _read(spec, (text1_key, text2_key, score_key), parse, on_bad_record, "scored pairs")


# ----------------------------------------------------------------------------- retrieval


def retrieval_set(pairs: list[TextPair]) -> tuple[list[str], list[str], list[set[int]]]:
  """(queries, corpus, qrels) for `jembed.retrieval.retrieval_metrics`.

  queries: the distinct anchors in order of first appearance; corpus: every distinct positive and
  negative text in order of first appearance; qrels[i]: corpus indices of query i's positives (an
  anchor that occurs in several pairs has all their positives relevant).
  """
  corpus_index: dict[str, int] = {}
  query_index: dict[str, int] = {}
  qrels: list[set[int]] = []
  for pair in pairs:
    for text in (pair.positive, *pair.negatives):
      corpus_index.setdefault(text, len(corpus_index))
    if pair.anchor not in query_index:
      query_index[pair.anchor] = len(query_index)
      qrels.append(set())
    qrels[query_index[pair.anchor]].add(corpus_index[pair.positive])
  return list(query_index), list(corpus_index), qrels


# ----------------------------------------------------------------------------- embedded

# The topic modules of the embedded classification set and more of the standard library; a module
# this Python lacks is skipped.
EMBEDDED_PAIR_MODULES: tuple[str, ...] = tuple(
    m for ms in labeled_text.EMBEDDED_TOPICS.values() for m in ms) + tuple("""
    collections itertools functools json json.decoder json.encoder csv email.message email.utils
    email.parser email.generator email.feedparser email.header email.headerregistry email.policy
    xml.etree.ElementTree xml.dom.minidom xml.dom.pulldom xml.sax xml.sax.handler xml.sax.saxutils
    logging logging.handlers logging.config argparse optparse getopt configparser tomllib zipfile
    tarfile gzip bz2 lzma zlib hashlib hmac base64 binascii struct array heapq bisect copy copyreg
    pickle pickletools shelve dbm dbm.dumb sqlite3 unittest unittest.mock doctest inspect ast dis
    tokenize symtable pyclbr code typing dataclasses enum contextlib contextvars operator io locale
    gettext mailbox imaplib poplib xmlrpc.client html html.parser http.cookiejar http.cookies
    urllib.robotparser urllib.error wsgiref.handlers socketserver pprint reprlib traceback warnings
    weakref importlib importlib.metadata importlib.resources importlib.abc pkgutil modulefinder
    runpy compileall py_compile zipapp platform sysconfig selectors mmap uuid secrets shlex cmd bdb
    profile pstats timeit trace tracemalloc wave colorsys plistlib netrc mimetypes quopri fnmatch
    linecache fileinput graphlib keyword stringprep pydoc ctypes multiprocessing.pool
    multiprocessing.managers multiprocessing.shared_memory
    """.split())

# A first paragraph like "sleep(seconds)" or "S.split(sep) -> list" is a signature, not a summary.
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$", re.S)
_MIN_ANCHOR_CHARS = 15
_MIN_POSITIVE_CHARS = 40


def _summary_and_rest(doc: str) -> tuple[str, str] | None:
  paragraphs = [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()]
  while paragraphs and _SIGNATURE.match(paragraphs[0]):
    paragraphs = paragraphs[1:]
  if len(paragraphs) < 2:
    return None
  anchor, positive = paragraphs[0], " ".join(paragraphs[1:])
  if len(anchor) < _MIN_ANCHOR_CHARS or len(positive) < _MIN_POSITIVE_CHARS:
    return None  # too short to say anything a model could match
  return anchor, positive


@functools.lru_cache(maxsize=1)
def _embedded_all() -> tuple[TextPair, ...]:
  found: list[tuple[str, str]] = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # deprecation warnings of old modules on import
    for name in EMBEDDED_PAIR_MODULES:
      try:
        module = importlib.import_module(name)
      except ImportError:
        continue
      found += [p for p in map(_summary_and_rest, labeled_text.module_docstrings(module)) if p]
  # A summary shared by several docstrings ("Close the file.") or a body shared by several
  # summaries has no single right answer: drop both kinds.
  anchors = collections.Counter(a for a, _ in found)
  positives = collections.Counter(p for _, p in found)
  return tuple(TextPair(a, p) for a, p in found if anchors[a] == 1 and positives[p] == 1)


def embedded_pairs(eval_fraction: float = 0.15) -> tuple[list[TextPair], list[TextPair]]:
  """(train, held-out) pairs from the installed standard library's docstrings (about 1,350 on
  Python 3.11), split by a hash of the anchor: the same split on every machine."""
  pairs = list(_embedded_all())
  return sources.split_by_hash([p.anchor for p in pairs], pairs, eval_fraction)


# ----------------------------------------------------------------------------- config


def load_pair_splits(data_config: Any) -> tuple[list[TextPair], list[TextPair], int]:
  """(train pairs, eval pairs, bad records skipped) from data.train / data.eval files, or the
  embedded pairs when data.train is unset. Without data.eval the train files are split by
  data.eval_fraction (a hash of the anchor). Field names: data.anchor_key / positive_key /
  negative_key; data.on_bad_record: 'error' (default) or 'skip'."""
  train_spec, eval_spec = str(sources.field(data_config, "train", "")), str(sources.field(data_config, "eval", ""))
  fraction = float(sources.field(data_config, "eval_fraction", 0.15))
  if not train_spec:
    if eval_spec:
      raise UserError("data.eval is set without data.train; give both files, or neither for the "
                      "embedded pairs")
    train, held = embedded_pairs(fraction)
    return train, held, 0
  keys = dict(anchor_key=str(sources.field(data_config, "anchor_key", "anchor")),
              positive_key=str(sources.field(data_config, "positive_key", "positive")),
              negative_key=str(sources.field(data_config, "negative_key", "negative")),
              on_bad_record=str(sources.field(data_config, "on_bad_record", "error")))
  train, skipped = load_pairs(train_spec, **keys)
  if eval_spec:
    held, more = load_pairs(eval_spec, **keys)
    skipped += more
  else:
    train, held = sources.split_by_hash([p.anchor for p in train], train, fraction)
  if not held:
    raise UserError("the eval split is empty; give data.eval or raise data.eval_fraction")
  return train, held, skipped
