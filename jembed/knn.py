"""Exact (and on TPU approximate) maximum-inner-product search over rows held on the devices.

The rows are split over a 1-D mesh ("rows"): each device holds a slice, padded to a whole number of
chunks. A search runs, on every device at once, a scan over its chunks: scores = queries @ chunk.T,
padding rows set to -inf, the chunk's top-k merged into a running top-k. The per-device lists (k
each) are then merged into the global top-k. Memory is (queries x chunk) scores per device, not
(queries x rows), so a million rows search in the memory of a few thousand.

`recall_target` switches the per-chunk top-k to `jax.lax.approx_max_k` (TPU-KNN, Chern et al. 2022):
on TPU it trades recall for speed with an expected-recall guarantee; on other backends JAX falls
back to an exact sort, so results there equal the exact search. Queries are padded to a few batch
sizes and compiled functions are cached per (rows geometry, query batch, k, recall target), so
repeated searches, and an index loaded again, never recompile.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jembed.errors import UserError

AXIS = "rows"
# Query batches are padded to one of these sizes (then cut into QUERY_BATCHES[-1]-sized batches):
# few shapes, few compiles.
QUERY_BATCHES = (8, 64, 256)
CHUNK_ROWS = 8192        # rows scored together on one device (per scan step)
_FUNCTIONS: dict[tuple, object] = {}   # compiled searches, by geometry, query batch, k, recall target
TRACES = 0               # search functions traced so far (tests check that repeats reuse them)


class Searcher:
  """Rows (N, D) placed on `devices` (default: the local ones; sharded by rows), searched by inner
  product."""

  def __init__(self, rows: np.ndarray, *, devices: Sequence | None = None, chunk_rows: int = CHUNK_ROWS):
    devices = list(devices or jax.local_devices())   # each process searches its own copy
    self.count, self.dim = int(rows.shape[0]), int(rows.shape[1])
    self.mesh = jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Explicit,),
                              devices=devices)
    n_dev = len(devices)
    per_dev = max(-(-self.count // n_dev), 1)
    self.chunk = min(int(chunk_rows), -(-per_dev // 8) * 8)   # no bigger than a device's slice
    self.per_dev = -(-per_dev // self.chunk) * self.chunk       # a whole number of chunks
    total = self.per_dev * n_dev
    dtype = np.dtype(rows.dtype) if np.dtype(rows.dtype) in (np.float16, np.float32) else np.float32
    sharding = NamedSharding(self.mesh, P(AXIS, None))

    def shard(index):
      # Only this device's slice is read from `rows` (a memmap stays on disk until then); the rows
      # past the end are zeros, masked to -inf in every search.
      lo, hi = index[0].start or 0, index[0].stop or total
      out = np.zeros((hi - lo, self.dim), dtype)
      real = rows[lo:min(hi, self.count)]
      out[:len(real)] = real
      return out

    self.rows = jax.make_array_from_callback((total, self.dim), sharding, shard)

  def search(self, queries: np.ndarray, k: int, *, recall_target: float | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k'), row indices (Q, k')) of the k' = min(k, N) best rows of each query, best first."""
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise UserError(f"query vectors of shape {queries.shape} do not fit the index (it holds "
                      f"{self.dim}-d vectors); give a (Q, {self.dim}) array")
    if k < 1:
      raise UserError(f"k={k} must be positive")
    if recall_target is not None and not 0.0 < recall_target <= 1.0:
      raise UserError(f"recall target {recall_target} must be in (0, 1]")
    k = min(int(k), self.count)
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    step = QUERY_BATCHES[-1]
    for lo in range(0, len(queries), step):
      batch = queries[lo:lo + step]
      size = next(b for b in QUERY_BATCHES if b >= len(batch))
      padded = np.zeros((size, self.dim), np.float32)
      padded[:len(batch)] = batch
      fn = self._function(size, k, recall_target)
      # Its own mesh, whatever mesh the caller has set (a task's evaluation runs inside the train
      # loop's): shard_map needs the context mesh to be the one it maps over.
      with jax.set_mesh(self.mesh):
        s, i = fn(self.rows, jax.device_put(padded, NamedSharding(self.mesh, P())))
      scores[lo:lo + len(batch)] = np.asarray(s)[:len(batch)]
      ids[lo:lo + len(batch)] = np.asarray(i)[:len(batch)]
    return scores, ids

  def _function(self, batch: int, k: int, recall_target: float | None):
    # Shared by every Searcher of the same geometry (an index loaded again, a server's reload).
    key = (tuple(self.mesh.devices.flat), self.count, self.dim, self.chunk, self.per_dev,
           str(self.rows.dtype), batch, k, recall_target)
    if key not in _FUNCTIONS:
      if len(_FUNCTIONS) >= 64:   # indexes reloaded after many adds: forget old geometries
        _FUNCTIONS.clear()
      _FUNCTIONS[key] = self._compile(k, recall_target)
    return _FUNCTIONS[key]

  def _compile(self, k: int, recall_target: float | None):
    chunk, per_dev, count = self.chunk, self.per_dev, self.count
    # Each device keeps its best min(k, per_dev) rows; n_dev of those lists hold the global top k,
    # since n_dev * per_dev >= count >= k.
    k_dev = min(k, per_dev)
    k_chunk = min(k_dev, chunk)

    def top(scores, kk):
      if recall_target is None:
        return jax.lax.top_k(scores, kk)
      return jax.lax.approx_max_k(scores, kk, recall_target=recall_target)

    def per_device(rows, queries):
      # rows: this device's (per_dev, D) slice; queries: all of them, replicated.
      offset = jax.lax.axis_index(AXIS) * per_dev
      blocks = rows.reshape(per_dev // chunk, chunk, rows.shape[-1])
      q = queries.shape[0]

      def step(carry, xs):
        best_s, best_i = carry
        block, start = xs
        s = jnp.einsum("qd,rd->qr", queries, block.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
        row = start + jnp.arange(chunk)
        s = jnp.where(row[None, :] < count, s, -jnp.inf)   # padding rows never win
        cs, ci = top(s, k_chunk)
        all_s = jnp.concatenate([best_s, cs], axis=1)
        all_i = jnp.concatenate([best_i, jnp.take(row, ci)], axis=1)
        ms, mi = jax.lax.top_k(all_s, k_dev)
        return (ms, jnp.take_along_axis(all_i, mi, axis=1)), None

      init = (jnp.full((q, k_dev), -jnp.inf, jnp.float32), jnp.full((q, k_dev), -1, jnp.int32))
      init = jax.lax.pcast(init, (AXIS,), to="varying")   # the carry differs per device
      starts = offset + jnp.arange(per_dev // chunk, dtype=jnp.int32) * chunk
      (best_s, best_i), _ = jax.lax.scan(step, init, (blocks, starts))
      return best_s, best_i

    mapped = jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(AXIS, None), P()),
                           out_specs=(P(None, AXIS), P(None, AXIS)))
    mesh = self.mesh

    @jax.jit
    def fn(rows, queries):
      global TRACES
      TRACES += 1   # runs while tracing only
      s, i = mapped(rows, queries)            # (Q, n_dev * k_dev): every device's list
      s = jax.sharding.reshard(s, NamedSharding(mesh, P()))
      i = jax.sharding.reshard(i, NamedSharding(mesh, P()))
      best, where = jax.lax.top_k(s, k)
      return best, jnp.take_along_axis(i, where, axis=1)

    return fn


def brute_force(rows: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The NumPy reference: full scores, stable descending sort (ties: lower row first)."""
  scores = np.asarray(queries, np.float64) @ np.asarray(rows, np.float64).T
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, order, axis=1), order
