"""The device mesh and the map from logical axis names to mesh axes.

Model code names axes logically (`batch`, `embed`, `mlp`, `heads`, `vocab`, ...). The config holds
the mesh sizes (`mesh.data`, `mesh.fsdp`, `mesh.tensor`, `-1` fills the rest) and the rules that
map logical names to mesh axes, so one model runs data-parallel, FSDP or tensor-parallel by config.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jembed.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# The default plan: batch over data and fsdp, weights' embed dim over fsdp (ZeRO-3 style), the
# wide dims (mlp, heads, vocab, conv output channels) over tensor (Megatron style); the rows of an ID
# embedding table over the whole mesh.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_out", "tensor"),
    # Rows of an ID embedding table (two-tower users / items): over every device, so a catalogue of
    # millions of items takes 1/N of the memory on each.
    ("table_rows", ("data", "fsdp", "tensor")),
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
  rules = config.sharding_rules
  if not rules:
    return DEFAULT_RULES
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules)


def logical_to_sharding(logical_specs, mesh: Mesh, rules) -> Any:
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def logical_specs(abstract_state) -> Any:
  """Logical PartitionSpecs of an (abstract) nnx State, as a pure dict."""
  return nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))


# Leaves with fewer elements than this stay replicated. On a TPU an array is laid out in (8, 128)
# tiles of 32-bit words, 1024 elements (4 KiB) each (the "TPU memory layout" section of JAX's Pallas
# TPU guide, docs.jax.dev/en/latest/pallas/tpu/details.html), so a shard of a smaller array still
# fills a tile: sharding it saves no memory and adds a gather to every step. Biases and norm scales
# of narrow models fall under it; a 32x32 kernel already does not.
MIN_SHARD_ELEMENTS = 1024
# LoRA factors keep their kernel's axes however small they are: A shares the kernel's input-dim
# sharding and B its output-dim sharding, so `W + s * A @ B` merges without communication.
SMALL_EXEMPT = re.compile(r"(^|/)adapters/")


@dataclasses.dataclass
class Placement:
  """What `fit_shardings` changed from the rules' plan: parameters whose mesh axes moved to another
  dimension, that became replicated, and how many were too small to shard."""
  moved: list = dataclasses.field(default_factory=list)       # "name (shape): axes dim i -> j"
  replicated: list = dataclasses.field(default_factory=list)  # "name (shape): axes"
  small: int = 0
  small_bytes: int = 0

  def __bool__(self) -> bool:
    return bool(self.moved or self.replicated or self.small)

  def line(self) -> str:
    """One log line (empty when the rules' plan was kept everywhere); layer indices collapse to `*`."""
    if not self:
      return ""
    parts = []
    if self.moved:
      parts.append(f"sharded along another dimension: {_collapse(self.moved)}")
    if self.replicated:
      parts.append(f"replicated (no dimension divides): {_collapse(self.replicated)}")
    if self.small:
      parts.append(f"{self.small} parameters under {MIN_SHARD_ELEMENTS} elements replicated "
                   f"({self.small_bytes / 1024:.1f} KiB)")
    return "sharding: " + "; ".join(parts)


def _collapse(entries: list) -> str:
  """Entries that differ only in a layer index are listed once, as `layers/*/...` (xN)."""
  counts: dict[str, int] = {}
  for e in entries:
    key = re.sub(r"(?<=/)\d+(?=/)", "*", e)
    counts[key] = counts.get(key, 0) + 1
  return ", ".join(k if n == 1 else f"{k} (x{n})" for k, n in counts.items())


def _axes(entry) -> tuple:
  if entry is None:
    return ()
  return entry if isinstance(entry, tuple) else (entry,)


def fit_spec(shape: Sequence[int], spec: P, mesh_shape: dict, min_elements: int = MIN_SHARD_ELEMENTS
             ) -> tuple[P, str, str]:
  """The spec a leaf of `shape` gets on a mesh of `mesh_shape` ({axis: size}) when the rules gave it
  `spec`: unchanged where every dimension divides over its axes; else the axes of a dimension that
  does not divide move to the largest other dimension they divide (joining that dimension's axes),
  else are dropped (replicated over them). Leaves under `min_elements` are replicated. Returns
  (spec, kind, detail) with kind "" (kept), "small", "moved" or "replicated"."""
  entries = [list(_axes(e)) for e in spec] + [[] for _ in range(len(shape) - len(spec))]
  size = lambda axes: math.prod(mesh_shape[a] for a in axes)
  if not any(size(e) > 1 for e in entries):
    return spec, "", ""
  if math.prod(shape) < min_elements:
    return P(), "small", ""
  kind, details = "", []
  for i, dim in enumerate(shape):
    axes = entries[i]
    if dim % size(axes) == 0:
      continue
    entries[i] = []
    axes = [a for a in axes if mesh_shape[a] > 1]
    # Prefer a dimension no axis splits yet, then the largest one (the most even split).
    order = sorted((j for j in range(len(shape)) if j != i),
                   key=lambda j: (size(entries[j]) > 1, -shape[j]))
    target = next((j for j in order if shape[j] % (size(entries[j]) * size(axes)) == 0), None)
    if target is None:
      kind = "replicated"
      details.append(f"{'/'.join(axes)} dim {i}")
    else:
      entries[target] = entries[target] + axes
      kind = kind or "moved"
      details.append(f"{'/'.join(axes)} dim {i}->{target}")
  if not kind:
    return spec, "", ""
  out = [None if not e else (e[0] if len(e) == 1 else tuple(e)) for e in entries]
  while out and out[-1] is None:
    out.pop()
  return P(*out), kind, ", ".join(details)


def fit_shardings(abstract_tree, sharding_tree, min_elements: int = MIN_SHARD_ELEMENTS
                  ) -> tuple[Any, Placement]:
  """Every leaf's NamedSharding made valid for its shape (`fit_spec`): a model that can be placed is
  never refused (LoRA factors, `SMALL_EXEMPT`, skip the size threshold). Returns the new tree and
  what changed (`Placement.line()` for the log)."""
  is_sharding = lambda x: isinstance(x, NamedSharding)
  leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  shardings, treedef = jax.tree_util.tree_flatten(sharding_tree, is_leaf=is_sharding)
  placement, out = Placement(), []
  for (path, leaf), sh in zip(leaves, shardings, strict=True):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    least = 0 if SMALL_EXEMPT.search(name) else min_elements
    spec, kind, detail = fit_spec(leaf.shape, sh.spec, dict(sh.mesh.shape), least)
    if kind == "small":
      placement.small += 1
      placement.small_bytes += leaf.size * leaf.dtype.itemsize
    elif kind == "moved":
      placement.moved.append(f"{name} {tuple(leaf.shape)}: {detail}")
    elif kind == "replicated":
      placement.replicated.append(f"{name} {tuple(leaf.shape)}: {detail}")
    out.append(NamedSharding(sh.mesh, spec) if kind else sh)
  return jax.tree_util.tree_unflatten(treedef, out), placement


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
