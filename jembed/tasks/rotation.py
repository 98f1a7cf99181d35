"""Rotation prediction (RotNet, Gidaris et al. 2018).

Every image of the batch is shown at 0, 90, 180 and 270 degrees (rotated on device), and a 4-way
linear head on the pooled backbone features predicts which: to tell the angle the backbone has to
recognise what is in the image. Metrics: cross-entropy and accuracy over the 4B rotated images.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

from jembed.data import augment
from jembed.errors import UserError
from jembed.models.heads import Classifier
from jembed.tasks.vision import (VisionTask, backbone_features, build_backbone, preprocess_of,
                                 standardize, to_float)

NUM_ROTATIONS = 4


class RotationModel(nnx.Module):
  """backbone -> pooled features -> `head` (4 logits)."""

  def __init__(self, backbone: dict, image_shape, *, rngs: nnx.Rngs, preprocess=None):
    self.backbone, dim = build_backbone(backbone, image_shape, rngs)
    self.preprocess = preprocess  # mean / std the rotated [0, 1] images are standardised with
    self.head = Classifier(dim, NUM_ROTATIONS, rngs=rngs)

  def __call__(self, images):
    return self.head(backbone_features(self.backbone, images))


class RotationTask(VisionTask):
  pretext_name = "rotation accuracy (4-way)"

  @classmethod
  def build_model(cls, spec, rngs):
    return RotationModel(spec["backbone"], tuple(spec["image_shape"]), rngs=rngs,
                         preprocess=preprocess_of(spec))

  def items_per_example(self) -> int:
    return 1  # throughput counts source images; each is seen 4 times

  def prepare(self, batch, rng, train):
    aug = self.config.augment
    if not (aug and train):
      return batch
    # Crops make the angle harder to read off low-level cues, so the backbone learns more shape.
    return dict(batch, image=augment.simclr_augment(rng, to_float(batch["image"]), **dict(aug)))

  def loss(self, model, batch, rng, train):
    images, labels = augment.rotate_batch(to_float(batch["image"]))
    logits = model(standardize(images, model.preprocess)).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (logits.argmax(-1) == labels).mean()
    return loss, {"loss": loss, "accuracy": accuracy}

  def load_data(self):
    data = super().load_data()
    h, w, _ = self.image_shape
    if h != w:
      raise UserError(f"rotation prediction needs square images, got {h}x{w}; set data.image_size=N "
                      "to resize them to NxN")
    return data
