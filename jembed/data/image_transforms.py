"""How an image becomes model input: the preprocessing a model declares, and the host-side transforms.

A model's preprocessing (`Preprocess`) travels with it in model.json under `"preprocess"`: the
square input size, how evaluation resizes and crops (`crop_pct`, `resize`), the interpolation, and
the per-channel `mean` / `std` in [0, 1] units. The host does the geometric part on uint8 pixels
(decode, resize, crop, flip) so batches stay small on the wire; the device does the arithmetic part
(uint8 -> [0, 1] -> (x - mean) / std) inside the model (`normalize`), so a float NHWC array that is
already normalised can be fed directly.

Recipes (the ones torchvision, timm and Hugging Face use):
  eval : resize="shorter": shorter side to round(size / crop_pct), then a size x size center crop
         (torchvision Resize(256) + CenterCrop(224) is crop_pct 0.875); resize="squash": straight to
         size x size (HF ViTImageProcessor).
  train: random-resized crop (area scale, aspect ratio, torchvision's sampling) + horizontal flip.
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
RESIZE_MODES = ("shorter", "squash")
# PIL modes that hold one intensity channel.
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


class BadImage(ValueError):
  """An image that cannot be decoded; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """The preprocessing a model declares (saved in model.json as `preprocess`)."""
  size: int                                  # the square input the model takes
  crop_pct: float = 1.0                      # eval: shorter side to size / crop_pct, then center crop
  resize: str = "shorter"                    # "shorter" | "squash" (straight to size x size)
  interpolation: str = "bilinear"
  mean: tuple[float, ...] = (0.0, 0.0, 0.0)  # in [0, 1] units, per channel
  std: tuple[float, ...] = (1.0, 1.0, 1.0)
  channels: int = 3

  def __post_init__(self):
    if self.size <= 0:
      raise ValueError(f"preprocess size must be positive, got {self.size}")
    if not 0.0 < self.crop_pct <= 1.0:
      raise ValueError(f"preprocess crop_pct must be in (0, 1], got {self.crop_pct}")
    if self.resize not in RESIZE_MODES:
      raise ValueError(f"preprocess resize must be one of {RESIZE_MODES}, got {self.resize!r}")
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(f"preprocess interpolation must be one of {sorted(INTERPOLATIONS)}, "
                       f"got {self.interpolation!r}")
    if self.channels not in (1, 3):
      raise ValueError(f"preprocess channels must be 1 or 3, got {self.channels}")
    for name in ("mean", "std"):
      value = tuple(float(v) for v in getattr(self, name))
      if len(value) == 1:
        value = value * self.channels
      if len(value) != self.channels:
        raise ValueError(f"preprocess {name} has {len(value)} values for {self.channels} channels")
      object.__setattr__(self, name, value)
    if min(self.std) <= 0:
      raise ValueError(f"preprocess std must be positive, got {self.std}")

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["mean"], d["std"] = list(self.mean), list(self.std)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})

  @property
  def eval_resize(self) -> int:
    """The shorter side before the center crop (torchvision's int(size / crop_pct) would give 255
    for 224 / 0.875 through float error; timm and HF round)."""
    return int(math.floor(self.size / self.crop_pct + 0.5))


def plain(size: int, channels: int) -> Preprocess:
  """Pixels scaled to [0, 1], squashed to size x size: what a jembed model trained from scratch on
  small images uses (the digits default)."""
  return Preprocess(size=size, crop_pct=1.0, resize="squash", interpolation="bilinear",
                    mean=(0.0,) * channels, std=(1.0,) * channels, channels=channels)


def torchvision_imagenet(size: int = 224) -> Preprocess:
  """torchvision's documented ImageNet weights recipe: resize 256, center crop 224, ImageNet stats."""
  return Preprocess(size=size, crop_pct=0.875, resize="shorter", interpolation="bilinear",
                    mean=IMAGENET_MEAN, std=IMAGENET_STD)


# ----------------------------------------------------------------------------- decoding


def open_image(data: bytes | str, channels: int = 3, name: str = "") -> Image.Image:
  """Encoded bytes (or a local path) -> a decoded PIL image in mode "L" or "RGB" (channels 1 or 3;
  0 keeps one channel for grayscale files); BadImage names the file."""
  label = name or (data if isinstance(data, str) else "<bytes>")
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as img:
      img.load()
      if channels == 1 or (channels == 0 and img.mode in _GRAY_MODES):
        return img.convert("L")
      return img.convert("RGB")
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise BadImage(f"cannot decode image {label}: {type(e).__name__}: {e}") from e


def decode(data: bytes | str, channels: int = 3, name: str = "") -> np.ndarray:
  """Encoded bytes (or a local path) -> uint8 (H, W, channels); BadImage names the file.
  channels 0 keeps one channel for grayscale files and makes everything else RGB."""
  return _array(open_image(data, channels, name))


def _array(img: Image.Image) -> np.ndarray:
  array = np.asarray(img, np.uint8)
  return array[..., None] if array.ndim == 2 else array


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
  """uint8 (H, W, C) with C in {1, 3, 4} -> `channels` channels (alpha dropped, ITU-R 601-2 luma)."""
  have = img.shape[-1]
  if channels in (0, have):
    return img
  if channels == 3 and have == 1:
    return np.repeat(img, 3, axis=-1)
  if channels == 3 and have == 4:
    return img[..., :3]
  if channels == 1 and have in (3, 4):
    gray = img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None]
  raise ValueError(f"cannot convert {have}-channel images to {channels} channels")


# ----------------------------------------------------------------------------- geometry


def resize(img: np.ndarray, height: int, width: int, interpolation: str = "bilinear") -> np.ndarray:
  """uint8 (H, W, C) -> (height, width, C) with PIL's antialiased filters (as torchvision's PIL path)."""
  if img.shape[:2] == (height, width):
    return img
  pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
  out = np.asarray(pil.resize((width, height), INTERPOLATIONS[interpolation]))
  return out.reshape(height, width, img.shape[-1])


def resize_shorter(img: np.ndarray, shorter: int, interpolation: str = "bilinear") -> np.ndarray:
  """Shorter side to `shorter`, aspect ratio kept (torchvision Resize(int))."""
  h, w = img.shape[:2]
  if h <= w:
    nh, nw = shorter, int(shorter * w / h)
  else:
    nh, nw = int(shorter * h / w), shorter
  return resize(img, nh, nw, interpolation)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
  """The central size x size window (torchvision's rounding); images smaller than that are padded
  with zeros first, as torchvision does."""
  h, w = img.shape[:2]
  if h < size or w < size:
    ph, pw = max(size - h, 0), max(size - w, 0)
    img = np.pad(img, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    h, w = img.shape[:2]
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return img[top:top + size, left:left + size]


def eval_transform(img: np.ndarray, pp: Preprocess) -> np.ndarray:
  """uint8 (H, W, C) of any size -> uint8 (size, size, channels): the model's evaluation view."""
  img = to_channels(img, pp.channels)
  if pp.resize == "squash":
    return resize(img, pp.size, pp.size, pp.interpolation)
  return center_crop(resize_shorter(img, pp.eval_resize, pp.interpolation), pp.size)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: Sequence[float] = (0.08, 1.0),
                            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(top, left, h, w) sampled as torchvision's RandomResizedCrop: area fraction uniform in
  `scale`, log-aspect uniform in `ratio`, 10 tries, then the largest central crop within `ratio`."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def train_transform(img: np.ndarray, pp: Preprocess, rng: np.random.Generator, *,
                    scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                    flip: bool = True) -> np.ndarray:
  """uint8 (H, W, C) -> uint8 (size, size, channels): random-resized crop, then a coin-flip mirror."""
  img = to_channels(img, pp.channels)
  top, left, h, w = random_resized_crop_box(rng, img.shape[0], img.shape[1], scale, ratio)
  out = resize(img[top:top + h, left:left + w], pp.size, pp.size, pp.interpolation)
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


# ----------------------------------------------------------------------------- on PIL images
# The same views as `eval_transform` / `train_transform` (pixel for pixel), computed on the decoded
# PIL image so a large photo is never copied into NumPy and back before it is shrunk: what the
# streamed input (jembed.data.image_stream) runs in its workers.


def eval_view(img: Image.Image, pp: Preprocess) -> np.ndarray:
  """A decoded image in pp's channels ("L" / "RGB") -> uint8 (size, size, channels)."""
  if pp.resize == "squash":
    return _array(img.resize((pp.size, pp.size), INTERPOLATIONS[pp.interpolation]))
  w, h = img.size
  s = pp.eval_resize
  nh, nw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
  if (nh, nw) != (h, w):
    img = img.resize((nw, nh), INTERPOLATIONS[pp.interpolation])
  if nh < pp.size or nw < pp.size:
    return center_crop(_array(img), pp.size)  # padded as torchvision does
  top, left = int(round((nh - pp.size) / 2.0)), int(round((nw - pp.size) / 2.0))
  return _array(img.crop((left, top, left + pp.size, top + pp.size)))


def train_view(img: Image.Image, pp: Preprocess, rng: np.random.Generator, *,
               scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
               flip: bool = True) -> np.ndarray:
  """A decoded image -> uint8 (size, size, channels): `train_transform`'s random-resized crop and
  flip, with the same random draws."""
  w, h = img.size
  top, left, ch, cw = random_resized_crop_box(rng, h, w, scale, ratio)
  img = img.crop((left, top, left + cw, top + ch))
  if (ch, cw) != (pp.size, pp.size):
    img = img.resize((pp.size, pp.size), INTERPOLATIONS[pp.interpolation])
  out = _array(img)
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


# ----------------------------------------------------------------------------- arithmetic


def normalize(images, pp: Preprocess | dict | None):
  """uint8 or float [0, 1] NHWC (NumPy or jax) -> (x / 255 - mean) / std in float32; with `pp`
  None only the scaling to [0, 1]. The device runs this inside the model (jembed.tasks.vision)."""
  import jax.numpy as jnp
  x = images
  if jnp.issubdtype(x.dtype, jnp.integer):
    x = x.astype(jnp.float32) / 255.0
  else:
    x = x.astype(jnp.float32)
  if pp is None:
    return x
  if isinstance(pp, dict):
    pp = Preprocess.from_dict(pp)
  mean = jnp.asarray(pp.mean, jnp.float32)
  std = jnp.asarray(pp.std, jnp.float32)
  return (x - mean) / std
