"""SimCLR-style image augmentations and RotNet rotations, in JAX, for use inside jit.

Randomness is per example: the batch key is split into one key per image and the
per-image function is vmapped. With `jax_threefry_partitionable` (the trainer's setting)
the results are the same whether the global batch lives on one device or is sharded,
so augmentations can run inside the sharded train step.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

# ITU-R 601-2 luma, as torchvision and PIL use for grayscale.
_LUMA = (0.299, 0.587, 0.114)


def _gray(img: jax.Array) -> jax.Array:
  """(H, W, 3) -> (H, W, 1) luminance."""
  return jnp.tensordot(img, jnp.asarray(_LUMA, img.dtype), axes=([-1], [0]))[..., None]


# ----------------------------------------------------------------------------- colour space


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
  """(..., 3) RGB in [0, 1] -> (..., 3) HSV in [0, 1] (hue as a fraction of a turn)."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc = jnp.max(rgb, axis=-1)
  minc = jnp.min(rgb, axis=-1)
  delta = maxc - minc
  s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
  # Guarded denominators keep gradients and values finite for gray pixels.
  safe = jnp.where(delta > 0, delta, 1.0)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  h = jnp.where(r == maxc, bc - gc, jnp.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """Inverse of rgb_to_hsv."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = i.astype(jnp.int32) % 6
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  r = jnp.choose(i, [v, q, p, p, t, v], mode="clip")
  g = jnp.choose(i, [t, v, v, q, p, p], mode="clip")
  b = jnp.choose(i, [p, p, t, v, v, q], mode="clip")
  return jnp.stack([r, g, b], axis=-1)


# ----------------------------------------------------------------------------- per image


_ATTEMPTS = 10  # random-resized-crop candidates, as in torchvision


def _crop_box(u, height: int, width: int, scale: Sequence[float], ratio: Sequence[float]):
  """Random resized crop box (y0, x0, h, w) in pixels, torchvision semantics.

  `u` holds 2 * _ATTEMPTS + 2 uniforms. All candidates are drawn at once and the first
  that fits is taken; if none does, the largest centred crop with an allowed aspect ratio
  is used (the whole image for a square one), so crop_scale=(1, 1) is the identity.
  """
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:_ATTEMPTS])
  lo, hi = math.log(ratio[0]), math.log(ratio[1])
  r = jnp.exp(lo + (hi - lo) * u[_ATTEMPTS:2 * _ATTEMPTS])
  w = jnp.sqrt(area * r)
  h = jnp.sqrt(area / r)
  fits = (w <= width) & (h <= height)
  first = jnp.argmax(fits)
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fw, fh = float(width), width / ratio[0]
  elif in_ratio > ratio[1]:
    fw, fh = height * ratio[1], float(height)
  else:
    fw, fh = float(width), float(height)
  found = jnp.any(fits)
  h = jnp.where(found, h[first], fh)
  w = jnp.where(found, w[first], fw)
  y0 = jnp.where(found, u[2 * _ATTEMPTS] * (height - h), (height - h) / 2)
  x0 = jnp.where(found, u[2 * _ATTEMPTS + 1] * (width - w), (width - w) / 2)
  return y0, x0, h, w


def _random_resized_crop(u, img, scale, ratio):
  height, width = img.shape[0], img.shape[1]
  y0, x0, h, w = _crop_box(u, height, width, scale, ratio)
  sy, sx = height / h, width / w
  # Output pixel o samples input (o + 0.5 - t) / s - 0.5, mapping [y0, y0 + h] to [0, H].
  return jax.image.scale_and_translate(
      img, img.shape, (0, 1), jnp.stack([sy, sx]), jnp.stack([-y0 * sy, -x0 * sx]),
      method="linear", antialias=False)


def _color_jitter(u, img, strength: float):
  """Brightness, contrast, saturation, hue (SimCLR: 0.8s, 0.8s, 0.8s, 0.2s), random order.

  `u` holds 8 uniforms: four for the factors, four whose ranks give the order.
  """
  amount = 0.8 * strength
  lo = max(0.0, 1 - amount)
  b, c, s = (lo + (1 + amount - lo) * u[i] for i in range(3))
  hue = 0.2 * strength * (2 * u[3] - 1)
  is_gray = img.shape[-1] == 1

  def brightness(x):
    return jnp.clip(x * b, 0, 1)

  def contrast(x):
    mean = jnp.mean(x if is_gray else _gray(x))
    return jnp.clip((x - mean) * c + mean, 0, 1)

  def saturation(x):
    g = _gray(x)
    return jnp.clip((x - g) * s + g, 0, 1)

  def hue_shift(x):
    hsv = rgb_to_hsv(x)
    hsv = hsv.at[..., 0].set((hsv[..., 0] + hue) % 1.0)
    return jnp.clip(hsv_to_rgb(hsv), 0, 1)

  # Saturation and hue are meaningless for one channel.
  ops = [brightness, contrast] if is_gray else [brightness, contrast, saturation, hue_shift]
  order = jnp.argsort(u[4:4 + len(ops)])
  return jax.lax.fori_loop(
      0, len(ops), lambda i, x: jax.lax.switch(order[i], ops, x), img)


def _gaussian_blur(u, img):
  """Blur with sigma ~ U(0.1, 2) and a kernel about 10% of the image side (SimCLR)."""
  radius = max(1, img.shape[0] // 20)
  sigma = 0.1 + 1.9 * u
  offsets = jnp.arange(-radius, radius + 1, dtype=img.dtype)
  weights = jnp.exp(-0.5 * (offsets / sigma) ** 2)
  weights = weights / jnp.sum(weights)
  n = 2 * radius + 1

  def blur_axis(x, axis):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode="reflect")
    size = x.shape[axis]
    return sum(weights[i] * jax.lax.slice_in_dim(padded, i, i + size, axis=axis)
               for i in range(n))

  return blur_axis(blur_axis(img, 0), 1)


# Layout of the per-image uniform draws: one draw per image keeps compiled code small.
_U_CROP = slice(0, 2 * _ATTEMPTS + 2)
_U_JITTER = slice(_U_CROP.stop, _U_CROP.stop + 8)
_U_FLIP, _U_APPLY_JITTER, _U_GRAY, _U_BLUR, _U_SIGMA = range(_U_JITTER.stop, _U_JITTER.stop + 5)
_U_COUNT = _U_SIGMA + 1


def _augment_one(key, img, crop_scale, crop_ratio, flip, color_jitter, jitter_prob,
                 grayscale_prob, blur_prob):
  u = jax.random.uniform(key, (_U_COUNT,))
  img = _random_resized_crop(u[_U_CROP], img, crop_scale, crop_ratio)
  if flip:
    img = jnp.where(u[_U_FLIP] < 0.5, img[:, ::-1], img)
  if color_jitter > 0 and jitter_prob > 0:
    jittered = _color_jitter(u[_U_JITTER], img, color_jitter)
    img = jnp.where(u[_U_APPLY_JITTER] < jitter_prob, jittered, img)
  if grayscale_prob > 0 and img.shape[-1] == 3:
    gray = jnp.broadcast_to(_gray(img), img.shape)
    img = jnp.where(u[_U_GRAY] < grayscale_prob, gray, img)
  if blur_prob > 0:
    blurred = _gaussian_blur(u[_U_SIGMA], img)
    img = jnp.where(u[_U_BLUR] < blur_prob, blurred, img)
  return jnp.clip(img, 0.0, 1.0)


# ----------------------------------------------------------------------------- public


def simclr_augment(key: jax.Array, images: jax.Array, *,
                   crop_scale: Sequence[float] = (0.08, 1.0),
                   crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
                   flip: bool = True, color_jitter: float = 0.4, jitter_prob: float = 0.8,
                   grayscale_prob: float = 0.2, blur_prob: float = 0.0) -> jax.Array:
  """SimCLR augmentation of a (B, H, W, C) float batch in [0, 1]; same shape out.

  Per image: random resized crop (area fraction `crop_scale`, aspect `crop_ratio`,
  bilinear back to H x W), horizontal flip with p=0.5, colour jitter of strength
  `color_jitter` with p=`jitter_prob` (brightness/contrast only when C == 1), grayscale
  with p=`grayscale_prob` (C == 3), Gaussian blur with p=`blur_prob`. Deterministic in
  `key`; every image gets its own key from jax.random.split(key, B).
  """
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"expected (B, H, W, 1|3) images, got shape {images.shape}")
  keys = jax.random.split(key, images.shape[0])
  fn = lambda k, x: _augment_one(  # noqa: E731
      k, x, tuple(crop_scale), tuple(crop_ratio), flip, float(color_jitter),
      float(jitter_prob), float(grayscale_prob), float(blur_prob))
  return jax.vmap(fn)(keys, images)


def two_views(key: jax.Array, images: jax.Array, **kwargs) -> tuple[jax.Array, jax.Array]:
  """Two independent augmentations of the same batch (the SimCLR positive pairs)."""
  k1, k2 = jax.random.split(key)
  return simclr_augment(k1, images, **kwargs), simclr_augment(k2, images, **kwargs)


def rotate_batch(images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """RotNet inputs: every image at 0, 90, 180 and 270 degrees counter-clockwise.

  Returns (rotated (4B, H, W, C), labels (4B,) int32) ordered rotation-major:
  rotated[k * B + i] == np.rot90(images[i], k) and labels[k * B + i] == k.
  """
  if images.shape[1] != images.shape[2]:
    raise ValueError(f"rotate_batch needs square images, got {images.shape[1:3]}")
  rotated = jnp.concatenate([jnp.rot90(images, k, axes=(1, 2)) for k in range(4)])
  labels = jnp.repeat(jnp.arange(4, dtype=jnp.int32), images.shape[0])
  return rotated, labels
