"""What the image tasks share: the backbone from config, image columns, and frozen-feature eval.

Models built here expose the backbone as the attribute `backbone` (heads as `head` /
`projection`), so a classifier can restore `backbone/...` parameters from a pretraining
checkpoint. Images travel as uint8 (N, H, W, C) and become float [0, 1] on device. The model
description (model.json) holds the backbone's description and the image shape.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jembed import modelspec, probe
from jembed.data import image_stream
from jembed.data import image_transforms
from jembed.data import images as images_lib
from jembed.errors import UserError
from jembed.models import resnet, vit
from jembed.tasks.base import Data, Task

BACKBONES = ("resnet", "vit")


DEFAULT_BACKBONE = modelspec.DEFAULT_BACKBONE  # the defaults of an image backbone's description
# Fields that change how the same weights run, never taken from a pretraining run.
_RUNTIME = ("dropout", "attention_dropout", "dtype", "remat", "adapter_dim", "zero_init_residual")


def resolve_backbone(model_config: dict, source: dict | None = None) -> dict:
  """The backbone description: the pretraining run's (`source`) or the defaults, overlaid with this
  config's non-empty fields (runtime fields such as dropout always come from this config)."""
  def overlay(base: dict, ours: dict) -> dict:
    out = dict(base)
    for k, v in ours.items():
      if isinstance(v, dict):
        out[k] = overlay(base.get(k) if isinstance(base.get(k), dict) else {}, v)
      elif v or k in _RUNTIME:
        out[k] = v
    return out
  return overlay(source or DEFAULT_BACKBONE, {k: v for k, v in model_config.items()
                                              if k in DEFAULT_BACKBONE})


def to_float(images: jax.Array) -> jax.Array:
  """uint8 images -> float32 in [0, 1] (floats pass through)."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def preprocess_of(spec: dict) -> image_transforms.Preprocess | None:
  """The model's declared preprocessing (model.json `preprocess`); None for runs older than it."""
  pp = spec.get("preprocess")
  return image_transforms.Preprocess.from_dict(pp) if pp else None


def spec_preprocess(image_shape, source_spec: dict | None = None) -> dict:
  """model.json's `preprocess` for a run on (H, W, C) images: the warm-start source's (its size set
  to this run's) or, from scratch, plain [0, 1] pixels."""
  size, channels = int(image_shape[0]), int(image_shape[-1])
  if source_spec and source_spec.get("preprocess"):
    pp = dict(source_spec["preprocess"], size=size)
    if int(pp.get("channels", 3)) != channels:
      raise UserError(f"the warm-start source takes {pp.get('channels', 3)}-channel images but the "
                      f"data has {channels}; set data.channels={pp.get('channels', 3)}")
    return image_transforms.Preprocess.from_dict(pp).to_dict()
  return image_transforms.plain(size, channels).to_dict()


def model_input(images: jax.Array, preprocess: image_transforms.Preprocess | None) -> jax.Array:
  """What a backbone takes: uint8 pixels normalised as the model declares ((x/255 - mean) / std;
  only /255 without a declaration); float input is taken as already normalised."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    return image_transforms.normalize(images, preprocess)
  return images.astype(jnp.float32)


def standardize(images01: jax.Array, preprocess: image_transforms.Preprocess | None) -> jax.Array:
  """Float images in [0, 1] (after on-device augmentation) -> (x - mean) / std."""
  if preprocess is None:
    return images01
  return image_transforms.normalize(images01, preprocess)


def build_backbone(backbone: dict, image_shape: tuple[int, int, int], rngs: nnx.Rngs
                   ) -> tuple[nnx.Module, int]:
  """The backbone a description (`resolve_backbone`) names for (H, W, C) images, and its feature
  width."""
  kind = backbone["backbone"]
  if kind == "resnet":
    module = resnet.resnet_from_config(backbone["resnet"], in_channels=image_shape[-1], rngs=rngs)
  elif kind == "vit":
    module = vit.vit_from_config(backbone["vit"], image_shape=tuple(image_shape), rngs=rngs)
  else:
    raise UserError(f"model.backbone='{kind}' is unknown; choose one of {', '.join(BACKBONES)}")
  return module, int(module.out_features)


def backbone_features(backbone: nnx.Module, images_float: jax.Array) -> jax.Array:
  """(B, H, W, C) float images -> (B, D) pooled float32 features."""
  return backbone(images_float).astype(jnp.float32)


class VisionTask(Task):
  """A self-supervised image task: labelled image data for frozen-feature evaluation, backbone
  from config. Subclasses implement `build_model` (with a `backbone` attribute) and `loss`."""

  unit = "images"
  backbone = "backbone"

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    self._features_fn = None
    self._random_metrics = None

  # -- data --
  def load_data(self) -> Data:
    if image_stream.is_streamed(self.config.data):
      return self._stream_data()
    train, held = images_lib.load_image_splits(self.config.data)
    if len(train) == 0:
      raise UserError("the training split has no images; check config.data")
    self.train_ds, self.eval_ds = train, held
    self.image_shape = tuple(int(s) for s in train.images.shape[1:])
    eval_cols = ({"image": held.images, "label": held.labels} if len(held) else None)
    info = {"train_images": len(train), "eval_images": len(held),
            "image_shape": "x".join(map(str, self.image_shape)), "classes": train.num_classes}
    return Data(train={"image": train.images, "label": train.labels}, eval=eval_cols, info=info)

  def _stream_data(self) -> Data:
    """Folders, lists and TFDS streamed from disk (jembed/data/image_stream.py). The probes of the
    frozen-feature evaluation read at most frozen_eval.max_train images of each split into memory
    (in the evaluation view), when they first run."""
    enabled = bool(self.config.frozen_eval.enabled)
    if enabled and not int(self.config.frozen_eval.max_train):
      raise UserError("frozen_eval.max_train=0 would read the whole streamed training split into memory "
                      "for the probes; set --config.frozen_eval.max_train=N (e.g. 10000) or "
                      "--config.frozen_eval.enabled=False")
    spec = self.init.spec if self.init is not None else None
    train, held = image_stream.open_splits(self.config.data, spec)
    self.train_stream, self.eval_stream = train, held
    self.train_ds = self.eval_ds = None  # read on first use by `_eval_split`
    self.image_shape = train.image_shape
    info = {"train_images": len(train), "eval_images": len(held),
            "image_shape": "x".join(map(str, self.image_shape)), "classes": len(train.class_names),
            "workers": train.workers}
    return Data(train=train, eval=held if len(held) else None, info=info)

  def _probe_data(self) -> None:
    """The capped in-memory probe splits of a streamed source (a random max_train of the training
    split, the first max_train held-out images)."""
    if self.train_ds is not None:
      return
    cap = int(self.config.frozen_eval.max_train)
    tr, ev = self.train_stream, self.eval_stream
    idx = np.arange(len(tr))
    if len(tr) > cap:
      idx = np.sort(np.random.default_rng(0).permutation(len(tr))[:cap])
    names = list(tr.class_names)
    self.train_ds = images_lib.ImageDataset(*tr.take(idx), names)
    self.eval_ds = images_lib.ImageDataset(*ev.take(np.arange(min(len(ev), cap))), names)

  def model_spec(self):
    source = self.init.spec.get("backbone") if self.init is not None else None
    stream = getattr(self, "train_stream", None)
    return dict(task=self.config.task, backbone=resolve_backbone(self.config.model.to_dict(), source),
                image_shape=list(self.image_shape),
                preprocess=(stream.pp.to_dict() if stream is not None else
                            spec_preprocess(self.image_shape, self.init.spec if self.init else None)),
                **self.head_spec())

  def head_spec(self) -> dict:
    """What the task's heads add to the model description."""
    return {}

  # -- frozen-feature evaluation (host side) --

  def _features(self, backbone: nnx.Module, images: np.ndarray) -> np.ndarray:
    backbone.eval()
    graphdef, state = nnx.split(backbone)
    if self._features_fn is None:
      # One compiled function for pretrained and random-init backbones (same graph, new weights).
      pp = preprocess_of(self.model_spec())
      self._features_fn = jax.jit(
          lambda g, s, x: backbone_features(nnx.merge(g, s), model_input(x, pp)), static_argnums=0)
    batch = int(self.config.frozen_eval.batch)
    return probe.extract_features(lambda x: self._features_fn(graphdef, state, x), images, batch)

  def _eval_split(self):
    """Labelled (train, test) images for the probes; the train side capped at max_train."""
    if getattr(self, "train_stream", None) is not None:
      self._probe_data()
    cap = int(self.config.frozen_eval.max_train)
    train, test = self.train_ds, self.eval_ds
    if len(test) == 0:
      raise UserError("frozen-feature evaluation needs held-out labelled images; raise "
                      "data.eval_fraction or give data.eval / data.tfds_eval_split")
    idx = np.arange(len(train))
    if cap and len(train) > cap:
      idx = np.sort(np.random.default_rng(0).permutation(len(train))[:cap])
    return (train.images[idx], train.labels[idx]), (test.images, test.labels)

  def frozen_eval_metrics(self, model: nnx.Module, *, with_random: bool = True) -> dict[str, float]:
    """Probe and kNN accuracy of the model's frozen backbone features, and of a random-init
    backbone of the same architecture (computed once and cached) as `random_*`."""
    (tr_x, tr_y), (te_x, te_y) = self._eval_split()
    kwargs = probe.eval_kwargs(self.config)
    kwargs["num_classes"] = self.train_ds.num_classes
    feats = (self._features(model.backbone, tr_x), self._features(model.backbone, te_x))
    out = probe.feature_metrics(feats[0], tr_y, feats[1], te_y, **kwargs)
    if with_random:
      if self._random_metrics is None:
        seed = int(self.config.seed) + 7919
        rand = self.build_model(self.model_spec(), nnx.Rngs(params=seed, dropout=seed)).backbone
        rfeats = (self._features(rand, tr_x), self._features(rand, te_x))
        rnd = probe.feature_metrics(rfeats[0], tr_y, rfeats[1], te_y, **kwargs)
        self._random_metrics = {f"random_{k}": v for k, v in rnd.items()}
      out.update(self._random_metrics)
    return out

  def extra_eval(self, model, step):
    if not bool(self.config.frozen_eval.enabled):
      return {}
    return self.frozen_eval_metrics(model)

  # Subclasses say what their pretext accuracy means.
  pretext_name = "pretext accuracy"

  def final_summary(self, model, eval_metrics, logger) -> None:
    metrics = dict(eval_metrics or {})
    if "probe_acc" not in metrics and bool(self.config.frozen_eval.enabled):
      metrics.update(self.frozen_eval_metrics(model))
    if "accuracy" in metrics:
      logger.info(f"held-out {self.pretext_name} {metrics['accuracy']:.4f} (loss {metrics['loss']:.4f})")
    if "probe_acc" in metrics:
      logger.info("frozen-embedding evaluation (linear probe and weighted kNN on backbone features):\n"
                  + probe.format_table(metrics))
