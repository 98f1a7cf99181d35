"""sentence-transformers files: modules.json, sentence_bert_config.json, 1_Pooling, 2_Normalize.

A directory without modules.json is a plain transformers model; sentence-transformers wraps one
in mean pooling without normalisation, and so does `read_st`.
"""
from __future__ import annotations

import json
import os

from jembed.errors import UserError
from jembed.hf.tokenizer import read_json
from jembed.models.heads import POOLINGS

_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
# Legacy boolean keys (sentence-transformers <= 5, still read by 6) -> jembed pooling name.
_LEGACY_MODES = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}
# sentence-transformers 6 `pooling_mode` strings -> jembed pooling name.
_MODES = {"cls": "cls", "max": "max", "mean": "mean", "mean_sqrt_len_tokens": "mean_sqrt_len",
          "weightedmean": "weightedmean", "lasttoken": "lasttoken"}


def _module_type(entry: dict) -> str:
  # Module types are written as "sentence_transformers.models.X" (older) or with a deeper path (6.x).
  kind = str(entry.get("type", ""))
  return kind.rsplit(".", 1)[-1]


def _pooling_mode(cfg: dict, source: str) -> str:
  if "pooling_mode" in cfg:
    modes = cfg["pooling_mode"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    modes = [_MODES.get(m, m) for m in modes]
  else:
    modes = [name for key, name in _LEGACY_MODES.items() if cfg.get(key)] or ["mean"]
  if len(modes) != 1 or modes[0] not in POOLINGS:
    raise UserError(f"{source}: pooling {'+'.join(modes)} is not supported; jembed pools with one of "
                    f"{', '.join(POOLINGS)}")
  return modes[0]


def read_st(directory: str) -> dict:
  """{"model_dir", "pooling", "normalize", "max_seq_length" (None: not set), "lowercase"}."""
  out = {"model_dir": directory, "pooling": "mean", "normalize": False, "max_seq_length": None,
         "lowercase": False}
  modules_path = os.path.join(directory, "modules.json")
  if not os.path.isfile(modules_path):
    return out
  modules = read_json(modules_path, "sentence-transformers module list")
  if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
    raise UserError(f"{modules_path} is not a list of modules; re-save the model with sentence-transformers")
  kinds = [_module_type(m) for m in sorted(modules, key=lambda m: m.get("idx", 0))]
  if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
    raise UserError(f"{modules_path}: module pipeline {' -> '.join(kinds)} is not supported; jembed "
                    "reads Transformer -> Pooling [-> Normalize]")
  by_kind = {_module_type(m): m for m in modules}
  model_dir = os.path.join(directory, by_kind["Transformer"].get("path", ""))
  out["model_dir"] = model_dir
  sbert_path = os.path.join(model_dir, "sentence_bert_config.json")
  if os.path.isfile(sbert_path):
    sbert = read_json(sbert_path, "sentence-transformers Transformer config")
    out["max_seq_length"] = sbert.get("max_seq_length")
    out["lowercase"] = bool(sbert.get("do_lower_case", False))
  pooling_path = os.path.join(directory, by_kind["Pooling"].get("path", ""), "config.json")
  if not os.path.isfile(pooling_path):
    raise UserError(f"{pooling_path} is missing; modules.json names a Pooling module, re-save the model")
  out["pooling"] = _pooling_mode(read_json(pooling_path, "pooling config"), pooling_path)
  # Normalize has no parameters; its directory may be absent (nothing to save in it).
  out["normalize"] = "Normalize" in by_kind
  return out


def st_files(*, pooling: str, normalize: bool, max_seq_length: int, lowercase: bool,
             hidden_size: int, model_args: dict | None = None) -> dict[str, str]:
  """{relative path: text} of the sentence-transformers files (the model itself sits in the root).
  `model_args`: keyword arguments sentence-transformers passes to the transformers model's
  from_pretrained (`model_args` in sentence_bert_config.json: every version reads that name)."""
  if pooling not in POOLINGS:
    raise UserError(f"pooling '{pooling}' is unknown; use one of {', '.join(POOLINGS)}")
  dump = lambda obj: json.dumps(obj, indent=2) + "\n"
  modules = [
      {"idx": 0, "name": "0", "path": "", "type": _TRANSFORMER},
      {"idx": 1, "name": "1", "path": "1_Pooling", "type": _POOLING},
  ]
  if normalize:
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": _NORMALIZE})
  # Written with the legacy boolean keys: every sentence-transformers version reads them.
  pooling_cfg = {"word_embedding_dimension": int(hidden_size)}
  pooling_cfg.update({key: name == pooling for key, name in _LEGACY_MODES.items()})
  pooling_cfg["include_prompt"] = True
  files = {
      "modules.json": dump(modules),
      "sentence_bert_config.json": dump({"max_seq_length": int(max_seq_length),
                                         "do_lower_case": bool(lowercase),
                                         **({"model_args": dict(model_args)} if model_args else {})}),
      "config_sentence_transformers.json": dump({
          "model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None,
          "similarity_fn_name": "cosine"}),
      os.path.join("1_Pooling", "config.json"): dump(pooling_cfg),
  }
  if normalize:
    # sentence-transformers 6 saves Normalize's (default) config here; older versions save nothing.
    files[os.path.join("2_Normalize", "config.json")] = dump(
        {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})
  return files
