"""Building blocks: byte-wise dropout keeps its rate and the expectation; LayerNorm matches NumPy."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jembed.models.layers import LayerNorm, dropout


def test_dropout_rate_and_expectation():
  x = jnp.ones((64, 1000))
  y = np.asarray(dropout(x, 0.1, nnx.Rngs(dropout=0), True))
  dropped = (y == 0).mean()
  assert abs(dropped - 26 / 256) < 0.004          # rate quantised to 1/256
  assert abs(y.mean() - 1.0) < 0.01                # inverted scaling keeps the mean
  np.testing.assert_allclose(y[y != 0], 1 / (1 - 26 / 256), rtol=1e-6)
  # Odd widths (not a multiple of 4 bytes) work and every column can be dropped.
  z = np.asarray(dropout(jnp.ones((4096, 7)), 0.5, nnx.Rngs(dropout=1), True))
  assert ((z == 0).mean(0) > 0.4).all()


def test_dropout_deterministic_and_off_in_eval():
  x = jnp.arange(4000.0).reshape(40, 100)
  a = dropout(x, 0.2, nnx.Rngs(dropout=3), True)
  b = dropout(x, 0.2, nnx.Rngs(dropout=3), True)
  c = dropout(x, 0.2, nnx.Rngs(dropout=4), True)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  np.testing.assert_array_equal(dropout(x, 0.2, nnx.Rngs(dropout=3), False), x)


def test_layernorm_matches_numpy():
  x = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32)
  ln = LayerNorm(16, eps=1e-12)
  ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-12)
  np.testing.assert_allclose(ln(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-5)
