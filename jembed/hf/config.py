"""config.json (a transformers Bert/Roberta/XLMRoberta/MPNet/ModernBert config) <-> jembed
TransformerConfig field values.

`from_hf_config` reads a family's config.json into the encoder options (jembed/models/transformer.py)
that compute what its transformers model computes; `to_hf_config` writes the reverse, and
`normalize_encoder_config` refuses, in one line, an encoder whose options its family's config.json
cannot express (it reads back what it would write and compares).
"""
from __future__ import annotations

import dataclasses

from jembed.errors import UserError
from jembed.models.transformer import ACTIVATIONS, ARCH_FIELDS, FAMILIES, TransformerConfig

SUPPORTED_MODEL_TYPES = FAMILIES
# model_type -> (base model class, masked-LM class), as transformers names them.
ARCHITECTURES = {
    "bert": ("BertModel", "BertForMaskedLM"),
    "roberta": ("RobertaModel", "RobertaForMaskedLM"),
    "xlm-roberta": ("XLMRobertaModel", "XLMRobertaForMaskedLM"),
    "mpnet": ("MPNetModel", "MPNetForMaskedLM"),
    "modernbert": ("ModernBertModel", "ModernBertForMaskedLM"),
}
# model_type -> its sequence-classification class (jembed's model.head=hf).
SEQUENCE_CLASSIFIERS = {
    "bert": "BertForSequenceClassification",
    "roberta": "RobertaForSequenceClassification",
    "xlm-roberta": "XLMRobertaForSequenceClassification",
    "mpnet": "MPNetForSequenceClassification",
    "modernbert": "ModernBertForSequenceClassification",
}

# The config classes' defaults (transformers 5 configuration_*.py), for keys a config.json leaves out.
_BERT_LIKE = {
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
    "layer_norm_eps": 1e-12, "position_embedding_type": "absolute", "pad_token_id": 0,
}
_DEFAULTS = {
    "bert": _BERT_LIKE,
    "roberta": dict(_BERT_LIKE, vocab_size=50265, pad_token_id=1),
    "xlm-roberta": dict(_BERT_LIKE, pad_token_id=1),
    "mpnet": dict(_BERT_LIKE, vocab_size=30527, relative_attention_num_buckets=32, pad_token_id=1),
    "modernbert": {
        "vocab_size": 50368, "hidden_size": 768, "intermediate_size": 1152, "num_hidden_layers": 22,
        "num_attention_heads": 12, "hidden_activation": "gelu", "max_position_embeddings": 8192,
        "norm_eps": 1e-5, "norm_bias": False, "attention_bias": False, "mlp_bias": False,
        "classifier_bias": False, "attention_dropout": 0.0, "mlp_dropout": 0.0, "local_attention": 128,
        "global_attn_every_n_layers": 3, "global_rope_theta": 160000.0, "local_rope_theta": 10000.0,
        "pad_token_id": 50283, "classifier_activation": "gelu",
    },
}
# TransformerConfig fields of a BERT-like config.json, and the key of each.
_FIELDS = {
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
    "num_heads": "num_attention_heads", "mlp_dim": "intermediate_size", "vocab_size": "vocab_size",
    "max_position": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps", "hidden_act": "hidden_act",
    "dropout": "hidden_dropout_prob", "attention_dropout": "attention_probs_dropout_prob",
}
# The same for ModernBERT's config.json.
_MODERNBERT_FIELDS = {
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
    "num_heads": "num_attention_heads", "mlp_dim": "intermediate_size", "vocab_size": "vocab_size",
    "max_position": "max_position_embeddings", "layer_norm_eps": "norm_eps",
    "hidden_act": "hidden_activation", "dropout": "mlp_dropout", "attention_dropout": "attention_dropout",
    "local_window": "local_attention", "norm_bias": "norm_bias",
}
# MPNet's transformers code buckets relative distances with these, whatever config.json says.
MPNET_BUCKETS, MPNET_MAX_DISTANCE = 32, 128
# Decoder / seq2seq model types people point at by mistake get the list of what is supported.
_SUPPORTED = ", ".join(FAMILIES)


def from_hf_config(cfg: dict, *, pooler: bool, source: str) -> dict:
  """A config.json dict -> TransformerConfig field values (encoder_config)."""
  model_type = cfg.get("model_type")
  if model_type not in FAMILIES:
    raise UserError(f"{source}: model_type {model_type!r} is not supported; jembed imports the encoder "
                    f"families {_SUPPORTED}")
  defaults = _DEFAULTS[model_type]
  get = lambda key: cfg[key] if cfg.get(key) is not None else defaults[key]
  if model_type == "modernbert":
    out = _modernbert(cfg, get, source)
  else:
    out = _bert_like(cfg, get, model_type, source)
  if out["hidden_act"] not in ACTIVATIONS:
    raise UserError(f"{source}: hidden activation {out['hidden_act']!r} is not supported; use one of "
                    f"{', '.join(ACTIVATIONS)}")
  out["layer_norm_eps"] = float(out["layer_norm_eps"])
  out["pooler"] = bool(pooler)
  out["family"] = model_type
  if out["hidden_size"] % out["num_heads"]:
    raise UserError(f"{source}: hidden_size {out['hidden_size']} is not divisible by "
                    f"num_attention_heads {out['num_heads']}; the config.json is inconsistent")
  return out


def _bert_like(cfg: dict, get, model_type: str, source: str) -> dict:
  if model_type != "mpnet" and get("position_embedding_type") != "absolute":
    raise UserError(f"{source}: position_embedding_type {get('position_embedding_type')!r} is not "
                    "supported; only 'absolute' learned position embeddings are")
  if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
    raise UserError(f"{source}: a {model_type} decoder (is_decoder / add_cross_attention) is not "
                    "supported; use an encoder checkpoint")
  fields = {f: k for f, k in _FIELDS.items() if not (model_type == "mpnet" and f == "type_vocab_size")}
  out = {field: get(key) for field, key in fields.items()}
  if model_type == "bert":
    return out
  # RoBERTa / XLM-R count positions over the real tokens from padding_idx + 1 (pad_token_id); MPNet
  # does the same with padding_idx fixed at 1 in its code.
  out.update(positions="padded", position_offset=1 if model_type == "mpnet" else int(get("pad_token_id")))
  if model_type == "mpnet":
    buckets = int(get("relative_attention_num_buckets"))
    if buckets != MPNET_BUCKETS:
      raise UserError(f"{source}: relative_attention_num_buckets={buckets}, but transformers' MPNet "
                      f"always computes {MPNET_BUCKETS} buckets; only {MPNET_BUCKETS} is supported")
    out.update(type_vocab_size=0, relative_buckets=buckets, relative_max_distance=MPNET_MAX_DISTANCE)
  return out


def _modernbert(cfg: dict, get, source: str) -> dict:
  out = {field: get(key) for field, key in _MODERNBERT_FIELDS.items()}
  biases = {key: bool(get(key)) for key in ("attention_bias", "mlp_bias", "classifier_bias")}
  if len(set(biases.values())) != 1:
    raise UserError(f"{source}: attention_bias, mlp_bias and classifier_bias differ ({biases}); jembed's "
                    "encoder has one use_bias for all projections")
  n = cfg.get("num_hidden_layers") or get("num_hidden_layers")
  every = int(get("global_attn_every_n_layers"))
  if cfg.get("layer_types") is not None:  # transformers 5 spells the pattern out
    types = list(cfg["layer_types"])
    every = next((k for k in range(1, n + 1) if types == _layer_types(n, k)), 0)
    if len(types) != n or not every:
      raise UserError(f"{source}: layer_types {types} is not one global layer every k layers starting at "
                      "layer 0 (ModernBERT's global_attn_every_n_layers pattern); it is not supported")
  thetas = {"full_attention": float(get("global_rope_theta")), "sliding_attention": float(get("local_rope_theta"))}
  for kind, params in (cfg.get("rope_parameters") or {}).items():
    if params is None or kind not in thetas:
      continue
    if params.get("rope_type", "default") != "default":
      raise UserError(f"{source}: rope_type {params.get('rope_type')!r} ({kind}) is not supported; only "
                      "'default' rotary embeddings are")
    thetas[kind] = float(params.get("rope_theta", thetas[kind]))
  out.update(type_vocab_size=0, pre_ln=True, embedding_norm=True, positions="rotary", gated_mlp=True,
             use_bias=biases["attention_bias"], norm_bias=bool(out["norm_bias"]), global_every=every,
             rope_theta=thetas["full_attention"], local_rope_theta=thetas["sliding_attention"],
             local_window=int(out["local_window"]) if every > 1 else 0)
  if get("classifier_activation") != "gelu":
    raise UserError(f"{source}: classifier_activation {get('classifier_activation')!r} is not supported; "
                    "jembed's MLM head uses gelu")
  return out


def _layer_types(n: int, every: int) -> list[str]:
  return ["full_attention" if i % every == 0 else "sliding_attention" for i in range(n)]


def normalize_encoder_config(encoder_config) -> dict:
  """A TransformerConfig or a dict of its fields -> the fields its family's config.json expresses.

  Refuses (one line) what that config.json cannot hold: adapters, and any option the family does not
  have (e.g. a pre-LN encoder as BERT)."""
  if dataclasses.is_dataclass(encoder_config):
    encoder_config = dataclasses.asdict(encoder_config)
  cfg = dict(encoder_config)
  if cfg.get("adapter_dim"):
    raise UserError("an encoder with bottleneck adapters cannot be written as a Hugging Face model; "
                    "export the model without adapters")
  missing = [f for f in ("num_layers", "hidden_size", "num_heads", "mlp_dim", "vocab_size") if f not in cfg]
  if missing:
    raise UserError(f"encoder_config lacks {', '.join(missing)}; pass a TransformerConfig or its fields")
  family = cfg.get("family", "bert")
  if family not in FAMILIES:
    raise UserError(f"encoder family {family!r} is unknown; jembed exports {_SUPPORTED}")
  known = {f.name for f in dataclasses.fields(TransformerConfig)}
  full = dataclasses.asdict(TransformerConfig(**{k: v for k, v in cfg.items() if k in known and k != "dtype"}))
  if full["hidden_act"] not in ACTIVATIONS:
    raise UserError(f"hidden_act {full['hidden_act']!r} is not supported; use one of {', '.join(ACTIVATIONS)}")
  # What the family's config.json says, read back: an option it cannot express comes back changed.
  written = to_hf_config(full, pad_token_id=full["position_offset"], architecture="", dtype="float32")
  back = from_hf_config(written, pooler=full["pooler"], source=f"this encoder exported as {family}")
  expected = dataclasses.asdict(TransformerConfig(**back))
  for field in ARCH_FIELDS + ("layer_norm_eps", "hidden_act", "pooler"):
    value = expected[field]
    if full[field] != value:
      hint = " (BERT is post-LN: a pre-LN encoder is built with model.pre_ln=True)" if field == "pre_ln" else ""
      raise UserError(f"encoder option {field}={full[field]!r} cannot be written as a {family} "
                      f"config.json (it has {field}={value!r}){hint}; export an encoder of that family")
  return back | {"dropout": full["dropout"], "attention_dropout": full["attention_dropout"]}


def to_hf_config(encoder_config: dict, *, pad_token_id: int, architecture: str, dtype: str,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 labels: list[str] | None = None, classifier_pooling: str = "mean") -> dict:
  """encoder_config (from normalize_encoder_config) -> the config.json its family's model loads.
  `labels`: a sequence classifier's class names (id2label / label2id); `classifier_pooling`:
  ModernBERT's (cls | mean)."""
  family = encoder_config.get("family", "bert")
  cfg = {"architectures": [architecture], "model_type": family, "pad_token_id": int(pad_token_id),
         "initializer_range": 0.02,
         # transformers 5 reads `dtype`; 4.x reads `torch_dtype`.
         "dtype": dtype, "torch_dtype": dtype}
  if labels is not None:
    cfg.update(id2label={str(i): name for i, name in enumerate(labels)},
               label2id={name: i for i, name in enumerate(labels)},
               problem_type="single_label_classification")
  if family != "bert":  # BertConfig has no bos / eos; the others name <s> / </s> ([CLS] / [SEP]) so
    if bos_token_id is not None:
      cfg["bos_token_id"] = int(bos_token_id)
    if eos_token_id is not None:
      cfg["eos_token_id"] = int(eos_token_id)
  if family == "modernbert":  # ModernBertConfig names [CLS] / [SEP] again (defaults: its own vocabulary's)
    if bos_token_id is not None:
      cfg["cls_token_id"] = int(bos_token_id)
    if eos_token_id is not None:
      cfg["sep_token_id"] = int(eos_token_id)
  if family == "modernbert":
    for field, key in _MODERNBERT_FIELDS.items():
      cfg[key] = encoder_config[field]
    every, n = int(encoder_config["global_every"]), int(encoder_config["num_layers"])
    if not encoder_config["local_window"]:
      every, cfg["local_attention"] = 1, 128  # all layers global: the window is never used
    bias = bool(encoder_config["use_bias"])
    cfg.update({
        "attention_bias": bias, "mlp_bias": bias, "classifier_bias": bias, "decoder_bias": True,
        "embedding_dropout": 0.0, "classifier_activation": "gelu", "classifier_pooling": classifier_pooling,
        # transformers 4.x reads these three; 5 reads layer_types and rope_parameters.
        "global_attn_every_n_layers": every, "global_rope_theta": encoder_config["rope_theta"],
        "local_rope_theta": encoder_config["local_rope_theta"],
        "layer_types": _layer_types(n, every),
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": encoder_config["rope_theta"]},
            "sliding_attention": {"rope_type": "default", "rope_theta": encoder_config["local_rope_theta"]}},
    })
    if labels is not None:  # its head's dropout; the other families use hidden_dropout_prob
      cfg["classifier_dropout"] = encoder_config["dropout"]
    return dict(sorted(cfg.items()))
  for field, key in _FIELDS.items():
    if not (family == "mpnet" and field == "type_vocab_size"):
      cfg[key] = encoder_config[field]
  if family == "mpnet":
    cfg["relative_attention_num_buckets"] = encoder_config["relative_buckets"]
  else:
    cfg.update({"position_embedding_type": "absolute", "classifier_dropout": None, "use_cache": True,
                "is_decoder": False, "add_cross_attention": False})
  if family in ("roberta", "xlm-roberta"):
    # Its embeddings read the pads' position id from pad_token_id.
    cfg["pad_token_id"] = int(encoder_config["position_offset"])
  return dict(sorted(cfg.items()))
