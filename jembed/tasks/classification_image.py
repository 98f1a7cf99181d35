"""Image classification: a vision backbone (ResNet or ViT, jembed/tasks/vision.py) and its pooled
features, then a fresh linear head. Data: jembed/data/images.py."""
from __future__ import annotations

import ml_collections
from flax import nnx

from jembed.data import images as images_lib
from jembed.errors import UserError
from jembed.models.heads import Classifier
from jembed.tasks import vision
from jembed.tasks.base import Data
from jembed.tasks.classification import ClassificationTask


class ImageClassifier(nnx.Module):

  def __init__(self, backbone: dict, image_shape, num_classes: int, *, rngs: nnx.Rngs):
    self.backbone, features = vision.build_backbone(backbone, image_shape, rngs)
    self.head = Classifier(features, num_classes, rngs=rngs)

  def __call__(self, images):
    return self.head(vision.backbone_features(self.backbone, vision.to_float(images)))


class ImageClassificationTask(ClassificationTask):
  unit = "images"
  backbone = "backbone"

  def load_data(self) -> Data:
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
    held_cols = {"image": held.images, "label": held.labels}
    self.eval_columns = held_cols
    return Data(train={"image": train.images, "label": train.labels}, eval=held_cols, info={
        "train_images": len(train), "eval_images": len(held), "classes": len(self.class_names),
        "image_shape": "x".join(map(str, self.image_shape))})

  def model_spec(self):
    source = self.init.spec.get("backbone") if self.init is not None else None
    if self.init is not None and not source:
      raise UserError(f"init source {self.init.description} has no image backbone; warm-start an "
                      "image task from a rotation, SimCLR or image classification run")
    return dict(task="classification", modality="image",
                backbone=vision.resolve_backbone(self.config.model.to_dict(), source),
                image_shape=list(self.image_shape), class_names=list(self.class_names))

  @classmethod
  def build_model(cls, spec, rngs):
    return ImageClassifier(spec["backbone"], tuple(spec["image_shape"]), len(spec["class_names"]),
                           rngs=rngs)

  def logits(self, model, batch):
    return model(batch["image"])
