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
    # What pretrained ViTs differ in (jembed/interop/vit.py sets them from the source):
    layer_norm_eps=1e-6,  # timm / big_vision 1e-6, Hugging Face 1e-12
    hidden_act="gelu",    # gelu (exact erf, timm / HF) | gelu_new (tanh, big_vision / AugReg .npz)
    class_token=True,     # a learned [CLS] token is prepended
    pooling="cls",        # cls (the final [CLS] state) | mean (average of the patch tokens)
    fc_norm=False,        # the final LayerNorm after pooling instead of before (timm's avg-pool ViTs)
)
POOLINGS = ("cls", "mean")


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
      pre_ln=True, layer_norm_eps=float(c["layer_norm_eps"]), hidden_act=str(c["hidden_act"]),
      dtype=compute_dtype(c["dtype"]),
      adapter_dim=int(get("adapter_dim", 0) or 0),  # set by peft.method=adapter (jembed/peft/adapters.py)
      remat=remat_policy(c["remat"]))


class ViT(nnx.Module):
  """(B, H, W, C) images -> (B, hidden) pooled features ([CLS] state, or the patch tokens' mean)."""

  def __init__(self, cfg: TransformerConfig, *, image_size: tuple[int, int], channels: int,
               patch_size: int, class_token: bool = True, pooling: str = "cls",
               fc_norm: bool = False, rngs: nnx.Rngs):
    h, w = image_size
    if h % patch_size or w % patch_size:
      raise UserError(f"image size {h}x{w} is not divisible by model.vit.patch_size={patch_size}; "
                      "pick a patch size that divides both sides")
    if pooling not in POOLINGS:
      raise UserError(f"model.vit.pooling={pooling!r} is unknown; use one of {', '.join(POOLINGS)}")
    if pooling == "cls" and not class_token:
      raise UserError("model.vit.pooling='cls' needs model.vit.class_token=True; use pooling='mean'")
    self.patch_size = patch_size
    self.grid = (h // patch_size, w // patch_size)
    self.num_patches = self.grid[0] * self.grid[1]
    self.class_token = bool(class_token)
    self.pooling = pooling
    d = cfg.hidden_size
    patch_dim = patch_size * patch_size * channels
    self.patch_embed = Dense(patch_dim, d, (None, "embed"), dtype=cfg.dtype, rngs=rngs,
                             kernel_init=nnx.initializers.lecun_normal())
    self.cls = param(None, zeros_init, (1, 1, d), (None, None, "embed")) if class_token else None
    self.position = param(rngs, nnx.initializers.normal(0.02),
                          (1, self.num_patches + int(self.class_token), d), (None, None, "embed"))
    self.encoder = TransformerEncoder(cfg, rngs=rngs)
    # Patches replace the token tables: drop them so no unused (and weight-decayed) parameters remain.
    self.encoder.embeddings = None
    # timm's avg-pool ViTs normalise the pooled vector (`fc_norm`) rather than every token.
    self.fc_norm = nnx.data(self.encoder.final_norm if fc_norm else None)
    if fc_norm:
      self.encoder.final_norm = None
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
    if self.cls is not None:
      cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (b, 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.position[...].astype(x.dtype)
    x = self.dropout(constrain(x, ("batch", "length", "embed")))
    mask = jnp.ones(x.shape[:2], bool)
    hidden = self.encoder.encode_embedded(x, mask)
    if self.pooling == "cls":
      pooled = hidden[:, 0]
    else:
      pooled = hidden[:, int(self.class_token):].astype(jnp.float32).mean(axis=1)
    if self.fc_norm is not None:
      pooled = self.fc_norm(pooled)
    return pooled.astype(jnp.float32)


def vit_from_config(vit_config_dict: Any, *, image_shape: tuple[int, int, int], rngs: nnx.Rngs) -> ViT:
  """A ViT for images of `image_shape` (H, W, C) from `model.vit` (size, patch_size, overrides)."""
  h, w, c = image_shape
  get = lambda key: vit_config_dict.get(key, DEFAULTS[key])
  return ViT(vit_config(vit_config_dict), image_size=(h, w), channels=c,
             patch_size=int(vit_config_dict.get("patch_size") or DEFAULTS["patch_size"]),
             class_token=bool(get("class_token")), pooling=str(get("pooling") or "cls"),
             fc_norm=bool(get("fc_norm")), rngs=rngs)


def resample_position(position, old_grid: tuple[int, int], new_grid: tuple[int, int],
                      class_token: bool):
  """(1, [1 +] gh*gw, D) learned positions for another patch grid: the grid part resized
  bilinearly (half-pixel centres, as torch's align_corners=False), the [CLS] row kept as is."""
  import numpy as np
  position = np.asarray(position, np.float32)
  if tuple(old_grid) == tuple(new_grid):
    return position
  n = int(class_token)
  head, grid = position[:, :n], position[:, n:]
  d = grid.shape[-1]
  grid = grid.reshape(old_grid[0], old_grid[1], d)
  resized = jax.image.resize(jnp.asarray(grid), (new_grid[0], new_grid[1], d), "bilinear",
                             antialias=False)
  return np.concatenate([head, np.asarray(resized).reshape(1, -1, d)], axis=1)
