"""Image classification: a vision backbone (ResNet or ViT, jembed/tasks/vision.py) and its pooled
features, then a fresh linear head. Data: folders, list files and TFDS are streamed from disk
(jembed/data/image_stream.py: memory holds file names, not pixels); the embedded digits are read in
memory (jembed/data/images.py)."""
from __future__ import annotations

import ml_collections
from flax import nnx

import numpy as np

from jembed.data import image_stream
from jembed.data import image_transforms
from jembed.data import images as images_lib
from jembed.errors import UserError
from jembed.models.heads import Classifier
from jembed.tasks import vision
from jembed.tasks.base import Data
from jembed.tasks.classification_base import ClassificationBase


class ImageClassifier(nnx.Module):
  """images -> logits. uint8 images are normalised on device as `preprocess` declares (None: /255);
  float images are taken as already normalised. With num_classes None (a pretrained source without
  a classifier head) there is no head and the model returns the pooled features."""

  def __init__(self, backbone: dict, image_shape, num_classes: int | None, *, rngs: nnx.Rngs,
               preprocess: dict | None = None):
    self.backbone, features = vision.build_backbone(backbone, image_shape, rngs)
    self.head = Classifier(features, num_classes, rngs=rngs) if num_classes is not None else None
    self.preprocess = image_transforms.Preprocess.from_dict(preprocess) if preprocess else None

  def features(self, images):
    return vision.backbone_features(self.backbone, vision.model_input(images, self.preprocess))

  def __call__(self, images):
    features = self.features(images)
    return features if self.head is None else self.head(features)


class ImageClassificationTask(ClassificationBase):
  unit = "images"
  backbone = "backbone"

  def load_data(self) -> Data:
    if image_stream.is_streamed(self.config.data):
      return self._stream_data()
    d = self.config.data.to_dict()
    if self.init is not None and self.init.spec.get("image_shape"):
      # The backbone saw images of this form in pretraining: resize / convert to it unless told.
      h, _, c = self.init.spec["image_shape"]
      d["image_size"] = d.get("image_size") or h
      d["channels"] = d.get("channels") or c
    train, held = images_lib.load_image_splits(ml_collections.ConfigDict(d))
    if len(held) == 0:
      raise UserError("the eval split has no images; give data.eval or raise data.eval_fraction")
    self.image_shape = tuple(int(s) for s in train.images.shape[1:])
    self.class_names = list(train.class_names)
    self.preprocess = None
    held_cols = {"image": held.images, "label": held.labels}
    self.eval_columns = held_cols
    return Data(train={"image": train.images, "label": train.labels}, eval=held_cols, info={
        "train_images": len(train), "eval_images": len(held), "classes": len(self.class_names),
        "image_shape": "x".join(map(str, self.image_shape))})

  def _stream_data(self) -> Data:
    """Train and eval splits streamed from disk, in the model's preprocessing
    (image_stream.model_preprocess: the warm-start source's, or data.image_size)."""
    spec = self.init.spec if self.init is not None else None
    train, held = image_stream.open_splits(self.config.data, spec)
    if len(held) == 0:
      raise UserError("the eval split has no images; give data.eval or raise data.eval_fraction")
    self.preprocess = train.pp
    self.image_shape = train.image_shape
    self.class_names = list(train.class_names)
    self.eval_columns = held
    return Data(train=train, eval=held, info={
        "train_images": len(train), "eval_images": len(held), "classes": len(self.class_names),
        "image_shape": "x".join(map(str, self.image_shape)), "workers": train.workers})

  def eval_predictions(self, model):
    if not isinstance(self.eval_columns, image_stream.ImageStream):
      return super().eval_predictions(model)
    # Streamed a batch at a time: memory holds the labels and predictions, never the split.
    labels, preds = [], []
    for batch in self.eval_columns.batches(int(self.config.batch_size)):
      labels.append(batch["label"])
      preds.append(self.predict(model, batch))
    return np.concatenate(labels), np.concatenate(preds)

  def model_spec(self):
    source = self.init.spec.get("backbone") if self.init is not None else None
    if self.init is not None and not source:
      raise UserError(f"init source {self.init.description} has no image backbone; warm-start an "
                      "image task from a rotation, SimCLR or image classification run")
    return dict(task="classification", modality="image",
                backbone=vision.resolve_backbone(self.config.model.to_dict(), source),
                image_shape=list(self.image_shape), class_names=list(self.class_names),
                preprocess=(self.preprocess.to_dict() if self.preprocess else
                            vision.spec_preprocess(self.image_shape,
                                                   self.init.spec if self.init else None)))

  @classmethod
  def build_model(cls, spec, rngs):
    # A spec without class_names is a headless pretrained backbone (jembed/interop).
    names = spec.get("class_names")
    return ImageClassifier(spec["backbone"], tuple(spec["image_shape"]),
                           None if names is None else len(names), rngs=rngs,
                           preprocess=spec.get("preprocess"))

  def logits(self, model, batch):
    return model(batch["image"])
