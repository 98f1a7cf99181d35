"""Pretrained image models in and out, without torch: `open_image_model(path)`.

    from jembed.interop import open_image_model
    m = open_image_model("resnet18.pth")     # or a HF / timm directory, a .safetensors, a .npz
    m.spec        # a model.json description: jembed.modelspec.build(m.spec, rngs) builds it
    m.params      # the task model's parameters (pure dict: backbone/..., head/dense/...)
    m.model_state # BatchNorm statistics (backbone/...), empty for a ViT

Sources (format detected):
  * a torchvision / timm state dict, `.pth` / `.pt` / `.bin` (read by jembed.interop.torchzip, which
    never executes pickled code) or `.safetensors`;
  * a Hugging Face `ResNetModel` / `ResNetForImageClassification` / `ViTModel` /
    `ViTForImageClassification` directory (config.json, model.safetensors or pytorch_model.bin,
    preprocessor_config.json);
  * a timm directory (config.json with `architecture` / `pretrained_cfg`, model.safetensors or
    pytorch_model.bin);
  * a big_vision / AugReg ViT `.npz`.

The spec is what an image classifier's model.json holds: task "classification", modality "image",
`backbone` (as jembed.tasks.vision.resolve_backbone gives it), `image_shape` [H, W, C],
`class_names` (HF id2label, timm label_names, else "0".."N-1") and `preprocess`
(Preprocess.to_dict(): HF preprocessor_config.json, timm pretrained_cfg, or torchvision's ImageNet
recipe for a bare ResNet state dict). A source WITHOUT a classifier head (ResNetModel, ViTModel,
timm num_classes=0) has no `class_names` key: the model it builds has no head and returns the
pooled features (what `embed` needs; `predict` refuses it), and `head` is False.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from flax import nnx

from jembed import fs, modelspec, tree
from jembed.data import image_transforms
from jembed.errors import UserError
from jembed.interop import resnet as resnet_io
from jembed.interop import vit as vit_io
from jembed.interop.resnet import SUPPORTED

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# PIL resample codes as Hugging Face image processors store them.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclasses.dataclass
class ImportedImageModel:
  spec: dict[str, Any]          # model.json description (see the module docstring)
  params: dict                  # pure dict of the task model's nnx.Param leaves
  model_state: dict             # pure dict of its BatchNorm statistics ({} for a ViT)
  format: str                   # torchvision | timm | hf | big_vision
  path: str

  @property
  def head(self) -> bool:
    return "class_names" in self.spec

  @property
  def description(self) -> str:
    return f"{self.path} ({self.format} {self.spec['backbone']['backbone']})"

  def build(self):
    """The task model (jembed.tasks.classification_image.ImageClassifier) with these weights, in
    eval mode."""
    abstract = nnx.eval_shape(lambda: modelspec.build(self.spec, nnx.Rngs(params=0, dropout=0)))
    graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
    model = nnx.merge(graphdef, modelspec.fill_like(abs_params, self.params),
                      modelspec.fill_like(rest, self.model_state))
    model.eval()
    return model


def is_image_source(path: str) -> bool:
  """Whether `path` looks like a pretrained image model this module reads (cheap: names only)."""
  path = str(path)
  if os.path.isfile(path):
    return path.lower().endswith(WEIGHT_SUFFIXES)
  cfg = _read_json(os.path.join(path, "config.json")) if os.path.isdir(path) else None
  return bool(cfg) and (cfg.get("model_type") in ("resnet", "vit") or "architecture" in cfg
                        or "pretrained_cfg" in cfg)


def open_image_model(path: str) -> ImportedImageModel:
  """Reads a pretrained ResNet or ViT (see the module docstring); UserError (one line) otherwise."""
  path = os.path.expanduser(str(path))
  if not os.path.exists(path):
    raise UserError(f"pretrained image model '{path}' does not exist; give a .pth/.safetensors/.npz "
                    "file or a Hugging Face / timm model directory")
  hf_cfg, timm_cfg, pre_cfg = None, None, None
  if os.path.isdir(path):
    cfg = _read_json(os.path.join(path, "config.json")) or {}
    if cfg.get("model_type"):
      if cfg["model_type"] not in ("resnet", "vit"):
        raise UserError(f"{path} is a Hugging Face '{cfg['model_type']}' model; {SUPPORTED}")
      hf_cfg = cfg
      pre_cfg = _read_json(os.path.join(path, "preprocessor_config.json"))
    elif "architecture" in cfg or "pretrained_cfg" in cfg:
      timm_cfg = cfg
    weights = next((os.path.join(path, f) for f in _WEIGHT_FILES if os.path.isfile(os.path.join(path, f))), None)
    if weights is None:
      raise UserError(f"{path} has no model.safetensors or pytorch_model.bin; copy the weights into it")
  else:
    weights = path
  sd = read_weights(weights)
  fmt = "hf" if hf_cfg else "timm" if timm_cfg else "torchvision"
  heads = 0
  if weights.lower().endswith(".npz"):
    sd, heads = vit_io.npz_to_timm(sd, weights)
    fmt = "big_vision"
  if hf_cfg or any(k.startswith(("resnet.", "vit.", "embedder.", "embeddings.", "encoder.")) for k in sd):
    fmt = "hf"
    sd = resnet_io.hf_to_torchvision(sd) if hf_cfg and hf_cfg["model_type"] == "resnet" or \
        any(k.startswith(("resnet.", "embedder.")) for k in sd) else vit_io.hf_to_timm(sd)[0]
  if resnet_io.is_resnet(sd):
    return _resnet(sd, path, fmt, hf_cfg, timm_cfg, pre_cfg)
  if vit_io.is_vit(sd):
    return _vit(sd, path, fmt, hf_cfg, timm_cfg, pre_cfg, heads)
  raise UserError(f"{weights}: keys such as '{_example_key(sd)}' match no supported layout; {SUPPORTED}")


def _example_key(sd: dict) -> str:
  return sorted(sd)[0] if sd else "(none)"


def read_weights(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a .pth/.pt/.bin (torch zip), .safetensors or .npz file."""
  low = path.lower()
  if low.endswith(".safetensors"):
    from safetensors.numpy import load
    try:
      return dict(load(fs.read_bytes(path)))
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).splitlines() or [type(e).__name__])[0][:100]
      raise UserError(f"cannot read {path} ({first}); the file is truncated or not safetensors") from None
  if low.endswith(".npz"):
    import io
    import zipfile
    try:
      with np.load(io.BytesIO(fs.read_bytes(path)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
      raise UserError(f"cannot read {path} ({type(e).__name__}); the file is truncated or not a "
                      ".npz of arrays") from None
  if low.endswith(WEIGHT_SUFFIXES):
    from jembed.interop import torchzip
    return torchzip.load(path)
  raise UserError(f"'{path}' is not a weights file jembed reads; give one ending in "
                  f"{', '.join(WEIGHT_SUFFIXES)} or a model directory")


def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  try:
    return json.loads(fs.read_text(path))
  except ValueError as e:
    raise UserError(f"{path} is not valid JSON ({e}); restore the file") from None


# ----------------------------------------------------------------------------- preprocessing


def preprocess_from_hf(pre: dict, default_size: int, channels: int) -> image_transforms.Preprocess:
  """Hugging Face preprocessor_config.json -> Preprocess: ViTImageProcessor squashes to
  size {height, width}; ConvNextImageProcessor (microsoft/resnet-*) resizes the shorter side to
  shortest_edge / crop_pct and center-crops shortest_edge."""
  size = pre.get("size", default_size)
  mean = pre.get("image_mean", image_transforms.IMAGENET_MEAN)
  std = pre.get("image_std", image_transforms.IMAGENET_STD)
  if not pre.get("do_normalize", True):
    mean, std = (0.0,) * channels, (1.0,) * channels
  interp = _RESAMPLE.get(int(pre.get("resample", 2)), "bilinear")
  if isinstance(size, dict) and "shortest_edge" in size:
    edge = int(size["shortest_edge"])
    # ConvNextImageProcessor crops only below 384 px; from there it resizes straight to edge x edge.
    mode, crop = ("shorter", float(pre.get("crop_pct") or 1.0)) if edge < 384 else ("squash", 1.0)
    return image_transforms.Preprocess(size=edge, crop_pct=crop, resize=mode, interpolation=interp,
                                       mean=mean, std=std, channels=channels)
  side = int(size.get("height", default_size)) if isinstance(size, dict) else int(size)
  return image_transforms.Preprocess(size=side, crop_pct=1.0, resize="squash", interpolation=interp,
                                     mean=mean, std=std, channels=channels)


def preprocess_from_timm(pcfg: dict, default: image_transforms.Preprocess) -> image_transforms.Preprocess:
  size = pcfg.get("input_size") or [default.channels, default.size, default.size]
  interp = pcfg.get("interpolation", default.interpolation)
  squash = pcfg.get("crop_mode") == "squash"  # timm's squash: straight to size x size
  return image_transforms.Preprocess(
      size=int(size[-1]), crop_pct=1.0 if squash else float(pcfg.get("crop_pct", default.crop_pct)),
      resize="squash" if squash else "shorter",
      interpolation=interp if interp in image_transforms.INTERPOLATIONS else "bicubic",
      mean=pcfg.get("mean", default.mean), std=pcfg.get("std", default.std), channels=int(size[0]))


def _class_names(n: int, hf_cfg, timm_cfg) -> list[str]:
  if hf_cfg and hf_cfg.get("id2label"):
    labels = {int(k): str(v) for k, v in hf_cfg["id2label"].items()}
    if len(labels) == n and not all(v == f"LABEL_{k}" for k, v in labels.items()):
      return [labels[i] for i in range(n)]
  names = (timm_cfg or {}).get("label_names") or ((timm_cfg or {}).get("pretrained_cfg") or {}).get("label_names")
  if isinstance(names, dict):
    names = [names.get(str(i), names.get(i, str(i))) for i in range(n)]
  if names and len(names) == n:
    return [str(x) for x in names]
  return [str(i) for i in range(n)]


# ----------------------------------------------------------------------------- assembling


def _assemble(kind: str, cfg: dict, image_shape, backbone: dict, stats: dict, head, pp,
              path: str, fmt: str, hf_cfg, timm_cfg) -> ImportedImageModel:
  description = {k: (dict(v) if isinstance(v, dict) else v) for k, v in modelspec.DEFAULT_BACKBONE.items()}
  description["backbone"] = kind
  description[kind] = cfg
  spec = {"task": "classification", "modality": "image", "backbone": description,
          "image_shape": [int(s) for s in image_shape], "preprocess": pp.to_dict()}
  params = {"backbone": tree.unflatten(backbone)}
  if head is not None:
    spec["class_names"] = _class_names(int(head[1].shape[0]), hf_cfg, timm_cfg)
    params["head"] = {"dense": {"kernel": np.ascontiguousarray(head[0]), "bias": head[1]}}
  model_state = {"backbone": tree.unflatten(stats)} if stats else {}
  model = ImportedImageModel(spec, params, model_state, fmt, path)
  _check_shapes(model)
  return model


def _check_shapes(m: ImportedImageModel) -> None:
  """Every leaf of the model the spec describes is present with its shape (and nothing else)."""
  abstract = nnx.eval_shape(lambda: modelspec.build(m.spec, nnx.Rngs(params=0, dropout=0)))
  for what, cls, have in (("parameter", nnx.Param, m.params), ("statistic", nnx.BatchStat, m.model_state)):
    want = tree.flatten(nnx.to_pure_dict(nnx.state(abstract, cls)))
    got = tree.flatten(have)
    for k, leaf in want.items():
      if k not in got:
        raise UserError(f"{m.path} lacks the {what} for '{k}'; {SUPPORTED}")
      if tuple(got[k].shape) != tuple(leaf.shape):
        raise UserError(f"{m.path}: '{k}' has shape {tuple(got[k].shape)}, the inferred architecture "
                        f"needs {tuple(leaf.shape)}; {SUPPORTED}")
    extra = [k for k in got if k not in want]
    if extra:
      raise UserError(f"{m.path} has '{extra[0]}' that the inferred architecture lacks; {SUPPORTED}")


def _resnet(sd, path, fmt, hf_cfg, timm_cfg, pre_cfg) -> ImportedImageModel:
  if hf_cfg:
    if hf_cfg.get("downsample_in_first_stage") or hf_cfg.get("downsample_in_bottleneck"):
      raise UserError(f"{path} is a ResNet with downsample_in_first_stage / downsample_in_bottleneck "
                      "(not torchvision's v1.5 layout); jembed imports the standard layout only")
    if hf_cfg.get("hidden_act", "relu") != "relu":
      raise UserError(f"{path} uses hidden_act={hf_cfg['hidden_act']!r}; jembed's ResNet uses relu")
  cfg, channels = resnet_io.infer(sd, path)
  backbone, stats, head = resnet_io.to_jembed(sd, cfg, path)
  pp = image_transforms.torchvision_imagenet()
  if channels != 3:
    pp = dataclasses.replace(pp, channels=channels, mean=pp.mean[:1], std=pp.std[:1])
  if pre_cfg:
    pp = preprocess_from_hf(pre_cfg, 224, channels)
  elif timm_cfg:
    fmt = "timm"
    pp = preprocess_from_timm(timm_cfg.get("pretrained_cfg") or {}, pp)
  return _assemble("resnet", cfg, (pp.size, pp.size, channels), backbone, stats, head, pp, path, fmt,
                   hf_cfg, timm_cfg)


# timm's default ViT preprocessing (AugReg / DeiT style: mean = std = 0.5, crop_pct 0.9, bicubic).
_TIMM_VIT = dict(crop_pct=0.9, resize="shorter", interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)


def _vit(sd, path, fmt, hf_cfg, timm_cfg, pre_cfg, npz_heads) -> ImportedImageModel:
  eps, act, heads, pooling = 1e-6, "gelu", npz_heads, ""
  if fmt == "big_vision":
    act = "gelu_new"  # flax's nn.gelu, which big_vision's MlpBlock uses, is the tanh approximation
  if fmt == "hf":  # HF ViT names (a bare file too): ViTConfig's defaults where config.json is absent
    eps = float((hf_cfg or {}).get("layer_norm_eps", 1e-12))
    act = str((hf_cfg or {}).get("hidden_act", "gelu"))
    heads = int((hf_cfg or {}).get("num_attention_heads", 0))
    pooling = "cls"
  if timm_cfg:
    heads = int((timm_cfg.get("model_args") or {}).get("num_heads", 0))
    pool = timm_cfg.get("global_pool") or (timm_cfg.get("model_args") or {}).get("global_pool")
    pooling = {"token": "cls", "avg": "mean"}.get(pool, "")
    if pool and not pooling:
      raise UserError(f"{path} uses global_pool={pool!r}; jembed's ViT pools 'token' or 'avg'")
  cfg, shape = vit_io.infer(sd, heads=heads, eps=eps, hidden_act=act, pooling=pooling, source=path)
  backbone, head = vit_io.to_jembed(sd, cfg, path)
  size = shape[0]
  if pre_cfg or fmt == "hf":  # without preprocessor_config.json: ViTImageProcessor's defaults
    pp = preprocess_from_hf(pre_cfg or {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}, size, shape[2])
  elif fmt == "big_vision":  # big_vision: pixels to [-1, 1], resized straight to the input size
    pp = image_transforms.Preprocess(size=size, crop_pct=1.0, resize="squash", interpolation="bilinear",
                                     mean=(0.5,) * 3, std=(0.5,) * 3, channels=shape[2])
  else:
    pp = image_transforms.Preprocess(size=size, channels=shape[2], **_TIMM_VIT)
    if timm_cfg:
      fmt = "timm"
      pp = preprocess_from_timm(timm_cfg.get("pretrained_cfg") or {}, pp)
  if pp.size != size:
    # The declared input size differs from the position table's grid: resample to the declared one.
    g = pp.size // int(cfg["patch_size"])
    from jembed.models import vit as vit_model
    backbone["position"] = vit_model.resample_position(backbone["position"], (size // int(cfg["patch_size"]),) * 2,
                                                       (g, g), bool(cfg["class_token"]))
    shape = (pp.size, pp.size, shape[2])
  return _assemble("vit", cfg, shape, backbone, {}, head, pp, path, fmt, hf_cfg, timm_cfg)
