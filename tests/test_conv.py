"""layers.Conv / conv2d (matmul and im2col forms) against lax.conv_general_dilated and nnx.Conv."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jembed.models import layers


def _lax_conv(x, w, s):
  p = w.shape[0] // 2
  return jax.lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("k,stride,size", [(1, 1, 6), (1, 2, 7), (3, 1, 6), (3, 2, 7), (3, 2, 8),
                                           (7, 2, 9)])
def test_conv2d_matches_lax_values_and_gradients(k, stride, size):
  rng = np.random.default_rng(k * 10 + stride)
  x = jnp.asarray(rng.standard_normal((2, size, size + 1, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, 3, 5)), jnp.float32)
  ref, ref_vjp = jax.vjp(lambda x, w: _lax_conv(x, w, stride), x, w)
  out, vjp = jax.vjp(lambda x, w: layers.conv2d(x, w, stride), x, w)
  assert jax.default_backend() == "cpu"  # the im2col path is the one under test
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
  dy = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
  for got, want in zip(vjp(dy), ref_vjp(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_conv2d_off_cpu_is_the_native_convolution(monkeypatch):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 5, 5, 2)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  jaxpr = str(jax.make_jaxpr(lambda x, w: layers.conv2d(x, w, 2))(x, w))
  assert "conv_general_dilated" in jaxpr and "concatenate" not in jaxpr
  np.testing.assert_allclose(layers.conv2d(x, w, 2), _lax_conv(x, w, 2), rtol=1e-5, atol=1e-4)


def test_conv_kernel_is_nnx_convs():
  init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
  ours = layers.Conv(4, 6, 3, stride=2, kernel_init=init, rngs=nnx.Rngs(3))
  theirs = nnx.Conv(4, 6, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False,
                    kernel_init=init, rngs=nnx.Rngs(3))
  np.testing.assert_array_equal(ours.kernel[...], theirs.kernel[...])
  assert set(nnx.to_pure_dict(nnx.state(ours, nnx.Param))) == {"kernel"}
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 7, 4)), jnp.float32)
  np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
