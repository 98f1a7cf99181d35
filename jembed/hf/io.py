"""Read and write Hugging Face / sentence-transformers model directories without torch.

`load_dir` reads what `transformers` (`save_pretrained`) and `sentence-transformers` (`save`) write
for a BERT, RoBERTa, XLM-RoBERTa, MPNet or ModernBERT model; `save_dir` writes a directory both
load, atomically (a temp directory beside the target, renamed at the end).
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tokenizers

from jembed import fs
from jembed.errors import UserError
from jembed.hf import config as hf_config
from jembed.hf import names
from jembed.hf import st
from jembed.hf import tokenizer as hf_tokenizer
from jembed.models.heads import HF_SEQUENCE_HEADS

WEIGHTS = "model.safetensors"
TORCH_WEIGHTS = "pytorch_model.bin"


@dataclasses.dataclass
class HFModel:
  """A text encoder read from a Hugging Face directory, in jembed's terms."""
  encoder_config: dict  # TransformerConfig field values
  params: dict  # the TransformerEncoder's nnx.to_pure_dict(nnx.state(encoder, nnx.Param))
  mlm_head: dict | None  # MlmHead's pure dict when the checkpoint has a masked-LM head
  tokenizer: tokenizers.Tokenizer  # no padding; truncation at max_seq_length
  special_ids: dict  # pad, unk, cls, sep, mask -> id, as the tokenizer has them
  pooling: str  # cls | mean | max | mean_sqrt_len
  normalize: bool
  max_seq_length: int
  lowercase: bool = False  # sentence_bert_config's do_lower_case: texts are lower-cased first
  # A *ForSequenceClassification checkpoint's head (SequenceClassifierHead's pure dict; BERT's
  # pooler is in `params`), its class names (id2label) and what it pools ([CLS], or ModernBERT's mean).
  classifier: dict | None = None
  class_names: list[str] | None = None
  classifier_pooling: str = "cls"

  def encode(self, texts) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids, mask) int32 [B, T], exactly as sentence-transformers tokenizes them."""
    return hf_tokenizer.encode(self.tokenizer, texts, self.max_seq_length,
                               pad_id=self.special_ids["pad"], lowercase=self.lowercase)


def _read_weights(model_dir: str) -> dict:
  path = os.path.join(model_dir, WEIGHTS)
  if os.path.isfile(path):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    try:
      return load_file(path)
    except Exception as e:  # pylint: disable=broad-except
      first = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise UserError(f"cannot read {path} ({first}); the file is damaged or not safetensors") from None
  bin_path = os.path.join(model_dir, TORCH_WEIGHTS)
  if os.path.isfile(bin_path):
    # A torch zip pickle, read without torch by a restricted unpickler that rebuilds tensors only.
    from jembed.interop import torchzip  # pylint: disable=import-outside-toplevel
    return torchzip.load(bin_path)
  if any(f.startswith("model-") and f.endswith(".safetensors") for f in os.listdir(model_dir)):
    raise UserError(f"{model_dir} holds sharded weights (model-*.safetensors); jembed reads a single "
                    "model.safetensors: re-save with a larger max_shard_size")
  raise UserError(f"{model_dir} has no {WEIGHTS}; copy the model's weights into it")


def load_dir(path: str) -> HFModel:
  """Reads a transformers or sentence-transformers directory of a supported encoder family (local
  or gs://; a remote one is downloaded to a temporary directory first)."""
  if not fs.is_local(path):
    if not fs.isdir(path):
      raise UserError(f"model directory {path!r} does not exist; give the path of a Hugging Face "
                      "or sentence-transformers model directory")
    with fs.local_dir(path) as local:
      return load_dir(local)
  directory = os.path.expanduser(str(path))
  if not os.path.isdir(directory):
    raise UserError(f"model directory {directory!r} does not exist; give the path of a Hugging Face "
                    "or sentence-transformers model directory")
  info = st.read_st(directory)
  model_dir = info["model_dir"]
  config_path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(config_path):
    raise UserError(f"{model_dir} has no config.json, so it is not a Hugging Face model directory; "
                    "point at the directory that save_pretrained / SentenceTransformer.save wrote")
  cfg = hf_tokenizer.read_json(config_path, "model config")
  if not isinstance(cfg, dict):
    raise UserError(f"{config_path} is not a JSON object; re-save the model")
  # Check the model type before touching the (possibly large) weights.
  family = hf_config.from_hf_config(cfg, pooler=False, source=config_path)["family"]
  tensors = _read_weights(model_dir)
  encoder_config = hf_config.from_hf_config(cfg, pooler=names.has_pooler(tensors, family),
                                            source=config_path)
  params, mlm_head, classifier = names.from_hf(tensors, encoder_config, source=model_dir)
  class_names, classifier_pooling = None, "cls"
  if classifier is not None:
    problem = cfg.get("problem_type") or "single_label_classification"
    if problem != "single_label_classification" or len(classifier["out"]["bias"]) < 2:
      raise UserError(f"{config_path}: a {problem} head with {len(classifier['out']['bias'])} output(s) "
                      "is not supported; jembed reads single-label (softmax) classifiers")
    class_names = _class_names(cfg, len(classifier["out"]["bias"]), source=config_path)
    classifier_pooling = cfg.get("classifier_pooling", "cls") if family == "modernbert" else "cls"
    if classifier_pooling not in HF_SEQUENCE_HEADS[family][0]:
      raise UserError(f"{config_path}: classifier_pooling {classifier_pooling!r} is not supported; "
                      f"jembed pools with {' or '.join(HF_SEQUENCE_HEADS[family][0])}")
  _check_shapes(params, encoder_config, source=model_dir, mlm_head=mlm_head, classifier=classifier)
  from jembed.models.transformer import TransformerConfig  # pylint: disable=import-outside-toplevel
  limit = TransformerConfig(**encoder_config).max_length

  tokenizer, ids = hf_tokenizer.load_tokenizer(model_dir, family)
  if encoder_config.get("positions") == "padded" and ids["pad"] != encoder_config["position_offset"]:
    raise UserError(f"{directory}: the tokenizer pads with id {ids['pad']} but the model's positions "
                    f"treat id {encoder_config['position_offset']} as padding; the tokenizer files "
                    "belong to another model")
  max_len = info["max_seq_length"]
  if max_len is None:
    # sentence-transformers: the tokenizer's model_max_length capped at the position table.
    tok_cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    tok_cfg = hf_tokenizer.read_json(tok_cfg_path, "tokenizer config") if os.path.isfile(tok_cfg_path) else {}
    max_len = min(int(tok_cfg.get("model_max_length") or 10**30), limit)
  max_len = int(max_len)
  if not 2 <= max_len <= limit:
    raise UserError(f"{directory}: max_seq_length {max_len} does not fit the position table "
                    f"({limit} tokens from max_position_embeddings {encoder_config['max_position']}); "
                    "fix sentence_bert_config.json")
  if tokenizer.get_vocab_size() > encoder_config["vocab_size"]:
    raise UserError(f"{directory}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model "
                    f"only {encoder_config['vocab_size']} embeddings; the tokenizer files belong to another model")
  tokenizer.enable_truncation(max_len)
  return HFModel(encoder_config=encoder_config, params=params, mlm_head=mlm_head, tokenizer=tokenizer,
                 special_ids=ids, pooling=info["pooling"], normalize=info["normalize"],
                 max_seq_length=max_len, lowercase=info["lowercase"], classifier=classifier,
                 class_names=class_names, classifier_pooling=classifier_pooling)


def _class_names(cfg: dict, n: int, *, source: str) -> list[str]:
  """config.json's id2label as a list in logit order (transformers' LABEL_i when it has none)."""
  id2label = cfg.get("id2label") or {}
  try:
    names_by_id = {int(k): str(v) for k, v in id2label.items()}
  except (TypeError, ValueError, AttributeError):
    raise UserError(f"{source}: id2label must map class ids to names; re-save the model") from None
  if names_by_id and sorted(names_by_id) != list(range(n)):
    raise UserError(f"{source}: id2label has ids {sorted(names_by_id)} but the classifier has {n} "
                    "outputs; the config and weights do not belong together")
  return [names_by_id.get(i, f"LABEL_{i}") for i in range(n)]


def abstract_module(build):
  """nnx.eval_shape of `build(rngs)`: shapes only, no weights allocated. Eager sharding is off while
  it is built (it would need a mesh and logical rules); the caller places the result."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: build(nnx.Rngs(params=0, dropout=0)))


def _check_shapes(params: dict, cfg: dict, *, source: str, mlm_head: dict | None = None,
                  classifier: dict | None = None) -> None:
  """Every tensor has the shape a TransformerEncoder (and MlmHead, SequenceClassifierHead) of `cfg`
  gives it."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jembed.models.heads import MlmHead, SequenceClassifierHead  # pylint: disable=import-outside-toplevel
  from jembed.models.transformer import TransformerConfig, TransformerEncoder  # pylint: disable=import-outside-toplevel
  tcfg = TransformerConfig(**cfg)
  want = nnx.to_pure_dict(nnx.state(abstract_module(lambda rngs: TransformerEncoder(tcfg, rngs=rngs)),
                                    nnx.Param))
  pairs = [(want, params)]
  if mlm_head is not None:
    head = abstract_module(lambda rngs: MlmHead.for_encoder(tcfg, rngs=rngs))
    pairs.append((nnx.to_pure_dict(nnx.state(head, nnx.Param)), mlm_head))
  if classifier is not None:
    n = len(classifier["out"]["bias"])
    head = abstract_module(lambda rngs: SequenceClassifierHead.for_encoder(tcfg, n, rngs=rngs))
    pairs.append((nnx.to_pure_dict(nnx.state(head, nnx.Param)), classifier))
  for expected, got in pairs:
    for path, leaf in _flat(expected):
      node = got
      for key in path:
        node = node[key]
      if tuple(node.shape) != tuple(leaf.shape):
        raise UserError(f"{source}: tensor {'/'.join(map(str, path))} has shape {tuple(node.shape)} but "
                        f"config.json implies {tuple(leaf.shape)}; the weights and config do not belong together")


def _flat(tree: dict, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _dtype_name(params: dict) -> str:
  dtypes = {str(np.asarray(leaf).dtype) for leaf in _leaves(params)}
  return dtypes.pop() if len(dtypes) == 1 else "float32"


def _leaves(tree: dict):
  for value in tree.values():
    if isinstance(value, dict):
      yield from _leaves(value)
    else:
      yield value


@dataclasses.dataclass
class SequenceClassifier:
  """A classifier head to export with the encoder: the family's *ForSequenceClassification."""
  params: dict        # SequenceClassifierHead's pure dict (BERT: `out` only; its pooler is the encoder's)
  labels: list[str]   # class names, in logit order (config.json's id2label / label2id)
  pooling: str = "cls"  # what the head reads: [CLS] (every family) or the mean (ModernBERT only)


def save_dir(path: str, *, encoder_config, params: dict, tokenizer: tokenizers.Tokenizer, pooling: str,
             normalize: bool, max_seq_length: int, mlm_head: dict | None = None,
             special_ids: dict | None = None, lowercase: bool = False,
             classifier: SequenceClassifier | None = None) -> str:
  """Writes a directory that transformers.AutoModel and sentence_transformers.SentenceTransformer load.

  `encoder_config` is a TransformerConfig or its fields (its `family` says which transformers
  model: BertModel, RobertaModel, XLMRobertaModel, MPNetModel or ModernBertModel), `params` the
  encoder's pure dict, `mlm_head` MlmHead's pure dict (then the weights are laid out as the
  family's *ForMaskedLM), `classifier` a sequence-classification head (then as the family's
  *ForSequenceClassification, with id2label; RoBERTa's, MPNet's and ModernBERT's have no pooler, so
  an encoder's pooler weights are left out). Returns the path.

  No pooler weights are invented when the encoder has none: sentence_bert_config.json then tells
  sentence-transformers to build the model without one (model_args add_pooling_layer=False), so it
  loads with nothing missing; transformers' AutoModel (BertModel, RobertaModel, MPNetModel) always
  builds a pooler and reports it newly initialised unless given add_pooling_layer=False. An encoder's
  pooler weights (from a source that had them) are kept, never dropped: *ForMaskedLM, which has no
  pooler, lists them as unexpected, as it does for Google's BERT checkpoints.

  Local or gs://: the directory is built beside the target and swapped in whole (fs.swap_dir), so a
  reader never sees a half-written model; files get the mode a plain open() gives (fs.file_mode).
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  local = fs.is_local(path)
  target = os.path.abspath(os.path.expanduser(str(path))) if local else str(path)
  cfg = hf_config.normalize_encoder_config(encoder_config)
  if bool(cfg["pooler"]) != ("pooler" in params):
    raise UserError(f"encoder_config says pooler={cfg['pooler']} but the parameters "
                    f"{'have' if 'pooler' in params else 'lack'} pooler weights; pass matching ones")
  family = cfg["family"]
  if mlm_head is not None and classifier is not None:
    raise UserError("a model is exported with a masked-LM head or a classifier head, not both")
  if classifier is not None:
    allowed = HF_SEQUENCE_HEADS[family][0]
    if classifier.pooling not in allowed:
      raise UserError(f"{hf_config.SEQUENCE_CLASSIFIERS[family]} pools with {' or '.join(allowed)}, "
                      f"not {classifier.pooling}; train the classifier with model.head=hf")
    if family == "bert" and not cfg["pooler"]:
      raise UserError("BertForSequenceClassification reads the pooler, but the encoder has none; train "
                      "the classifier with model.head=hf")
    if family != "bert" and cfg["pooler"]:
      params = {k: v for k, v in params.items() if k != "pooler"}
      cfg = dict(cfg, pooler=False)
  if special_ids is None:
    special_ids = hf_tokenizer.special_ids(tokenizer, hf_tokenizer.family_specials(family),
                                           source="the tokenizer")
  from jembed.models.transformer import TransformerConfig  # pylint: disable=import-outside-toplevel
  limit = TransformerConfig(**cfg).max_length
  if not 2 <= int(max_seq_length) <= limit:
    raise UserError(f"max_seq_length={max_seq_length} does not fit the position table "
                    f"(max_position {cfg['max_position']}); choose 2..{limit}")
  if cfg.get("positions") == "padded" and special_ids["pad"] != cfg["position_offset"]:
    raise UserError(f"the tokenizer pads with id {special_ids['pad']} but the encoder's positions treat "
                    f"id {cfg['position_offset']} as padding ({family}); export it with its own tokenizer")
  tensors = names.to_hf(params, cfg, cfg["pooler"], mlm_head,
                        classifier.params if classifier is not None else None)
  _check_shapes(params, cfg, source="the parameters", mlm_head=mlm_head)
  if classifier is not None:
    architecture = hf_config.SEQUENCE_CLASSIFIERS[family]
  else:
    architecture = hf_config.ARCHITECTURES[family][mlm_head is not None]
  config_json = hf_config.to_hf_config(
      cfg, pad_token_id=special_ids["pad"], architecture=architecture, dtype=_dtype_name(params),
      bos_token_id=special_ids["cls"], eos_token_id=special_ids["sep"],
      labels=list(classifier.labels) if classifier is not None else None,
      classifier_pooling=classifier.pooling if classifier is not None else "mean")
  # model_max_length = max_seq_length, as sentence-transformers 6 saves it (it reads the limit from
  # there; older versions from sentence_bert_config.json, also written).
  files = hf_tokenizer.tokenizer_files(tokenizer, special_ids, int(max_seq_length), family=family)
  # sentence-transformers builds its model with AutoModel, which has a pooler in these families:
  # without pooler weights, ask for none rather than let it initialise one at random.
  no_pooler = family != "modernbert" and not cfg["pooler"]
  files.update(st.st_files(pooling=pooling, normalize=normalize, max_seq_length=int(max_seq_length),
                           lowercase=lowercase, hidden_size=cfg["hidden_size"],
                           model_args={"add_pooling_layer": False} if no_pooler else None))
  files["config.json"] = json.dumps(config_json, indent=2) + "\n"

  if fs.is_file(target):
    raise UserError(f"{target} exists and is a file; choose a directory path for the model")
  if fs.isdir(target) and fs.listdir(target) and not fs.exists(fs.join(target, "config.json")):
    raise UserError(f"{target} exists and is not a model directory; choose an empty or new path")

  def build(directory: str) -> None:
    for rel, text in files.items():
      fs.write_text(fs.join(directory, *rel.split(os.sep)), text)
    # safetensors writes 0600 (its own temporary file); fs.write_with gives the usual mode.
    fs.write_with(fs.join(directory, WEIGHTS), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

  # Swap: an old export stays whole until the new one is complete.
  fs.swap_dir(target, build)
  return target


def save_model(path: str, model: HFModel) -> str:
  """save_dir of an HFModel (what load_dir returned, possibly with trained params)."""
  return save_dir(path, encoder_config=model.encoder_config, params=model.params,
                  tokenizer=model.tokenizer, pooling=model.pooling, normalize=model.normalize,
                  max_seq_length=model.max_seq_length, mlm_head=model.mlm_head,
                  special_ids=model.special_ids, lowercase=model.lowercase,
                  classifier=(SequenceClassifier(model.classifier, list(model.class_names),
                                                 model.classifier_pooling)
                              if model.classifier is not None else None))


def encoder_from_dir(path: str, *, dtype=None):
  """(a TransformerEncoder holding the directory's weights, in eval mode, unsharded; the HFModel).

  Call `.train()` on the encoder to fine-tune it (its dropout rates are the config.json's)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jembed.models.transformer import TransformerConfig, TransformerEncoder  # pylint: disable=import-outside-toplevel
  model = load_dir(path)
  fields = dict(model.encoder_config)
  if dtype is not None:
    fields["dtype"] = jnp.dtype(dtype)
  cfg = TransformerConfig(**fields)
  # Built abstractly (no random init of weights about to be replaced), then filled in.
  abstract = abstract_module(lambda rngs: TransformerEncoder(cfg, rngs=rngs))
  graphdef, params, rng, rest = nnx.split(abstract, nnx.Param, nnx.RngState, ...)
  nnx.replace_by_pure_dict(params, jax_tree(model.params))
  # The dropout streams get concrete keys (seed 0); a training loop reseeds them.
  rng = jax.tree.map(lambda s: jax.random.key(0) if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key)
                     else jnp.zeros(s.shape, s.dtype), rng)
  encoder = nnx.merge(graphdef, params, rng, rest)
  encoder.eval()
  return encoder, model


def jax_tree(tree: dict) -> dict:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return {k: jax_tree(v) if isinstance(v, dict) else jnp.asarray(v) for k, v in tree.items()}
