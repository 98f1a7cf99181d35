"""Labelled images streamed from disk, per host: memory holds file names and labels, never pixels.

Sources (chosen from config.data, see `open_splits`):
  - a class-per-folder tree (`data.train=DIR`, `data.eval=DIR`): DIR/<class>/<image>, any sizes;
  - a list file (`data.train=list.csv` or `.jsonl`): CSV with a `path,label` header, or JSON lines
    {"path": ..., "label": ...}; paths relative to the list file's folder; labels class names or ints;
  - TFDS (`data.tfds_name`), read record by record through `tfds.data_sources` (ArrayRecord, already
    prepared under data.data_dir), the image feature left encoded and decoded here.

Training (`ImageStream.train_iterator`): each JAX process takes the records i with i % P == p
(disjoint shards that cover the data), reshuffles its shard every epoch with the run's seed, and
decodes + augments (random-resized crop, flip: image_transforms.train_transform) in `data.workers`
grain worker processes, whole local batches at a time. The pipeline is a grain MapDataset up to the
batches, so the output is the same for any worker count and the iterator state saved with the
checkpoint is a batch index: resume is exact.

Bad images: with data.on_bad_record='error' a UserError naming the file; with 'skip' the next record
of the same shard stands in (batches keep their size and the stream stays deterministic) and the
file is counted once in jembed.data.pipeline's bad-record counters (the count travels with the batch
from the worker process and is added in the main process).

Evaluation (`ImageStream.eval_batches`, `ImageStream.batches`) reads the held-out split in fixed
order through the model's evaluation view (image_transforms.eval_transform), a batch at a time.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from jembed import fs
from jembed.data import image_transforms as T
from jembed.data import sources
from jembed.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LIST_EXTENSIONS = (".csv", ".jsonl")
# A marker that survives grain's worker-process error wrapping, so the main process can raise the
# one-line UserError the worker meant.
_USER_ERROR = "jembed-user-error: "
# Fixed so the held-out split never changes between runs or machines.
_SPLIT_SEED = 0


def _field(config: Any, name: str, default: Any) -> Any:
  value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
  return default if value is None else value


# ----------------------------------------------------------------------------- records


class FileRecords:
  """Image files and their labels (what a folder tree or a list file names). The names are kept as
  UTF-8 bytes relative to their common folder in one fixed-width array (ImageNet's 1.28M names:
  ~40 MB), not as a list of Python strings."""

  def __init__(self, paths: Sequence[str], labels: Sequence[int], root: str | None = None,
               names: np.ndarray | None = None):
    if names is None:
      paths = list(paths)
      root = _common_folder(paths)
      cut = len(root) + 1 if root else 0
      names = np.asarray([p[cut:].encode("utf-8") for p in paths], dtype=bytes)
    self.root, self.names = root or "", names
    self.labels = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def path(self, i: int) -> str:
    name = self.names[i].decode("utf-8")
    return f"{self.root}/{name}" if self.root else name

  @property
  def paths(self) -> list[str]:
    return [self.path(i) for i in range(len(self))]

  def subset(self, idx: np.ndarray) -> "FileRecords":
    return FileRecords((), self.labels[idx], self.root, self.names[idx])

  def all_labels(self) -> np.ndarray:
    return self.labels

  def read(self, i: int) -> tuple[bytes | None, int, str, str]:
    """(encoded bytes or None, label, name, why it could not be read)."""
    path = self.path(i)
    try:
      return fs.read_bytes(path), int(self.labels[i]), path, ""
    except OSError as e:
      return None, int(self.labels[i]), path, f"{type(e).__name__}: {e}"


def _common_folder(paths: list[str]) -> str:
  """The longest folder prefix (ending before a "/") that all paths share; "" if none."""
  if not paths:
    return ""
  first, last = min(paths), max(paths)  # the common prefix of all is that of the extremes
  n = 0
  while n < min(len(first), len(last)) and first[n] == last[n]:
    n += 1
  return first[:n].rsplit("/", 1)[0] if "/" in first[:n] else ""


class TfdsRecords:
  """Records of a TFDS split (a random-access `tfds.data_sources` source with the image feature
  left encoded); `index` maps record positions to source indices (a held-out subset)."""

  def __init__(self, source, name: str, index: np.ndarray | None = None):
    self.source = source
    self.name = name
    self.index = np.arange(len(source), dtype=np.int64) if index is None else index

  def __len__(self) -> int:
    return len(self.index)

  def subset(self, idx: np.ndarray) -> "TfdsRecords":
    return TfdsRecords(self.source, self.name, self.index[idx])

  def all_labels(self) -> np.ndarray | None:
    return None  # reading them would read every image; splits held out from TFDS are not stratified

  def read(self, i: int) -> tuple[bytes | None, int, str, str]:
    j = int(self.index[i])
    record = self.source[j]
    return record["image"], int(record["label"]), f"{self.name}[{j}]", ""


# ----------------------------------------------------------------------------- loading (workers)


@dataclasses.dataclass(frozen=True)
class View:
  """How a record becomes a model input: the model's preprocessing, train or eval view."""
  pp: T.Preprocess
  train: bool
  crop_scale: tuple[float, float] = (0.08, 1.0)
  flip: bool = True
  skip_bad: bool = False


class LoadImage:
  """record index -> {"image": uint8 (size, size, C), "label", "bad": names skipped}; runs in the
  grain workers (picklable: records, view and shard geometry only)."""

  def __init__(self, records, view: View, shard: tuple[int, int] = (0, 1)):
    self.records, self.view, self.shard = records, view, shard

  def _next_in_shard(self, i: int) -> int:
    p, n_shards = self.shard
    j = i + n_shards
    return j if j < len(self.records) else p

  def __call__(self, i: int, rng: np.random.Generator | None = None) -> dict:
    bad = []
    for _ in range(len(self.records)):
      data, label, name, why = self.records.read(int(i))
      try:
        if data is None:
          raise T.BadImage(f"cannot read image {name}: {why}")
        img = T.open_image(data, self.view.pp.channels, name)
        if self.view.train:
          img = T.train_view(img, self.view.pp, rng, scale=self.view.crop_scale, flip=self.view.flip)
        else:
          img = T.eval_view(img, self.view.pp)
        return {"image": img, "label": np.int32(label), "bad": tuple(bad)}
      except T.BadImage as e:
        if not self.view.skip_bad:
          raise RuntimeError(f"{_USER_ERROR}{e}; fix or remove the file, or set "
                             "--config.data.on_bad_record=skip to skip such images") from None
        bad.append((name, str(e)))
        i = self._next_in_shard(int(i))
    raise RuntimeError(f"{_USER_ERROR}no image of this split could be decoded (e.g. {bad[0][1]}); "
                       "check the data")


def stack(elements: Sequence[dict]) -> dict:
  """A batch: images and labels stacked, the skipped names of all its elements together."""
  return {"image": np.stack([e["image"] for e in elements]),
          "label": np.asarray([e["label"] for e in elements], np.int32),
          "bad": tuple(b for e in elements for b in e["bad"])}


def _count_bad(batch: dict) -> dict:
  """Main process: adds the batch's skipped images to the bad-record counters (each file once, so
  a peeked or re-read batch and later epochs do not count it again) and drops them from the batch."""
  from jembed.data import pipeline  # pylint: disable=import-outside-toplevel
  for name, message in batch.pop("bad", ()):
    pipeline.skipped_once(name, message)
  return batch


class _UserErrors(grain.DatasetIterator):
  """Re-raises a worker's marked error as the one-line UserError it stands for."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self):
    try:
      return next(self._parent)
    except Exception as e:  # pylint: disable=broad-except
      text = str(e)
      cause = e
      while _USER_ERROR not in text and cause.__cause__ is not None:
        cause = cause.__cause__
        text = str(cause)
      if _USER_ERROR in text:
        line = text.split(_USER_ERROR, 1)[1].splitlines()[0]
        raise UserError(line) from None
      raise

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)

  def close(self):
    close = getattr(self._parent, "close", None)
    if close is not None:
      close()


class _WithUserErrors(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset):
    super().__init__(parent)

  def __iter__(self):
    return _UserErrors(self._parent.__iter__())


def _iterate(ds: grain.MapDataset, workers: int, buffer: int = 2) -> grain.DatasetIterator:
  """The batches of `ds` decoded in `workers` processes (0: threads of this process), then the
  bad-image count added here."""
  threads = 1 if workers else 4
  read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(buffer, threads))
  it = ds.to_iter_dataset(read)
  if workers:
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read its absl flags; outside an absl app (tests, notebooks,
      # jembed as a library) nobody parsed them, so their defaults are taken as parsed.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=buffer))
  return iter(_WithUserErrors(it).map(_count_bad))


# ----------------------------------------------------------------------------- the stream


@dataclasses.dataclass
class ImageStream:
  """One split: its records, class names and the views; `train_iterator` (Data.train) or
  `eval_batches` / `batches` (the held-out split)."""
  records: Any
  class_names: list[str]
  pp: T.Preprocess
  workers: int = 0
  crop_scale: tuple[float, float] = (0.08, 1.0)
  flip: bool = True
  skip_bad: bool = False

  def __len__(self) -> int:
    return len(self.records)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.pp.size, self.pp.size, self.pp.channels)

  def example_columns(self) -> dict[str, np.ndarray]:
    """One example shaped like a batch (for shape-only planning)."""
    return {"image": np.zeros((1,) + self.image_shape, np.uint8), "label": np.zeros((1,), np.int32)}

  def view(self, train: bool) -> View:
    return View(self.pp, train, self.crop_scale, self.flip, self.skip_bad)

  # -- training --
  def train_dataset(self, global_batch: int, seed: int, *, process_count: int | None = None,
                    process_index: int | None = None) -> grain.MapDataset:
    """This process's endless MapDataset of local batches (before the worker processes)."""
    import jax  # pylint: disable=import-outside-toplevel
    n_proc = jax.process_count() if process_count is None else process_count
    p = jax.process_index() if process_index is None else process_index
    if global_batch % n_proc:
      raise UserError(f"batch_size={global_batch} does not divide over {n_proc} processes; use a "
                      f"multiple of {n_proc}")
    local = global_batch // n_proc
    shard = len(range(p, len(self.records), n_proc))
    if shard < local:
      raise UserError(f"the training split has {len(self.records)} images, {shard} on process {p}: "
                      f"fewer than its share {local} of batch_size={global_batch}; lower "
                      "--config.batch_size or add images")
    return (grain.MapDataset.range(len(self.records))[p::n_proc]
            .seed(seed)
            .shuffle()
            .repeat()
            .random_map(LoadImage(self.records, self.view(True), (p, n_proc)))
            .batch(local, drop_remainder=True, batch_fn=stack))

  def train_iterator(self, global_batch: int, seed: int, *, process_count: int | None = None,
                     process_index: int | None = None) -> grain.DatasetIterator:
    ds = self.train_dataset(global_batch, seed, process_count=process_count,
                            process_index=process_index)
    return _iterate(ds, self.workers)

  # -- evaluation --
  def _eval_dataset(self, indices: np.ndarray, batch: int) -> grain.MapDataset:
    return (grain.MapDataset.source(indices)
            .map(LoadImage(self.records, self.view(False)))
            .batch(batch, drop_remainder=False, batch_fn=stack))

  def num_eval_batches(self, global_batch: int, max_batches: int) -> int:
    n = len(self.records) // global_batch
    return min(n, max_batches) if max_batches else n

  def eval_batches(self, global_batch: int, max_batches: int, *, process_count: int | None = None,
                   process_index: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Fixed, unshuffled held-out batches (this process's share of each global batch), as
    jembed.data.pipeline.eval_batches gives for in-memory columns; the remainder is dropped."""
    import jax  # pylint: disable=import-outside-toplevel
    n_proc = jax.process_count() if process_count is None else process_count
    p = jax.process_index() if process_index is None else process_index
    local = global_batch // n_proc
    n = self.num_eval_batches(global_batch, max_batches)
    if n == 0:
      return iter(())
    idx = np.concatenate([np.arange(b * global_batch + p * local, b * global_batch + (p + 1) * local)
                          for b in range(n)])
    return _closing(_iterate(self._eval_dataset(idx, local), self.workers))

  def take(self, indices: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, labels) of the records `indices` in the evaluation view, in memory (for the
    frozen-feature probes, which the caller bounds with frozen_eval.max_train)."""
    images, labels = [], []
    if len(indices):
      for b in _closing(_iterate(self._eval_dataset(np.asarray(indices), batch), self.workers)):
        images.append(b["image"])
        labels.append(b["label"])
    if not images:
      return np.zeros((0,) + self.image_shape, np.uint8), np.zeros((0,), np.int32)
    return np.concatenate(images), np.concatenate(labels)

  def batches(self, batch: int) -> Iterator[dict[str, np.ndarray]]:
    """The whole split in order, `batch` at a time (the last batch may be short)."""
    if len(self.records) == 0:
      return iter(())
    ds = self._eval_dataset(np.arange(len(self.records)), batch)
    return _closing(_iterate(ds, self.workers))


def _closing(it) -> Iterator[dict[str, np.ndarray]]:
  try:
    yield from it
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()


# ----------------------------------------------------------------------------- sources


def _is_list(path: str) -> bool:
  return path.lower().endswith(LIST_EXTENSIONS)


def _list_dir(root: str) -> list[str]:
  return sorted(p.name for p in fs.path(root).iterdir())


def folder_records(root: str, what: str, class_names: list[str] | None = None
                   ) -> tuple[FileRecords, list[str]]:
  """root/<class>/<image>: the files (names only, nothing decoded) and the class names."""
  if not root:
    raise UserError(f"data.{what} is empty; set it to a folder with one sub-folder per class")
  if not fs.isdir(root):
    raise UserError(f"data.{what} folder {root!r} does not exist; set data.{what} to a "
                    "folder with one sub-folder per class (or a .csv / .jsonl list of path,label)")
  found = [d for d in _list_dir(root) if not d.startswith(".") and fs.isdir(fs.join(root, d))]
  if not found:
    raise UserError(f"data.{what} folder {root!r} has no class sub-folders; put the images "
                    f"of each class in {root}/<class_name>/")
  if class_names is None:
    class_names = found
  unknown = [c for c in found if c not in class_names]
  if unknown:
    raise UserError(f"data.{what} has class folder(s) {unknown} that data.train lacks; "
                    "use the same class folder names in both")
  paths, labels = [], []
  for name in found:
    folder = fs.join(root, name)
    files = [f for f in _list_dir(folder)
             if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
      raise UserError(f"class folder {folder!r} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                      "add some or remove the folder")
    label = class_names.index(name)
    paths.extend(fs.join(folder, f) for f in files)
    labels.extend([label] * len(files))
  return FileRecords(paths, labels), list(class_names)


def _list_rows(path: str, what: str) -> Iterator[tuple[str, Any, str]]:
  """(image path as written, label, where) of each row of a .csv or .jsonl list (read by
  jembed.data.sources.file_records, as the text tasks read theirs; a bad line is one error)."""
  form = 'write one {"path": ..., "label": ...} object a line'
  csv_list = path.lower().endswith(".csv")
  if csv_list:
    header = [h.strip().lower() for h in sources.csv_header(path)]
    if "path" not in header or "label" not in header:
      raise UserError(f"data.{what} list {path} needs a header row with 'path' and 'label' columns "
                      f"(it has {header}); write e.g. 'path,label' first")
  for where, record in sources.file_records(path, None, form):
    record = {str(k).strip().lower(): v for k, v in record.items()}  # a header as written
    if "path" not in record or "label" not in record:
      raise UserError(f'{where}: expected an object with "path" and "label", got {record}')
    if csv_list:
      if not any(str(v).strip() for v in record.values()):
        continue
      yield str(record["path"]).strip(), str(record["label"]).strip(), where
    else:
      yield str(record["path"]), record["label"], where


def _int_label(value) -> int | None:
  if isinstance(value, bool):
    return None
  if isinstance(value, int):
    return value
  if isinstance(value, str) and value.strip().lstrip("-").isdigit():
    return int(value)
  return None


def list_records(path: str, what: str, class_names: list[str] | None = None
                 ) -> tuple[FileRecords, list[str]]:
  """A .csv (path,label header) or .jsonl ({"path", "label"}) list; relative paths are relative to
  the list's folder. Labels are class names, or all integers (classes 0..max)."""
  if not fs.exists(path):
    raise UserError(f"data.{what} list {path!r} does not exist; give a .csv / .jsonl list of "
                    "path,label or a folder with one sub-folder per class")
  base = os.path.dirname(fs.absolute(path))
  paths, raw, wheres = [], [], []
  for p, label, where in _list_rows(path, what):
    if not p:
      raise UserError(f"{where}: empty path; give each row an image path")
    paths.append(p if os.path.isabs(p) or "://" in p else fs.join(base, p))
    raw.append(label)
    wheres.append(where)
  if not paths:
    raise UserError(f"data.{what} list {path} names no images; add path,label rows")
  ints = [_int_label(v) for v in raw]
  if class_names is None:
    if all(i is not None for i in ints):
      if min(ints) < 0:
        raise UserError(f"data.{what} list {path} has a negative label {min(ints)}; use 0..N-1")
      class_names = [str(i) for i in range(max(ints) + 1)]
    else:
      class_names = sorted({str(v) for v in raw})
  labels = []
  for value, i, where in zip(raw, ints, wheres):
    name = str(value)
    if name in class_names:
      labels.append(class_names.index(name))
    elif i is not None and 0 <= i < len(class_names):
      labels.append(i)
    else:
      raise UserError(f"{where}: label {value!r} is not a class of data.train ({len(class_names)} "
                      f"classes, e.g. {class_names[:3]}); use the training split's labels")
  return FileRecords(paths, labels), list(class_names)


def file_records(path: str, what: str, class_names: list[str] | None = None
                 ) -> tuple[FileRecords, list[str]]:
  """A folder tree or a list file (by extension)."""
  path = str(path).strip()
  if path and _is_list(path):
    return list_records(path, what, class_names)
  return folder_records(path, what, class_names)


def tfds_records(config: Any, split: str, what: str) -> tuple[TfdsRecords, list[str]]:
  """A TFDS split as a random-access source whose image feature stays encoded."""
  from jembed.data import tfds_source  # pylint: disable=import-outside-toplevel
  source, builder = tfds_source.open_split(config, split, what, "imagenet2012")
  features = builder.info.features
  for key in ("image", "label"):
    if key not in features:
      raise UserError(f"TFDS dataset {builder.info.name!r} has no {key!r} feature (it has "
                      f"{sorted(features)}); use an image classification dataset")
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  # Decoding here would turn every image into pixels in the reading process; the workers decode.
  source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  names = list(getattr(features["label"], "names", None) or [])
  if not names:
    names = [str(i) for i in range(int(getattr(features["label"], "num_classes", 0) or 0))]
  if not names:
    raise UserError(f"TFDS dataset {builder.info.name!r} does not say its number of classes; use a "
                    "dataset whose label is a ClassLabel")
  return TfdsRecords(source, f"{builder.info.name}[{split}]"), names


def split_records(records, fraction: float):
  """(train, held-out) records: stratified by label where the labels are in memory, else a fixed
  random permutation."""
  from jembed.data.images import stratified_split  # pylint: disable=import-outside-toplevel
  labels = records.all_labels()
  if labels is not None:
    tr, ev = stratified_split(labels, fraction, _SPLIT_SEED)
  else:
    perm = np.random.default_rng(_SPLIT_SEED).permutation(len(records))
    n_eval = int(round(fraction * len(records)))
    ev, tr = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
  return records.subset(tr), records.subset(ev)


# ----------------------------------------------------------------------------- preprocessing


def first_image_shape(records) -> tuple[int, int, int]:
  """(H, W, C) of the first readable record (only its header is read for files)."""
  data, _, name, why = records.read(0)
  if data is None:
    raise UserError(f"cannot read image {name}: {why}")
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(io.BytesIO(data)) as im:
      gray = im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
      return im.size[1], im.size[0], 1 if gray else 3
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"cannot decode image {name}: {type(e).__name__}: {e}; fix or remove the "
                    "file") from None


def model_preprocess(data_config: Any, init_spec: dict | None = None,
                     native: tuple[int, int, int] | None = None) -> T.Preprocess:
  """The `Preprocess` an image task's model uses: the warm-start source's `preprocess` (model.json)
  when it declares one, with data.image_size / data.channels overriding its size / channels; else
  `image_transforms.plain` at data.image_size (the square the model sees), or the warm-start
  source's image shape, or the data's native size (`native`, (H, W, C) of its first image).
  One function so the tasks, predict and embed agree."""
  size = int(_field(data_config, "image_size", 0) or 0)
  channels = int(_field(data_config, "channels", 0) or 0)
  if size < 0:
    raise UserError(f"data.image_size={size} must be >= 0 (0 = the warm-start model's or the native size)")
  if channels not in (0, 1, 3):
    raise UserError(f"data.channels={channels} must be 0 (native), 1 or 3")
  spec = init_spec or {}
  if spec.get("preprocess"):
    pp = T.Preprocess.from_dict(spec["preprocess"])
    changes = {}
    if size and size != pp.size:
      changes["size"] = size
    if channels and channels != pp.channels:
      changes["channels"] = channels
      if len(pp.mean) != channels:  # a 3-channel mean for a gray model: the channel average
        changes["mean"] = (float(np.mean(pp.mean)),) * channels
        changes["std"] = (float(np.mean(pp.std)),) * channels
    return dataclasses.replace(pp, **changes) if changes else pp
  shape = spec.get("image_shape")
  if shape:
    size = size or int(shape[0])
    channels = channels or int(shape[-1])
  if not size or not channels:
    if native is None:
      raise UserError("data.image_size is 0 and the data's native size is unknown; set "
                      "--config.data.image_size=N (the NxN square the model sees)")
    h, w, c = native
    if not size and h != w:
      raise UserError(f"data.image_size=0 keeps the native size, but the first image is {h}x{w}; "
                      "set --config.data.image_size=N (the NxN square the model sees)")
    size = size or h
    channels = channels or c
  return T.plain(size, channels)


# ----------------------------------------------------------------------------- entry point


def is_streamed(data_config: Any) -> bool:
  """Whether config.data names a source this module streams (folders, lists, TFDS): everything
  but the embedded digits."""
  from jembed.data.images import resolve_source  # pylint: disable=import-outside-toplevel
  return resolve_source(data_config) != "embedded"


def default_workers() -> int:
  """data.workers=-1: a decoding process per CPU this process may use, one left for the training
  loop, at most 8 (beyond that a host's input rarely scales on PIL decoding alone)."""
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    cpus = os.cpu_count() or 1
  return max(0, min(8, cpus - 1))


def _options(config: Any) -> dict:
  workers = int(_field(config, "workers", 0))
  if workers == -1:
    workers = default_workers()
  if workers < 0:
    raise UserError(f"data.workers={workers} must be >= 0 (0 decodes in the training process) or "
                    "-1 (one per CPU but one, at most 8)")
  scale = tuple(float(s) for s in _field(config, "crop_scale", (0.08, 1.0)))
  if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
    raise UserError(f"data.crop_scale={scale} must be (min, max) area fractions with "
                    "0 < min <= max <= 1, e.g. (0.08, 1.0)")
  bad = str(_field(config, "on_bad_record", "error") or "error")
  if bad not in ("error", "skip"):
    raise UserError(f"data.on_bad_record={bad!r} must be 'error' or 'skip'")
  return dict(workers=workers, crop_scale=scale, flip=bool(_field(config, "flip", True)),
              skip_bad=bad == "skip")


def open_splits(data_config: Any, init_spec: dict | None = None
                ) -> tuple[ImageStream, ImageStream]:
  """(train, held-out) streams for a folder, list or TFDS source (never the embedded digits)."""
  from jembed.data.images import resolve_source  # pylint: disable=import-outside-toplevel
  source = resolve_source(data_config)
  fraction = float(_field(data_config, "eval_fraction", 0.2))
  if not 0.0 <= fraction < 1.0:
    raise UserError(f"data.eval_fraction={fraction} must be in [0, 1)")
  opts = _options(data_config)
  if source == "tfds":
    train, names = tfds_records(data_config, str(_field(data_config, "tfds_split", "train")),
                                "tfds_split")
    eval_split = str(_field(data_config, "tfds_eval_split", "test")).strip()
    held = tfds_records(data_config, eval_split, "tfds_eval_split")[0] if eval_split else None
  elif source == "folder":
    train, names = file_records(str(_field(data_config, "train", "")), "train")
    eval_path = str(_field(data_config, "eval", "")).strip()
    held = file_records(eval_path, "eval", names)[0] if eval_path else None
  else:
    raise UserError(f"data.source={source!r} is not streamed; the embedded digits are read in memory")
  if held is None:
    train, held = split_records(train, fraction)
  if len(train) == 0:
    raise UserError("the training split has no images; check config.data")
  pp = model_preprocess(data_config, init_spec,
                        None if _field(data_config, "image_size", 0) and _field(data_config, "channels", 0)
                        else first_image_shape(train))
  return (ImageStream(train, names, pp, **opts), ImageStream(held, names, pp, **opts))
