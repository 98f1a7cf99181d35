"""The one mapping between Hugging Face tensor names and jembed's parameter tree, per family.

A Hugging Face checkpoint is a flat {name: array} in torch layout (a Linear weight is [out, in]);
jembed's `TransformerEncoder` is a nested pure dict (`nnx.to_pure_dict`) whose Dense kernels are
[in, out]. Both directions are driven by one table per family (`_entries`), so import and export
cannot drift apart. A fused tensor (ModernBERT's Wqkv, its GeGLU Wi) maps to several jembed
tensors: split in equal parts along its output rows on import, concatenated back on export.
"""
from __future__ import annotations

import numpy as np

from jembed.errors import UserError

# kinds: "linear" = a torch Linear weight (transposed), anything else is copied as is.
_BERT_LAYER = (
    ("attention.self.query", ("attention", "query"), "dense"),
    ("attention.self.key", ("attention", "key"), "dense"),
    ("attention.self.value", ("attention", "value"), "dense"),
    ("attention.output.dense", ("attention", "out"), "dense"),
    ("attention.output.LayerNorm", ("attention_norm",), "norm"),
    ("intermediate.dense", ("mlp", "wi"), "dense"),
    ("output.dense", ("mlp", "wo"), "dense"),
    ("output.LayerNorm", ("mlp_norm",), "norm"),
)
_MPNET_LAYER = (
    ("attention.attn.q", ("attention", "query"), "dense"),
    ("attention.attn.k", ("attention", "key"), "dense"),
    ("attention.attn.v", ("attention", "value"), "dense"),
    ("attention.attn.o", ("attention", "out"), "dense"),
    ("attention.LayerNorm", ("attention_norm",), "norm"),
    ("intermediate.dense", ("mlp", "wi"), "dense"),
    ("output.dense", ("mlp", "wo"), "dense"),
    ("output.LayerNorm", ("mlp_norm",), "norm"),
)
# ModernBERT: tuples of paths are the parts of a fused tensor, in its row order.
_MODERNBERT_LAYER = (
    ("attn_norm", ("attention_norm",), "norm"),
    ("attn.Wqkv", (("attention", "query"), ("attention", "key"), ("attention", "value")), "dense"),
    ("attn.Wo", ("attention", "out"), "dense"),
    ("mlp_norm", ("mlp_norm",), "norm"),
    # Wi = [input; gate]: GeGLU computes act(input) * gate.
    ("mlp.Wi", (("mlp", "wi"), ("mlp", "wg")), "dense"),
    ("mlp.Wo", ("mlp", "wo"), "dense"),
)
# Each family: the prefix of its base model inside a task model (BertForMaskedLM's `bert.`), its
# layer list, its MLM head's modules, and stored tensors that carry nothing of their own: buffers
# (arange / zeros), tied decoders (copies of the word embeddings and of the head bias) and heads
# jembed has no use for (BERT's next-sentence head).
_FAMILY = {
    "bert": {"prefix": "bert.", "layers": "encoder.layer", "head": "cls.predictions.",
             "ignored_prefixes": ("cls.predictions.decoder.", "cls.seq_relationship.")},
    "roberta": {"prefix": "roberta.", "layers": "encoder.layer", "head": "lm_head.",
                "ignored_prefixes": ("lm_head.decoder.",)},
    "mpnet": {"prefix": "mpnet.", "layers": "encoder.layer", "head": "lm_head.",
              "ignored_prefixes": ("lm_head.decoder.",)},
    "modernbert": {"prefix": "model.", "layers": "layers", "head": "head.",
                   "ignored_prefixes": ("decoder.weight",)},
}
_FAMILY["xlm-roberta"] = _FAMILY["roberta"]
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


def _module(hf: str, path: tuple, kind: str, *, bias: bool, norm_bias: bool):
  """(hf tensor name, jembed path(s), linear | copy) of one Dense or LayerNorm module."""
  parts = path if isinstance(path[0], tuple) else (path,)
  join = lambda leaf: tuple(p + (leaf,) for p in parts) if len(parts) > 1 else parts[0] + (leaf,)
  if kind == "dense":
    out = [(f"{hf}.weight", join("kernel"), "linear")]
    return out + ([(f"{hf}.bias", join("bias"), "copy")] if bias else [])
  out = [(f"{hf}.weight", join("scale"), "copy")]
  return out + ([(f"{hf}.bias", join("bias"), "copy")] if norm_bias else [])


def _entries(cfg: dict, pooler: bool):
  """(hf_name, path(s) in the encoder tree, kind) for every encoder tensor of an encoder_config."""
  family = cfg.get("family", "bert")
  bias, norm_bias = cfg.get("use_bias", True), cfg.get("norm_bias", True)
  module = lambda hf, path, kind: _module(hf, path, kind, bias=bias, norm_bias=norm_bias)
  out = []
  if family == "modernbert":
    out += [("embeddings.tok_embeddings.weight", ("embeddings", "token", "embedding"), "copy")]
    out += module("embeddings.norm", ("embeddings", "norm"), "norm")
    layer = _MODERNBERT_LAYER
  else:
    out += [("embeddings.word_embeddings.weight", ("embeddings", "token", "embedding"), "copy"),
            ("embeddings.position_embeddings.weight", ("embeddings", "position", "embedding"), "copy")]
    if cfg.get("type_vocab_size", 2):
      out += [("embeddings.token_type_embeddings.weight", ("embeddings", "segment", "embedding"), "copy")]
    out += module("embeddings.LayerNorm", ("embeddings", "norm"), "norm")
    layer = _MPNET_LAYER if family == "mpnet" else _BERT_LAYER
  prefix = _FAMILY[family]["layers"]
  for i in range(cfg["num_layers"]):
    for hf, path, kind in layer:
      if family == "modernbert" and i == 0 and hf == "attn_norm":
        continue  # layer 0's attention input is the normalised embeddings (embedding_norm)
      nested = (tuple(("layers", i) + p for p in path) if isinstance(path[0], tuple)
                else ("layers", i) + path)
      out += module(f"{prefix}.{i}.{hf}", nested, kind)
  if family == "mpnet":
    out += [("encoder.relative_attention_bias.weight", ("relative_bias", "embedding"), "copy")]
  if family == "modernbert":
    out += module("final_norm", ("final_norm",), "norm")
  if pooler:
    out += [("pooler.dense.weight", ("pooler", "kernel"), "linear"),
            ("pooler.dense.bias", ("pooler", "bias"), "copy")]
  return out


def _head_entries(cfg: dict):
  """(hf_name, path in the MlmHead tree, kind) of the family's masked-LM head (the output
  projection is tied to the word embeddings in every family, so never stored apart)."""
  family = cfg.get("family", "bert")
  bias, norm_bias = cfg.get("use_bias", True), cfg.get("norm_bias", True)
  module = lambda hf, path, kind: _module(hf, path, kind, bias=bias, norm_bias=norm_bias)
  if family == "bert":
    return (module("cls.predictions.transform.dense", ("transform",), "dense")
            + module("cls.predictions.transform.LayerNorm", ("norm",), "norm")
            + [("cls.predictions.bias", ("bias",), "copy")])
  if family == "modernbert":
    return (module("head.dense", ("transform",), "dense") + module("head.norm", ("norm",), "norm")
            + [("decoder.bias", ("bias",), "copy")])
  return (module("lm_head.dense", ("transform",), "dense") + module("lm_head.layer_norm", ("norm",), "norm")
          + [("lm_head.bias", ("bias",), "copy")])


def _classifier_entries(cfg: dict):
  """(hf_name, path in the SequenceClassifierHead tree, kind) of the family's
  *ForSequenceClassification head (BERT's pooler is the encoder's, listed by `_entries`)."""
  family = cfg.get("family", "bert")
  bias, norm_bias = cfg.get("use_bias", True), cfg.get("norm_bias", True)
  module = lambda hf, path, kind, b=bias: _module(hf, path, kind, bias=b, norm_bias=norm_bias)
  if family == "bert":
    return module("classifier", ("out",), "dense", True)
  if family == "modernbert":  # its classifier Linear always has a bias (classifier_bias is the head's)
    return (module("head.dense", ("dense",), "dense") + module("head.norm", ("norm",), "norm")
            + module("classifier", ("out",), "dense", True))
  return module("classifier.dense", ("dense",), "dense") + module("classifier.out_proj", ("out",), "dense")


def canonical_name(name: str, family: str = "bert") -> str | None:
  """The base-model name of a stored tensor (its task-model prefix dropped); None for tensors
  that carry nothing."""
  spec = _FAMILY[family]
  if name.startswith(spec["prefix"]):
    name = name[len(spec["prefix"]):]
  if name.endswith(_IGNORED_SUFFIXES) or name.startswith(spec["ignored_prefixes"]):
    return None
  # Checkpoints converted from Google's TF BERT spell LayerNorm's parameters gamma / beta.
  if name.endswith("LayerNorm.gamma"):
    name = name[:-len("gamma")] + "weight"
  elif name.endswith("LayerNorm.beta"):
    name = name[:-len("beta")] + "bias"
  return name


def has_pooler(names, family: str = "bert") -> bool:
  return any(canonical_name(n, family) == "pooler.dense.weight" for n in names)


def has_mlm_head(names, family: str = "bert") -> bool:
  head = _FAMILY[family]["head"]
  return any((canonical_name(n, family) or "").startswith(head) for n in names)


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple, what: str, family: str):
  node = tree
  for key in path:
    if not isinstance(node, dict) or key not in node:
      raise UserError(f"{what} has no parameter {'/'.join(map(str, path))}; pass the pure dict of a "
                      f"TransformerEncoder built with the {family} options (no adapters)")
    node = node[key]
  return node


def _leaf_paths(tree: dict, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaf_paths(value, prefix + (key,))
    else:
      yield prefix + (key,)


def _paths(path) -> tuple:
  return path if isinstance(path[0], tuple) else (path,)


def has_classifier(names) -> bool:
  """Whether a checkpoint is a *ForSequenceClassification's (its output layer is `classifier`)."""
  return any(n == "classifier.weight" or n.startswith("classifier.out_proj.") for n in names)


def from_hf(tensors: dict, cfg: dict, *, source: str) -> tuple[dict, dict | None, dict | None]:
  """{hf name: array} -> (encoder pure dict, MLM head pure dict or None, SequenceClassifierHead
  pure dict or None), Linear weights transposed."""
  family = cfg.get("family", "bert")
  canonical = {}
  for name, value in tensors.items():
    key = canonical_name(name, family)
    if key is not None:
      canonical[key] = value
  entries = _entries(cfg, pooler="pooler.dense.weight" in canonical)
  head_prefix = _FAMILY[family]["head"]
  classifier = _classifier_entries(cfg) if has_classifier(canonical) else []
  # ModernBERT's classifier has a `head` too (dense + norm, no decoder): not an MLM head then.
  head = (_head_entries(cfg) if not classifier and any(k.startswith(head_prefix) for k in canonical)
          else [])
  if classifier and family == "bert" and "pooler.dense.weight" not in canonical:
    raise UserError(f"{source} is a BertForSequenceClassification without pooler weights; it is not a "
                    "complete checkpoint")
  missing = [name for name, _, _ in entries + head + classifier if name not in canonical]
  if missing:
    raise UserError(f"{source} lacks {len(missing)} {family} tensor(s), e.g. '{missing[0]}'; it is not a "
                    "complete checkpoint for its config.json (num_hidden_layers? biases?)")
  used = {name for name, _, _ in entries + head + classifier}
  extra = sorted(set(canonical) - used)
  if extra:
    raise UserError(f"{source} has {len(extra)} tensor(s) a {family} encoder does not use, e.g. "
                    f"'{extra[0]}'; only base-model, masked-LM and sequence-classification checkpoints "
                    "are supported")

  def fill(tree, name, path, kind):
    value = np.asarray(canonical[name])
    parts = _paths(path)
    if value.shape[0] % len(parts):
      raise UserError(f"{source}: tensor '{name}' {value.shape} does not split into {len(parts)} equal "
                      "parts; the weights and config do not belong together")
    for part, piece in zip(parts, np.split(value, len(parts), axis=0)):
      _set(tree, part, np.ascontiguousarray(piece.T) if kind == "linear" else piece)

  params: dict = {}
  for name, path, kind in entries:
    fill(params, name, path, kind)
  heads = []
  for entries_of_head in (head, classifier):
    tree = None
    if entries_of_head:
      tree = {}
      for name, path, kind in entries_of_head:
        fill(tree, name, path, kind)
    heads.append(tree)
  return params, heads[0], heads[1]


def to_hf(params: dict, cfg: dict, pooler: bool, mlm_head: dict | None,
          classifier: dict | None = None) -> dict:
  """(encoder pure dict, MLM head pure dict or None, SequenceClassifierHead pure dict or None) ->
  {hf name: C-contiguous numpy array}.

  With a head the encoder's names get the family's task-model prefix (`bert.`, `roberta.`, ...).
  Every array is made C-contiguous: safetensors 0.8 writes the buffer of a transposed (F-ordered)
  view as if it were row-major.
  """
  family = cfg.get("family", "bert")
  entries = _entries(cfg, pooler)
  expected = {p for _, path, _ in entries for p in _paths(path)}
  extra = sorted(set(_leaf_paths(params)) - expected, key=str)
  if extra:
    raise UserError(f"encoder parameter {'/'.join(map(str, extra[0]))} has no place in a {family} "
                    "checkpoint; export an encoder of that family without adapters (merge LoRA first)")
  prefix = _FAMILY[family]["prefix"] if mlm_head is not None or classifier is not None else ""

  def convert(tree, path, kind, what):
    parts = [np.asarray(_get(tree, p, what, family)) for p in _paths(path)]
    parts = [p.T if kind == "linear" else p for p in parts]
    return np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))

  out = {prefix + name: convert(params, path, kind, "the encoder tree") for name, path, kind in entries}
  if mlm_head is not None:
    head = _head_entries(cfg)
    head_paths = {path for _, path, _ in head}
    extra = sorted(set(_leaf_paths(mlm_head)) - head_paths, key=str)
    if extra:
      raise UserError(f"MLM head parameter {'/'.join(map(str, extra[0]))} has no place in the {family} "
                      "masked-LM head; pass MlmHead's pure dict")
    out.update({name: convert(mlm_head, path, kind, "the MLM head tree") for name, path, kind in head})
  if classifier is not None:
    head = _classifier_entries(cfg)
    extra = sorted(set(_leaf_paths(classifier)) - {path for _, path, _ in head}, key=str)
    if extra:
      raise UserError(f"classifier head parameter {'/'.join(map(str, extra[0]))} has no place in the "
                      f"{family} sequence-classification head; pass SequenceClassifierHead's pure dict")
    out.update({name: convert(classifier, path, kind, "the classifier head tree") for name, path, kind in head})
  return out
