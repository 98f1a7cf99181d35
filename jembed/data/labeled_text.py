"""Labelled text for classification: the user's .jsonl/.csv files, a TFDS dataset, or an embedded
default that needs no download.

`load_labeled_text(data_config)` returns a `LabeledText` (train/eval texts, integer labels and class
names). Labels may be strings or integers in the files; classes are the sorted distinct training
labels (numerically when every label is an integer), and an eval label never seen in training is
refused.

The embedded default labels docstrings of the Python standard library (functions, classes and their
methods, read at run time from the installed modules) by what their module is about: numbers, files,
text, time, network or concurrency (see `EMBEDDED_TOPICS`). It is a small, genuinely textual topic
task: a docstring of `socket.recv` must be told apart from one of `os.read`.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import importlib
import inspect
import os
from typing import Any

import numpy as np

from jembed.data import pipeline, tfds_source
from jembed.errors import UserError

# topic -> stdlib modules whose docstrings carry that label.
EMBEDDED_TOPICS: dict[str, tuple[str, ...]] = {
    "numbers": ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers"),
    "files": ("os", "os.path", "shutil", "pathlib", "glob", "tempfile", "filecmp", "stat"),
    "text": ("re", "string", "textwrap", "difflib", "unicodedata", "codecs"),
    "time": ("datetime", "time", "calendar", "zoneinfo", "sched"),
    "network": ("socket", "ssl", "urllib.request", "urllib.parse", "http.client", "http.server",
                "smtplib", "ftplib", "ipaddress"),
    "concurrency": ("threading", "multiprocessing", "queue", "asyncio", "concurrent.futures",
                    "subprocess", "signal"),
}
_MIN_DOC_CHARS = 40
_MAX_DOC_CHARS = 2000


@dataclasses.dataclass
class LabeledText:
  train_texts: list[str]
  train_labels: np.ndarray  # int32, indices into class_names
  eval_texts: list[str]
  eval_labels: np.ndarray
  class_names: list[str]


def _get(config: Any, name: str, default: Any) -> Any:
  value = config.get(name, default) if config is not None and hasattr(config, "get") else default
  return default if value is None else value


# ----------------------------------------------------------------------------- embedded


def _docstrings(module) -> list[str]:
  """Own docstrings of a module's public functions, classes and their methods."""
  top = module.__name__.split(".")[0]
  out, seen = [], set()

  def add(obj):
    doc = getattr(obj, "__doc__", None)
    if isinstance(doc, str) and len(doc.strip()) >= _MIN_DOC_CHARS:
      out.append(inspect.cleandoc(doc)[:_MAX_DOC_CHARS])

  for name in sorted(dir(module)):
    obj = getattr(module, name, None)
    if name.startswith("_") or id(obj) in seen:
      continue
    if not (inspect.isroutine(obj) or inspect.isclass(obj)):
      continue  # constants would contribute int's or str's docstring
    seen.add(id(obj))
    if inspect.isclass(obj) and not str(getattr(obj, "__module__", "")).lstrip("_").startswith(top):
      continue  # re-exported classes (e.g. os.DirEntry is fine, but not builtins like int)
    add(obj)
    if inspect.isclass(obj):
      for attr, value in sorted(vars(obj).items()):
        if attr.startswith("_"):
          continue
        if isinstance(value, (classmethod, staticmethod)):
          value = value.__func__
        if inspect.isroutine(value) or isinstance(value, property):
          add(value)
  return out


def embedded_examples() -> tuple[list[str], list[str]]:
  """(texts, topic labels) from the installed standard library, deduplicated; a text that occurs
  under two topics is dropped rather than given either label."""
  labels: dict[str, set[str]] = {}
  order: list[str] = []
  for topic, modules in EMBEDDED_TOPICS.items():
    for name in modules:
      try:
        module = importlib.import_module(name)
      except ImportError:  # a Python built without e.g. ssl still gives the other topics
        continue
      for doc in _docstrings(module):
        if doc not in labels:
          labels[doc] = set()
          order.append(doc)
        labels[doc].add(topic)
  texts = [d for d in order if len(labels[d]) == 1]
  return texts, [next(iter(labels[d])) for d in texts]


def _hash_unit(text: str) -> float:
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64


def hash_split(texts: list[str], labels: list, eval_fraction: float):
  """Assigns each example to eval by a hash of its text: the same split on every machine."""
  if not 0.0 < eval_fraction < 1.0:
    raise UserError(f"data.eval_fraction={eval_fraction} must be in (0, 1) when no data.eval is given")
  held = [_hash_unit(t) < eval_fraction for t in texts]
  pick = lambda want: ([t for t, h in zip(texts, held) if h == want],
                       [l for l, h in zip(labels, held) if h == want])
  return pick(False), pick(True)


# ----------------------------------------------------------------------------- files


def _paths(spec: str, what: str) -> list[str]:
  paths = []
  for pattern in (p.strip() for p in spec.split(",") if p.strip()):
    matches = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
    if not matches:
      raise UserError(f"data.{what}: {pattern!r} matches no files; check the path or glob")
    for path in matches:
      if not path.endswith((".jsonl", ".csv")):
        raise UserError(f"data.{what}: unsupported file {path!r}; use .jsonl (objects with 'text' "
                        "and 'label') or .csv (a header with text,label)")
      paths.append(path)
  return paths


def _read_jsonl(path: str, text_key: str, label_key: str, config=None):
  texts, labels = [], []
  form = f'each line must be one object like {{"{text_key}": "...", "{label_key}": ...}}'
  for line_no, line in pipeline.decoded_lines(path, config):
    where = f"{path}:{line_no}"
    if not line.strip():
      continue
    record = pipeline.json_line(config, where, line, form)
    if record is None:
      continue
    if not isinstance(record, dict) or not isinstance(record.get(text_key), str) \
        or label_key not in record:
      pipeline.bad_record(config, where, f"needs a string '{text_key}' and a '{label_key}' field",
                          f"{form} (set data.text_key / data.label_key for other names)")
      continue
    if not record[text_key].strip():
      pipeline.skipped_record(where, f"an empty '{text_key}'")  # nothing to learn from
      continue
    texts.append(record[text_key])
    labels.append(record[label_key])
  return texts, labels


def _read_csv(path: str, text_key: str, label_key: str, config=None):
  numbered = list(pipeline.decoded_lines(path, config))
  reader = csv.DictReader((line for _, line in numbered))
  if not reader.fieldnames or text_key not in reader.fieldnames or label_key not in reader.fieldnames:
    raise UserError(f"{path}: the header must name '{text_key}' and '{label_key}' columns, got "
                    f"{reader.fieldnames}; fix the header or set data.text_key / data.label_key")
  texts, labels = [], []
  for row in reader:
    # reader.line_num counts lines read so far; with the skipped-undecodable lines the record's
    # line in the file is looked up from the numbered list.
    line_no = numbered[min(reader.line_num, len(numbered)) - 1][0]
    where = f"{path}:{line_no}"
    if None in row or any(v is None for v in row.values()):
      pipeline.bad_record(config, where, f"{len(reader.fieldnames)} columns expected",
                          "fix the row (quote fields that hold commas)")
      continue
    if not row[text_key].strip():
      pipeline.skipped_record(where, f"an empty '{text_key}'")
      continue
    texts.append(row[text_key])
    labels.append(row[label_key])
  return texts, labels


def _read_files(spec: str, what: str, text_key: str, label_key: str, config=None):
  texts, labels = [], []
  for path in _paths(spec, what):
    try:
      read = _read_jsonl if path.endswith(".jsonl") else _read_csv
      t, l = read(path, text_key, label_key, config)
    except OSError as e:
      raise UserError(f"cannot read {path} ({e.strerror}); check the path") from None
    texts += t
    labels += l
  if not texts:
    raise UserError(f"data.{what}={spec!r} holds no examples; add lines to the files")
  return texts, labels


# ----------------------------------------------------------------------------- tfds


def _tfds(config, split: str):
  text_key, label_key = str(_get(config, "text_key", "text")), str(_get(config, "label_key", "label"))
  ds, builder = tfds_source.open_split(config, split, "tfds_split", "imdb_reviews")
  texts, labels = [], []
  for record in ds:
    text = record[text_key]
    texts.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
    labels.append(int(record[label_key]))
  names = None
  feature = builder.info.features[label_key] if label_key in builder.info.features else None
  if feature is not None and hasattr(feature, "names"):
    names = list(feature.names)
  return texts, labels, names


# ----------------------------------------------------------------------------- all sources


def _encode(train_labels: list, eval_labels: list, names: list[str] | None = None):
  if names is not None:  # integer labels with known class names (TFDS)
    return (np.asarray(train_labels, np.int32), np.asarray(eval_labels, np.int32), names)
  as_str = [str(l).strip() for l in train_labels]
  distinct = set(as_str)
  numeric = all(s.lstrip("-").isdigit() for s in distinct)
  classes = sorted(distinct, key=int) if numeric else sorted(distinct)
  if len(classes) < 2:
    raise UserError(f"the training labels hold {len(classes)} class(es) ({classes}); a classifier "
                    "needs at least two")
  index = {c: i for i, c in enumerate(classes)}
  unseen = sorted({str(l).strip() for l in eval_labels} - distinct)
  if unseen:
    raise UserError(f"eval labels {unseen[:5]} never occur in the training data; fix the labels or "
                    "add training examples for them, or set --config.data.on_bad_record=skip to skip "
                    "those examples")
  encode = lambda ls: np.asarray([index[str(l).strip()] for l in ls], np.int32)
  return encode(train_labels), encode(eval_labels), classes


def _drop_unseen_labels(texts: list, labels: list, train_labels: list, config, what: str):
  """Eval examples whose label the training data lacks: a bad record each (skip or error)."""
  known = {str(l).strip() for l in train_labels}
  keep_t, keep_l = [], []
  for i, (t, l) in enumerate(zip(texts, labels)):
    if str(l).strip() not in known:
      pipeline.bad_record(config, f"data.{what} example {i}", f"label {str(l).strip()!r} is not in "
                          "the training label set", "fix the label or add training examples for it")
      continue
    keep_t.append(t)
    keep_l.append(l)
  return keep_t, keep_l


def load_labeled_text(data_config) -> LabeledText:
  """Train/eval texts and labels from data.train/data.eval files, data.tfds_name, or the embedded
  standard-library topics (the default)."""
  train_spec, eval_spec = str(_get(data_config, "train", "")), str(_get(data_config, "eval", ""))
  tfds_name = str(_get(data_config, "tfds_name", ""))
  fraction = float(_get(data_config, "eval_fraction", 0.2))
  text_key, label_key = str(_get(data_config, "text_key", "text")), str(_get(data_config, "label_key", "label"))
  names = None
  if train_spec and tfds_name:
    raise UserError("data.train and data.tfds_name are both set; keep one")
  if train_spec:
    texts, labels = _read_files(train_spec, "train", text_key, label_key, data_config)
    if eval_spec:
      eval_texts, eval_labels = _read_files(eval_spec, "eval", text_key, label_key, data_config)
      if pipeline.on_bad_record(data_config) == "skip":
        eval_texts, eval_labels = _drop_unseen_labels(eval_texts, eval_labels, labels, data_config,
                                                      "eval")
    else:
      (texts, labels), (eval_texts, eval_labels) = hash_split(texts, labels, fraction)
  elif tfds_name:
    texts, labels, names = _tfds(data_config, str(_get(data_config, "tfds_split", "train")))
    eval_split = str(_get(data_config, "tfds_eval_split", "test"))
    eval_texts, eval_labels, _ = _tfds(data_config, eval_split)
  else:
    if eval_spec:
      raise UserError("data.eval is set without data.train; give both files, or neither for the "
                      "embedded dataset")
    texts, labels = embedded_examples()
    (texts, labels), (eval_texts, eval_labels) = hash_split(texts, labels, fraction)
  if not eval_texts:
    raise UserError("the eval split is empty; give data.eval or raise data.eval_fraction")
  train_y, eval_y, classes = _encode(labels, eval_labels, names)
  return LabeledText(texts, train_y, eval_texts, eval_y, list(classes))
