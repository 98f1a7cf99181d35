"""Rotation-prediction (RotNet) pretraining of a small ResNet on the embedded digits (the default run).

  python -m jembed.main --config configs/rotation.py --workdir /tmp/rot

The embedded data are scikit-learn's 8x8 handwritten digits, so this runs anywhere without a
download; on a 2-core CPU it finishes in a few minutes and ends by printing the held-out rotation
accuracy and a table of linear-probe / kNN digit accuracy on the frozen backbone features, for the
pretrained backbone and a random-init one of the same architecture. The same numbers later:

  python -m jembed.evaluate --workdir /tmp/rot

Bigger runs override fields, e.g. a ViT-S on a TFDS dataset prepared under data_dir:

  python -m jembed.main --config configs/rotation.py --workdir /tmp/rot_c10 \
      --config.data.tfds_name=cifar10 --config.data.data_dir=/data/tfds \
      --config.model.backbone=vit --config.model.vit.size=S --config.model.vit.patch_size=4
"""
import ml_collections

from jembed.config import base_config
from configs.common import (frozen_eval_config, init_config, peft_config, vision_data_config,
                            vision_model_config)


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.task = "rotation"
  c.total_steps = 200
  c.batch_size = 64
  c.learning_rate = 2e-3
  c.warmup_steps = 40
  c.weight_decay = 1e-4
  c.log_every = 50
  c.eval_every = 200
  c.eval_batches = 0            # the whole held-out split
  c.checkpoint_every = 200
  # Random-resized crops before rotating (keyword arguments of jembed.data.augment.simclr_augment);
  # an empty dict turns them off. Without them the angle of a digit is read off trivially and the
  # features specialise to the pretext task.
  c.augment = ml_collections.ConfigDict(dict(crop_scale=(0.3, 1.0), flip=False, color_jitter=0.0))
  c.model = vision_model_config()
  c.data = vision_data_config()
  c.frozen_eval = frozen_eval_config()
  c.init = init_config()       # warm start (a jembed workdir, or init.pretrained: a pretrained image model)
  c.peft = peft_config()       # which parameters train: full | linear_probe | lora | adapter
  return c
