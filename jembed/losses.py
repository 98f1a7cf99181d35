"""Losses shared by tasks: NT-Xent (SimCLR), InfoNCE over text pairs, a learnable CLIP temperature,
and GradCache, which computes a contrastive loss's gradient over a batch too large to hold every
example's activations at once.

Every loss here is plain jnp over the whole batch. Inside a jitted step the batch is one global
array sharded over the mesh's batch axes, so the similarity matrices span every device and the
in-batch negatives come from the global batch, not one shard (tests/test_losses.py checks 8 devices
against 1). float32 inside whatever the embeddings' dtype: a bf16 logsumexp over thousands of
candidates loses the small differences the loss is made of.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jembed.errors import UserError

# CLIP (Radford et al. 2021; open_clip): the learnable logit scale starts at 1/0.07 and is clamped
# at 100 "as in the original paper".
CLIP_INIT_TEMPERATURE = 0.07
CLIP_MAX_SCALE = 100.0


def _normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """NT-Xent loss and contrastive top-1 accuracy of paired embeddings z1[i] <-> z2[i], (B, d) each.

  Rows are L2-normalised here. Each of the 2B views is a softmax over the other 2B-1 (itself
  excluded) with its partner as the target; the loss is the mean over all 2B views. Accuracy:
  how often the partner is the most similar of the 2B-1 candidates.
  """
  z = _normalize(jnp.concatenate([z1, z2], axis=0))
  n = z.shape[0]
  b = n // 2
  logits = (z @ z.T) / temperature
  # A view is always most similar to itself: take it out of the candidates.
  logits = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, logits)
  partner = (jnp.arange(n) + b) % n
  positive = jnp.take_along_axis(logits, partner[:, None], axis=1)[:, 0]
  loss = (jax.nn.logsumexp(logits, axis=-1) - positive).mean()
  accuracy = (logits.argmax(-1) == partner).mean()
  return loss, accuracy


# ----------------------------------------------------------------------------- InfoNCE


def info_nce(q: jax.Array, d: jax.Array, *, scale: float | jax.Array,
             negatives: jax.Array | None = None,
             symmetric: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """In-batch-negative InfoNCE (sentence-transformers' MultipleNegativesRankingLoss) of text pairs.

  q: (B, D) anchors; d: (B, D) their positives; negatives: optional (B, K, D) hard negatives, K per
  anchor. Rows are L2-normalised here, so the logits are cosine similarity times `scale`
  (1/temperature: 20 is MNRL's default, temperature 0.05; a traced value from `clip_logit_scale`
  makes it learnable). Query -> document: anchor i is a softmax over all B positives plus all B*K
  negatives of the (global) batch, with d[i] the target. Symmetric adds document -> query: d[i] is
  a softmax over the B anchors with q[i] the target, and the loss is the mean of the two directions
  (MultipleNegativesSymmetricRankingLoss).

  Returns (loss, metrics): `loss`, `accuracy` (how often d[i] is anchor i's top-1 candidate),
  `accuracy_d2q` when symmetric, `scale`, and the mean cosine of positive pairs
  (`positive_cosine`), which collapses towards the negatives' when training goes wrong.
  """
  if q.ndim != 2 or d.shape != q.shape:
    raise UserError(f"info_nce: anchors {q.shape} and positives {d.shape} must both be (batch, dim)")
  b, dim = q.shape
  q, d = _normalize(q), _normalize(d)
  candidates = d
  if negatives is not None:
    if negatives.ndim != 3 or negatives.shape[0] != b or negatives.shape[2] != dim:
      raise UserError(f"info_nce: negatives {negatives.shape} must be (batch={b}, K, dim={dim})")
    # Column layout [P_0..P_B-1, N_0,0..N_0,K-1, N_1,0, ...]: the targets are the first B columns.
    candidates = jnp.concatenate([d, _normalize(negatives).reshape(-1, dim)], axis=0)
  scale = jnp.asarray(scale, jnp.float32)
  logits = scale * (q @ candidates.T)  # (B, B + B*K)
  target = jnp.arange(b)
  positive = logits[target, target]
  q2d = (jax.nn.logsumexp(logits, axis=-1) - positive).mean()
  metrics = {"accuracy": (logits.argmax(-1) == target).mean(),
             "scale": scale,
             "positive_cosine": jnp.sum(q * d, axis=-1).mean()}
  loss = q2d
  if symmetric:
    # d[i] against the B anchors: the transpose of the first B columns.
    back = logits[:, :b].T
    d2q = (jax.nn.logsumexp(back, axis=-1) - positive).mean()
    loss = (q2d + d2q) / 2
    metrics["accuracy_d2q"] = (back.argmax(-1) == target).mean()
  metrics["loss"] = loss
  return loss, metrics


def clip_logit_scale_init(temperature: float = CLIP_INIT_TEMPERATURE) -> jax.Array:
  """The learnable parameter of CLIP's temperature: log(1/temperature), a float32 scalar.

  Keep it with the trained parameters (e.g. an `nnx.Param` on the task's model) and pass
  `clip_logit_scale(param)` as `info_nce`'s scale.
  """
  if not temperature > 0:
    raise UserError(f"temperature={temperature} must be > 0; CLIP starts at 0.07")
  return jnp.asarray(math.log(1.0 / temperature), jnp.float32)


def clip_logit_scale(log_scale: jax.Array, max_scale: float = CLIP_MAX_SCALE) -> jax.Array:
  """exp(log_scale) clamped at `max_scale` (100 in CLIP).

  open_clip clamps the parameter in place after each step; a pure function clamps in the forward
  pass instead. The effective scale is the same, and above the clamp the parameter gets no
  gradient from the loss, so it stops where CLIP's would be held.
  """
  return jnp.exp(jnp.minimum(jnp.asarray(log_scale, jnp.float32), math.log(max_scale)))


# ----------------------------------------------------------------------------- GradCache


def _batch_size(inputs: Any) -> int:
  leaves = jax.tree.leaves(inputs)
  if not leaves:
    raise UserError("grad_cache: inputs hold no arrays; pass the batch's columns (e.g. token ids)")
  sizes = {int(x.shape[0]) if getattr(x, "ndim", 0) else -1 for x in leaves}
  if len(sizes) != 1 or -1 in sizes:
    raise UserError(f"grad_cache: every input needs the same leading batch axis, got leading sizes "
                    f"{sorted(sizes)}; give each column shape (batch, ...)")
  return sizes.pop()


def grad_cache(encode: Callable[[Any, Any, jax.Array], Any],
               loss_from_embeddings: Callable[[Any, Any], tuple[jax.Array, Any]],
               params: Any, inputs: Any, *, chunk_size: int,
               rng: jax.Array) -> tuple[tuple[jax.Array, Any], Any]:
  """((loss, aux), d loss / d params) of `loss_from_embeddings(encode(params, inputs), params)`, computed
  chunk by chunk so that memory holds one chunk's activations, not the batch's (GradCache,
  Gao et al. 2021, arXiv 2101.06983).

  encode(params, chunk, rng) -> embeddings: pure; `chunk` is `inputs` cut to `chunk_size` examples
  along the leading axis of every leaf; it returns a pytree of arrays with that leading axis (e.g.
  {"anchor": (c, D), "positive": (c, D), "negative": (c, K, D)} for two weight-sharing towers: embed
  each column of the chunk with the same parameters, folding a distinct constant into `rng` per
  column if the columns need different dropout masks).
  loss_from_embeddings(embeddings, params) -> (loss, aux): sees the whole batch's embeddings in the
  original example order (so in-batch negatives span the whole batch), e.g. `info_nce`. It gets
  `params` too, for parameters of the loss itself (a learnable temperature: `clip_logit_scale` of
  a leaf of params); their gradient is added to the encoder's. A loss without any ignores it.
  params: any pytree of float arrays (the gradient has its structure and dtypes).
  inputs: any pytree of arrays with a common leading batch axis B; chunk_size must divide B.
  rng: chunk i runs with `jax.random.fold_in(rng, i)` in both passes, so dropout masks match.

  Pass 1 embeds every chunk under `lax.scan` without keeping activations; the loss and its gradient
  w.r.t. the embeddings come from the whole batch; pass 2 re-runs each chunk's forward under
  `jax.vjp` and pulls the cached embedding gradient back to the parameters, summing over chunks in
  float32. The result equals `jax.grad` of the unchunked function (given the same per-chunk rngs)
  up to float rounding; the cost is one extra forward pass.

  Chunk i holds examples i, i+n, i+2n, ... (n = B / chunk_size): under a mesh that shards the
  batch in contiguous blocks, every chunk then takes chunk_size / shards rows from every device
  with no data movement, as long as chunk_size is a multiple of the number of batch shards.
  """
  chunk_size = int(chunk_size)
  b = _batch_size(inputs)
  if chunk_size <= 0 or b % chunk_size:
    raise UserError(f"grad_cache: chunk_size={chunk_size} does not divide the batch of {b}; "
                    f"choose a chunk size that divides {b}")
  n = b // chunk_size

  def to_chunks(x):  # (B, ...) -> (n, chunk, ...); row a*n + i goes to chunk i, slot a
    return jnp.moveaxis(x.reshape(chunk_size, n, *x.shape[1:]), 1, 0)

  def from_chunks(x):  # the inverse of to_chunks
    return jnp.moveaxis(x, 0, 1).reshape(b, *x.shape[2:])

  chunks = jax.tree.map(to_chunks, inputs)
  index = jnp.arange(n)

  def embed(_, xs):
    chunk, i = xs
    return None, jax.lax.stop_gradient(encode(params, chunk, jax.random.fold_in(rng, i)))

  _, embeddings = jax.lax.scan(embed, None, (chunks, index))
  embeddings = jax.tree.map(from_chunks, embeddings)
  (loss, aux), (cotangent, loss_grads) = jax.value_and_grad(
      loss_from_embeddings, argnums=(0, 1), has_aux=True)(embeddings, params)
  cotangent = jax.tree.map(to_chunks, cotangent)

  def pull_back(total, xs):
    chunk, i, g = xs
    _, vjp = jax.vjp(lambda p: encode(p, chunk, jax.random.fold_in(rng, i)), params)
    (grads,) = vjp(g)
    return jax.tree.map(lambda t, x: t + x.astype(jnp.float32), total, grads), None

  start = jax.tree.map(lambda g: g.astype(jnp.float32), loss_grads)
  total, _ = jax.lax.scan(pull_back, start, (chunks, index, cotangent))
  grads = jax.tree.map(lambda t, p: t.astype(jnp.result_type(p)), total, params)
  return (loss, aux), grads


# ----------------------------------------------------------------------------- sampled softmax


def sampled_softmax(query: jax.Array, candidates: jax.Array, item_ids: jax.Array, *,
                    temperature: float = 1.0, log_q: jax.Array | None = None,
                    remove_accidental_hits: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """In-batch sampled softmax of a retrieval two-tower (Yi et al., RecSys 2019).

  query: (B, D) user embeddings; candidates: (B, D) the embeddings of their positive items, which
  are also every other row's negatives; item_ids: (B,) the positives' ids. logits = q @ c.T /
  temperature. log_q: (B,) log of the probability that each in-batch item was sampled (its share of
  the training interactions); it is subtracted from its column, so popular items, which turn up as
  negatives more often, are not pushed down for it. With `remove_accidental_hits` a column whose item
  is the row's own positive (other than the diagonal) is masked out: it is not a negative.

  Plain jnp over the global batch, so the negatives span every device. Returns (loss, metrics with
  `loss` and `accuracy`: how often a row's own positive scores highest)."""
  logits = (query.astype(jnp.float32) @ candidates.astype(jnp.float32).T) / temperature
  if log_q is not None:
    logits = logits - log_q.astype(jnp.float32)[None, :]
  b = logits.shape[0]
  eye = jnp.eye(b, dtype=bool)
  if remove_accidental_hits:
    same = item_ids[:, None] == item_ids[None, :]
    logits = jnp.where(same & ~eye, -jnp.inf, logits)
  positive = jnp.diagonal(logits)
  loss = (jax.nn.logsumexp(logits, axis=-1) - positive).mean()
  accuracy = (logits.argmax(-1) == jnp.arange(b)).mean()
  return loss, {"loss": loss, "accuracy": accuracy}
