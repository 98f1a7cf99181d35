"""Config sections shared by the files in configs/ (import them from here, not from the library)."""
import copy

import ml_collections

from jembed.tasks.vision import DEFAULT_BACKBONE


def vision_model_config() -> ml_collections.ConfigDict:
  """`config.model` of the image configs: the backbone choice and both backbones' fields, with the
  library's defaults (jembed.tasks.vision.DEFAULT_BACKBONE, sized for 8x8 digits on a CPU)."""
  return ml_collections.ConfigDict(copy.deepcopy(DEFAULT_BACKBONE))


def vision_data_config(**overrides) -> ml_collections.ConfigDict:
  """`config.data`: the labelled image source (jembed/data/images.py)."""
  c = ml_collections.ConfigDict(dict(
      source="",                # "" = inferred: folder if data.train, tfds if data.tfds_name, else embedded digits
      train="",                 # folder with one sub-folder of images per class
      eval="",                  # the same for held-out images; empty = a stratified eval_fraction of train
      eval_fraction=0.2,
      tfds_name="",
      tfds_split="train",
      tfds_eval_split="test",
      data_dir="",
      image_size=0,             # 0 = native size (or the pretraining run's); N resizes to NxN
      channels=0,               # 0 = native (or the pretraining run's); 1 or 3 converts
  ))
  c.update(overrides)
  return c


def frozen_eval_config() -> ml_collections.ConfigDict:
  """The linear probe / kNN evaluation of frozen backbone features (every eval_every steps)."""
  return ml_collections.ConfigDict(dict(
      enabled=True,
      probe_steps=300,          # full-batch Adam steps of the logistic regression
      probe_lr=0.05,
      probe_l2=1e-4,
      knn_k=20,
      knn_temperature=0.07,
      n_per_class=10,           # the low-label variant; 0 turns it off
      max_train=10000,          # labelled training images used (0 = all)
      batch=256,                # feature-extraction batch
  ))
