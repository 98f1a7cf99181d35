"""Supervised classification on top of a (pretrained) backbone: text or images, any tuning.

Text: a `TransformerEncoder` (attribute `encoder`, as in the MLM model) pooled by [CLS] or the mean
over tokens (`model.pooling`), then a fresh linear `head`. Images: the vision backbone (attribute
`backbone`, as in the vision pretraining models) and its pooled features, then `head`. The names line
up with the pretraining models, so `load_pretrained` copies `encoder/...` or `backbone/...` leaves of a
pretraining checkpoint and drops its heads.

Architecture from a pretraining run: with `init.checkpoint` set, the run's `config.json` gives the
model fields and its `tokenizer.json` the vocabulary. A field of `config.model` that is falsy (0, "",
False) means "as in the pretraining run" (or the built-in default without one); a set field overrides
it and must then match the checkpoint, or `load_pretrained` names the first mismatching parameter.
Dropout rates, dtype, remat and pooling are always this config's.

Tunings (`peft.method`): see jembed/peft/. The tuning says whether the backbone runs in inference mode
(a linear probe: BatchNorm keeps its pretrained statistics), what it adds to the model description
and which new parameters a warm start may lack.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jembed import checkpoint as ckpt_lib
from jembed import report as report_lib
from jembed import tree
from jembed.data import labeled_text
from jembed.data import text as text_lib
from jembed.errors import UserError
from jembed.models.heads import Classifier, pool
from jembed.peft import tuning_from_config
from jembed.tasks.base import Data, Task

# Fields whose falsy values are real choices for fine-tuning, never taken from the pretraining run.
_ALWAYS_OURS = ("dropout", "attention_dropout", "dtype", "remat", "pooling", "adapter_dim")


def _merge_arch(pretrained: dict, ours: dict) -> dict:
  """Pretraining model fields overlaid with this config's truthy ones (recursively); falsy fields
  with no pretraining value are dropped so model builders use their defaults."""
  out = dict(pretrained)
  for k, v in ours.items():
    if isinstance(v, dict):
      out[k] = _merge_arch(pretrained.get(k, {}) if isinstance(pretrained.get(k), dict) else {}, v)
    elif v or k in _ALWAYS_OURS:
      out[k] = v
  return out


def restore_backbone(target: dict, source: dict, prefix: str, *, what: str = "parameter",
                     allow_missing: str | None = None) -> dict:
  """`target` with every leaf under `prefix/` replaced by `source`'s (same path), placed with the
  target leaf's sharding. Leaves outside the prefix (new heads) keep their fresh values, and
  `source` leaves outside it (pretraining heads) are ignored. Missing, extra or differently shaped
  leaves under the prefix raise a UserError naming the first one; target leaves whose path matches
  the `allow_missing` regex (e.g. new adapters) may be absent from `source`."""
  import re
  want = {p: v for p, v in tree.flatten(target).items() if p.startswith(prefix + "/")}
  have = {p: leaf for p, leaf in tree.flatten(source).items() if p.startswith(prefix + "/")}
  if want and not have:
    raise UserError(f"the pretraining checkpoint has no {what}s under '{prefix}/' (it has "
                    f"{sorted({p.split('/')[0] for p in tree.flatten(source)})}); it is not a "
                    "checkpoint of this kind of backbone")
  restored = {}
  for path, leaf in want.items():
    if path not in have:
      if allow_missing and re.search(allow_missing, path):
        continue
      raise UserError(f"architecture mismatch: {what} '{path}' {tuple(leaf.shape)} does not exist in "
                      "the pretraining checkpoint; use the pretraining run's model settings")
    src = have[path]
    if tuple(np.shape(src)) != tuple(leaf.shape):
      raise UserError(f"architecture mismatch at {what} '{path}': the model has shape {tuple(leaf.shape)}, "
                      f"the pretraining checkpoint {tuple(np.shape(src))}; use the pretraining run's "
                      "model settings (leave config.model fields at 0/'' to take them from it)")
    value = np.asarray(jax.device_get(src)).astype(leaf.dtype)
    restored[path] = jax.device_put(value, leaf.sharding)
  extra = sorted(set(have) - set(want))
  if extra:
    raise UserError(f"architecture mismatch: the pretraining checkpoint has {what} '{extra[0]}' "
                    f"{tuple(np.shape(have[extra[0]]))}, which this model lacks; use the pretraining "
                    "run's model settings")
  return tree.replace(target, restored)


class TextClassifier(nnx.Module):

  def __init__(self, cfg, num_classes: int, pooling: str, *, rngs: nnx.Rngs):
    from jembed.models.transformer import TransformerEncoder
    self.encoder = TransformerEncoder(cfg, rngs=rngs)
    self.head = Classifier(cfg.hidden_size, num_classes, rngs=rngs)
    self.pooling = pooling

  def __call__(self, tokens, mask, *, train: bool, backbone_train: bool | None = None, rngs=None):
    hidden = self.encoder(tokens, mask, train=train if backbone_train is None else backbone_train,
                          rngs=rngs)
    return self.head(pool(hidden, mask, self.pooling))


class ImageClassifier(nnx.Module):

  def __init__(self, model_config, image_shape, num_classes: int, *, rngs: nnx.Rngs):
    from jembed.tasks import vision
    self.backbone, features = vision.build_backbone(model_config, image_shape, rngs)
    self.head = Classifier(features, num_classes, rngs=rngs)

  def __call__(self, images, *, train: bool, backbone_train: bool | None = None, rngs=None):
    from jembed.tasks import vision
    bt = train if backbone_train is None else backbone_train
    return self.head(vision.backbone_features(self.backbone, vision.to_float(images), bt))


class ClassificationTask(Task):

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    self.modality = config.data.get("modality", "text")
    if self.modality not in ("text", "image"):
      raise UserError(f"data.modality='{self.modality}' is unknown; use text or image")
    self.init_dir = str(config.get("init", {}).get("checkpoint", "") or "")
    self.prefix = "encoder" if self.modality == "text" else "backbone"
    self.unit = "examples" if self.modality == "text" else "images"
    self._tuning = tuning_from_config(config.get("peft"))
    self._predict = None

  # -- architecture, possibly from the pretraining run --
  def _pretrained_config(self) -> dict:
    if not self.init_dir:
      return {}
    path = os.path.join(self.init_dir, "config.json")
    if not os.path.isdir(self.init_dir):
      raise UserError(f"init.checkpoint '{self.init_dir}' does not exist; point it at the --workdir of "
                      "a pretraining run")
    if not os.path.exists(path):
      return {}  # a bare checkpoint directory: the architecture must be given in full
    with open(path) as f:
      return json.load(f)

  def model_config(self) -> ml_collections.ConfigDict:
    pre = self._pretrained_config().get("model", {})
    if not pre and self.modality == "image":
      from jembed.tasks import vision
      pre = vision.model_config().to_dict()  # from scratch: the image configs' defaults
    merged = _merge_arch(pre, self.config.model.to_dict())
    return ml_collections.ConfigDict(self._tuning.model_overrides(merged))

  # -- data --
  def _tokenizer_path(self) -> str | None:
    for path in (self.config.data.get("tokenizer", ""),
                 os.path.join(self.init_dir, "tokenizer.json") if self.init_dir else "",
                 os.path.join(self.workdir, "tokenizer.json")):
      if path and os.path.exists(path):
        return path
    if self.config.data.get("tokenizer", ""):
      raise UserError(f"data.tokenizer '{self.config.data.tokenizer}' does not exist; fix the path")
    return None

  def encode_texts(self, texts: list[str]) -> np.ndarray:
    """[CLS] tokens [SEP] [PAD]... rows of data.seq_len; longer texts are truncated."""
    seq_len = int(self.config.data.seq_len)
    tok = text_lib._raw_encoder(self.tokenizer)  # pylint: disable=protected-access
    out = np.full((len(texts), seq_len), self.ids["pad"], np.int32)
    for i, enc in enumerate(tok.encode_batch(list(texts), add_special_tokens=False)):
      body = enc.ids[:seq_len - 2]
      out[i, 0] = self.ids["cls"]
      out[i, 1:1 + len(body)] = body
      out[i, 1 + len(body)] = self.ids["sep"]
    return out

  def load_data(self) -> Data:
    if self.modality == "image":
      return self._load_images()
    d = self.config.data
    data = labeled_text.load_labeled_text(d)
    self.tokenizer = text_lib.build_tokenizer(data.train_texts, int(d.get("vocab_size", 8192)),
                                              path=self._tokenizer_path())
    self.ids = text_lib.special_ids(self.tokenizer)
    self.vocab = self.tokenizer.get_vocab_size()
    self.class_names = data.class_names
    arch = self.model_config()
    if int(d.seq_len) > int(arch.get("max_position", 512) or 512):
      raise UserError(f"data.seq_len={d.seq_len} is longer than the position table "
                      f"({arch.get('max_position')}); lower data.seq_len")
    train = {"tokens": self.encode_texts(data.train_texts), "label": data.train_labels}
    held = {"tokens": self.encode_texts(data.eval_texts), "label": data.eval_labels}
    self.eval_columns = held
    return Data(train=train, eval=held, info={
        "train_texts": len(data.train_texts), "eval_texts": len(data.eval_texts),
        "classes": len(self.class_names), "vocab_size": self.vocab})

  def _load_images(self) -> Data:
    from jembed.data import images as images_lib
    pre_data = self._pretrained_config().get("data", {})
    d = self.config.data.to_dict()
    for key in ("image_size", "channels"):  # the backbone saw images of this form in pretraining
      if not d.get(key) and pre_data.get(key):
        d[key] = pre_data[key]
    train, held = images_lib.load_image_splits(ml_collections.ConfigDict(d))
    if len(held) == 0:
      raise UserError("the eval split has no images; give data.eval or raise data.eval_fraction")
    self.image_shape = tuple(int(s) for s in train.images.shape[1:])
    self.class_names = list(train.class_names)
    held_cols = {"image": held.images, "label": held.labels}
    self.eval_columns = held_cols
    return Data(train={"image": train.images, "label": train.labels}, eval=held_cols, info={
        "train_images": len(train), "eval_images": len(held), "classes": len(self.class_names),
        "image_shape": "x".join(map(str, self.image_shape))})

  def save_artifacts(self) -> None:
    if self.modality == "text":
      path = os.path.join(self.workdir, "tokenizer.json")
      if not os.path.exists(path):
        self.tokenizer.save(path + ".tmp")
        os.replace(path + ".tmp", path)

  # -- model --
  def build_model(self, rngs):
    arch = self.model_config()
    n = len(self.class_names)
    if self.modality == "text":
      from jembed.models.transformer import TransformerConfig
      pooling = self.config.model.get("pooling", "cls")
      if pooling not in ("cls", "mean"):
        raise UserError(f"model.pooling='{pooling}' is unknown; use cls or mean")
      return TextClassifier(TransformerConfig.from_config(arch, self.vocab), n, pooling, rngs=rngs)
    return ImageClassifier(arch, self.image_shape, n, rngs=rngs)

  def tuning(self):
    return self._tuning

  def load_pretrained(self, params, model_state, mesh, rules):
    if not self.init_dir:
      return params, model_state
    step = int(self.config.get("init", {}).get("step", 0) or 0) or None
    state, step = ckpt_lib.restore_params_only(self.init_dir, step)
    source = state.get("params") or {}
    if state.get("frozen"):
      source = tree.merge(state["frozen"], source)
    params = restore_backbone(params, source, self.prefix, allow_missing=self._tuning.new_params)
    if any(p.startswith(self.prefix + "/") for p in tree.flatten(model_state)):
      model_state = restore_backbone(model_state, state.get("model_state") or {}, self.prefix,
                                     what="BatchNorm statistic")
    self.loaded_from = f"{self.init_dir} step {step}"
    return params, model_state

  # -- objective --
  def _logits(self, model, batch, rng, train):
    # A frozen backbone runs in inference mode: BatchNorm keeps its pretrained statistics.
    backbone_train = train and self._tuning.backbone_mode == "train"
    rngs = nnx.Rngs(dropout=rng) if rng is not None else None
    if self.modality == "text":
      tokens = batch["tokens"]
      return model(tokens, tokens != self.ids["pad"], train=train, backbone_train=backbone_train,
                   rngs=rngs)
    return model(batch["image"], train=train, backbone_train=backbone_train)

  def loss(self, model, batch, rng, train):
    logits = self._logits(model, batch, rng, train).astype(jnp.float32)
    labels = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"loss": loss, "accuracy": (logits.argmax(-1) == labels).mean()}

  # -- reporting --
  def predict(self, model, columns: dict[str, np.ndarray]) -> np.ndarray:
    """Predicted class of every example in `columns` (the last batch padded so one compile serves)."""
    graphdef, state = nnx.split(model)
    if self._predict is None:
      self._predict = jax.jit(lambda g, s, b: self._logits(nnx.merge(g, s), b, None, False).argmax(-1),
                              static_argnums=0)
    batch = int(self.config.batch_size)
    n = len(columns["label"])
    preds = []
    for lo in range(0, n, batch):
      chunk = {k: v[lo:lo + batch] for k, v in columns.items() if k != "label"}
      real = len(next(iter(chunk.values())))
      chunk = {k: np.concatenate([v, np.zeros((batch - real,) + v.shape[1:], v.dtype)])
               for k, v in chunk.items()}
      preds.append(np.asarray(jax.device_get(self._predict(graphdef, state, chunk)))[:real])
    return np.concatenate(preds)

  def final_summary(self, model, eval_metrics, logger) -> None:
    preds = self.predict(model, self.eval_columns)
    report = report_lib.classification_report(self.eval_columns["label"], preds, self.class_names)
    report["method"] = self._tuning.name
    if jax.process_index() == 0:
      report_lib.save_report(report, self.workdir)
    logger.info(f"classification report on the whole eval split ({len(preds)} examples, "
                f"peft.method={self._tuning.name}):\n{report_lib.format_report(report, digits=4)}"
                f"accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}; saved "
                f"{os.path.join(self.workdir, 'classification_report.json')} and confusion_matrix.png")

  def export(self, state, tuning) -> None:
    """LoRA runs: the adapter-only checkpoint (WORKDIR/lora_adapter) and the merged dense params
    (WORKDIR/merged), so the result can be used either way."""
    tuning.export(self.workdir, state)
