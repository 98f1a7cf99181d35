"""The documents of an MLM corpus: the embedded default (jembed/data/corpus_embedded.py), the user's
.txt / .jsonl files, or a TFDS dataset.

`load_documents(config.data)` gives (train, eval) lists; `document_streams` the same as re-iterable
streams read line by line (jembed.data.prepare). Without an explicit eval set, eval is carved from
the training documents by a hash of their text (jembed.data.sources.split_by_hash).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np

from jembed.data import pipeline, sources, tfds_source
from jembed.data.corpus_embedded import embedded_documents
from jembed.errors import UserError

FORMATS = {".txt": "one document per line",
           ".jsonl": "one JSON object with a 'text' field per line"}
_field = sources.field


def resolve_source(config: Any) -> str:
  """'embedded', 'files' or 'tfds': the source `load_documents` reads for `config`."""
  return sources.resolve_source(config, "files")


def split_train_eval(docs: Sequence[str], eval_fraction: float) -> tuple[list[str], list[str]]:
  """Assigns each document to eval by a hash of its text: stable across runs and machines.

  Identical documents always land on the same side, so eval never leaks into train.
  """
  return sources.split_by_hash(docs, docs, eval_fraction)


def iter_file_documents(path: str, config: Any = None) -> Iterator[str]:
  """Documents of one .txt (one per line; blank lines are ignored) or .jsonl file, read line by
  line (memory does not grow with the file). A bad record (bytes that are not UTF-8, a JSON line
  that does not parse or lacks a string 'text' field) is an error naming file:line, or skipped and
  counted with data.on_bad_record='skip' (jembed.data.pipeline.bad_record). An empty document is
  always skipped, and counted."""
  form = "each .jsonl line must be one JSON object with a non-empty string 'text' field"
  for where, record in sources.file_records(path, config, form):
    if not isinstance(record.get("text"), str):
      pipeline.bad_record(config, where, "no string 'text' field", form)
      continue
    if not record["text"].strip():
      pipeline.skipped_record(where, "an empty 'text'")  # nothing to train on, never an error
      continue
    yield record["text"].strip()


def _read_files(spec: str, what: str, config: Any = None) -> list[str]:
  docs = [d for path in sources.expand_paths(spec, what, FORMATS)
          for d in iter_file_documents(path, config)]
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
  source = resolve_source(data_config)
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
  return (sources.expand_paths(train_spec, "train", FORMATS),
          sources.expand_paths(eval_spec, "eval", FORMATS) if eval_spec else [])


def document_streams(data_config: Any) -> tuple[Callable[[], Iterator[str]],
                                                Callable[[], Iterator[str]] | None, dict]:
  """What `load_documents` reads, as re-iterable streams: (train, explicit eval or None, a
  description of the source). Files are read line by line, so a pass over them takes bounded
  memory; the embedded corpus and TFDS splits are read whole (they fit in memory)."""
  source = resolve_source(data_config)
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
