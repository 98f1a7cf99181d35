"""The one mapping between Hugging Face BERT tensor names and jembed's parameter tree.

A Hugging Face `BertModel` checkpoint is a flat {name: array} in torch layout (a Linear weight is
[out, in]); jembed's `TransformerEncoder` is a nested pure dict (`nnx.to_pure_dict`) whose Dense
kernels are [in, out]. Both directions are driven by one table (`_entries`), so import and export
cannot drift apart.
"""
from __future__ import annotations

import numpy as np

from jembed.errors import UserError

# kinds: "linear" = a torch Linear weight (transposed), anything else is copied as is.
_LAYER = (
    ("attention.self.query.weight", ("attention", "query", "kernel"), "linear"),
    ("attention.self.query.bias", ("attention", "query", "bias"), "copy"),
    ("attention.self.key.weight", ("attention", "key", "kernel"), "linear"),
    ("attention.self.key.bias", ("attention", "key", "bias"), "copy"),
    ("attention.self.value.weight", ("attention", "value", "kernel"), "linear"),
    ("attention.self.value.bias", ("attention", "value", "bias"), "copy"),
    ("attention.output.dense.weight", ("attention", "out", "kernel"), "linear"),
    ("attention.output.dense.bias", ("attention", "out", "bias"), "copy"),
    ("attention.output.LayerNorm.weight", ("attention_norm", "scale"), "copy"),
    ("attention.output.LayerNorm.bias", ("attention_norm", "bias"), "copy"),
    ("intermediate.dense.weight", ("mlp", "wi", "kernel"), "linear"),
    ("intermediate.dense.bias", ("mlp", "wi", "bias"), "copy"),
    ("output.dense.weight", ("mlp", "wo", "kernel"), "linear"),
    ("output.dense.bias", ("mlp", "wo", "bias"), "copy"),
    ("output.LayerNorm.weight", ("mlp_norm", "scale"), "copy"),
    ("output.LayerNorm.bias", ("mlp_norm", "bias"), "copy"),
)
_EMBEDDINGS = (
    ("embeddings.word_embeddings.weight", ("embeddings", "token", "embedding"), "copy"),
    ("embeddings.position_embeddings.weight", ("embeddings", "position", "embedding"), "copy"),
    ("embeddings.token_type_embeddings.weight", ("embeddings", "segment", "embedding"), "copy"),
    ("embeddings.LayerNorm.weight", ("embeddings", "norm", "scale"), "copy"),
    ("embeddings.LayerNorm.bias", ("embeddings", "norm", "bias"), "copy"),
)
_POOLER = (
    ("pooler.dense.weight", ("pooler", "kernel"), "linear"),
    ("pooler.dense.bias", ("pooler", "bias"), "copy"),
)
# BertForMaskedLM's head; its decoder weight is tied to the word embeddings (never stored apart).
_MLM = (
    ("cls.predictions.transform.dense.weight", ("transform", "kernel"), "linear"),
    ("cls.predictions.transform.dense.bias", ("transform", "bias"), "copy"),
    ("cls.predictions.transform.LayerNorm.weight", ("norm", "scale"), "copy"),
    ("cls.predictions.transform.LayerNorm.bias", ("norm", "bias"), "copy"),
    ("cls.predictions.bias", ("bias",), "copy"),
)
# Stored by some checkpoints but carrying nothing of their own: buffers (arange / zeros), the tied
# decoder (a copy of the word embeddings and of cls.predictions.bias) and the next-sentence head.
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
_IGNORED_PREFIXES = ("cls.predictions.decoder.", "cls.seq_relationship.")


def _entries(num_layers: int, pooler: bool):
  """(hf_name, path in the encoder tree, kind) for every encoder tensor."""
  out = list(_EMBEDDINGS)
  for i in range(num_layers):
    out += [(f"encoder.layer.{i}.{name}", ("layers", i) + path, kind) for name, path, kind in _LAYER]
  if pooler:
    out += list(_POOLER)
  return out


def canonical_name(name: str) -> str | None:
  """The modern BertModel name of a stored tensor; None for tensors that carry nothing."""
  if name.startswith("bert."):
    name = name[len("bert."):]
  if name.endswith(_IGNORED_SUFFIXES) or name.startswith(_IGNORED_PREFIXES):
    return None
  # Checkpoints converted from Google's TF BERT spell LayerNorm's parameters gamma / beta.
  if name.endswith("LayerNorm.gamma"):
    name = name[:-len("gamma")] + "weight"
  elif name.endswith("LayerNorm.beta"):
    name = name[:-len("beta")] + "bias"
  return name


def has_pooler(names) -> bool:
  return any(canonical_name(n) == "pooler.dense.weight" for n in names)


def has_mlm_head(names) -> bool:
  return any(canonical_name(n) == "cls.predictions.bias" for n in names)


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple, what: str):
  node = tree
  for key in path:
    if not isinstance(node, dict) or key not in node:
      raise UserError(f"{what} has no parameter {'/'.join(map(str, path))}; pass the pure dict of a "
                      "BERT-layout TransformerEncoder (post-LN, no adapters)")
    node = node[key]
  return node


def _leaf_paths(tree: dict, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaf_paths(value, prefix + (key,))
    else:
      yield prefix + (key,)


def from_hf(tensors: dict, num_layers: int, *, source: str) -> tuple[dict, dict | None]:
  """{hf name: array} -> (encoder pure dict, MLM head pure dict or None), Linear weights transposed."""
  canonical = {}
  for name, value in tensors.items():
    key = canonical_name(name)
    if key is not None:
      canonical[key] = value
  entries = _entries(num_layers, pooler="pooler.dense.weight" in canonical)
  head = _MLM if "cls.predictions.bias" in canonical else ()
  missing = [name for name, _, _ in list(entries) + list(head) if name not in canonical]
  if missing:
    raise UserError(f"{source} lacks {len(missing)} BERT tensor(s), e.g. '{missing[0]}'; it is not a "
                    "complete BertModel checkpoint for its config.json (num_hidden_layers?)")
  used = {name for name, _, _ in list(entries) + list(head)}
  extra = sorted(set(canonical) - used)
  if extra:
    raise UserError(f"{source} has {len(extra)} tensor(s) a BERT encoder does not use, e.g. "
                    f"'{extra[0]}'; only BertModel / BertForMaskedLM checkpoints are supported")

  def convert(name, kind):
    value = np.asarray(canonical[name])
    return np.ascontiguousarray(value.T) if kind == "linear" else value

  params: dict = {}
  for name, path, kind in entries:
    _set(params, path, convert(name, kind))
  mlm = None
  if head:
    mlm = {}
    for name, path, kind in head:
      _set(mlm, path, convert(name, kind))
  return params, mlm


def to_hf(params: dict, num_layers: int, pooler: bool, mlm_head: dict | None) -> dict:
  """(encoder pure dict, MLM head pure dict or None) -> {hf name: C-contiguous numpy array}.

  With a head the names get BertForMaskedLM's `bert.` prefix. Every array is made C-contiguous:
  safetensors 0.8 writes the buffer of a transposed (F-ordered) view as if it were row-major.
  """
  entries = _entries(num_layers, pooler)
  expected = {path for _, path, _ in entries}
  extra = sorted(set(_leaf_paths(params)) - expected, key=str)
  if extra:
    raise UserError(f"encoder parameter {'/'.join(map(str, extra[0]))} has no place in a BERT "
                    "checkpoint; export a post-LN encoder without adapters (merge LoRA first)")
  prefix = "bert." if mlm_head is not None else ""

  def convert(value, kind):
    value = np.asarray(value)
    return np.ascontiguousarray(value.T if kind == "linear" else value)

  out = {prefix + name: convert(_get(params, path, "the encoder tree"), kind)
         for name, path, kind in entries}
  if mlm_head is not None:
    head_paths = {path for _, path, _ in _MLM}
    extra = sorted(set(_leaf_paths(mlm_head)) - head_paths, key=str)
    if extra:
      raise UserError(f"MLM head parameter {'/'.join(map(str, extra[0]))} has no place in "
                      "BertForMaskedLM; pass MlmHead's pure dict")
    out.update({name: convert(_get(mlm_head, path, "the MLM head tree"), kind)
                for name, path, kind in _MLM})
  return out
