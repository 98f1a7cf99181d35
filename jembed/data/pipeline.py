"""grain pipelines over in-memory columns: deterministic, shuffled, sharded by JAX process,
batched, prefetched and checkpointable (the iterator state is saved with the train state)."""
from __future__ import annotations

import json
from typing import Iterator

import grain
import jax
import numpy as np

from jembed import fs
from jembed.errors import UserError


class ColumnSource:
  """A random-access grain source over columns name -> (N, ...) arrays."""

  def __init__(self, columns: dict[str, np.ndarray]):
    self.columns = columns
    self._len = len(next(iter(columns.values())))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self.columns.items()}


# ---------------------------------------------------------------------------------------------------
# Bad records: the loaders either raise (data.on_bad_record='error') or skip and count them here;
# the loop reports the count in its log and in metrics.jsonl.
# ---------------------------------------------------------------------------------------------------
_BAD = {"skipped": 0, "examples": [], "seen": set()}


def reset_bad_records() -> None:
  _BAD["skipped"], _BAD["examples"] = 0, []
  _BAD["seen"] = set()


def bad_records() -> dict:
  return {"skipped": _BAD["skipped"], "examples": list(_BAD["examples"])}


def bad_record(config, where: str, problem: str, fix: str) -> None:
  """One bad record at `where` (file:line or a record index): a UserError, or counted and skipped
  when data.on_bad_record == 'skip'."""
  if on_bad_record(config) != "skip":
    raise UserError(f"{where}: {problem}; {fix}, or set --config.data.on_bad_record=skip to skip "
                    "such records")
  _BAD["skipped"] += 1
  if len(_BAD["examples"]) < 5:
    _BAD["examples"].append(f"{where}: {problem}")


def add_bad_records(summary: dict) -> None:
  """Counts the records a cached read skipped (a `bad_records()` summary) as if read again."""
  _BAD["skipped"] += int(summary.get("skipped", 0))
  _BAD["examples"] = (_BAD["examples"] + list(summary.get("examples", [])))[:5]


def skipped_record(where: str, problem: str) -> None:
  """A record that is always skipped whatever data.on_bad_record says (an empty document, which
  holds nothing to train on), counted and reported like the bad ones."""
  _BAD["skipped"] += 1
  if len(_BAD["examples"]) < 5:
    _BAD["examples"].append(f"{where}: {problem}")


def skipped_once(key: str, message: str) -> None:
  """A bad record found while streaming (jembed.data.image_stream), counted the first time its
  `key` (the file) is seen: a stream meets the same bad file again every epoch and after a rewind."""
  if key not in _BAD["seen"]:
    _BAD["seen"].add(key)
    skipped_record("data.on_bad_record=skip", message)


def decoded_lines(path: str, config) -> Iterator[tuple[int, str]]:
  """(line number, text) of each line of a file (local or gs://), read as it goes; a line whose bytes
  are not UTF-8 is a bad record (an error, or skipped and counted)."""
  with fs.open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        yield line_no, raw.decode("utf-8")
      except UnicodeDecodeError as e:
        bad_record(config, f"{path}:{line_no}", f"bytes that are not UTF-8 ({e.reason} at byte {e.start})",
                   "re-encode the file as UTF-8")


def json_line(config, where: str, line: str, form: str):
  """The JSON value on one .jsonl line, or None once a line that does not parse is reported as a bad
  record (`form` says what a good line looks like)."""
  try:
    return json.loads(line)
  except json.JSONDecodeError as e:
    bad_record(config, where, f"not valid JSON ({e.msg})", form)
    return None


def on_bad_record(config) -> str:
  # Configs written before the option existed have no such key; they keep the old behaviour.
  value = config.get("on_bad_record", "error") if hasattr(config, "get") else "error"
  return value or "error"


def per_process_batch(global_batch: int, batch_shards: int) -> int:
  """The share of the global batch each JAX process loads; refuses sizes that do not divide."""
  if global_batch % batch_shards:
    raise UserError(f"batch_size={global_batch} does not divide over the {batch_shards} devices the batch is "
                    f"sharded across (mesh data*fsdp); use a multiple of {batch_shards}")
  n = jax.process_count()
  if global_batch % n:
    raise UserError(f"batch_size={global_batch} does not divide over {n} processes; use a multiple of {n}")
  return global_batch // n


def train_iterator(columns: dict[str, np.ndarray], global_batch: int, seed: int, *,
                   prefetch: int = 4) -> grain.DatasetIterator:
  """An endless, epoch-reshuffled stream of this process's share of each global batch.

  Every process walks the same seeded global order and takes a strided slice of it, so the data
  order depends on the seed only, and each global batch is the same set of examples whatever the
  number of processes.
  """
  n_proc, idx = jax.process_count(), jax.process_index()
  local = global_batch // n_proc
  if len(ColumnSource(columns)) < global_batch:
    raise UserError(f"the training split has {len(ColumnSource(columns))} examples, fewer than "
                    f"batch_size={global_batch}; lower --config.batch_size or add data")
  ds = (grain.MapDataset.source(ColumnSource(columns))
        .seed(seed)
        .shuffle()
        .repeat()
        .batch(global_batch, drop_remainder=True)
        .map(lambda b: {k: v[idx * local:(idx + 1) * local] for k, v in b.items()}))
  read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(read))


def make_train_iterator(train, global_batch: int, seed: int) -> grain.DatasetIterator:
  """The train iterator of a task's `Data.train`: in-memory columns (`train_iterator`), or a
  source that makes its own, such as a prepared corpus streamed from disk
  (jembed.data.streaming.PreparedTrain)."""
  if hasattr(train, "train_iterator"):
    return train.train_iterator(global_batch, seed)
  return train_iterator(train, global_batch, seed)


def eval_batches(columns: dict[str, np.ndarray], global_batch: int, max_batches: int
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Fixed, unshuffled held-out batches (this process's share); the remainder is dropped. A split
  streamed from disk (jembed.data.image_stream.ImageStream) reads its own."""
  if hasattr(columns, "eval_batches"):
    return columns.eval_batches(global_batch, max_batches)
  return _column_eval_batches(columns, global_batch, max_batches)


def _column_eval_batches(columns, global_batch, max_batches):
  n_proc, idx = jax.process_count(), jax.process_index()
  local = global_batch // n_proc
  n = len(ColumnSource(columns)) // global_batch
  if max_batches:
    n = min(n, max_batches)
  for b in range(n):
    lo = b * global_batch + idx * local
    yield {k: v[lo:lo + local] for k, v in columns.items()}


def num_eval_batches(columns: dict[str, np.ndarray], global_batch: int, max_batches: int) -> int:
  if hasattr(columns, "num_eval_batches"):
    return columns.num_eval_batches(global_batch, max_batches)
  n = len(ColumnSource(columns)) // global_batch
  return min(n, max_batches) if max_batches else n
