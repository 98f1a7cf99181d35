"""Labelled text for classification: the user's .jsonl/.csv files, a TFDS dataset, or an embedded
default that needs no download.

`load_labeled_text(data_config)` returns a `LabeledText` (train/eval texts, integer labels and class
names) in memory; `example_streams` gives the same examples one at a time, for
`python -m jembed.data.prepare` (jembed/data/prepare_labeled.py). Labels may be strings or integers in the files; classes are the sorted distinct training
labels (numerically when every label is an integer), and an eval label never seen in training is
refused.

The embedded default labels docstrings of the Python standard library (functions, classes and their
methods, read at run time from the installed modules) by what their module is about: numbers, files,
text, time, network or concurrency (see `EMBEDDED_TOPICS`). It is a small, genuinely textual topic
task: a docstring of `socket.recv` must be told apart from one of `os.read`.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from jembed.data import pipeline, sources, tfds_source
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


# ----------------------------------------------------------------------------- embedded


def module_docstrings(module) -> list[str]:
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
      for doc in module_docstrings(module):
        if doc not in labels:
          labels[doc] = set()
          order.append(doc)
        labels[doc].add(topic)
  texts = [d for d in order if len(labels[d]) == 1]
  return texts, [next(iter(labels[d])) for d in texts]


# ----------------------------------------------------------------------------- files


FORMATS = {".jsonl": "objects with 'text' and 'label'", ".csv": "a header with text,label"}


def iter_file_examples(path: str, text_key: str, label_key: str, config=None
                       ) -> Iterator[tuple[str, Any]]:
  """(text, label) of each example of a .jsonl or .csv file, read line by line; a bad record is an
  error naming file:line or, with data.on_bad_record='skip', skipped and counted."""
  form = f'each line must be one object like {{"{text_key}": "...", "{label_key}": ...}}'
  sources.require_columns(path, (text_key, label_key),
                          "fix the header or set data.text_key / data.label_key")
  for where, record in sources.file_records(path, config, form):
    if not isinstance(record.get(text_key), str) or label_key not in record:
      pipeline.bad_record(config, where, f"needs a string '{text_key}' and a '{label_key}' field",
                          f"{form} (set data.text_key / data.label_key for other names)")
      continue
    if not record[text_key].strip():
      pipeline.skipped_record(where, f"an empty '{text_key}'")  # nothing to learn from
      continue
    yield record[text_key], record[label_key]


def _tfds_examples(config, split: str) -> Iterator[tuple[str, int]]:
  text_key, label_key = str(sources.field(config, "text_key", "text")), str(sources.field(config, "label_key", "label"))
  ds, _ = tfds_source.open_split(config, split, "tfds_split", "imdb_reviews")
  for record in ds:
    text = record[text_key]
    yield text.decode("utf-8") if isinstance(text, bytes) else str(text), int(record[label_key])


def _tfds_class_names(config, split: str) -> list[str] | None:
  label_key = str(sources.field(config, "label_key", "label"))
  _, builder = tfds_source.open_split(config, split, "tfds_split", "imdb_reviews")
  feature = builder.info.features[label_key] if label_key in builder.info.features else None
  return list(feature.names) if feature is not None and hasattr(feature, "names") else None


# ----------------------------------------------------------------------------- all sources

Examples = Callable[[], Iterator[tuple[str, Any]]]


@dataclasses.dataclass
class ExampleStreams:
  """The (text, raw label) examples of a config's source, as re-iterable streams (each call reads
  again, one example at a time), and the class names when the source declares them (TFDS). `eval`
  is None when it is carved from train by `eval_fraction` (`carved` does that, streamed)."""
  train: Examples
  eval: Examples | None
  eval_fraction: float
  names: list[str] | None = None
  description: dict = dataclasses.field(default_factory=dict)

  def carved(self) -> tuple[Examples, Examples]:
    """(train, eval) streams, eval carved from train by a hash of the text when there is no eval set
    (jembed.data.sources.held_out_rule: the same split as `sources.split_by_hash` in memory)."""
    if self.eval is not None:
      return self.train, self.eval
    every = self.train
    rule = sources.held_out_rule(lambda: (t for t, _ in every()), self.eval_fraction)
    return (lambda: ((t, l) for t, l in every() if not rule(t)),
            lambda: ((t, l) for t, l in every() if rule(t)))


def example_streams(data_config) -> ExampleStreams:
  """The examples of data.train/data.eval files, data.tfds_name, or the embedded standard-library
  topics (the default), streamed. Without data.eval, eval is carved from train by a hash of the text
  (`ExampleStreams.carved`)."""
  train_spec, eval_spec = str(sources.field(data_config, "train", "")), str(sources.field(data_config, "eval", ""))
  fraction = float(sources.field(data_config, "eval_fraction", 0.2))
  text_key, label_key = str(sources.field(data_config, "text_key", "text")), str(sources.field(data_config, "label_key", "label"))
  source = sources.resolve_source(data_config, "files")
  if source == "files":
    read = lambda paths: lambda: (e for p in paths for e in iter_file_examples(
        p, text_key, label_key, data_config))
    train_files = sources.expand_paths(train_spec, "train", FORMATS)
    train = read(train_files)
    held = read(sources.expand_paths(eval_spec, "eval", FORMATS)) if eval_spec else None
    description = {"source": "files", "train": train_files}
    names = None
  elif source == "tfds":
    split, eval_split = str(sources.field(data_config, "tfds_split", "train")), str(sources.field(data_config, "tfds_eval_split", "test"))
    train = lambda: _tfds_examples(data_config, split)
    held = lambda: _tfds_examples(data_config, eval_split)
    names = _tfds_class_names(data_config, split)
    description = {"source": "tfds", "name": str(sources.field(data_config, "tfds_name", "")), "split": split,
                   "eval_split": eval_split}
  else:
    if eval_spec:
      raise UserError("data.eval is set without data.train; give both files, or neither for the "
                      "embedded dataset")
    texts, labels = embedded_examples()
    train, held, names = (lambda: zip(texts, labels)), None, None
    description = {"source": "embedded"}
  if held is None:
    description["eval_fraction"] = fraction
  return ExampleStreams(train, held, fraction, names, description)


def class_names(train_labels: Iterable, names: list[str] | None = None) -> list[str]:
  """The classes: the source's names (TFDS), else the sorted distinct training labels (numerically
  when every label is an integer)."""
  if names is not None:
    return list(names)
  distinct = {str(l).strip() for l in train_labels}
  numeric = all(s.lstrip("-").isdigit() for s in distinct)
  classes = sorted(distinct, key=int) if numeric else sorted(distinct)
  if len(classes) < 2:
    raise UserError(f"the training labels hold {len(classes)} class(es) ({classes}); a classifier "
                    "needs at least two")
  return classes


class LabelIndex:
  """Raw label -> class index. An eval label the training data lacks is a bad record: skipped and
  counted with data.on_bad_record='skip', else collected and refused in one line by `check`."""

  def __init__(self, classes: list[str], config, by_position: bool = False):
    # by_position: the labels are already indices into the source's names (TFDS).
    self.index = ({i: i for i in range(len(classes))} if by_position
                  else {c: i for i, c in enumerate(classes)})
    self.by_position = by_position
    self.config = config
    self.unseen: set[str] = set()

  def __call__(self, label, where: str) -> int | None:
    key = label if self.by_position else str(label).strip()
    if key in self.index:
      return self.index[key]
    if pipeline.on_bad_record(self.config) == "skip":
      pipeline.bad_record(self.config, where, f"label {str(key)!r} is not in the training label set",
                          "fix the label or add training examples for it")
    else:
      self.unseen.add(str(key))
    return None

  def check(self) -> None:
    if self.unseen:
      raise UserError(f"eval labels {sorted(self.unseen)[:5]} never occur in the training data; fix "
                      "the labels or add training examples for them, or set "
                      "--config.data.on_bad_record=skip to skip those examples")


def load_labeled_text(data_config) -> LabeledText:
  """Train/eval texts and labels from data.train/data.eval files, data.tfds_name, or the embedded
  standard-library topics (the default), in memory (`example_streams` read once)."""
  streams = example_streams(data_config)
  train = list(streams.train())   # each file read once: a bad record is counted once
  if streams.eval is None:
    texts = [t for t, _ in train]
    train, held = sources.split_by_hash(texts, train, streams.eval_fraction)
  else:
    held = streams.eval()
  if not train:
    raise UserError(f"data.train={str(sources.field(data_config, 'train', ''))!r} holds no examples; add "
                    "lines to the files")
  classes = class_names((l for _, l in train), streams.names)
  index = LabelIndex(classes, data_config, by_position=streams.names is not None)
  train_y = np.asarray([index(l, f"data.train example {i}") for i, (_, l) in enumerate(train)],
                       np.int32)
  eval_texts, eval_y = [], []
  for i, (t, l) in enumerate(held):
    y = index(l, f"data.eval example {i}")
    if y is not None:
      eval_texts.append(t)
      eval_y.append(y)
  index.check()
  if not eval_texts:
    raise UserError("the eval split is empty; give data.eval or raise data.eval_fraction")
  return LabeledText([t for t, _ in train], train_y, eval_texts, np.asarray(eval_y, np.int32),
                     classes)
