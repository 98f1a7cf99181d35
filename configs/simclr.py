"""SimCLR contrastive pretraining of a small ResNet on the embedded digits (the default run).

  python -m jembed.main --config configs/simclr.py --workdir /tmp/simclr

Two augmented views of each image (made on device, reproducibly from the seed and step), a
projection head, and NT-Xent whose negatives are the whole global batch across the mesh. On a
2-core CPU the default finishes in a few minutes and ends by printing the held-out contrastive
accuracy and linear-probe / kNN digit accuracy of the frozen backbone, pretrained vs random init.
Another dataset, e.g. CIFAR-10 prepared with TFDS under a data_dir:

  python -m jembed.main --config configs/simclr.py --workdir /tmp/simclr \
      --config.data.tfds_name=cifar10 --config.data.data_dir=gs://my-bucket/tfds \
      --config.model.resnet.width=64 --config.model.resnet.num_stages=4 --config.batch_size=512

Evaluate a checkpoint on its own: python -m jembed.evaluate --workdir /tmp/simclr
"""
import ml_collections

from jembed.config import base_config
from configs.common import (frozen_eval_config, init_config, peft_config, vision_data_config,
                            vision_model_config)


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.task = "simclr"
  c.total_steps = 300
  c.batch_size = 128
  c.learning_rate = 2e-3
  c.warmup_steps = 40
  c.weight_decay = 1e-4
  c.log_every = 50
  c.eval_every = 300
  c.eval_batches = 0
  c.checkpoint_every = 300
  c.temperature = 0.2           # NT-Xent temperature
  c.model = vision_model_config()
  c.model.projection = ml_collections.ConfigDict(dict(
      layers=2,                 # 2 or 3 Dense layers (ReLU between)
      hidden=0,                 # 0 = the backbone's feature width
      dim=64,                   # output dimension compared by NT-Xent
  ))
  # Keyword arguments of jembed.data.augment.two_views. On 8x8 digits the paper's 0.08 minimum crop
  # leaves a pixel or two and horizontal flips turn digits into other glyphs, so milder crops and no
  # flips; colour jitter (brightness/contrast for one channel) as in the paper.
  c.augment = ml_collections.ConfigDict(dict(crop_scale=(0.4, 1.0), flip=False, color_jitter=0.4))
  c.data = vision_data_config()
  c.frozen_eval = frozen_eval_config()
  c.init = init_config()       # warm start (a jembed workdir, or init.pretrained: a pretrained image model)
  c.peft = peft_config()       # which parameters train: full | linear_probe | lora | adapter
  return c
