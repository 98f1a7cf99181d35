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
from jembed.tasks.vision import VisionTask, backbone_features, build_backbone, to_float


class SimclrModel(nnx.Module):
  """backbone -> pooled features -> `projection` (the MLP whose output NT-Xent compares)."""

  def __init__(self, model_config, image_shape, *, rngs: nnx.Rngs):
    self.backbone, dim = build_backbone(model_config, image_shape, rngs)
    p = model_config.get("projection", {})
    self.projection = ProjectionHead(dim, int(p.get("hidden", 0) or dim), int(p.get("dim", 128)),
                                     int(p.get("layers", 2)), rngs=rngs)

  def __call__(self, images, *, train: bool, rngs: nnx.Rngs | None = None):
    return self.projection(backbone_features(self.backbone, images, train))


class SimclrTask(VisionTask):
  pretext_name = "contrastive accuracy (partner is top-1 of 2B-1)"

  def build_model(self, rngs):
    return SimclrModel(self.config.model, self.image_shape, rngs=rngs)

  def loss(self, model, batch, rng, train):
    v1, v2 = augment.two_views(rng, to_float(batch["image"]), **self.augment_kwargs())
    b = v1.shape[0]
    # One backbone call for both views: BatchNorm statistics come from all 2B views together.
    z = model(jnp.concatenate([v1, v2], axis=0), train=train)
    loss, accuracy = nt_xent(z[:b], z[b:], float(self.config.temperature))
    return loss, {"loss": loss, "accuracy": accuracy}

  def augment_kwargs(self) -> dict:
    aug = self.config.get("augment", None)
    return dict(aug) if aug else {}
