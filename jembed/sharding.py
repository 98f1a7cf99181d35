"""The device mesh and the map from logical axis names to mesh axes.

Model code names axes logically (`batch`, `embed`, `mlp`, `heads`, `vocab`, ...). The config holds
the mesh sizes (`mesh.data`, `mesh.fsdp`, `mesh.tensor`, `-1` fills the rest) and the rules that
map logical names to mesh axes, so one model runs data-parallel, FSDP or tensor-parallel by config.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jembed.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# The default plan: batch over data and fsdp, weights' embed dim over fsdp (ZeRO-3 style), the
# wide dims (mlp, heads, vocab, conv output channels) over tensor (Megatron style).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_out", "tensor"),
    ("kv", None),
    ("length", None),
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves `-1` in the configured sizes and checks that the product is the device count."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise UserError(f"mesh: at most one of mesh.data/fsdp/tensor may be -1, got {dict(zip(MESH_AXES, sizes))}; "
                    "set the others to explicit sizes")
  if any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise UserError(f"mesh: {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices "
                      f"({num_devices} is not divisible by {fixed}); choose sizes whose product divides {num_devices}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise UserError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices; "
                    f"set --config.mesh.data/fsdp/tensor so the product is {num_devices} (or use -1 for one of them)")
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(mesh_config, len(devices))
  # Auto axis types: shardings are given at the jit boundary and propagated by the compiler.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                       devices=devices)


def rules_from_config(config) -> tuple:
  rules = config.get("sharding_rules", None)
  if not rules:
    return DEFAULT_RULES
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules)


def logical_to_sharding(logical_specs, mesh: Mesh, rules) -> Any:
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def logical_specs(abstract_state) -> Any:
  """Logical PartitionSpecs of an (abstract) nnx State, as a pure dict."""
  return nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))


def check_divisible(abstract_tree, sharding_tree, what: str) -> None:
  """Refuses a dimension that does not divide over its mesh axes, naming the parameter."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  shardings = jax.tree_util.tree_leaves(sharding_tree, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(leaves, shardings):
    spec = sharding.spec
    for dim, axes in zip(leaf.shape, spec):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      n = math.prod(sharding.mesh.shape[a] for a in axes)
      if dim % n:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        raise UserError(f"{what} '{name}' has shape {tuple(leaf.shape)}; dimension {dim} does not divide over "
                        f"mesh axes {axes} of size {n}; change the model size or the mesh "
                        f"(--config.mesh.*) so it divides")


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  """Batch dimension over the axes `batch` maps to; the other dimensions replicated."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def batch_axis_size(mesh: Mesh, rules) -> int:
  spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
  if spec is None:
    return 1
  spec = spec if isinstance(spec, tuple) else (spec,)
  return math.prod(mesh.shape[a] for a in spec)


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
          for k, v in local_batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
