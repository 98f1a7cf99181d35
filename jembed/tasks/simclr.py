"""SimCLR (Chen et al. 2020): contrastive learning between two augmented views of each image.

Both views go through the backbone and a projection head, are L2-normalised, and NT-Xent asks
each view to pick its partner out of the other 2B-1 views of the *global* batch at temperature T.
Inside the jitted step the batch is one global sharded array, so the (2B x 2B) similarity matrix
written with plain jnp spans every device: negatives come from the whole mesh, not one shard
(tests/test_vision_tasks.py checks 8 devices against 1).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jembed.data import augment
from jembed.losses import nt_xent
from jembed.models.heads import ProjectionHead
from jembed.tasks.vision import (VisionTask, backbone_features, build_backbone, preprocess_of,
                                 standardize, to_float)


class SimclrModel(nnx.Module):
  """backbone -> pooled features -> `projection` (the MLP whose output NT-Xent compares)."""

  def __init__(self, backbone: dict, image_shape, projection: dict, *, rngs: nnx.Rngs,
               preprocess=None):
    self.backbone, dim = build_backbone(backbone, image_shape, rngs)
    self.preprocess = preprocess  # mean / std the augmented [0, 1] views are standardised with
    self.projection = ProjectionHead(dim, int(projection["hidden"] or dim), int(projection["dim"]),
                                     int(projection["layers"]), rngs=rngs)

  def __call__(self, images):
    return self.projection(backbone_features(self.backbone, images))


class SimclrTask(VisionTask):
  pretext_name = "contrastive accuracy (partner is top-1 of 2B-1)"
  no_accumulation = ("NT-Xent's negatives are the other views of the batch, and a micro-batch would "
                     "have fewer of them; set grad_accum_steps=1 and fit the batch with more devices")

  def head_spec(self):
    return {"projection": self.config.model.projection.to_dict()}

  @classmethod
  def build_model(cls, spec, rngs):
    return SimclrModel(spec["backbone"], tuple(spec["image_shape"]), spec["projection"], rngs=rngs,
                       preprocess=preprocess_of(spec))

  def loss(self, model, batch, rng, train):
    v1, v2 = augment.two_views(rng, to_float(batch["image"]), **self.augment_kwargs())
    b = v1.shape[0]
    # One backbone call for both views: BatchNorm statistics come from all 2B views together.
    z = model(standardize(jnp.concatenate([v1, v2], axis=0), model.preprocess))
    loss, accuracy = nt_xent(z[:b], z[b:], float(self.config.temperature))
    return loss, {"loss": loss, "accuracy": accuracy}

  def augment_kwargs(self) -> dict:
    aug = self.config.augment
    return dict(aug) if aug else {}
