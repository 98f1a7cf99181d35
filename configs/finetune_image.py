"""Image classification fine-tuning: a vision backbone (from a pretrained torchvision / timm /
Hugging Face / big_vision model, or a jembed rotation / SimCLR run) plus a classifier head.

  # from pretrained weights (torchvision / timm / Hugging Face ResNet or ViT, big_vision .npz):
  python -m jembed.main --config configs/finetune_image.py --workdir /tmp/ft_img \
      --config.init.pretrained=path/to/resnet18.pth --config.data.train=DIR
  # from a jembed self-supervised run:
  python -m jembed.main --config configs/rotation.py --workdir /tmp/rot
  python -m jembed.main --config configs/finetune_image.py --workdir /tmp/ft_img \
      --config.init.checkpoint=/tmp/rot --config.peft.method=full

With init.pretrained the architecture, the preprocessing (model.json `preprocess`) and, when the data
has as many classes, the source's classifier head come from the source (jembed/interop); images
are resized to the source's input size unless data.image_size says otherwise.

Where the weights start (config.init): `init.pretrained` a weights file or directory of another
library (format detected; its preprocessing comes along), or `init.checkpoint` a jembed --workdir (a
rotation, SimCLR or image classification run); neither = the backbone from scratch.

Defaults follow the source (jembed/transfer.py), and a value you set is always kept:
  learning_rate = 0 (auto): from a source, full fine-tuning at 1e-4 (AdamW, as timm fine-tunes
    ResNet / ViT), LoRA, adapters and linear probes at 1e-3; from scratch 2e-3. The chosen rate is
    printed and saved in WORKDIR/config.json.

With no data given it fine-tunes on the embedded scikit-learn 8x8 digits (10 classes, a fixed
stratified 20% held out), so it runs anywhere without a download. Your own images:
--config.data.train=DIR --config.data.eval=DIR (one sub-folder per class), or a TFDS dataset
prepared under data.data_dir (--config.data.tfds_name=cifar10). At the end it prints a
classification report and writes WORKDIR/classification_report.json and WORKDIR/confusion_matrix.png.
Then `jembed.load(WORKDIR).predict(images)` (uint8 images of any size, or paths) or
`python -m jembed.predict --model WORKDIR --input FOLDER --output preds.jsonl`.

peft.method: full | linear_probe (backbone frozen, BatchNorm in inference mode) | lora (conv and dense
kernels, with BatchNorm scale/bias and the head trained in full) | adapter (ViT backbones only).
With a source, the backbone architecture comes from it: leave the model fields at 0/"" to take them
from it; a field you set must match the source.
"""
import ml_collections

from jembed.config import base_config
from configs.common import init_config, peft_config, vision_data_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.task = "classification"
  c.total_steps = 400
  c.batch_size = 64
  c.learning_rate = 0.0         # 0 = auto: from the source and peft.method (see above)
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
