"""The one Transformer encoder in Flax NNX: BERT by default, and by options RoBERTa / XLM-RoBERTa,
MPNet and ModernBERT.

Post-LayerNorm by default, laid out like BERT (token + position + segment embeddings, LayerNorm,
then blocks of attention -> add & norm -> GELU MLP -> add & norm) so BERT checkpoints map onto it
one tensor to one tensor; `pre_ln=True` gives the pre-LN variant with a final LayerNorm. Every
parameter carries logical axis names; activations are pinned to (`batch`, `length`, `embed`).

The options beyond BERT (TransformerConfig, all off by default) each change one thing:
  positions="padded"   learned positions counted over the non-padding tokens from position_offset+1
                       (pads get position_offset): RoBERTa, XLM-RoBERTa, MPNet
  positions="rotary"   no position table; rotary embeddings on queries and keys (ModernBERT)
  relative_buckets     a learned per-head bias of the bucketed query-key distance, one table shared
                       by all layers (MPNet)
  local_window         sliding-window attention on all but every global_every-th layer (ModernBERT)
  gated_mlp            GeGLU: act(x wi) * (x wg), then wo (ModernBERT)
  use_bias / norm_bias biases of the projections / shifts of the LayerNorms (ModernBERT: neither)
  embedding_norm       pre-LN with normalised embeddings; layer 0 then has no attention norm
  type_vocab_size=0    no segment table (MPNet, ModernBERT)
`family` only says which Hugging Face family the weights are named and exported as (jembed/hf).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jembed.errors import UserError
from jembed.models.layers import DENSE_DOT, Dense, Dropout, Embed, LayerNorm, compute_dtype, einsum

POSITIONS = ("absolute", "padded", "rotary")
# Hugging Face families whose weights the encoder holds (jembed/hf maps their names and config.json).
FAMILIES = ("bert", "roberta", "xlm-roberta", "mpnet", "modernbert")

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
  # -- beyond BERT (see the module docstring); the defaults are BERT's.
  family: str = "bert"            # Hugging Face family the weights export as (FAMILIES)
  positions: str = "absolute"     # absolute | padded | rotary
  position_offset: int = 0        # padded: the pads' position id (RoBERTa's padding_idx)
  relative_buckets: int = 0       # relative attention bias buckets (MPNet: 32); 0 = none
  relative_max_distance: int = 128
  rope_theta: float = 10000.0     # rotary base of the global layers
  local_rope_theta: float = 10000.0  # rotary base of the sliding-window layers
  local_window: int = 0           # > 0: a local layer's query sees keys within local_window // 2
  global_every: int = 1           # with local_window: layer i is global iff i % global_every == 0
  gated_mlp: bool = False
  use_bias: bool = True
  norm_bias: bool = True
  embedding_norm: bool = False    # pre_ln only: LayerNorm the embeddings (layer 0: no attention norm)

  def __post_init__(self):
    if self.positions not in POSITIONS:
      raise UserError(f"model positions '{self.positions}' is unknown; use one of {', '.join(POSITIONS)}")
    if self.family not in FAMILIES:
      raise UserError(f"model family '{self.family}' is unknown; use one of {', '.join(FAMILIES)}")
    if self.embedding_norm and not self.pre_ln:
      raise UserError("embedding_norm=True is for pre-LN encoders (a post-LN one always normalises its "
                      "embeddings); set pre_ln=True or embedding_norm=False")
    if self.relative_buckets and (self.relative_buckets < 4 or self.relative_buckets % 2):
      raise UserError(f"relative_buckets={self.relative_buckets} must be an even number >= 4 (or 0)")
    if self.local_window < 0 or self.global_every < 1:
      raise UserError(f"local_window={self.local_window} / global_every={self.global_every}: use "
                      "local_window >= 0 and global_every >= 1")
    if self.positions == "rotary" and (self.hidden_size // max(self.num_heads, 1)) % 2:
      raise UserError(f"rotary positions need an even head size; hidden_size {self.hidden_size} / "
                      f"num_heads {self.num_heads} is odd")

  @property
  def max_length(self) -> int:
    """The longest sequence the positions allow: padded positions start after position_offset."""
    return self.max_position - (self.position_offset + 1 if self.positions == "padded" else 0)

  def is_local(self, layer: int) -> bool:
    """Whether layer `layer` attends within the sliding window (else to the whole sequence)."""
    return bool(self.local_window) and layer % self.global_every != 0

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
# Dense's low-precision matmuls are custom_vjp calls (layers.einsum) that the dot policy cannot
# see, so "dots" also keeps the outputs Dense names.
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names(DENSE_DOT))}


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
               "type_vocab_size", "pre_ln", "family", "positions", "position_offset", "relative_buckets",
               "relative_max_distance", "rope_theta", "local_rope_theta", "local_window", "global_every",
               "gated_mlp", "use_bias", "norm_bias", "embedding_norm")
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


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """(length, length) int32 bucket of each key-query distance, as transformers' MPNet computes it
  (T5's scheme: half the buckets per direction, exact up to a quarter, then logarithmic up to
  `max_distance`). NumPy at trace time: a constant, the same float32 steps on every backend."""
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # key - query
  n = -rel
  half = num_buckets // 2
  out = (n < 0).astype(np.int64) * half
  n = np.abs(n)
  exact = half // 2
  scaled = (np.log(np.maximum(n, 1).astype(np.float32) / np.float32(exact))
            / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
  large = np.minimum(exact + scaled.astype(np.int64), half - 1)
  return (out + np.where(n < exact, n, large)).astype(np.int32)


def rotary_tables(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each (length, head_dim) float32, of rotary embeddings at positions 0..length-1 with
  the halves layout (rotate_half), as transformers' ModernBERT."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, rope) -> jax.Array:
  """Rotates (B, T, heads, head_dim) queries or keys by the (cos, sin) tables, in float32."""
  cos, sin = rope
  dtype, x = x.dtype, x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos[None, :, None, :] + rotated * sin[None, :, None, :]).astype(dtype)


def position_ids(mask: jax.Array, scheme: str, offset: int) -> jax.Array:
  """Position ids (B or 1, T) of the learned table: 0..T-1, or (padded) RoBERTa's
  create_position_ids_from_input_ids: the real tokens count from offset + 1, pads get offset."""
  if scheme == "padded":
    real = mask.astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + offset
  return jnp.arange(mask.shape[1])[None, :]


class Attention(nnx.Module):

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    dense = lambda axes: Dense(d, d, axes, use_bias=cfg.use_bias, dtype=cfg.dtype, rngs=rngs)
    self.query = dense(("embed", "heads"))
    self.key = dense(("embed", "heads"))
    self.value = dense(("embed", "heads"))
    self.out = dense(("heads", "embed"))
    self.num_heads = cfg.num_heads
    self.dropout = Dropout(cfg.attention_dropout, rngs=rngs)

  def __call__(self, x, mask, bias=None, rope=None):
    """`mask`: (B, T) keys to attend to, or a boolean broadcastable to (B, heads, T, T); `bias`: an
    additive float (1, heads, T, T); `rope`: the (cos, sin) rotary tables."""
    b, t, d = x.shape
    split = lambda y: constrain(y.reshape(b, t, self.num_heads, d // self.num_heads),
                                ("batch", "length", "heads", "kv"))
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    if rope is not None:
      q, k = apply_rotary(q, rope), apply_rotary(k, rope)
    # Both contractions accumulate in float32 (layers.einsum): the scores are float32 anyway, and a
    # bfloat16 one runs twice as fast on a CPU in that form.
    scores = einsum("bqnh,bknh->bnqk", q, k) / jnp.sqrt(jnp.float32(d // self.num_heads))
    if bias is not None:
      scores = scores + bias
    if mask.ndim == 2:
      mask = mask[:, None, None, :]
    scores = jnp.where(mask, scores, -1e9)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    probs = self.dropout(probs)
    ctx = einsum("bnqk,bknh->bqnh", probs, v).astype(x.dtype).reshape(b, t, d)
    return self.out(ctx)


class Mlp(nnx.Module):

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    dense = lambda i, o, axes: Dense(i, o, axes, use_bias=cfg.use_bias, dtype=cfg.dtype, rngs=rngs)
    self.wi = dense(cfg.hidden_size, cfg.mlp_dim, ("embed", "mlp"))
    # GeGLU's gate: its own kernel (transformers fuses it with wi as Wi = [wi; wg]), so tensor
    # parallelism shards both alike and LoRA can target either.
    self.wg = dense(cfg.hidden_size, cfg.mlp_dim, ("embed", "mlp")) if cfg.gated_mlp else None
    self.wo = dense(cfg.mlp_dim, cfg.hidden_size, ("mlp", "embed"))
    activation(cfg.hidden_act)  # an unknown name fails when the model is built, not mid-step
    self.hidden_act = cfg.hidden_act

  def __call__(self, x):
    h = constrain(self.wi(x), ("batch", "length", "mlp"))
    # BERT uses the exact (erf) GELU (the default "gelu").
    h = activation(self.hidden_act)(h)
    if self.wg is not None:
      h = h * constrain(self.wg(x), ("batch", "length", "mlp"))
    return self.wo(h)


class Layer(nnx.Module):

  def __init__(self, cfg: TransformerConfig, *, index: int = 0, rngs: nnx.Rngs):
    norm = lambda: LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, use_bias=cfg.norm_bias)
    self.attention = Attention(cfg, rngs=rngs)
    # Pre-LN over normalised embeddings: layer 0's input is normalised already, so (as ModernBERT)
    # it has no attention norm of its own.
    self.attention_norm = None if (cfg.embedding_norm and index == 0) else norm()
    self.mlp = Mlp(cfg, rngs=rngs)
    self.mlp_norm = norm()
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
      h = self.dropout(fn(x if norm is None else norm(x)))
      if adapter is not None:
        h = adapter(h)
      return x + h
    h = self.dropout(fn(x))
    if adapter is not None:
      # Houlsby: the adapter sits on the sub-layer output, before the residual add and LayerNorm.
      h = adapter(h)
    return norm(x + h)

  def __call__(self, x, mask, bias=None, rope=None):
    x = self._block(x, lambda y: self.attention(y, mask, bias, rope), self.attention_norm,
                    self.attention_adapter)
    x = self._block(x, self.mlp, self.mlp_norm, self.mlp_adapter)
    return constrain(x, ACTIVATION)


class Embeddings(nnx.Module):
  """Token + position + segment embeddings, then LayerNorm (post-LN) and dropout. Rotary encoders
  have no position table, type_vocab_size=0 ones no segment table."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.token = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), rngs=rngs)
    self.position = (Embed(cfg.max_position, cfg.hidden_size, (None, "embed"), rngs=rngs)
                     if cfg.positions != "rotary" else None)
    self.segment = (Embed(cfg.type_vocab_size, cfg.hidden_size, (None, "embed"), rngs=rngs)
                    if cfg.type_vocab_size else None)
    self.norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, use_bias=cfg.norm_bias)
    self.apply_norm = not cfg.pre_ln or cfg.embedding_norm
    self.positions, self.position_offset = cfg.positions, cfg.position_offset
    self.dropout = Dropout(cfg.dropout, rngs=rngs)
    self.dtype = cfg.dtype

  def __call__(self, tokens, segments, mask=None):
    x = self.token(tokens)
    if self.position is not None:
      if mask is None:
        mask = jnp.ones(tokens.shape, bool)
      x = x + self.position(position_ids(mask, self.positions, self.position_offset))
    if self.segment is not None:
      x = x + self.segment(segments)
    if self.apply_norm:
      x = self.norm(x)
    return self.dropout(constrain(x.astype(self.dtype), ACTIVATION))


class TransformerEncoder(nnx.Module):
  """tokens (B, T) int -> hidden states (B, T, D). Padding is where `mask` is False.

  Dropout follows the module's mode: `model.train()` / `model.eval()` (see layers.Dropout)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.layers = nnx.List([Layer(cfg, index=i, rngs=rngs) for i in range(cfg.num_layers)])
    # One (buckets, heads) table for all layers; replicated (a few hundred numbers).
    self.relative_bias = (Embed(cfg.relative_buckets, cfg.num_heads, (None, None), rngs=rngs)
                          if cfg.relative_buckets else None)
    self.final_norm = (LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, use_bias=cfg.norm_bias)
                       if cfg.pre_ln else None)
    self.pooler = (Dense(cfg.hidden_size, cfg.hidden_size, ("embed", "mlp"), dtype=cfg.dtype, rngs=rngs)
                   if cfg.pooler else None)

  def __call__(self, tokens, mask=None, segments=None):
    if mask is None:
      mask = jnp.ones(tokens.shape, bool)
    if segments is None:
      segments = jnp.zeros_like(tokens)
    x = self.embeddings(tokens, segments, mask)
    return self.encode_embedded(x, mask)

  def _attention_inputs(self, length: int, mask):
    """Per layer kind ("global", "local"): (mask, bias, rope) for Attention."""
    cfg = self.config
    keys = mask[:, None, None, :]
    bias = None
    if self.relative_bias is not None:
      buckets = relative_position_buckets(length, cfg.relative_buckets, cfg.relative_max_distance)
      bias = jnp.transpose(self.relative_bias(jnp.asarray(buckets)), (2, 0, 1))[None].astype(jnp.float32)
    rope = lambda theta: (rotary_tables(length, cfg.hidden_size // cfg.num_heads, theta)
                          if cfg.positions == "rotary" else None)
    out = {"global": (keys, bias, rope(cfg.rope_theta))}
    if cfg.local_window:
      pos = np.arange(length)
      band = np.abs(pos[:, None] - pos[None, :]) <= cfg.local_window // 2
      out["local"] = (keys & jnp.asarray(band)[None, None], bias, rope(cfg.local_rope_theta))
    return out

  def encode_embedded(self, x, mask):
    """Runs the layers on already-embedded inputs (B, T, D): ViT feeds patch embeddings here."""
    inputs = self._attention_inputs(x.shape[1], mask)
    for i, layer in enumerate(self.layers):
      args = inputs["local" if self.config.is_local(i) else "global"]
      if self.config.remat != "none":
        x = nnx.remat(lambda lyr, y, a=args: lyr(y, *a), policy=REMAT_POLICIES[self.config.remat])(layer, x)
      else:
        x = layer(x, *args)
    if self.final_norm is not None:
      x = self.final_norm(x)
    return x

  def pooled(self, hidden):
    """BERT's pooler output tanh(dense(hidden[:, 0])) (B, D); needs `pooler=True`."""
    if self.pooler is None:
      raise UserError("this encoder has no pooler; build it with model.pooler=True "
                      "(or use heads.pool for cls/mean pooling)")
    return jnp.tanh(self.pooler(hidden[:, 0]))
