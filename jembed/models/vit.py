"""Vision Transformer (Dosovitskiy et al. 2021) on the spine's Transformer encoder.

Images are cut into non-overlapping patches, each flattened patch goes through one Dense (the
same as a stride-`patch` conv), a learned [CLS] token is prepended and learned positions added,
and the pre-LN `TransformerEncoder.encode_embedded` runs the layers: text and images share one
encoder implementation. The pooled output is the final [CLS] state.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jembed.errors import UserError
from jembed.models.layers import Dense, Dropout, compute_dtype, param, zeros_init
from jembed.models.transformer import TransformerConfig, TransformerEncoder, constrain, remat_policy

# (hidden, layers, heads); mlp = 4 * hidden (the ViT paper and DeiT's Ti/S).
PRESETS = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
}


# The `model.vit` config section's defaults (configs/common.py builds the section from these); the
# size fields at 0 take the preset's value.
DEFAULTS = dict(
    size="Ti",            # Ti | S | B; the fields below override the preset when non-zero
    patch_size=2,
    hidden_size=0,
    num_layers=0,
    num_heads=0,
    mlp_dim=0,
    dropout=0.0,
    attention_dropout=0.0,
    dtype="auto",         # compute dtype: auto = bfloat16 on TPU/GPU, float32 on CPU
    remat="none",         # none | full | dots (see models/transformer.py)
)


def vit_config(vit_config_dict: Any) -> TransformerConfig:
  """The encoder's TransformerConfig from `model.vit` (size preset, then explicit overrides); fields
  it leaves out take DEFAULTS."""
  c = {**DEFAULTS, **dict(vit_config_dict)}
  get = c.get
  size = c["size"] or DEFAULTS["size"]
  if size not in PRESETS:
    raise UserError(f"model.vit.size '{size}' is unknown; choose one of {', '.join(PRESETS)}")
  hidden, layers, heads = PRESETS[size]
  pick = lambda key, default: get(key, 0) or default  # 0 means "from the preset"
  hidden = pick("hidden_size", hidden)
  heads = pick("num_heads", heads)
  if hidden % heads:
    raise UserError(f"model.vit.hidden_size={hidden} is not divisible by model.vit.num_heads={heads}; "
                    "choose sizes where hidden_size % num_heads == 0")
  return TransformerConfig(
      num_layers=pick("num_layers", layers), hidden_size=hidden, num_heads=heads,
      mlp_dim=pick("mlp_dim", 4 * hidden), vocab_size=1, max_position=1, type_vocab_size=1,
      dropout=c["dropout"], attention_dropout=c["attention_dropout"],
      pre_ln=True, layer_norm_eps=1e-6, dtype=compute_dtype(c["dtype"]),
      adapter_dim=int(get("adapter_dim", 0) or 0),  # set by peft.method=adapter (jembed/peft/adapters.py)
      remat=remat_policy(c["remat"]))


class ViT(nnx.Module):
  """(B, H, W, C) images -> (B, hidden) [CLS] features."""

  def __init__(self, cfg: TransformerConfig, *, image_size: tuple[int, int], channels: int,
               patch_size: int, rngs: nnx.Rngs):
    h, w = image_size
    if h % patch_size or w % patch_size:
      raise UserError(f"image size {h}x{w} is not divisible by model.vit.patch_size={patch_size}; "
                      "pick a patch size that divides both sides")
    self.patch_size = patch_size
    self.num_patches = (h // patch_size) * (w // patch_size)
    d = cfg.hidden_size
    patch_dim = patch_size * patch_size * channels
    self.patch_embed = Dense(patch_dim, d, (None, "embed"), dtype=cfg.dtype, rngs=rngs,
                             kernel_init=nnx.initializers.lecun_normal())
    self.cls = param(None, zeros_init, (1, 1, d), (None, None, "embed"))
    self.position = param(rngs, nnx.initializers.normal(0.02), (1, self.num_patches + 1, d),
                          (None, None, "embed"))
    self.encoder = TransformerEncoder(cfg, rngs=rngs)
    # Patches replace the token tables: drop them so no unused (and weight-decayed) parameters remain.
    self.encoder.embeddings = None
    self.out_features = d
    self.dropout = Dropout(cfg.dropout, rngs=rngs)
    self.dtype = cfg.dtype

  def patchify(self, images: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, N, p*p*C), patches in row-major order."""
    b, h, w, c = images.shape
    p = self.patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.patch_embed(self.patchify(images))
    b = x.shape[0]
    cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.position[...].astype(x.dtype)
    x = self.dropout(constrain(x, ("batch", "length", "embed")))
    mask = jnp.ones(x.shape[:2], bool)
    hidden = self.encoder.encode_embedded(x, mask)
    return hidden[:, 0].astype(jnp.float32)


def vit_from_config(vit_config_dict: Any, *, image_shape: tuple[int, int, int], rngs: nnx.Rngs) -> ViT:
  """A ViT for images of `image_shape` (H, W, C) from `model.vit` (size, patch_size, overrides)."""
  h, w, c = image_shape
  return ViT(vit_config(vit_config_dict), image_size=(h, w), channels=c,
             patch_size=int(vit_config_dict.get("patch_size") or DEFAULTS["patch_size"]), rngs=rngs)
