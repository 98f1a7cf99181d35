"""Houlsby bottleneck adapters: a small residual MLP inserted after each Transformer sub-layer, and
the tuning that trains them.

The up projection starts at zero, so inserting adapters into a pretrained model leaves its outputs
unchanged until training moves them. Adapters, LayerNorms and the head train (ADAPTER_TRAINABLE).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jembed.errors import UserError
from jembed.models.layers import logical
from jembed.peft.base import RegexTuning

# Any path segment containing "adapter", LayerNorm parameters (module names ending in
# "norm") and the task head; matched with re.search on "/"-joined paths.
ADAPTER_TRAINABLE = r"(^|/)[^/]*adapter[^/]*/|(^|/)[^/]*norm/(scale|bias)$|^head/"
ADAPTER_PARAMS = r"(^|/)[^/]*adapter[^/]*/"
DEFAULT_DIM = 64


class BottleneckAdapter(nnx.Module):
  """y = x + up(gelu(down(x))), with ``up`` initialised to zero (identity at start)."""

  def __init__(self, features: int, bottleneck: int, *, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.down = nnx.Linear(
        features, bottleneck, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.initializers.lecun_normal(),
        kernel_metadata=logical("embed", None),
        bias_metadata=logical(None), rngs=rngs)
    self.up = nnx.Linear(
        bottleneck, features, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.initializers.zeros_init(),
        kernel_metadata=logical(None, "embed"),
        bias_metadata=logical("embed"), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.up(jax.nn.gelu(self.down(x))).astype(x.dtype)


class AdapterTuning(RegexTuning):
  """Bottleneck adapters of width `dim`, LayerNorms and the head train; the model is built with
  adapters (`model_overrides`), which a warm start from a checkpoint without them may lack."""
  name = "adapter"
  new_params = ADAPTER_PARAMS

  def __init__(self, dim: int = DEFAULT_DIM, trainable: str = ADAPTER_TRAINABLE):
    if dim < 1:
      raise UserError(f"peft.adapter_dim={dim} must be >= 1 for peft.method=adapter; set a bottleneck width")
    super().__init__(trainable)
    self.dim = dim

  def model_overrides(self, model_config: dict) -> dict:
    # A text model description is the encoder's own; an image one names its backbone, and the
    # adapters go into the ViT's encoder.
    out = dict(model_config)
    backbone = out.get("backbone")
    if backbone is None:
      out["adapter_dim"] = self.dim
    elif backbone == "vit":
      out["vit"] = dict(out.get("vit") or {}, adapter_dim=self.dim)
    else:
      raise UserError(f"peft.method=adapter needs a transformer backbone (text, or model.backbone=vit), "
                      f"not {backbone!r}; use lora, linear_probe or full for ResNets")
    return out
