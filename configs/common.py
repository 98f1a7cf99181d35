"""Config sections shared by several configs/*.py files (import them as `configs.common`; the
`configs` package is installed with jembed, so this works from any directory).

The defaults have one home: jembed.config (SECTIONS: init, peft, frozen_eval; base_config: the
top-level fields) and jembed.modelspec.DEFAULT_BACKBONE; the sections here are built from them, and a
config that leaves a field out gets the same value from jembed.config.complete.
"""
import copy

import ml_collections

from jembed import config as config_lib
from jembed.modelspec import DEFAULT_BACKBONE


def peft_config(**overrides) -> ml_collections.ConfigDict:
  """`config.peft`: which parameters train (jembed/peft), with overrides; fields and defaults in
  jembed.config.SECTIONS["peft"]."""
  return config_lib.section("peft", **overrides)


def init_config(**overrides) -> ml_collections.ConfigDict:
  """`config.init`: where a run's weights start (jembed/init.py); empty = random init. Fields and
  defaults in jembed.config.SECTIONS["init"]."""
  return config_lib.section("init", **overrides)


def vision_model_config() -> ml_collections.ConfigDict:
  """`config.model` of the image configs: the backbone choice and both backbones' fields, with the
  library's defaults (jembed.tasks.vision.DEFAULT_BACKBONE, sized for 8x8 digits on a CPU)."""
  return ml_collections.ConfigDict(copy.deepcopy(DEFAULT_BACKBONE))


def vision_data_config(**overrides) -> ml_collections.ConfigDict:
  """`config.data`: the labelled image source. Folders, list files and TFDS are streamed from disk
  per host (jembed/data/image_stream.py); the embedded digits are read in memory (jembed/data/images.py)."""
  c = ml_collections.ConfigDict(dict(
      source="",                # "" = inferred: folder if data.train, tfds if data.tfds_name, else embedded digits
      train="",                 # folder with one sub-folder of images per class, or a .csv / .jsonl list of path,label
      eval="",                  # the same for held-out images; empty = a stratified eval_fraction of train
      eval_fraction=0.2,
      tfds_name="",
      tfds_split="train",
      tfds_eval_split="test",
      data_dir="",
      image_size=0,             # the NxN square the model sees; 0 = the warm-start model's, else the native size
      channels=0,               # 0 = native (or the pretraining run's); 1 or 3 converts
      on_bad_record="error",    # error | skip (counted and reported) for images that fail to decode
      workers=-1,               # streamed sources: decoding processes per host; -1 = min(8, CPUs - 1), 0 = in-process
      crop_scale=(0.08, 1.0),   # streamed training view: random-resized crop area fraction (min, max)
      flip=True,                # streamed training view: random horizontal flip
  ))
  c.update(overrides)
  return c


def frozen_eval_config() -> ml_collections.ConfigDict:
  """The linear probe / kNN evaluation of frozen backbone features (every eval_every steps); fields
  and defaults in jembed.config.SECTIONS["frozen_eval"]."""
  return config_lib.section("frozen_eval")
