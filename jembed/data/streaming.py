"""Training input from a prepared corpus (jembed.data.prepare): every JAX process opens and reads only
its own shard files, records are read on demand (never the whole corpus in memory), and the global
batches depend on the seed and the number of streams only, not on the number of processes.

Streams: shard i belongs to stream i % S (S = data.streams; 0 means one per process). Stream s is
its own grain pipeline, shuffled with seed + s, that yields global_batch / S rows per step; the
global batch of a step is the concatenation of the streams' batches in stream order. Process p of P
owns the contiguous streams [p S/P, (p+1) S/P), so its local batch is the p-th contiguous slice of
the global batch, as `jax.make_array_from_process_local_data` expects. With S fixed, a run on one
process and a run on several see the same global batches, and each process's iterator state (saved
with the checkpoint) is a plain step index.
"""
from __future__ import annotations

import dataclasses
import os

import grain
import jax
import numpy as np

from jembed.data import shards as shard_files
from jembed.errors import UserError


@dataclasses.dataclass
class PreparedTrain:
  """The training split of a prepared directory: shard files and their row counts."""
  directory: str
  shards: list[tuple[str, int]]   # (path, rows), in shard order
  seq_len: int
  streams: int = 0                # 0 = one stream per JAX process
  # The columns a row holds, in order, and each one's shape (None: MLM's {"tokens": [seq_len]});
  # e.g. prepared pairs: {"anchor": [L], "positive": [L], "negative": [K, L]}.
  layout: dict[str, list[int]] | None = None

  def columns(self) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in (self.layout or {"tokens": [self.seq_len]}).items()}

  def decode(self, record: bytes) -> dict[str, np.ndarray]:
    """One record as its columns."""
    return decode_columns(record, self.columns())

  def __len__(self) -> int:
    return sum(rows for _, rows in self.shards)

  def example_columns(self) -> dict[str, np.ndarray]:
    """One row shaped like the training columns (for shape-only planning: jembed.plan)."""
    return {k: np.zeros((1,) + shape, np.int32) for k, shape in self.columns().items()}

  def stream_count(self, process_count: int) -> int:
    return self.streams or process_count

  def owned_streams(self, global_batch: int, process_count: int, process_index: int
                    ) -> dict[int, list[int]]:
    """{stream: its shard indices} for the streams process `process_index` reads; checks sizes."""
    s = self.stream_count(process_count)
    n = len(self.shards)
    if s % process_count:
      raise UserError(f"data.streams={s} does not divide over {process_count} JAX processes; use a "
                      f"multiple of {process_count} (or 0 for one stream per process)")
    if global_batch % s:
      raise UserError(f"batch_size={global_batch} does not split into data.streams={s} streams; use a "
                      f"multiple of {s}")
    if n < s:
      raise UserError(f"data.prepared={self.directory} has {n} shards, fewer than the {s} streams "
                      f"(data.streams); re-run jembed.data.prepare with --shards a multiple of {s}")
    per = s // process_count
    owned = {t: list(range(t, n, s)) for t in range(process_index * per, (process_index + 1) * per)}
    for t, idx in owned.items():
      rows = sum(self.shards[i][1] for i in idx)
      if rows < global_batch // s:
        raise UserError(f"stream {t} of data.prepared={self.directory} has {rows} rows, fewer than its "
                        f"share {global_batch // s} of batch_size={global_batch}; lower batch_size or "
                        "prepare more data")
    return owned

  def dataset(self, global_batch: int, seed: int, *, process_count: int | None = None,
              process_index: int | None = None) -> grain.MapDataset:
    """This process's endless dataset of local batches (e.g. {"tokens": (global_batch / P, seq_len)})."""
    p = jax.process_count() if process_count is None else process_count
    i = jax.process_index() if process_index is None else process_index
    s = self.stream_count(p)
    per_stream = global_batch // s
    streams = []
    for t, idx in self.owned_streams(global_batch, p, i).items():
      # "path[0:rows]" tells the source the size, so no file is opened until it is read.
      paths = [f"{self.shards[k][0]}[0:{self.shards[k][1]}]" for k in idx]
      streams.append(grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
                     .seed(seed + t)
                     .shuffle()
                     .repeat()
                     .map(self.decode)
                     .batch(per_stream, drop_remainder=True))
    if len(streams) == 1:
      return streams[0]
    names = list(self.columns())
    return grain.experimental.ZipMapDataset(streams).map(
        lambda parts: {k: np.concatenate([b[k] for b in parts]) for k in names})

  def train_iterator(self, global_batch: int, seed: int, *, prefetch: int = 4,
                     process_count: int | None = None, process_index: int | None = None
                     ) -> grain.DatasetIterator:
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)
    ds = self.dataset(global_batch, seed, process_count=process_count, process_index=process_index)
    return iter(ds.to_iter_dataset(read))


def open_prepared(directory: str, streams: int = 0, kind: str = "text") -> tuple[dict, PreparedTrain]:
  """(prepared.json, the training split) of a directory written by jembed.data.prepare; `kind`:
  what the task reads ("text": a packed MLM corpus, "pairs": contrastive pairs, "labeled_text":
  labelled text for classification)."""
  meta = shard_files.read_metadata(directory)
  if meta.get("kind", "text") != kind:
    raise UserError(f"data.prepared={directory} holds {meta.get('kind', 'text')} rows, this task "
                    f"reads {kind}; prepare it with this task's config")
  root = os.path.abspath(os.path.expanduser(directory))
  shards = [(os.path.join(root, s["file"]), int(s["rows"])) for s in meta["shards"]]
  missing = [p for p, _ in shards if not os.path.isfile(p)]
  if missing:
    raise UserError(f"data.prepared={directory} lacks {os.path.basename(missing[0])} (and "
                    f"{len(missing) - 1} more); copy the whole directory or run jembed.data.prepare again")
  if streams < 0:
    raise UserError(f"data.streams={streams} must be >= 0 (0 = one stream per JAX process)")
  return meta, PreparedTrain(directory, shards, int(meta["seq_len"]), streams, meta.get("layout"))


def decode_columns(record: bytes, columns: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """One prepared row as its columns (name -> shape, in row order; shape () is a scalar)."""
  flat = shard_files.decode_row(record)
  out, at = {}, 0
  for name, shape in columns.items():
    size = int(np.prod(shape))
    out[name] = flat[at:at + size].reshape(shape)
    at += size
  return out


def read_eval_columns(directory: str, meta: dict, max_rows: int = 0) -> dict[str, np.ndarray]:
  """The first `max_rows` (0 = all) held-out rows, in order, in memory, as columns (the eval split is
  small, and of an MLM corpus only its first eval_batches * batch_size rows are ever used)."""
  path = os.path.join(os.path.expanduser(directory), meta["eval"]["file"])
  rows = int(meta["eval"]["rows"])
  n = min(rows, max_rows) if max_rows else rows
  columns = {k: tuple(v) for k, v in (meta.get("layout") or {"tokens": [meta["seq_len"]]}).items()}
  source = grain.sources.ArrayRecordDataSource([f"{path}[0:{rows}]"])
  records = source.__getitems__(list(range(n))) if n else []
  decoded = [decode_columns(r, columns) for r in records]
  return {k: (np.stack([d[k] for d in decoded]) if decoded else np.zeros((0,) + shape, np.int32))
          for k, shape in columns.items()}


def open_prepared_text(directory: str, streams: int, kind: str, seq_len: int, init=None):
  """(prepared.json, the training split, the tokenizer) of a directory of prepared text rows for a
  task that reads `kind`, after the checks every text task makes: the rows' seq_len is data.seq_len,
  tokenizer.json is the one the rows were made with, and a warm-start source (`init`) has its
  vocabulary."""
  import hashlib
  from jembed import fs
  from jembed.data import wordpiece
  meta, train = open_prepared(directory, streams, kind=kind)
  if int(meta["seq_len"]) != seq_len:
    raise UserError(f"data.seq_len={seq_len} but data.prepared={directory} holds rows of "
                    f"seq_len={meta['seq_len']}; set --config.data.seq_len={meta['seq_len']} or "
                    "prepare again with this seq_len")
  tok_path = fs.join(fs.absolute(directory), meta["tokenizer"])
  if hashlib.sha256(fs.read_bytes(tok_path)).hexdigest() != meta["tokenizer_sha256"]:
    raise UserError(f"{tok_path} is not the tokenizer the rows of data.prepared={directory} were made "
                    "with (its sha256 differs from prepared.json); run jembed.data.prepare again")
  tok = wordpiece.build_tokenizer((), 0, path=tok_path)
  if init is not None and init.tokenizer is not None and init.tokenizer.get_vocab() != tok.get_vocab():
    raise UserError(f"the warm-start source {init.description} has another vocabulary than "
                    f"data.prepared={directory}; prepare the data with the same config.init")
  return meta, train, tok


def check_streams(data_config) -> bool:
  """Whether the task reads data.prepared; data.streams without it is refused (it would do nothing)."""
  if data_config.streams and not data_config.prepared:
    raise UserError(f"data.streams={data_config.streams} applies only to data.prepared (data made "
                    "by jembed.data.prepare); set data.prepared or leave data.streams at 0")
  return bool(data_config.prepared)
