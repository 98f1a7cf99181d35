"""Houlsby bottleneck adapters: a small residual MLP inserted after a block.

The up projection starts at zero, so inserting adapters into a pretrained model leaves
its outputs unchanged until training moves them. Only adapters, LayerNorms and the head
are trained (ADAPTER_TRAINABLE).
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Any path segment containing "adapter", LayerNorm parameters (module names ending in
# "norm") and the task head; matched with re.search on "/"-joined paths.
ADAPTER_TRAINABLE = r"(^|/)[^/]*adapter[^/]*/|(^|/)[^/]*norm/(scale|bias)$|^head/"


class BottleneckAdapter(nnx.Module):
  """y = x + up(gelu(down(x))), with ``up`` initialised to zero (identity at start)."""

  def __init__(self, features: int, bottleneck: int, *, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.down = nnx.Linear(
        features, bottleneck, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.initializers.lecun_normal(),
        kernel_metadata={"out_sharding": ("embed", None)},
        bias_metadata={"out_sharding": (None,)}, rngs=rngs)
    self.up = nnx.Linear(
        bottleneck, features, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.initializers.zeros_init(),
        kernel_metadata={"out_sharding": (None, "embed")},
        bias_metadata={"out_sharding": ("embed",)}, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.up(jax.nn.gelu(self.down(x))).astype(x.dtype)


def adapter_trainable_mask(params: dict) -> dict:
  """Bool tree (same structure as ``params``): True where ADAPTER_TRAINABLE matches."""
  def walk(tree, prefix):
    return {k: walk(v, f"{prefix}{k}/") if isinstance(v, dict)
            else re.search(ADAPTER_TRAINABLE, f"{prefix}{k}") is not None
            for k, v in tree.items()}
  return walk(params, "")
