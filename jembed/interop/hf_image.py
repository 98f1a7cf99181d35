"""Write a jembed image classifier as a Hugging Face directory (no torch needed).

ResNet -> `ResNetForImageClassification`, ViT -> `ViTForImageClassification`: config.json with
`id2label` / `label2id`, `preprocessor_config.json` from the model's `preprocess` (ViTImageProcessor
for resize="squash", ConvNextImageProcessor's shortest_edge + crop_pct for resize="shorter"), and a
torch-layout `model.safetensors` (contiguous float32, metadata format=pt, mode 0644). The directory
is built beside the target and swapped in whole (fs.swap_dir), so nothing half-written is left.
"""
from __future__ import annotations

import json

import numpy as np

from jembed import fs, tree
from jembed.data import image_transforms
from jembed.errors import UserError
from jembed.interop import resnet as resnet_io
from jembed.interop import vit as vit_io
from jembed.models import resnet as resnet_model

_RESAMPLE_CODE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def preprocessor_config(pp: image_transforms.Preprocess) -> dict:
  common = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(pp.mean), "image_std": list(pp.std),
            "resample": _RESAMPLE_CODE[pp.interpolation]}
  if pp.resize == "squash":
    return {"image_processor_type": "ViTImageProcessor", "size": {"height": pp.size, "width": pp.size},
            **common}
  return {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": pp.size},
          "crop_pct": pp.crop_pct, **common}


def _labels(class_names) -> dict:
  return {"id2label": {str(i): n for i, n in enumerate(class_names)},
          "label2id": {n: i for i, n in enumerate(class_names)}}


def resnet_files(spec: dict, params: dict, model_state: dict) -> tuple[dict, dict]:
  cfg = dict(spec["backbone"]["resnet"])
  if cfg.get("stem") != "imagenet" or cfg.get("norm", "batch") != "batch":
    raise UserError(f"this ResNet has stem={cfg.get('stem')!r}, norm={cfg.get('norm')!r}; Hugging Face's "
                    "ResNet has the ImageNet stem and BatchNorm only (model.resnet.stem=imagenet, norm=batch)")
  kind, counts = resnet_model.DEPTHS[int(cfg["depth"])]
  stages = int(cfg["num_stages"])
  width = int(cfg["width"])
  expansion = 4 if kind == "bottleneck" else 1
  head = params["head"]["dense"]
  sd = resnet_io.from_jembed(tree.flatten(params["backbone"]), tree.flatten(model_state.get("backbone", {})),
                             cfg, (head["kernel"], head["bias"]))
  config = {"architectures": ["ResNetForImageClassification"], "model_type": "resnet",
            "num_channels": int(spec["image_shape"][-1]), "embedding_size": width,
            "hidden_sizes": [width * 2 ** s * expansion for s in range(stages)],
            "depths": list(counts[:stages]), "layer_type": kind, "hidden_act": "relu",
            "downsample_in_first_stage": False, "downsample_in_bottleneck": False,
            "dtype": "float32", **_labels(spec["class_names"])}
  return config, resnet_io.torchvision_to_hf(sd, with_head=True)


def vit_files(spec: dict, params: dict) -> tuple[dict, dict]:
  cfg = dict(spec["backbone"]["vit"])
  from jembed.models.vit import vit_config
  tc = vit_config(cfg)
  if not cfg.get("class_token", True) or cfg.get("pooling", "cls") != "cls" or cfg.get("fc_norm"):
    raise UserError("this ViT pools without a [CLS] token (pooling=mean / fc_norm); Hugging Face's "
                    "ViTForImageClassification classifies the final [CLS] state only")
  if tc.adapter_dim:
    raise UserError("this ViT has adapters; Hugging Face's ViT has none (merge or export a full fine-tune)")
  h, w, c = spec["image_shape"]
  if h != w:
    raise UserError(f"Hugging Face's ViT takes square images; this model takes {h}x{w}")
  head = params["head"]["dense"]
  sd = vit_io.from_jembed(tree.flatten(params["backbone"]), dict(cfg, hidden_size=tc.hidden_size,
                                                                 num_layers=tc.num_layers),
                          spec["image_shape"], (head["kernel"], head["bias"]))
  config = {"architectures": ["ViTForImageClassification"], "model_type": "vit",
            "hidden_size": tc.hidden_size, "num_hidden_layers": tc.num_layers,
            "num_attention_heads": tc.num_heads, "intermediate_size": tc.mlp_dim,
            "hidden_act": tc.hidden_act, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "layer_norm_eps": tc.layer_norm_eps,
            "image_size": int(h), "patch_size": int(cfg["patch_size"]), "num_channels": int(c),
            "qkv_bias": True, "encoder_stride": int(cfg["patch_size"]), "dtype": "float32",
            **_labels(spec["class_names"])}
  return config, vit_io.timm_to_hf(sd)


def save_dir(output: str, spec: dict, params: dict, model_state: dict) -> str:
  """Writes the Hugging Face directory for an image classifier's spec / params / BatchNorm stats."""
  from safetensors.numpy import save
  if spec.get("modality") != "image" or spec.get("task") != "classification":
    raise UserError(f"Hugging Face image export is for image classifiers; this model is a "
                    f"'{spec.get('task')}' model: fine-tune it with configs/finetune_image.py first")
  if not spec.get("class_names"):
    raise UserError("this image model has no classifier head; export a fine-tuned classifier")
  kind = spec["backbone"]["backbone"]
  if kind == "resnet":
    config, tensors = resnet_files(spec, params, model_state)
  elif kind == "vit":
    config, tensors = vit_files(spec, params)
  else:
    raise UserError(f"backbone '{kind}' has no Hugging Face export; resnet and vit do")
  pp = (image_transforms.Preprocess.from_dict(spec["preprocess"]) if spec.get("preprocess")
        else image_transforms.plain(int(spec["image_shape"][0]), int(spec["image_shape"][-1])))
  # np.array(order="C"), not ascontiguousarray, which turns a 0-d num_batches_tracked into 1-d.
  tensors = {k: np.array(v, order="C") for k, v in tensors.items()}
  blob = save(tensors, metadata={"format": "pt"})

  def build(tmp: str) -> None:
    fs.write_text(fs.join(tmp, "config.json"), json.dumps(config, indent=2) + "\n")
    fs.write_text(fs.join(tmp, "preprocessor_config.json"), json.dumps(preprocessor_config(pp), indent=2) + "\n")
    fs.write_bytes(fs.join(tmp, "model.safetensors"), blob)

  fs.swap_dir(output, build)
  return output
