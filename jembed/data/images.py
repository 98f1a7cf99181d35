"""Labelled image sources held in memory: bundled digits, a class-per-folder tree, or TFDS.

The image tasks read only the digits through here; folders, list files and TFDS are streamed from
disk by jembed/data/image_stream.py (this module's folder / TFDS loaders remain for callers that want
a small source as one array).

Every source yields uint8 (N, H, W, C) arrays with one size and channel count, so batches
can be sliced straight from NumPy. Anything inconsistent is reported as a UserError that
names the offending files and the config field that fixes it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from jembed.data import pipeline, sources, tfds_source
from jembed.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# Fixed so the held-out split never changes between runs or machines.
_SPLIT_SEED = 0
# PIL modes that hold a single intensity channel; everything else is read as RGB.
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


@dataclasses.dataclass
class ImageDataset:
  images: np.ndarray  # (N, H, W, C) uint8
  labels: np.ndarray  # (N,) int32
  class_names: list[str]

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _field(config: Any, name: str, default: Any) -> Any:
  value = getattr(config, name, default) if config is not None else default
  return default if value is None else value


def resolve_source(config: Any) -> str:
  """'embedded', 'folder' or 'tfds': the source `load_image_dataset` reads for `config`."""
  return sources.resolve_source(config, "folder")


# ----------------------------------------------------------------------------- conversions


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
  """Converts (N, H, W, C) uint8 to `channels` (0 keeps them); drops alpha."""
  have = images.shape[-1]
  if channels == 0 or channels == have:
    return images
  if channels == 3 and have == 1:
    return np.repeat(images, 3, axis=-1)
  if channels == 1 and have in (3, 4):
    # ITU-R 601-2 luma, the same weights PIL uses for convert("L").
    rgb = images[..., :3].astype(np.float32)
    gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None]
  if channels == 3 and have == 4:
    return images[..., :3]
  raise UserError(f"cannot convert {have}-channel images to data.channels={channels}; "
                  "use 1 or 3")


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  if size == 0 or images.shape[1:3] == (size, size):
    return images
  out = np.empty((len(images), size, size, images.shape[-1]), np.uint8)
  for i, img in enumerate(images):
    out[i] = _resize_one(img, size)
  return out


def _resize_one(img: np.ndarray, size: int) -> np.ndarray:
  pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
  resized = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
  return resized.reshape(size, size, img.shape[-1])


def _finish(images: np.ndarray, labels: np.ndarray, class_names: list[str],
            config: Any) -> ImageDataset:
  channels = int(_field(config, "channels", 0))
  size = int(_field(config, "image_size", 0))
  images = _resize(_to_channels(images, channels), size)
  return ImageDataset(np.ascontiguousarray(images, np.uint8),
                      np.asarray(labels, np.int32), list(class_names))


def _check_options(config: Any) -> None:
  size = int(_field(config, "image_size", 0))
  if size < 0:
    raise UserError(f"data.image_size={size} must be >= 0 (0 keeps the native size)")
  channels = int(_field(config, "channels", 0))
  if channels not in (0, 1, 3):
    raise UserError(f"data.channels={channels} must be 0 (native), 1 or 3")
  fraction = float(_field(config, "eval_fraction", 0.2))
  if not 0.0 <= fraction < 1.0:
    raise UserError(f"data.eval_fraction={fraction} must be in [0, 1)")


# ----------------------------------------------------------------------------- split


def stratified_split(labels: np.ndarray, eval_fraction: float,
                     seed: int = _SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic per-class hold-out: returns sorted (train_idx, eval_idx)."""
  rng = np.random.default_rng(seed)
  train_idx, eval_idx = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_eval = int(round(eval_fraction * len(idx)))
    # Every class with at least two examples shows up on both sides.
    if eval_fraction > 0 and len(idx) > 1:
      n_eval = min(max(n_eval, 1), len(idx) - 1)
    eval_idx.append(idx[:n_eval])
    train_idx.append(idx[n_eval:])
  return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(eval_idx))


def _split(ds: ImageDataset, config: Any) -> tuple[ImageDataset, ImageDataset]:
  fraction = float(_field(config, "eval_fraction", 0.2))
  tr, ev = stratified_split(ds.labels, fraction)
  return (ImageDataset(ds.images[tr], ds.labels[tr], ds.class_names),
          ImageDataset(ds.images[ev], ds.labels[ev], ds.class_names))


# ----------------------------------------------------------------------------- embedded


def load_digits_dataset(config: Any = None) -> ImageDataset:
  """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, 1 channel)."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  # Pixel values are 0..16 counts; scale to the full uint8 range.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  names = [str(n) for n in digits.target_names]
  return _finish(images, digits.target, names, config)


# ----------------------------------------------------------------------------- folder


def _read_image(path: str, channels: int, size: int, config: Any = None) -> np.ndarray | None:
  """The image as uint8 HxWxC, or None when it cannot be decoded and data.on_bad_record='skip'."""
  try:
    with Image.open(path) as img:
      img.load()
      if channels == 1 or (channels == 0 and img.mode in _GRAY_MODES):
        img = img.convert("L")
      else:
        img = img.convert("RGB")
      if size:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
      array = np.asarray(img, np.uint8)
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
    pipeline.bad_record(config, f"cannot read image {path}", f"{type(e).__name__}: {e}",
                        "fix or remove the file")
    return None
  return array[..., None] if array.ndim == 2 else array


def _class_dirs(root: str, what: str) -> list[str]:
  if not root:
    raise UserError(f"data.{what} is empty; set it to a folder with one sub-folder per class")
  if not os.path.isdir(root):
    raise UserError(f"data.{what} folder {root!r} does not exist; set data.{what} to a "
                    "folder with one sub-folder per class")
  names = sorted(d for d in os.listdir(root)
                 if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
  if not names:
    raise UserError(f"data.{what} folder {root!r} has no class sub-folders; put the images "
                    f"of each class in {root}/<class_name>/")
  return names


def _consistent(arrays: list[np.ndarray], paths: list[str], what: str, config: Any = None,
                labels: list[int] | None = None):
  """Stacks the images; mixed shapes are an error, or with data.on_bad_record='skip' the images
  whose shape differs from the most common one are skipped (returns (images, labels))."""
  if pipeline.on_bad_record(config) == "skip" and arrays:
    shapes = [a.shape for a in arrays]
    common = max(dict.fromkeys(shapes), key=shapes.count)  # ties: the first seen
    keep = []
    for i, (path, array) in enumerate(zip(paths, arrays)):
      if array.shape != common:
        pipeline.bad_record(config, path, f"shape {array.shape} differs from the other images' "
                            f"{common}", "set data.image_size / data.channels")
      else:
        keep.append(i)
    arrays, paths = [arrays[i] for i in keep], [paths[i] for i in keep]
    labels = [labels[i] for i in keep] if labels is not None else None
  if not arrays:
    raise UserError(f"data.{what} holds no readable images; fix or add image files")
  first_path, first = paths[0], arrays[0]
  for path, array in zip(paths, arrays):
    if array.shape[-1] != first.shape[-1]:
      raise UserError(
          f"images in data.{what} have mixed channel counts: {first_path} has "
          f"{first.shape[-1]}, {path} has {array.shape[-1]}; set data.channels=3 (or 1) "
          "to convert them all")
    if array.shape != first.shape:
      raise UserError(
          f"images in data.{what} have mixed sizes: {first_path} is "
          f"{first.shape[0]}x{first.shape[1]}, {path} is {array.shape[0]}x{array.shape[1]}; "
          f"set data.image_size=N to resize them all to NxN (or data.on_bad_record=skip)")
  return np.stack(arrays), labels


def load_image_folder(root: str, config: Any, what: str = "train",
                      class_names: list[str] | None = None) -> ImageDataset:
  """Reads root/<class>/<image>; labels follow `class_names` (default: sorted folders)."""
  found = _class_dirs(os.path.expanduser(root), what)
  if class_names is None:
    class_names = found
  else:
    unknown = [c for c in found if c not in class_names]
    if unknown:
      raise UserError(f"data.{what} has class folder(s) {unknown} that data.train lacks; "
                      "use the same class folder names in both")
  channels = int(_field(config, "channels", 0))
  size = int(_field(config, "image_size", 0))
  arrays, paths, labels = [], [], []
  for name in found:
    folder = os.path.join(root, name)
    files = sorted(f for f in os.listdir(folder)
                   if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise UserError(f"class folder {folder!r} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                      "add some or remove the folder")
    for f in files:
      path = os.path.join(folder, f)
      array = _read_image(path, channels, size, config)
      if array is None:
        continue
      arrays.append(array)
      paths.append(path)
      labels.append(class_names.index(name))
  images, labels = _consistent(arrays, paths, what, config, labels)
  return ImageDataset(images, np.asarray(labels, np.int32), list(class_names))


# ----------------------------------------------------------------------------- tfds


def _tfds_split(config: Any, split: str, what: str) -> ImageDataset:
  """Reads one split of a TFDS image dataset already prepared under data.data_dir."""
  source, builder = tfds_source.open_split(config, split, what, "cifar10")
  name = builder.info.name
  first = source[0]
  for key in ("image", "label"):
    if key not in first:
      raise UserError(f"TFDS dataset {name!r} has no {key!r} feature (it has "
                      f"{sorted(first)}); use an image classification dataset")
  label_feature = builder.info.features["label"] if "label" in builder.info.features else None
  names = list(getattr(label_feature, "names", None) or [])
  arrays, labels, keys = [], [], []
  size = int(_field(config, "image_size", 0))
  channels = int(_field(config, "channels", 0))
  for i in range(len(source)):
    record = source[i]
    image = np.asarray(record["image"], np.uint8)
    image = image[..., None] if image.ndim == 2 else image
    image = _to_channels(image[None], channels)[0]
    # Resize one by one so datasets with varying image sizes still stack.
    arrays.append(_resize_one(image, size) if size else image)
    labels.append(int(record["label"]))
    keys.append(f"{name}[{split}][{i}]")
  images, labels = _consistent(arrays, keys, what, config, labels)
  labels = np.asarray(labels, np.int32)
  if not names:
    names = [str(i) for i in range(int(labels.max()) + 1)]
  return _finish(images, labels, names, config)


# ----------------------------------------------------------------------------- entry point


def load_image_splits(data_config: Any) -> tuple[ImageDataset, ImageDataset]:
  """Loads (train, eval) image datasets as described by the data config.

  Fields (all optional): source ("embedded" | "folder" | "tfds"; inferred: a non-empty
  train means folder, a non-empty tfds_name means tfds, else embedded digits), train and
  eval (folders with one sub-folder per class), eval_fraction (stratified deterministic
  hold-out used when there is no eval folder / eval split; default 0.2), tfds_name,
  tfds_split ("train"), tfds_eval_split ("test"; "" holds out from train), data_dir,
  image_size (0 keeps the native size, else resize to a square), channels (0 native, 1, 3).
  """
  _check_options(data_config)
  source = resolve_source(data_config)
  if source == "embedded":
    return _split(load_digits_dataset(data_config), data_config)
  if source == "tfds":
    train = _tfds_split(data_config, str(_field(data_config, "tfds_split", "train")),
                        "tfds_split")
    eval_split = str(_field(data_config, "tfds_eval_split", "test")).strip()
    if not eval_split:
      return _split(train, data_config)
    evals = _tfds_split(data_config, eval_split, "tfds_eval_split")
    _check_same_shape(train, evals, "tfds_eval_split")
    return train, evals
  train = load_image_folder(str(_field(data_config, "train", "")), data_config, "train")
  eval_root = str(_field(data_config, "eval", "")).strip()
  if not eval_root:
    return _split(train, data_config)
  evals = load_image_folder(eval_root, data_config, "eval", train.class_names)
  _check_same_shape(train, evals, "eval")
  return train, evals


def _check_same_shape(train: ImageDataset, evals: ImageDataset, what: str) -> None:
  if train.images.shape[1:] != evals.images.shape[1:]:
    raise UserError(
        f"data.{what} images are {evals.images.shape[1:]} but training images are "
        f"{train.images.shape[1:]} (H, W, C); set data.image_size=N and data.channels to "
        "make them match")
