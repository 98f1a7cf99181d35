"""config.json (a transformers BertConfig) <-> jembed TransformerConfig field values."""
from __future__ import annotations

import dataclasses

from jembed.errors import UserError
from jembed.models.transformer import ACTIVATIONS

# BertConfig's defaults (transformers configuration_bert.py), for keys a config.json leaves out.
_BERT_DEFAULTS = {
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
    "layer_norm_eps": 1e-12, "position_embedding_type": "absolute",
}
# TransformerConfig fields an encoder_config carries, and the config.json key of each.
_FIELDS = {
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
    "num_heads": "num_attention_heads", "mlp_dim": "intermediate_size", "vocab_size": "vocab_size",
    "max_position": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps", "hidden_act": "hidden_act",
    "dropout": "hidden_dropout_prob", "attention_dropout": "attention_probs_dropout_prob",
}
SUPPORTED_MODEL_TYPES = ("bert",)


def from_hf_config(cfg: dict, *, pooler: bool, source: str) -> dict:
  """A config.json dict -> TransformerConfig field values (encoder_config)."""
  model_type = cfg.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UserError(f"{source}: model_type {model_type!r} is not supported; jembed imports "
                    f"{', '.join(SUPPORTED_MODEL_TYPES)} (BERT-family) checkpoints only")
  get = lambda key: cfg[key] if cfg.get(key) is not None else _BERT_DEFAULTS[key]
  if get("position_embedding_type") != "absolute":
    raise UserError(f"{source}: position_embedding_type {get('position_embedding_type')!r} is not "
                    "supported; only 'absolute' BERT position embeddings are")
  if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
    raise UserError(f"{source}: a BERT decoder (is_decoder / add_cross_attention) is not supported; "
                    "use an encoder checkpoint")
  if get("hidden_act") not in ACTIVATIONS:
    raise UserError(f"{source}: hidden_act {get('hidden_act')!r} is not supported; use one of "
                    f"{', '.join(ACTIVATIONS)}")
  out = {field: get(key) for field, key in _FIELDS.items()}
  out["layer_norm_eps"] = float(out["layer_norm_eps"])
  out["pooler"] = bool(pooler)
  if out["hidden_size"] % out["num_heads"]:
    raise UserError(f"{source}: hidden_size {out['hidden_size']} is not divisible by "
                    f"num_attention_heads {out['num_heads']}; the config.json is inconsistent")
  return out


def normalize_encoder_config(encoder_config) -> dict:
  """A TransformerConfig or a dict of its fields -> the fields a BERT config.json can express."""
  if dataclasses.is_dataclass(encoder_config):
    encoder_config = dataclasses.asdict(encoder_config)
  cfg = dict(encoder_config)
  if cfg.get("pre_ln"):
    raise UserError("a pre-LN encoder cannot be written as BERT (which is post-LN); export a model "
                    "built with model.pre_ln=False")
  if cfg.get("adapter_dim"):
    raise UserError("an encoder with bottleneck adapters cannot be written as BERT; export the "
                    "model without adapters")
  missing = [f for f in ("num_layers", "hidden_size", "num_heads", "mlp_dim", "vocab_size") if f not in cfg]
  if missing:
    raise UserError(f"encoder_config lacks {', '.join(missing)}; pass a TransformerConfig or its fields")
  defaults = {"max_position": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
              "dropout": 0.1, "attention_dropout": 0.1, "pooler": False}
  out = {field: cfg.get(field, defaults.get(field)) for field in list(_FIELDS) + ["pooler"]}
  if out["hidden_act"] not in ACTIVATIONS:
    raise UserError(f"hidden_act {out['hidden_act']!r} is not supported; use one of {', '.join(ACTIVATIONS)}")
  return out


def to_hf_config(encoder_config: dict, *, pad_token_id: int, architecture: str, dtype: str) -> dict:
  """encoder_config (from normalize_encoder_config) -> the config.json BertModel loads."""
  cfg = {"architectures": [architecture], "model_type": "bert"}
  for field, key in _FIELDS.items():
    cfg[key] = encoder_config[field]
  cfg.update({
      "initializer_range": 0.02, "pad_token_id": int(pad_token_id),
      "position_embedding_type": "absolute", "classifier_dropout": None, "use_cache": True,
      "is_decoder": False, "add_cross_attention": False,
      # transformers 5 reads `dtype`; 4.x reads `torch_dtype`.
      "dtype": dtype, "torch_dtype": dtype,
  })
  return dict(sorted(cfg.items()))
