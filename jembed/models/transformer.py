"""A BERT-family Transformer encoder in Flax NNX.

Post-LayerNorm by default, laid out like BERT (token + position + segment embeddings, LayerNorm,
then blocks of attention -> add & norm -> GELU MLP -> add & norm) so BERT checkpoints map onto it
one tensor to one tensor; `pre_ln=True` gives the pre-LN variant with a final LayerNorm. Every
parameter carries logical axis names; activations are pinned to (`batch`, `length`, `embed`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jembed.errors import UserError
from jembed.models.layers import Dense, Dropout, Embed, LayerNorm, compute_dtype

# BERT's published sizes (Turc et al. 2019 for the small ones): (layers, hidden); heads = hidden/64,
# mlp = 4 * hidden.
SIZES = {
    "tiny": (2, 128),
    "mini": (4, 256),
    "small": (4, 512),
    "medium": (8, 512),
    "base": (12, 768),
    "large": (24, 1024),
}

ACTIVATION = ("batch", "length", "embed")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  num_layers: int
  hidden_size: int
  num_heads: int
  mlp_dim: int
  vocab_size: int
  max_position: int = 512
  type_vocab_size: int = 2
  dropout: float = 0.1
  attention_dropout: float = 0.1
  pre_ln: bool = False
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32
  adapter_dim: int = 0
  remat: str = "none"   # none | full | dots (keep matmul outputs, recompute the rest) per layer
  # The MLP's activation, named as in Hugging Face configs (see `activation`).
  hidden_act: str = "gelu"
  # BERT's pooler, tanh(dense(h[:, 0])): kept so imported checkpoints round-trip.
  pooler: bool = False

  @classmethod
  def from_config(cls, model_config, vocab_size: int | None = None) -> "TransformerConfig":
    """Size preset from `model.size` ("" = tiny), then any explicitly set dimension overrides it."""
    size = model_config.get("size", "") or "tiny"
    if size not in SIZES:
      raise UserError(f"model.size '{size}' is unknown; choose one of {', '.join(SIZES)}")
    layers, hidden = SIZES[size]
    pick = lambda key, default: model_config.get(key) or default  # 0 / None means "from the preset"
    hidden = pick("hidden_size", hidden)
    heads = pick("num_heads", max(1, hidden // 64))
    if hidden % heads:
      raise UserError(f"model.hidden_size={hidden} is not divisible by model.num_heads={heads}; "
                      "choose sizes where hidden_size % num_heads == 0")
    vocab = pick("vocab_size", vocab_size or 30522)
    if vocab_size and vocab < vocab_size:
      raise UserError(f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({vocab_size}); "
                      "leave model.vocab_size=0 to take it from the tokenizer")
    return cls(
        num_layers=pick("num_layers", layers), hidden_size=hidden, num_heads=heads,
        mlp_dim=pick("mlp_dim", 4 * hidden), vocab_size=vocab,
        max_position=model_config.get("max_position", 0) or 512,
        type_vocab_size=model_config.get("type_vocab_size", 0) or 2,
        dropout=model_config.get("dropout", 0.1),
        attention_dropout=model_config.get("attention_dropout", 0.1),
        pre_ln=model_config.get("pre_ln", False),
        dtype=compute_dtype(model_config.get("dtype", "auto")),
        adapter_dim=model_config.get("adapter_dim", 0),
        remat=remat_policy(model_config.get("remat", "none")),
        hidden_act=model_config.get("hidden_act", "gelu"),
        pooler=model_config.get("pooler", False),
    )

  def to_json(self) -> dict:
    """The fields as JSON-able values (the dtype by name), as model.json stores them."""
    d = dataclasses.asdict(self)
    d["dtype"] = jnp.dtype(self.dtype).name
    return d

  @classmethod
  def from_json(cls, d: dict) -> "TransformerConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    d = {k: v for k, v in d.items() if k in known}
    return cls(**dict(d, dtype=compute_dtype(d.get("dtype", "float32")),
                      remat=remat_policy(d.get("remat", "none"))))

  @classmethod
  def resolve(cls, model_config, *, vocab_size: int | None = None,
              source: dict | None = None) -> "TransformerConfig":
    """From scratch: `from_config`. From a warm-start source's encoder description: its
    architecture, with this config's dropout, dtype, remat and adapter settings; an architecture
    field set here (non-zero) must agree with the source."""
    if not source:
      return cls.from_config(model_config, vocab_size)
    base = cls.from_json(source)
    size = model_config.get("size", "")
    if size:
      if size not in SIZES:
        raise UserError(f"model.size '{size}' is unknown; choose one of {', '.join(SIZES)}")
      if SIZES[size] != (base.num_layers, base.hidden_size):
        raise UserError(f"model.size={size} {SIZES[size]} disagrees with the warm-start source "
                        f"({base.num_layers} layers, hidden {base.hidden_size}); leave model.size "
                        "empty to take the source's")
    for key in ARCH_FIELDS:
      value = model_config.get(key, 0)
      if value and value != getattr(base, key):
        raise UserError(f"model.{key}={value} disagrees with the warm-start source "
                        f"({key}={getattr(base, key)}); leave it at 0/'' to take the source's")
    if vocab_size and vocab_size > base.vocab_size:
      raise UserError(f"the tokenizer has {vocab_size} tokens but the source's embedding table "
                      f"{base.vocab_size}; use the source's tokenizer")
    runtime = {k: model_config[k] for k in RUNTIME_FIELDS if k in model_config}
    if "dtype" in runtime:
      runtime["dtype"] = compute_dtype(runtime["dtype"])
    if "remat" in runtime:
      runtime["remat"] = remat_policy(runtime["remat"])
    return dataclasses.replace(base, **runtime)


# Rematerialisation per layer: recompute activations in the backward pass instead of keeping them.
# "full" keeps only each layer's input; "dots" also keeps the matmul outputs (recomputing only the
# cheap element-wise work), a middle ground between memory and compute.
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_policy(value) -> str:
  """none | full | dots; booleans from older configs mean none / full."""
  if isinstance(value, bool) or value in (0, 1):
    return "full" if value else "none"
  if value not in ("none", *REMAT_POLICIES):
    raise UserError(f"model.remat='{value}' is unknown; use none, full or dots")
  return value


# Fields that define the weights (must agree with a warm-start source) and fields that only change
# how the same weights run (always this config's).
ARCH_FIELDS = ("num_layers", "hidden_size", "num_heads", "mlp_dim", "vocab_size", "max_position",
               "type_vocab_size", "pre_ln")
RUNTIME_FIELDS = ("dropout", "attention_dropout", "dtype", "remat", "adapter_dim")


# Hugging Face `hidden_act` names: "gelu" is the exact erf form; the tanh approximation goes by
# two names there.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise UserError(f"model.hidden_act '{name}' is not supported; use one of {', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def constrain(x: jax.Array, names) -> jax.Array:
  # A no-op outside a mesh + logical-rules context (e.g. in plain unit tests).
  return nn.with_logical_constraint(x, names)


class Attention(nnx.Module):

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.query = Dense(d, d, ("embed", "heads"), dtype=cfg.dtype, rngs=rngs)
    self.key = Dense(d, d, ("embed", "heads"), dtype=cfg.dtype, rngs=rngs)
    self.value = Dense(d, d, ("embed", "heads"), dtype=cfg.dtype, rngs=rngs)
    self.out = Dense(d, d, ("heads", "embed"), dtype=cfg.dtype, rngs=rngs)
    self.num_heads = cfg.num_heads
    self.dropout = Dropout(cfg.attention_dropout, rngs=rngs)

  def __call__(self, x, mask):
    b, t, d = x.shape
    split = lambda y: constrain(y.reshape(b, t, self.num_heads, d // self.num_heads),
                                ("batch", "length", "heads", "kv"))
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = jnp.einsum("bqnh,bknh->bnqk", q, k) / jnp.sqrt(d // self.num_heads).astype(q.dtype)
    scores = jnp.where(mask[:, None, None, :], scores.astype(jnp.float32), -1e9)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    probs = self.dropout(probs)
    ctx = jnp.einsum("bnqk,bknh->bqnh", probs, v).reshape(b, t, d)
    return self.out(ctx)


class Mlp(nnx.Module):

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.wi = Dense(cfg.hidden_size, cfg.mlp_dim, ("embed", "mlp"), dtype=cfg.dtype, rngs=rngs)
    self.wo = Dense(cfg.mlp_dim, cfg.hidden_size, ("mlp", "embed"), dtype=cfg.dtype, rngs=rngs)
    activation(cfg.hidden_act)  # an unknown name fails when the model is built, not mid-step
    self.hidden_act = cfg.hidden_act

  def __call__(self, x):
    h = constrain(self.wi(x), ("batch", "length", "mlp"))
    # BERT uses the exact (erf) GELU (the default "gelu").
    return self.wo(activation(self.hidden_act)(h))


class Layer(nnx.Module):

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.attention = Attention(cfg, rngs=rngs)
    self.attention_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
    self.mlp = Mlp(cfg, rngs=rngs)
    self.mlp_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
    if cfg.adapter_dim:
      from jembed.peft.adapters import BottleneckAdapter  # only models with adapters need it
      self.attention_adapter = BottleneckAdapter(cfg.hidden_size, cfg.adapter_dim, rngs=rngs)
      self.mlp_adapter = BottleneckAdapter(cfg.hidden_size, cfg.adapter_dim, rngs=rngs)
    else:
      self.attention_adapter = None
      self.mlp_adapter = None
    self.pre_ln = cfg.pre_ln
    self.dropout = Dropout(cfg.dropout, rngs=rngs)

  def _block(self, x, fn, norm, adapter):
    if self.pre_ln:
      h = self.dropout(fn(norm(x)))
      if adapter is not None:
        h = adapter(h)
      return x + h
    h = self.dropout(fn(x))
    if adapter is not None:
      # Houlsby: the adapter sits on the sub-layer output, before the residual add and LayerNorm.
      h = adapter(h)
    return norm(x + h)

  def __call__(self, x, mask):
    x = self._block(x, lambda y: self.attention(y, mask), self.attention_norm, self.attention_adapter)
    x = self._block(x, self.mlp, self.mlp_norm, self.mlp_adapter)
    return constrain(x, ACTIVATION)


class Embeddings(nnx.Module):
  """Token + position + segment embeddings, then LayerNorm (post-LN) and dropout."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.token = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), rngs=rngs)
    self.position = Embed(cfg.max_position, cfg.hidden_size, (None, "embed"), rngs=rngs)
    self.segment = Embed(cfg.type_vocab_size, cfg.hidden_size, (None, "embed"), rngs=rngs)
    self.norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
    self.pre_ln = cfg.pre_ln
    self.dropout = Dropout(cfg.dropout, rngs=rngs)
    self.dtype = cfg.dtype

  def __call__(self, tokens, segments):
    positions = jnp.arange(tokens.shape[1])[None, :]
    x = self.token(tokens) + self.position(positions) + self.segment(segments)
    if not self.pre_ln:
      x = self.norm(x)
    return self.dropout(constrain(x.astype(self.dtype), ACTIVATION))


class TransformerEncoder(nnx.Module):
  """tokens (B, T) int -> hidden states (B, T, D). Padding is where `mask` is False.

  Dropout follows the module's mode: `model.train()` / `model.eval()` (see layers.Dropout)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_ln else None
    self.pooler = (Dense(cfg.hidden_size, cfg.hidden_size, ("embed", "mlp"), dtype=cfg.dtype, rngs=rngs)
                   if cfg.pooler else None)

  def __call__(self, tokens, mask=None, segments=None):
    if mask is None:
      mask = jnp.ones(tokens.shape, bool)
    if segments is None:
      segments = jnp.zeros_like(tokens)
    x = self.embeddings(tokens, segments)
    return self.encode_embedded(x, mask)

  def encode_embedded(self, x, mask):
    """Runs the layers on already-embedded inputs (B, T, D): ViT feeds patch embeddings here."""
    for layer in self.layers:
      if self.config.remat != "none":
        x = nnx.remat(lambda lyr, y: lyr(y, mask), policy=REMAT_POLICIES[self.config.remat])(layer, x)
      else:
        x = layer(x, mask)
    if self.final_norm is not None:
      x = self.final_norm(x)
    return x

  def pooled(self, hidden):
    """BERT's pooler output tanh(dense(hidden[:, 0])) (B, D); needs `pooler=True`."""
    if self.pooler is None:
      raise UserError("this encoder has no pooler; build it with model.pooler=True "
                      "(or use heads.pool for cls/mean pooling)")
    return jnp.tanh(self.pooler(hidden[:, 0]))
