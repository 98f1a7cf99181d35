"""Where the data of every text task comes from, said once: which source a config names, the files a
path spec names, the hash rule that holds examples out for evaluation, and the records of a .txt,
.jsonl or .csv file.

Documents (MLM, jembed/data/documents.py), labelled text (jembed/data/labeled_text.py) and pairs
(jembed/data/pairs.py) all read through these, so a glob, a split or a bad line behaves the same in
each. Bad records go through the one counter, jembed.data.pipeline.bad_record.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

from jembed import fs
from jembed.data import pipeline
from jembed.errors import UserError


def field(config: Any, name: str, default: Any) -> Any:
  """config.name, or `default` when the config lacks it or holds None."""
  value = getattr(config, name, default) if config is not None else default
  return default if value is None else value


# ----------------------------------------------------------------------------- source


def resolve_source(config: Any, local: str = "files") -> str:
  """'embedded', `local` (what the task calls its own files: 'files', 'folder') or 'tfds'.

  "embedded" is the default, so a config that only sets data.train or data.tfds_name means that
  source; an explicit data.source is taken as it is ('files' and 'folder' name the same thing)."""
  source = str(field(config, "source", "") or "").strip().lower()
  train = str(field(config, "train", "")).strip()
  tfds_name = str(field(config, "tfds_name", "")).strip()
  if source in ("", "embedded") and (train or tfds_name):
    if train and tfds_name:
      choose = (f"set data.source='{local}' or 'tfds' to choose one" if hasattr(config, "source")
                else "keep one")
      raise UserError(f"data.train and data.tfds_name are both set; {choose}")
    return local if train else "tfds"
  if source in ("", "embedded"):
    return "embedded"
  if source in ("files", "folder"):
    return local
  if source != "tfds":
    raise UserError(f"unknown data.source {source!r}; use 'embedded', '{local}' or 'tfds'")
  return source


# ----------------------------------------------------------------------------- files


def expand_paths(spec: str, what: str | None, formats: dict[str, str]) -> list[str]:
  """The files a comma-separated list of paths, globs or directories names, in order, each once.

  `formats`: extension -> what such a file holds (for the error naming the accepted kinds); a
  directory gives its files of those extensions. `what` names the config field in errors."""
  where = f"data.{what}: " if what else ""
  extensions = tuple(formats)
  kinds = " or ".join(f"{ext} ({about})" for ext, about in formats.items())
  paths: list[str] = []
  for pattern in (p.strip() for p in str(spec).split(",")):
    if not pattern:
      continue
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
      matches = sorted(os.path.join(pattern, f) for f in os.listdir(pattern) if f.endswith(extensions))
      if not matches:
        raise UserError(f"{where}directory {pattern!r} has no {' or '.join(extensions)} files; point "
                        "it at the files or a glob such as 'dir/*.jsonl'")
    else:
      matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
      if not matches:
        raise UserError(f"{where}{pattern!r} matches no files; check the path or glob "
                        "(comma-separate several)")
    for path in matches:
      if not path.endswith(extensions):
        raise UserError(f"{where}unsupported file type {path!r}; use {kinds}")
      if path not in paths:
        paths.append(path)
  if not paths:
    raise UserError(f"{where}no files given; set it to a {' or '.join(extensions)} path or glob")
  return paths


def file_records(path: str, config: Any, form: str) -> Iterator[tuple[str, dict]]:
  """(file:line, record) of each non-blank record of a .txt, .jsonl or .csv file, read line by line.

  .txt: {"text": the line}; .jsonl: the JSON object; .csv: the row by the header's names (a short row
  lacks its last fields). A line that is not UTF-8 or not JSON, a JSON value that is no object and a
  row with more cells than the header are bad records (jembed.data.pipeline.bad_record: an error, or
  skipped and counted with data.on_bad_record='skip'); `form` says what a good record looks like."""
  try:
    if path.lower().endswith(".csv"):
      yield from _csv_records(path, config)
      return
    jsonl = path.lower().endswith(".jsonl")
    for line_no, line in pipeline.decoded_lines(path, config):
      where = f"{path}:{line_no}"
      if not line.strip():
        continue  # blank lines separate nothing; not a record
      if not jsonl:
        yield where, {"text": line.rstrip("\r\n")}
        continue
      record = pipeline.json_line(config, where, line, form)
      if record is None:
        continue
      if not isinstance(record, dict):
        pipeline.bad_record(config, where, "not a JSON object", form)
        continue
      yield where, record
  except OSError as e:
    raise UserError(f"cannot read {path} ({e.strerror}); check the path and permissions") from None


def _csv_records(path: str, config: Any) -> Iterator[tuple[str, dict]]:
  last = [0]  # the line number of the last line the csv reader took (a quoted field may span lines)

  def lines():
    for line_no, line in pipeline.decoded_lines(path, config):
      last[0] = line_no
      yield line

  reader = csv.DictReader(lines())
  header = reader.fieldnames or []
  for row in reader:
    where = f"{path}:{last[0]}"
    if None in row:
      pipeline.bad_record(config, where, f"{len(header)} columns expected",
                          "fix the row (quote fields that hold commas)")
      continue
    yield where, {k: v for k, v in row.items() if v is not None}


def csv_header(path: str) -> list[str]:
  """The column names of a .csv file's first line (for refusing a file without a needed column
  before reading it)."""
  try:
    with fs.open(path, "rb") as f:
      first = f.readline().decode("utf-8", errors="replace")
    return next(csv.reader([first]), [])
  except OSError as e:
    raise UserError(f"cannot read {path} ({e.strerror}); check the path and permissions") from None


def require_columns(path: str, columns: Sequence[str], fix: str) -> None:
  """Refuses a .csv file whose header lacks any of `columns` (one line, naming them)."""
  if not path.endswith(".csv"):
    return
  header = csv_header(path)
  missing = [c for c in columns if c not in header]
  if missing:
    raise UserError(f"{path}: the header {header} lacks {missing}; {fix}")


# ----------------------------------------------------------------------------- held-out split


def hash_unit(text: str) -> float:
  """A number in [0, 1) from the text alone: the same on every machine and in every run."""
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64


def check_fraction(eval_fraction: float) -> float:
  if not 0.0 <= eval_fraction < 1.0:
    raise UserError(f"data.eval_fraction={eval_fraction} is outside [0, 1); use e.g. 0.05")
  return eval_fraction


def split_by_hash(keys: Sequence[str], items: Sequence, eval_fraction: float) -> tuple[list, list]:
  """(train items, held-out items): an item is held out when the hash of its key (its text, a pair's
  anchor) is below `eval_fraction`, so identical keys always land on the same side and eval never
  leaks into train. A tiny set where no key falls below the fraction still holds out the items of
  its lowest-hash key (when it has two different keys). `held_out_rule` is the same rule, streamed."""
  check_fraction(eval_fraction)
  units = [hash_unit(k) for k in keys]
  held = [u < eval_fraction for u in units]
  if eval_fraction > 0 and not any(held) and len(set(keys)) > 1:
    lowest = min(zip(units, keys))[1]
    held = [k == lowest for k in keys]
  return ([x for x, h in zip(items, held) if not h], [x for x, h in zip(items, held) if h])


def held_out_rule(keys: Callable[[], Iterable[str]], eval_fraction: float) -> Callable[[str], bool]:
  """`split_by_hash`'s rule for one key at a time, for a stream too large for memory: whether an
  item with that key is held out. Its tiny-set fallback is found by one pass over `keys()` that
  keeps O(1) keys in memory (it stops at the first key below the fraction)."""
  check_fraction(eval_fraction)
  lowest, first, distinct = None, None, False
  for key in keys():
    unit = hash_unit(key)
    if unit < eval_fraction:
      return lambda k: hash_unit(k) < eval_fraction
    if lowest is None or (unit, key) < lowest:
      lowest = (unit, key)
    if first is None:
      first = key
    elif key != first:
      distinct = True
  if eval_fraction == 0 or not distinct:
    return lambda k: hash_unit(k) < eval_fraction
  held_key = lowest[1]
  return lambda k: k == held_key
