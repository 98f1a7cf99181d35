"""Row-wise (sparse) optimizers for embedding tables: only the rows a batch touches change.

A dense optimizer over an id table reads and writes every row every step (the gradient of a gather
is a table-sized scatter, and Adam's moments move even where it is zero), so a step costs in
proportion to the catalogue. Here a step gathers the touched rows, sums the gradients of repeated
ids, updates those rows and their per-row optimizer state, and scatters them back: a step costs in
proportion to the batch. This is TensorFlow's LazyAdam and TorchRec's row-wise fused optimizers.

  sgd      row -= lr * g                                   (equal to dense SGD)
  adagrad  acc += g^2; row -= lr * g / sqrt(acc + eps)     (equal to optax.adagrad: untouched rows
                                                            have g = 0, so dense changes them neither)
  adam     m, v of the touched rows only, bias-corrected with the global step (optax.adam's form);
           equal to dense Adam when every row is touched every step, else "lazy": an untouched row
           keeps its moments and value instead of drifting on its old momentum.

Tables and their state may be sharded by rows over the mesh: the gather and the scatter then touch
only the shards that hold the rows (XLA partitions both).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("adam", "adagrad", "sgd")
SLOTS = {"adam": ("m", "v"), "adagrad": ("acc",), "sgd": ()}
ADAGRAD_INITIAL = 0.1   # optax.adagrad's initial_accumulator_value
ADAGRAD_EPS = 1e-7      # optax.adagrad's eps
ADAM_EPS = 1e-8         # optax.adam's eps


def init_slots(kind: str, table: jax.Array) -> dict[str, jax.Array]:
  """The per-row optimizer state of `table`: one array of its shape per slot."""
  fill = ADAGRAD_INITIAL if kind == "adagrad" else 0.0
  return {name: jnp.full(table.shape, fill, table.dtype) for name in SLOTS[kind]}


def unique_rows(ids: jax.Array, grads: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """(rows, summed): the distinct ids of a batch (padded with `num_rows`, an index the scatter
  drops) and the sum of the gradients of each one's occurrences. Static shapes: at most B rows."""
  b = ids.shape[0]
  rows, inverse = jnp.unique(ids, size=b, fill_value=num_rows, return_inverse=True)
  summed = jax.ops.segment_sum(grads, inverse.reshape(-1), num_segments=b)
  return rows, summed


def update(kind: str, table: jax.Array, slots: dict[str, jax.Array], rows: jax.Array,
           grads: jax.Array, *, learning_rate, step, b1: float = 0.9, b2: float = 0.999,
           apply=True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`table` and `slots` with `rows` (from `unique_rows`) moved by their summed `grads`; `step` is
  the number of updates made before this one (Adam's bias correction). Where `apply` (a traced
  bool) is false the rows are written back unchanged: a step to skip costs no table-sized select."""
  get = lambda a: a.at[rows].get(mode="fill", fill_value=0)

  def put(a, new, old):
    return a.at[rows].set(jnp.where(apply, new, old).astype(a.dtype), mode="drop")

  w, g = get(table), grads.astype(jnp.float32)
  if kind == "sgd":
    return put(table, w - learning_rate * g, w), {}
  if kind == "adagrad":
    acc0 = get(slots["acc"])
    acc = acc0 + g * g
    scale = jnp.where(acc > 0, jax.lax.rsqrt(acc + ADAGRAD_EPS), 0.0)
    return put(table, w - learning_rate * g * scale, w), {"acc": put(slots["acc"], acc, acc0)}
  if kind == "adam":
    t = (step + 1).astype(jnp.float32)
    m0, v0 = get(slots["m"]), get(slots["v"])
    m = b1 * m0 + (1 - b1) * g
    v = b2 * v0 + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    new = w - learning_rate * m_hat / (jnp.sqrt(v_hat) + ADAM_EPS)
    return put(table, new, w), {"m": put(slots["m"], m, m0), "v": put(slots["v"], v, v0)}
  raise ValueError(f"unknown row optimizer {kind!r}")
