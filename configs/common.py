"""Config sections shared by several configs/*.py files (import them as `configs.common`; the
`configs` package is installed with jembed, so this works from any directory).

The library's defaults equal these (jembed.peft.LoraConfig, AdapterTuning and
jembed.tasks.vision.DEFAULT_BACKBONE; tests check that they agree), so a config section that leaves a
field out means the same thing.
"""
import copy

import ml_collections

from jembed.tasks.vision import DEFAULT_BACKBONE


def peft_config(**overrides) -> ml_collections.ConfigDict:
  """`config.peft`: which parameters train (jembed/peft), with overrides."""
  c = ml_collections.ConfigDict(dict(
      method="full",            # full | linear_probe | lora | adapter
      rank=8,                   # LoRA
      alpha=16.0,
      rslora=False,             # scale alpha/sqrt(rank) instead of alpha/rank
      dropout=0.0,              # on the LoRA input features (rows of A)
      targets="attention_qv",   # a preset (attention_qv | attention | all_dense | all_dense_and_conv) or a regex over parameter paths
      exclude=r"^head/",        # regex of kernels never LoRA-adapted
      trainable=r"^head/",      # regex of extra leaves trained in full next to LoRA (head, biases, norms)
      adapter_dim=64,           # bottleneck width of the Houlsby adapters
  ))
  c.update(overrides)
  return c


def init_config(**overrides) -> ml_collections.ConfigDict:
  """`config.init`: where a run's weights start (jembed/init.py); empty = random init."""
  c = ml_collections.ConfigDict(dict(
      checkpoint="",            # a jembed --workdir (its latest checkpoint, or `step`)
      step=0,                   # 0 = the latest
      hf="",                    # or a Hugging Face / sentence-transformers directory (text models)
      pretrained="",            # or a pretrained image model (image tasks): a torchvision/timm .pth or
                                # .safetensors, a HF/timm ResNet or ViT directory, a big_vision .npz;
                                # architecture, preprocessing and (same class count) head come from it
  ))
  c.update(overrides)
  return c


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
