"""Heads that sit on a backbone's features: MLM, pooling, classification, projection."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jembed.models.layers import Dense, Dropout, Embed, LayerNorm, param, zeros_init


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


# What each Hugging Face family's *ForSequenceClassification puts between the encoder and its output
# layer: (pooling it allows, activation of its dense layer or "" for none, LayerNorm after it).
# BERT's dense + tanh on [CLS] is its encoder's pooler (TransformerEncoder.pooler), so its head here
# is the output layer alone.
HF_SEQUENCE_HEADS = {
    "bert": (("cls",), "", False),
    "roberta": (("cls",), "tanh", False),
    "xlm-roberta": (("cls",), "tanh", False),
    "mpnet": (("cls",), "tanh", False),
    "modernbert": (("cls", "mean"), "gelu", True),
}


class SequenceClassifierHead(nnx.Module):
  """A Hugging Face family's sequence-classification head on pooled features, so that a fine-tuned
  classifier exports as that family's *ForSequenceClassification: [dense -> activation
  [-> LayerNorm]] -> dropout -> out. RoBERTa, XLM-R, MPNet: dense + tanh (their `classifier.dense`,
  `classifier.out_proj`); ModernBERT: dense + GELU + LayerNorm (its `head`), then `classifier`;
  BERT: `classifier` alone, on the encoder's pooler output. Computed in float32, as Classifier."""

  def __init__(self, hidden_size: int, num_classes: int, *, activation: str, norm: bool,
               eps: float = 1e-12, use_bias: bool = True, norm_bias: bool = True, dropout: float = 0.0,
               rngs: nnx.Rngs):
    self.activation = activation
    self.dense = (Dense(hidden_size, hidden_size, ("embed", "mlp"), use_bias=use_bias, rngs=rngs)
                  if activation else None)
    self.norm = LayerNorm(hidden_size, eps=eps, axis_name="mlp", use_bias=norm_bias) if norm else None
    self.dropout = Dropout(dropout, rngs=rngs)
    self.out = Dense(hidden_size, num_classes, ("mlp" if activation else "embed", None), rngs=rngs)

  @classmethod
  def for_encoder(cls, cfg, num_classes: int, *, rngs: nnx.Rngs) -> "SequenceClassifierHead":
    """The head of a TransformerConfig's family (its width, eps, biases and dropout)."""
    _, activation, norm = HF_SEQUENCE_HEADS[cfg.family]
    return cls(cfg.hidden_size, num_classes, activation=activation, norm=norm, eps=cfg.layer_norm_eps,
               use_bias=cfg.use_bias, norm_bias=cfg.norm_bias, dropout=cfg.dropout, rngs=rngs)

  def __call__(self, x):
    x = x.astype(jnp.float32)
    if self.dense is not None:
      x = self.dense(x)
      x = jnp.tanh(x) if self.activation == "tanh" else jax.nn.gelu(x, approximate=False)
    if self.norm is not None:
      x = self.norm(x)
    return self.out(self.dropout(x))


class PoolerClassifier(nnx.Module):
  """BERT's classification path from [CLS] features: the encoder's pooler (dense + tanh), then the
  head. What a loaded BERT classifier with the Hugging Face head runs on its pooled [CLS] vectors."""

  def __init__(self, pooler: Dense, head: nnx.Module):
    self.pooler = pooler
    self.head = head

  def __call__(self, cls_features):
    return self.head(jnp.tanh(self.pooler(cls_features)))


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
