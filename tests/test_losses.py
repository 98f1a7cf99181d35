"""InfoNCE against NumPy, 8 devices against 1, CLIP's learnable scale, and GradCache against the
unchunked gradient."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jembed.errors import UserError
from jembed.losses import clip_logit_scale, clip_logit_scale_init, grad_cache, info_nce

# ----------------------------------------------------------------------------- InfoNCE


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _info_nce_numpy(q, d, scale, negatives=None, symmetric=True):
  """Row by row, the way MultipleNegativesRankingLoss states it: anchor i's candidates are every
  positive and every hard negative of the batch; document i's candidates are the anchors."""
  q, d = _unit(q), _unit(d)
  b = len(q)
  cands = list(d) + ([] if negatives is None else [n for row in _unit(negatives) for n in row])
  cands = np.stack(cands)
  fwd, hits = [], []
  for i in range(b):
    s = scale * cands @ q[i]
    fwd.append(np.log(np.exp(s - s.max()).sum()) + s.max() - s[i])
    hits.append(np.argmax(s) == i)
  loss = np.mean(fwd)
  if symmetric:
    bwd = []
    for i in range(b):
      s = scale * q @ d[i]
      bwd.append(np.log(np.exp(s - s.max()).sum()) + s.max() - s[i])
    loss = (loss + np.mean(bwd)) / 2
  return loss, np.mean(hits)


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce_matches_numpy(k, symmetric):
  rng = np.random.default_rng(0)
  b, dim = 6, 5
  q = rng.normal(size=(b, dim)).astype(np.float32)
  d = (q + 0.8 * rng.normal(size=(b, dim))).astype(np.float32)
  negs = rng.normal(size=(b, k, dim)).astype(np.float32) if k else None
  loss, m = info_nce(q, d, scale=20.0, negatives=negs, symmetric=symmetric)
  ref_loss, ref_acc = _info_nce_numpy(q, d, 20.0, negs, symmetric)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(m["loss"], ref_loss, rtol=1e-5)
  np.testing.assert_allclose(m["accuracy"], ref_acc)
  np.testing.assert_allclose(m["positive_cosine"], np.mean(np.sum(_unit(q) * _unit(d), -1)), rtol=1e-5)
  assert ("accuracy_d2q" in m) == symmetric


def test_info_nce_scale_and_normalisation():
  rng = np.random.default_rng(1)
  q, d = rng.normal(size=(2, 4, 3)).astype(np.float32)
  # Rows are normalised inside: rescaling inputs changes nothing; the scale does.
  a, _ = info_nce(q, d, scale=20.0)
  b, _ = info_nce(3 * q, 0.5 * d, scale=20.0)
  c, _ = info_nce(q, d, scale=5.0)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  np.testing.assert_allclose(c, _info_nce_numpy(q, d, 5.0)[0], rtol=1e-5)
  assert not np.isclose(a, c)
  # bf16 inputs are computed in float32: same as casting them up first.
  lo, _ = info_nce(jnp.asarray(q, jnp.bfloat16), jnp.asarray(d, jnp.bfloat16), scale=20.0)
  up = np.asarray(jnp.asarray(q, jnp.bfloat16), np.float32), np.asarray(jnp.asarray(d, jnp.bfloat16), np.float32)
  assert lo.dtype == jnp.float32
  np.testing.assert_allclose(lo, info_nce(*up, scale=20.0)[0], rtol=1e-6)


def test_info_nce_shape_errors():
  with pytest.raises(UserError, match="negatives"):
    info_nce(np.ones((4, 3)), np.ones((4, 3)), scale=20.0, negatives=np.ones((4, 3)))
  with pytest.raises(UserError, match="anchors"):
    info_nce(np.ones((4, 3)), np.ones((5, 3)), scale=20.0)


def test_info_nce_sharded_uses_global_negatives():
  """Batch sharded over 8 devices under jit == the whole batch on one device, and != the mean of
  per-shard losses (which is what negatives from one shard only would give)."""
  rng = np.random.default_rng(2)
  b, k, dim = 16, 2, 8
  q = rng.normal(size=(b, dim)).astype(np.float32)
  d = (q + rng.normal(size=(b, dim))).astype(np.float32)
  negs = rng.normal(size=(b, k, dim)).astype(np.float32)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1)))))
  fn = jax.jit(lambda a, p, n: info_nce(a, p, scale=20.0, negatives=n))
  sq, sd, sn = put(q), put(d), put(negs)
  assert len(sq.sharding.device_set) == 8
  loss, m = fn(sq, sd, sn)
  one = jax.devices()[0]
  ref, ref_m = jax.jit(lambda a, p, n: info_nce(a, p, scale=20.0, negatives=n))(
      *(jax.device_put(x, one) for x in (q, d, negs)))
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(m["accuracy"], ref_m["accuracy"])
  np.testing.assert_allclose(loss, _info_nce_numpy(q, d, 20.0, negs)[0], rtol=1e-5)
  local = np.mean([_info_nce_numpy(q[i:i + 2], d[i:i + 2], 20.0, negs[i:i + 2])[0] for i in range(0, b, 2)])
  assert abs(float(loss) - local) > 0.1
  # Gradients too: sharded == single device.
  g = jax.jit(jax.grad(lambda a, p, n: info_nce(a, p, scale=20.0, negatives=n)[0]))
  np.testing.assert_allclose(g(sq, sd, sn), g(*(jax.device_put(x, one) for x in (q, d, negs))),
                             rtol=1e-4, atol=1e-6)


def test_clip_logit_scale():
  init = clip_logit_scale_init()
  assert init.dtype == jnp.float32
  np.testing.assert_allclose(init, math.log(1 / 0.07), rtol=1e-6)
  np.testing.assert_allclose(clip_logit_scale(init), 1 / 0.07, rtol=1e-5)
  np.testing.assert_allclose(clip_logit_scale(jnp.float32(math.log(500.0))), 100.0, rtol=1e-5)
  np.testing.assert_allclose(clip_logit_scale(jnp.float32(math.log(500.0)), max_scale=200.0), 200.0, rtol=1e-5)
  with pytest.raises(UserError):
    clip_logit_scale_init(0.0)
  # Learnable: the loss has a gradient for the parameter below the clamp, none above it, and the
  # traced scale is the one used (numpy reference at exp(t)).
  rng = np.random.default_rng(3)
  q, d = rng.normal(size=(2, 5, 4)).astype(np.float32)
  f = lambda t: info_nce(q, d, scale=clip_logit_scale(t))[0]
  np.testing.assert_allclose(f(jnp.float32(1.0)), _info_nce_numpy(q, d, math.e)[0], rtol=1e-5)
  assert abs(float(jax.grad(f)(jnp.float32(1.0)))) > 1e-4
  assert float(jax.grad(f)(jnp.float32(6.0))) == 0.0


# ----------------------------------------------------------------------------- GradCache

VOCAB, HIDDEN, SEQ = 50, 16, 6


def _params(seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  init = lambda k, s: jax.random.normal(k, s, jnp.float32) / math.sqrt(s[0])
  return {"embed": init(keys[0], (VOCAB, HIDDEN)),
          "attn": {"q": init(keys[1], (HIDDEN, HIDDEN)), "k": init(keys[2], (HIDDEN, HIDDEN))},
          "mlp": init(keys[3], (HIDDEN, HIDDEN)), "out": init(keys[4], (HIDDEN, HIDDEN))}


def _tower(params, ids, rng, dropout):
  """A transformer-like tower: embeddings, one self-attention, an MLP with dropout, mean pool."""
  h = params["embed"][ids]  # (n, L, H)
  att = jax.nn.softmax(jnp.einsum("nlh,nmh->nlm", h @ params["attn"]["q"], h @ params["attn"]["k"]), -1)
  h = h + att @ h
  h = jax.nn.gelu(h @ params["mlp"])
  if dropout:
    keep = jax.random.bernoulli(rng, 1 - dropout, h.shape)
    h = jnp.where(keep, h / (1 - dropout), 0.0)
  return h.mean(1) @ params["out"]


def _encode(dropout):
  """Two weight-sharing towers (plus hard negatives) in one call: the columns' rows go through the
  tower together, so each text gets its own dropout mask from the one chunk rng."""
  def encode(params, chunk, rng):
    n, k = chunk["negative"].shape[:2]
    ids = jnp.concatenate([chunk["anchor"], chunk["positive"], chunk["negative"].reshape(n * k, -1)])
    h = _tower(params, ids, rng, dropout)
    return {"anchor": h[:n], "positive": h[n:2 * n], "negative": h[2 * n:].reshape(n, k, -1)}
  return encode


def _loss(emb, params=None):
  loss, m = info_nce(emb["anchor"], emb["positive"], scale=20.0, negatives=emb["negative"])
  return loss, m["accuracy"]


def _inputs(b=12, k=2, seed=0):
  rng = np.random.default_rng(seed)
  return {"anchor": rng.integers(0, VOCAB, (b, SEQ), dtype=np.int32),
          "positive": rng.integers(0, VOCAB, (b, SEQ), dtype=np.int32),
          "negative": rng.integers(0, VOCAB, (b, k, SEQ), dtype=np.int32)}


def _reference(encode, params, inputs, chunk_size, rng):
  """jax.grad of the whole loss, embedding chunk i (examples i, i+n, ...) with fold_in(rng, i),
  the documented chunk/rng assignment, so dropout masks are the ones grad_cache uses."""
  b = len(inputs["anchor"])
  n = b // chunk_size

  def full(p):
    outs = [encode(p, jax.tree.map(lambda x: x[i::n], inputs), jax.random.fold_in(rng, i)) for i in range(n)]
    order = np.argsort(np.concatenate([np.arange(i, b, n) for i in range(n)]), kind="stable")
    emb = jax.tree.map(lambda *xs: jnp.concatenate(xs)[order], *outs)
    return _loss(emb)

  return jax.jit(jax.value_and_grad(full, has_aux=True))(params)


# Tolerance: float32 throughout. Chunking changes only the summation order (per-chunk gradient
# contributions added in a scan instead of one batched reduction, matmuls of other shapes), so the
# difference is float32 rounding of the largest partial sums: measured max abs diff 1.4e-6 (no
# dropout, chunk 3) and 4.8e-7 (dropout, chunk 2) on gradients up to |5.5|, i.e. a few ulps of the
# largest entries. atol=1e-5 (~2e-6 of the largest gradient) with rtol=1e-4 leaves a margin; a
# mismatched dropout mask moves the gradient by up to 5.1, so it cannot hide one.
RTOL, ATOL = 1e-4, 1e-5


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL), a, b)


def test_grad_cache_equals_unchunked_grad_without_dropout():
  """Also a loss with a parameter of its own (CLIP's learnable temperature): its gradient comes
  from the loss side and is added to the encoder's."""
  params, inputs, rng = dict(_params(), log_scale=clip_logit_scale_init()), _inputs(), jax.random.key(1)
  encode = _encode(0.0)

  def loss(emb, p):
    value, m = info_nce(emb["anchor"], emb["positive"], scale=clip_logit_scale(p["log_scale"]),
                        negatives=emb["negative"])
    return value, m["accuracy"]

  gc = jax.jit(lambda p, x: grad_cache(encode, loss, p, x, chunk_size=3, rng=rng))
  (value, acc), grads = gc(params, inputs)
  (ref_value, ref_acc), ref_grads = jax.jit(jax.value_and_grad(
      lambda p: loss(encode(p, inputs, rng), p), has_aux=True))(params)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(acc, ref_acc)
  _close(grads, ref_grads)
  assert abs(float(grads["log_scale"])) > 1e-4
  assert jax.tree.structure(grads) == jax.tree.structure(params)


@pytest.mark.parametrize("chunk_size", [2])
def test_grad_cache_with_dropout_equals_reference(chunk_size):
  params, inputs, rng = _params(), _inputs(), jax.random.key(2)
  encode = _encode(0.3)
  gc = jax.jit(lambda p, x, r: grad_cache(encode, _loss, p, x, chunk_size=chunk_size, rng=r))
  (loss, _), grads = gc(params, inputs, rng)
  (ref_loss, _), ref_grads = _reference(encode, params, inputs, chunk_size, rng)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  _close(grads, ref_grads)
  # Dropout really is on: another rng gives other gradients (so matching masks were tested).
  (_, _), other = gc(params, inputs, jax.random.key(3))
  assert np.abs(other["mlp"] - grads["mlp"]).max() > 1e-3


def test_grad_cache_sharded_matches_single_device():
  params, inputs, rng = _params(), _inputs(b=16), jax.random.key(4)
  encode = _encode(0.2)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1)))))
  fn = jax.jit(lambda p, x: grad_cache(encode, _loss, p, x, chunk_size=8, rng=rng))
  (loss, _), grads = fn(params, jax.tree.map(shard, inputs))
  one = jax.devices()[0]
  (ref_loss, _), ref_grads = fn(jax.device_put(params, one), jax.device_put(inputs, one))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  _close(grads, ref_grads)


def test_grad_cache_bad_chunk_size_is_one_line():
  params, inputs = _params(), _inputs(b=10)
  for bad in (3, 0):
    with pytest.raises(UserError) as e:
      grad_cache(_encode(0.0), _loss, params, inputs, chunk_size=bad, rng=jax.random.key(0))
    assert "\n" not in str(e.value) and "does not divide the batch of 10" in str(e.value)
  ragged = dict(_inputs(b=10), positive=np.zeros((8, SEQ), np.int32))
  with pytest.raises(UserError, match="same leading batch axis"):
    grad_cache(_encode(0.0), _loss, params, ragged, chunk_size=2, rng=jax.random.key(0))
