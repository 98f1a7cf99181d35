"""layers.Conv / conv2d (matmul and im2col forms) against lax.conv_general_dilated and nnx.Conv."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jembed.models import layers

WIDE = layers.IM2COL_MIN_CHANNELS  # input channels from which a CPU k x k conv is im2col


def _lax_conv(x, w, s):
  p = w.shape[0] // 2
  return jax.lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("k,stride,size,cin", [(1, 1, 6, 3), (1, 2, 7, 3), (3, 1, 6, WIDE), (3, 2, 7, WIDE),
                                               (3, 2, 8, WIDE), (7, 2, 9, WIDE), (7, 2, 9, 3)])
def test_conv2d_matches_lax_values_and_gradients(k, stride, size, cin):
  rng = np.random.default_rng(k * 10 + stride)
  x = jnp.asarray(rng.standard_normal((2, size, size + 1, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, cin, 5)) / np.sqrt(k * k * cin), jnp.float32)
  ref, ref_vjp = jax.vjp(lambda x, w: _lax_conv(x, w, stride), x, w)
  out, vjp = jax.vjp(lambda x, w: layers.conv2d(x, w, stride), x, w)
  # The form under test: a matmul for 1x1, im2col for wide k x k, the native conv for narrow ones.
  jaxpr = str(jax.make_jaxpr(lambda x, w: layers.conv2d(x, w, stride))(x, w))
  assert ("conv_general_dilated" in jaxpr) == (k > 1 and cin < WIDE)
  assert ("concatenate" in jaxpr) == (k > 1 and cin >= WIDE)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
  dy = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
  for got, want in zip(vjp(dy), ref_vjp(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_conv2d_off_cpu_is_the_native_convolution(monkeypatch):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 5, 5, WIDE)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, WIDE, 4)) / 30, jnp.float32)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  jaxpr = str(jax.make_jaxpr(lambda x, w: layers.conv2d(x, w, 2))(x, w))
  assert "conv_general_dilated" in jaxpr and "concatenate" not in jaxpr
  np.testing.assert_allclose(layers.conv2d(x, w, 2), _lax_conv(x, w, 2), rtol=1e-5, atol=1e-4)


def test_conv_kernel_is_nnx_convs():
  init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
  ours = layers.Conv(WIDE, 6, 3, stride=2, kernel_init=init, rngs=nnx.Rngs(3))
  theirs = nnx.Conv(WIDE, 6, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False,
                    kernel_init=init, rngs=nnx.Rngs(3))
  np.testing.assert_array_equal(ours.kernel[...], theirs.kernel[...])
  assert set(nnx.to_pure_dict(nnx.state(ours, nnx.Param))) == {"kernel"}
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 7, WIDE)), jnp.float32)
  np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-4)
