"""What end-of-run work needs when a run spans several JAX processes (a pod slice, a GPU cluster).

The rule: every collective (a jit over arrays sharded across processes, a gather, an orbax save of
such arrays) runs on EVERY process, in the same order; only the writing of run artifacts is
process 0's (`fs.is_writer`). A collective called by process 0 alone waits forever for the others.

- `host_values`: the full value of every leaf of a tree as NumPy, on every process (a collective).
- `local_copy`: the same tree with each leaf that spans processes copied whole onto this process's
  first device, so host-side evaluations (predictions, retrieval embeddings, probes) run locally,
  identically on every process, on ordinary jit calls.
- `barrier` and `shared_token`: a point every process reaches before any goes on, and a random
  name that is the same on every process (for a temporary directory they all write into).
With one process every function here is a plain local operation.
"""
from __future__ import annotations

import itertools
import uuid
from typing import Any

import jax
import numpy as np

_barriers = itertools.count()


def spans_processes(x: Any) -> bool:
  return isinstance(x, jax.Array) and not x.is_fully_addressable


def host_values(tree: Any) -> Any:
  """NumPy copies of every leaf (jax.Array, NumPy or Python scalar) with its full global value.
  Leaves sharded across processes are first resharded to fully replicated in ONE jitted program
  (a collective: every process must call this with the same tree structure)."""
  leaves, treedef = jax.tree.flatten(tree)
  spread = [i for i, x in enumerate(leaves) if spans_processes(x) and not x.is_fully_replicated]
  if spread:
    targets = [jax.sharding.NamedSharding(leaves[i].sharding.mesh, jax.sharding.PartitionSpec())
               for i in spread]
    gathered = jax.jit(lambda xs: xs, out_shardings=targets)([leaves[i] for i in spread])
    for i, x in zip(spread, gathered):
      leaves[i] = x
  # A fully replicated array converts from its local shard, addressable on every process.
  return jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])


def local_copy(tree: Any, device: jax.Device | None = None) -> Any:
  """`tree` with every leaf that spans processes replaced by its full value on `device` (default:
  this process's first local device); leaves this process holds whole are kept as they are. With
  one process the tree comes back unchanged (and nothing is copied). A collective when any leaf
  spans processes."""
  leaves, treedef = jax.tree.flatten(tree)
  spread = [i for i, x in enumerate(leaves) if spans_processes(x)]
  if not spread:
    return tree
  device = device or jax.local_devices()[0]
  values = host_values([leaves[i] for i in spread])
  for i, v in zip(spread, values):
    leaves[i] = jax.device_put(v, device)
  return jax.tree.unflatten(treedef, leaves)


def shared_token() -> str:
  """A random hex token, the same on every process (process 0's, broadcast)."""
  token = uuid.uuid4().hex[:8]
  if jax.process_count() == 1:
    return token
  from jax.experimental import multihost_utils
  value = multihost_utils.broadcast_one_to_all(np.asarray(int(token, 16), np.int64))
  return f"{int(value):08x}"


def barrier(name: str, timeout_s: int = 1800) -> None:
  """Returns once every process has called `barrier` with this name (a no-op with one process).
  On the coordination service where there is one (no device collective, so a peer that is slow to
  arrive is waited for up to `timeout_s`); else a device all-reduce."""
  if jax.process_count() == 1:
    return
  key = f"jembed_{name}_{next(_barriers)}"  # every process calls barriers in the same order
  try:  # the client jax.distributed.initialize() made (no public accessor in jax 0.10)
    from jax._src import distributed
    client = distributed.global_state.client
  except (ImportError, AttributeError):
    client = None
  if client is not None:
    client.wait_at_barrier(key, timeout_in_ms=timeout_s * 1000)
  else:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(key)
