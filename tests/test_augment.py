"""SimCLR augmentations and RotNet rotations: references, determinism, sharding."""
import colorsys
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jembed.data.augment import (hsv_to_rgb, rgb_to_hsv, rotate_batch, simclr_augment,
                                 two_views)

_IDENTITY = dict(crop_scale=(1.0, 1.0), flip=False, color_jitter=0.0, grayscale_prob=0.0)


@functools.partial(jax.jit, static_argnames=("kw",))
def _aug(key, images, kw=()):
  return simclr_augment(key, images, **dict(kw))


def _images(b=8, h=16, w=16, c=3, seed=0):
  return np.random.default_rng(seed).uniform(size=(b, h, w, c)).astype(np.float32)


def test_rotate_batch_matches_numpy():
  x = _images(b=3, h=5, w=5, c=2)
  rotated, labels = rotate_batch(jnp.asarray(x))
  assert rotated.shape == (12, 5, 5, 2)
  assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
  for j in range(12):
    k, i = divmod(j, 3)
    np.testing.assert_array_equal(rotated[j], np.rot90(x[i], int(labels[j]), axes=(0, 1)))
    assert labels[j] == k
  with pytest.raises(ValueError, match="square"):
    rotate_batch(jnp.zeros((1, 4, 5, 1)))


@pytest.mark.parametrize("c", [1, 3])
def test_identity_settings_return_input(c):
  x = _images(c=c)
  y = _aug(jax.random.key(0), x, tuple(_IDENTITY.items()))
  np.testing.assert_allclose(y, x, atol=1e-5)


def test_flip_only_mirrors_some_images():
  x = _images()
  kw = dict(_IDENTITY, flip=True)
  y = np.asarray(_aug(jax.random.key(1), x, tuple(kw.items())))
  flipped = [np.allclose(y[i], x[i, :, ::-1], atol=1e-5) for i in range(8)]
  kept = [np.allclose(y[i], x[i], atol=1e-5) for i in range(8)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert any(flipped) and any(kept)


def test_full_augment_shape_range_determinism_and_keys():
  x = _images()
  key = jax.random.key(2)
  y1 = _aug(key, x)
  y2 = _aug(key, x)
  assert y1.shape == x.shape and y1.dtype == jnp.float32
  assert float(y1.min()) >= 0.0 and float(y1.max()) <= 1.0
  np.testing.assert_array_equal(y1, y2)
  y3 = _aug(jax.random.key(3), x)
  assert not np.allclose(y1, y3)
  # Each image gets its own randomness: identical inputs come out different.
  same = np.repeat(x[:1], 8, axis=0)
  ys = np.asarray(_aug(key, same))
  assert len({ys[i].tobytes() for i in range(8)}) == 8


def test_two_views_differ():
  x = jnp.asarray(_images(b=4))
  # Crop and flip only: enough randomness to tell views apart, cheaper to compile.
  views = jax.jit(functools.partial(two_views, color_jitter=0.0, grayscale_prob=0.0))
  v1, v2 = views(jax.random.key(4), x)
  assert v1.shape == v2.shape == x.shape
  assert not np.allclose(v1, v2)


def test_crop_is_a_zoom_of_the_input():
  # A horizontal ramp stays monotone in x and constant in y under any crop + resize.
  ramp = np.broadcast_to(np.linspace(0, 1, 16, dtype=np.float32)[None, :, None],
                         (4, 16, 16, 1)).copy()
  kw = dict(_IDENTITY, crop_scale=(0.2, 0.5))
  y = np.asarray(_aug(jax.random.key(5), ramp, tuple(kw.items())))
  assert np.all(np.diff(y[..., 0], axis=2) >= -1e-6)
  np.testing.assert_allclose(y, np.broadcast_to(y[:, :1], y.shape), atol=1e-5)
  assert np.all(y[:, 0, -1, 0] - y[:, 0, 0, 0] < 0.95)  # Zoomed in: a smaller range.


def test_grayscale_gives_equal_channels():
  x = _images()
  kw = dict(_IDENTITY, grayscale_prob=1.0)
  y = np.asarray(_aug(jax.random.key(6), x, tuple(kw.items())))
  np.testing.assert_allclose(y[..., 0], y[..., 1], atol=1e-6)
  np.testing.assert_allclose(y[..., 0], y[..., 2], atol=1e-6)
  np.testing.assert_allclose(y[..., 0], x @ np.array([0.299, 0.587, 0.114]), atol=1e-5)


def test_jitter_and_blur_run_for_gray_and_rgb():
  for c in (1, 3):
    x = _images(c=c)
    kw = dict(_IDENTITY, color_jitter=0.5, jitter_prob=1.0, blur_prob=1.0)
    y = np.asarray(_aug(jax.random.key(7), x, tuple(kw.items())))
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert not np.allclose(y, x, atol=1e-3)


def test_hsv_round_trip_matches_colorsys():
  rgb = np.random.default_rng(1).uniform(size=(64, 3)).astype(np.float32)
  rgb[0] = [0.5, 0.5, 0.5]  # gray: hue and saturation 0
  hsv = np.asarray(rgb_to_hsv(jnp.asarray(rgb)))
  ref = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
  np.testing.assert_allclose(hsv, ref, atol=1e-5)
  np.testing.assert_allclose(hsv_to_rgb(jnp.asarray(hsv)), rgb, atol=1e-5)


def test_sharded_batch_gives_the_same_augmentation():
  x = _images()
  key = jax.random.key(8)
  kw = ()  # Defaults, so the single-device compile is shared with another test.
  single = _aug(key, x, kw)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  sharded = _aug(key, xs, kw)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(sharded, single, atol=1e-6)
