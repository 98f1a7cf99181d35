"""Heads that sit on a backbone's features: MLM, pooling, classification, projection."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jembed.models.layers import Dense, Embed, LayerNorm, param, zeros_init


class MlmHead(nnx.Module):
  """BERT's MLM head: dense + GELU + LayerNorm, then the output projection tied to the token table.

  RoBERTa's and MPNet's `lm_head` is the same; ModernBERT's has no dense bias and no LayerNorm shift
  (`use_bias` / `norm_bias` False, as its encoder)."""

  def __init__(self, hidden_size: int, vocab_size: int, *, eps: float = 1e-12, use_bias: bool = True,
               norm_bias: bool = True, rngs: nnx.Rngs):
    self.transform = Dense(hidden_size, hidden_size, ("embed", "mlp"), use_bias=use_bias, rngs=rngs)
    self.norm = LayerNorm(hidden_size, eps=eps, axis_name="mlp", use_bias=norm_bias)
    self.bias = param(None, zeros_init, (vocab_size,), ("vocab",))

  @classmethod
  def for_encoder(cls, cfg, *, rngs: nnx.Rngs) -> "MlmHead":
    """The head a TransformerConfig's family has: its width, vocabulary, eps and biases."""
    return cls(cfg.hidden_size, cfg.vocab_size, eps=cfg.layer_norm_eps, use_bias=cfg.use_bias,
               norm_bias=cfg.norm_bias, rngs=rngs)

  def __call__(self, hidden: jax.Array, token_table: Embed) -> jax.Array:
    h = self.norm(jax.nn.gelu(self.transform(hidden), approximate=False))
    return token_table.attend(h) + self.bias[...].astype(h.dtype)


POOLINGS = ("cls", "mean", "max", "mean_sqrt_len")


def pool(hidden: jax.Array, mask: jax.Array, method: str, *, normalize: bool = False) -> jax.Array:
  """(B, T, D) -> (B, D) over the non-padding tokens, as sentence-transformers' Pooling does it.

  cls: the first ([CLS]) token; mean: sum / count; max: per-feature max with padding set to -1e9
  (sentence-transformers 6 uses -inf: the same for every row that has a token); mean_sqrt_len:
  sum / sqrt(count). `normalize` then divides by the L2 norm (floored at 1e-12, as
  torch's F.normalize, which sentence-transformers' Normalize module calls).
  """
  m = mask[..., None]
  if method == "cls":
    out = hidden[:, 0]
  elif method == "max":
    out = jnp.where(m.astype(bool), hidden, jnp.asarray(-1e9, hidden.dtype)).max(1)
  elif method in ("mean", "mean_sqrt_len"):
    m = m.astype(hidden.dtype)
    count = jnp.maximum(m.sum(1), 1.0)  # an all-padding row pools to zeros, not NaN
    out = (hidden * m).sum(1) / (count if method == "mean" else jnp.sqrt(count))
  else:
    raise ValueError(f"unknown pooling '{method}'; use one of {', '.join(POOLINGS)}")
  if normalize:
    norm = jnp.linalg.norm(out.astype(jnp.float32), axis=-1, keepdims=True)
    out = (out / jnp.maximum(norm, 1e-12)).astype(hidden.dtype)
  return out


class Classifier(nnx.Module):
  """A linear head (features -> classes)."""

  def __init__(self, features: int, num_classes: int, *, rngs: nnx.Rngs):
    self.dense = Dense(features, num_classes, ("embed", None), init_std=0.01, rngs=rngs)

  def __call__(self, x):
    return self.dense(x.astype(jnp.float32))


class ProjectionHead(nnx.Module):
  """SimCLR-style MLP projection: (Dense, ReLU) x (layers-1), then Dense to `out`."""

  def __init__(self, features: int, hidden: int, out: int, num_layers: int = 2, *, rngs: nnx.Rngs):
    dims = [features] + [hidden] * (num_layers - 1) + [out]
    self.layers = nnx.List([
        Dense(dims[i], dims[i + 1], ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed"), rngs=rngs,
              kernel_init=nnx.initializers.lecun_normal())
        for i in range(num_layers)])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x
