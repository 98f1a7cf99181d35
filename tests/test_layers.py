"""Building blocks: byte-wise dropout keeps its rate and the expectation, follows train/eval mode and
cannot be built without a random stream; LayerNorm matches NumPy."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jembed.models.layers import Dropout, LayerNorm


def test_dropout_rate_and_expectation():
  y = np.asarray(Dropout(0.1, rngs=nnx.Rngs(dropout=0))(jnp.ones((64, 1000))))
  dropped = (y == 0).mean()
  assert abs(dropped - 26 / 256) < 0.004          # rate quantised to 1/256
  assert abs(y.mean() - 1.0) < 0.01                # inverted scaling keeps the mean
  np.testing.assert_allclose(y[y != 0], 1 / (1 - 26 / 256), rtol=1e-6)
  # Odd widths (not a multiple of 4 bytes) work and every column can be dropped.
  z = np.asarray(Dropout(0.5, rngs=nnx.Rngs(dropout=1))(jnp.ones((4096, 7))))
  assert ((z == 0).mean(0) > 0.4).all()


def test_dropout_reproducible_fresh_per_call_and_off_in_eval():
  x = jnp.arange(4000.0).reshape(40, 100)
  a, b = Dropout(0.2, rngs=nnx.Rngs(dropout=3)), Dropout(0.2, rngs=nnx.Rngs(dropout=3))
  first = a(x)
  np.testing.assert_array_equal(first, b(x))           # same stream, same mask
  assert not np.array_equal(first, a(x))               # the stream advances: a new mask per call
  c = Dropout(0.2, rngs=nnx.Rngs(dropout=4))
  assert not np.array_equal(first, c(x))
  c.eval()
  np.testing.assert_array_equal(c(x), x)
  c.train()
  assert not np.array_equal(c(x), x)


def test_dropout_needs_a_stream():
  with pytest.raises(AttributeError):
    Dropout(0.1, rngs=nnx.Rngs(params=0))
  Dropout(0.0, rngs=nnx.Rngs(params=0))  # a rate of zero never draws


def test_layernorm_matches_numpy():
  x = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32)
  ln = LayerNorm(16, eps=1e-12)
  ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-12)
  np.testing.assert_allclose(ln(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-5)
