"""Image classification fine-tuning: a vision backbone (from a rotation / SimCLR run, or a pretrained
torchvision / timm / Hugging Face / big_vision model) plus a classifier head.

  python -m jembed.main --config configs/rotation.py --workdir /tmp/rot
  python -m jembed.main --config configs/finetune_image.py --workdir /tmp/ft_img \
      --config.init.checkpoint=/tmp/rot --config.peft.method=full
  python -m jembed.main --config configs/finetune_image.py --workdir /tmp/ft_r18 \
      --config.init.pretrained=resnet18.pth --config.data.train=DIR --config.data.eval=DIR

With init.pretrained the architecture, the preprocessing (model.json `preprocess`) and, when the data
has as many classes, the source's classifier head come from the source (jembed/interop); images
are resized to the source's input size unless data.image_size says otherwise.

With no data given it fine-tunes on the embedded scikit-learn 8x8 digits (10 classes, a fixed
stratified 20% held out), so it runs anywhere without a download. Your own images:
--config.data.train=DIR --config.data.eval=DIR (one sub-folder per class), or a TFDS dataset
prepared under data.data_dir (--config.data.tfds_name=cifar10). At the end it prints a
classification report and writes WORKDIR/classification_report.json and WORKDIR/confusion_matrix.png.

peft.method: full | linear_probe (backbone frozen, BatchNorm in inference mode) | lora (conv and dense
kernels, with BatchNorm scale/bias and the head trained in full) | adapter (ViT backbones only).
With init.checkpoint / init.pretrained, the backbone architecture comes from that source: leave the model fields at
0/"" to take them from it; a field you set must match the checkpoint.
"""
import ml_collections

from jembed.config import base_config
from configs.common import init_config, peft_config, vision_data_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.task = "classification"
  c.total_steps = 400
  c.batch_size = 64
  c.learning_rate = 2e-3
  c.warmup_steps = 40
  c.weight_decay = 1e-4
  c.log_every = 50
  c.eval_every = 200
  c.eval_batches = 0
  c.checkpoint_every = 400

  c.init = init_config()
  c.peft = peft_config(targets="all_dense_and_conv",
                       trainable=r"^head/|norm[^/]*/(scale|bias)$")

  # 0 / "" / False = as in the pretraining run (or the rotation config's defaults from scratch).
  c.model = ml_collections.ConfigDict(dict(
      backbone="",              # resnet | vit
      resnet=ml_collections.ConfigDict(dict(
          depth=0, width=0, stem="", norm="", num_stages=0, zero_init_residual=False)),
      vit=ml_collections.ConfigDict(dict(
          size="", patch_size=0, hidden_size=0, num_layers=0, num_heads=0, mlp_dim=0,
          dropout=0.0, attention_dropout=0.0, dtype="auto", remat="none")),
  ))

  c.data = vision_data_config(modality="image")
  return c
