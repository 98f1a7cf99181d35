"""What a loaded model is given: texts and images through the API, and the files that
`python -m jembed.embed` and `python -m jembed.predict` read (a text a line, .jsonl, .csv, a folder
of images, a list of image paths).

Texts: `as_texts` accepts a string or a list of strings and nothing else.

An input is a uint8 (H, W, C) or (H, W) array of any size, an (N, H, W, C) array, or a file path
(local or gs://). Each becomes the model's evaluation view with the preprocessing it declares
(`image_transforms.eval_transform`: resize / crop to its size, its channels); the device then
normalises (mean / std). Files are decoded one chunk at a time, so a folder of any size runs in
bounded memory.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np

from jembed import fs
from jembed.data import image_transforms as T
from jembed.errors import UserError

TEXT_EXTENSIONS = (".txt", ".jsonl", ".csv")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".csv", ".jsonl")


# ----------------------------------------------------------------------------- texts


def as_texts(texts) -> list[str]:
  """A string or a sequence of strings as a list; one clear error for anything else."""
  if isinstance(texts, str):
    return [texts]
  if texts is None or isinstance(texts, (bytes, dict)) or not hasattr(texts, "__iter__"):
    raise UserError(f"texts must be a string or a list of strings; got {type(texts).__name__}")
  texts = list(texts)
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise UserError(f"text {i} is a {type(t).__name__} ({t!r:.40}), not a string; give a list of "
                      "strings")
  return texts


def _lines(path: str) -> Iterator[tuple[int, str]]:
  """(line number, line without its newline) of a UTF-8 file; a line that is not UTF-8 is one error
  naming the file and line."""
  with fs.open(path, "rb") as f:
    for i, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise UserError(f"{path}:{i} holds bytes that are not UTF-8 ({e.reason} at byte {e.start}); "
                        "re-encode the file as UTF-8") from None
      yield i, line.rstrip("\r\n")


def json_lines(path: str) -> Iterator[tuple[int, Any]]:
  """(line number, parsed value) of each non-blank line of a JSONL file; a line that is not JSON (or
  not UTF-8) is one error naming the file and line."""
  for i, line in _lines(path):
    if not line.strip():
      continue
    try:
      yield i, json.loads(line)
    except ValueError:
      raise UserError(f"{path}:{i} is not valid JSON; fix or remove that line") from None


def check_input(path: str) -> None:
  """Refuses a missing --input before anything slow (loading the model) starts."""
  if not fs.exists(path):
    raise UserError(f"input '{path}' does not exist; fix --input")


def read_records(path: str, field: str = "text", id_field: str | None = "id"
                 ) -> Iterator[tuple[Any, str]]:
  """(id or None, text) of each record, read as it goes: a .txt line, a .jsonl object's `field`, a
  .csv column."""
  if not fs.exists(path) or fs.isdir(path):
    raise UserError(f"input file '{path}' does not exist; fix --input")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".txt":
    for _, line in _lines(path):
      yield None, line
  elif ext == ".jsonl":
    for i, obj in json_lines(path):
      if not isinstance(obj, dict) or field not in obj:
        have = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{path}:{i} has no field '{field}' (it has {have}); pass --field NAME")
      yield obj.get(id_field) if id_field else None, str(obj[field])
  elif ext == ".csv":
    reader = csv.DictReader(line + "\n" for _, line in _lines(path))
    if field not in (reader.fieldnames or []):
      raise UserError(f"{path} has no column '{field}' (it has {reader.fieldnames}); pass "
                      "--field NAME")
    for row in reader:
      yield row.get(id_field) if id_field else None, row[field]
  else:
    raise UserError(f"input '{path}' is not .txt, .jsonl or .csv; use one of those")


def count_records(path: str, field: str, id_field: str | None) -> tuple[int, bool]:
  """(records, whether any has an id): a first pass that also finds bad lines before the model loads."""
  n, has_ids = 0, False
  for ident, _ in read_records(path, field, id_field):
    n += 1
    has_ids = has_ids or ident is not None
  return n, has_ids


# ----------------------------------------------------------------------------- images


def as_items(images) -> list[Any]:
  """The inputs as a list of single images (arrays or paths); one clear error for anything else."""
  if isinstance(images, (str, os.PathLike)):
    return [os.fspath(images)]
  if isinstance(images, np.ndarray):
    if images.ndim in (2, 3):
      return [images]
    if images.ndim == 4:
      return list(images)
    raise UserError(f"an image array must be (H, W), (H, W, C) or (N, H, W, C); got shape "
                    f"{images.shape}")
  if images is None or not isinstance(images, Sequence) or isinstance(images, bytes):
    raise UserError(f"images must be a list of uint8 arrays or file paths, or an (N, H, W, C) "
                    f"array; got {type(images).__name__}")
  items = list(images)
  for i, item in enumerate(items):
    if not isinstance(item, (str, os.PathLike, np.ndarray)):
      raise UserError(f"image {i} is a {type(item).__name__}; give uint8 arrays or file paths")
  return items


def load_file(path: str, channels: int) -> np.ndarray:
  """uint8 (H, W, C) pixels of an image file; one line naming the file when it cannot be read."""
  try:
    data = fs.read_bytes(path)
  except OSError as e:
    raise UserError(f"image {path} cannot be read ({e.strerror or type(e).__name__}); fix the "
                    "path or remove it from the input") from None
  try:
    return T.decode(data, channels, name=path)
  except T.BadImage as e:
    raise UserError(f"{e}; remove or replace that file") from None


def eval_view(item, pp: T.Preprocess) -> np.ndarray:
  """One input -> uint8 (size, size, channels), the model's evaluation view."""
  if isinstance(item, (str, os.PathLike)):
    img = load_file(os.fspath(item), pp.channels)
  else:
    img = np.asarray(item)
    if img.dtype != np.uint8:
      raise UserError(f"images given with preprocess=True must be uint8 pixels (got {img.dtype}); "
                      "pass float arrays that are already normalised with preprocess=False")
    if img.ndim == 2:
      img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
      raise UserError(f"an image must be (H, W) or (H, W, C) with 1, 3 or 4 channels; got shape "
                      f"{img.shape}")
  return T.eval_transform(img, pp)


def eval_batch(items: Sequence[Any], pp: T.Preprocess) -> np.ndarray:
  return np.stack([eval_view(item, pp) for item in items])


# ----------------------------------------------------------------------------- files for the CLIs


def list_inputs(path: str, field: str = "path") -> tuple[list[str], list[str]]:
  """(names written to the output, paths to read) of the images a CLI's --input names: every image
  file under a folder (recursively, sorted; names relative to it), or the paths a list file holds
  (.txt: one a line; .jsonl / .csv: the `field` column; relative paths are relative to the list)."""
  if fs.isdir(path):
    root = fs.path(path)
    # walk, not rglob: epath refuses recursive globs (on GCS one listing a folder is cheaper).
    paths = sorted(str(d / name) for d, _, files in root.walk() for name in files
                   if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith("."))
    if not paths:
      raise UserError(f"no images under '{path}' (looked for {', '.join(IMAGE_EXTENSIONS)}); give a "
                      "folder of images or a list file")
    prefix = str(root).rstrip("/") + "/"
    return [p[len(prefix):] if p.startswith(prefix) else p for p in paths], paths
  if not fs.exists(path):
    raise UserError(f"input '{path}' does not exist; fix --input")
  ext = os.path.splitext(path)[1].lower()
  if ext not in LIST_EXTENSIONS:
    raise UserError(f"input '{path}' is neither a folder of images nor a list file "
                    f"({', '.join(LIST_EXTENSIONS)} of image paths)")
  base = os.path.dirname(path)
  names = [name for _, name in read_records(path, field, None) if name.strip()]
  if not names:
    raise UserError(f"list '{path}' holds no image paths; give one path a line")
  full = [n if (os.path.isabs(n) or "://" in n) else fs.join(base, n) if base else n for n in names]
  return names, full


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
  for lo in range(0, len(items), size):
    yield items[lo:lo + size]
