"""ResNet weights between torchvision / timm / Hugging Face names and jembed's models/resnet.py.

torchvision and timm name a ResNet the same way (`conv1`, `bn1`, `layerS.I.convK` / `bnK`,
`layerS.I.downsample.{0,1}`, `fc`); Hugging Face's `ResNetModel` / `ResNetForImageClassification`
nest it differently (`resnet.embedder.embedder.*`, `resnet.encoder.stages.S.layers.I.layer.K.*`,
`.shortcut.*`, `classifier.1`). Hugging Face names are first renamed to torchvision's, then one table
maps those onto jembed's tree: convolution kernels OIHW -> HWIO, BatchNorm weight/bias -> scale/bias
(parameters), running_mean/var -> mean/var (batch statistics), `num_batches_tracked` dropped.
The architecture (depth, block type, width) is read off the weights.
"""
from __future__ import annotations

import re

import numpy as np

from jembed.errors import UserError
from jembed.models import resnet as resnet_model

SUPPORTED = ("jembed imports ResNet-18/34/50/101 (torchvision, timm, Hugging Face) and ViT (timm, "
             "Hugging Face, big_vision .npz) weights")
_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_STAT = ("mean", "var")


def is_resnet(keys) -> bool:
  keys = set(keys)
  return (any(k.startswith("layer1.0.conv1.") for k in keys)
          or any(re.match(r"(resnet\.)?encoder\.stages\.0\.layers\.0\.", k) for k in keys))


def hf_to_torchvision(sd: dict) -> dict:
  """Hugging Face ResNet names -> torchvision names (other keys unchanged)."""
  out = {}
  for k, v in sd.items():
    n = re.sub(r"^resnet\.", "", k)
    n = n.replace("embedder.embedder.convolution.", "conv1.").replace("embedder.embedder.normalization.", "bn1.")
    m = re.match(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)$", n)
    if m:
      s, i, rest = int(m.group(1)), m.group(2), m.group(3)
      rest = re.sub(r"^layer\.(\d+)\.convolution\.", lambda g: f"conv{int(g.group(1)) + 1}.", rest)
      rest = re.sub(r"^layer\.(\d+)\.normalization\.", lambda g: f"bn{int(g.group(1)) + 1}.", rest)
      rest = rest.replace("shortcut.convolution.", "downsample.0.").replace("shortcut.normalization.", "downsample.1.")
      n = f"layer{s + 1}.{i}.{rest}"
    n = n.replace("classifier.1.", "fc.")
    out[n] = v
  return out


def torchvision_to_hf(sd: dict, *, with_head: bool) -> dict:
  """torchvision names -> ResNetForImageClassification's (the inverse of hf_to_torchvision)."""
  out = {}
  for k, v in sd.items():
    n = k
    if n.startswith("conv1."):
      n = "resnet.embedder.embedder.convolution." + n[len("conv1."):]
    elif n.startswith("bn1."):
      n = "resnet.embedder.embedder.normalization." + n[len("bn1."):]
    elif n.startswith("fc."):
      n = "classifier.1." + n[len("fc."):]
    else:
      m = re.match(r"layer(\d+)\.(\d+)\.(.*)$", n)
      s, i, rest = int(m.group(1)) - 1, m.group(2), m.group(3)
      rest = re.sub(r"^conv(\d)\.", lambda g: f"layer.{int(g.group(1)) - 1}.convolution.", rest)
      rest = re.sub(r"^bn(\d)\.", lambda g: f"layer.{int(g.group(1)) - 1}.normalization.", rest)
      rest = rest.replace("downsample.0.", "shortcut.convolution.").replace("downsample.1.", "shortcut.normalization.")
      n = f"resnet.encoder.stages.{s}.layers.{i}.{rest}"
    out[n] = v
  return out


def infer(sd: dict, source: str) -> dict:
  """The `model.resnet` description (models/resnet.py fields) the torchvision-named weights fit."""
  if "conv1.weight" not in sd:
    raise UserError(f"{source} has no stem convolution 'conv1.weight' (a deep-stem or other ResNet "
                    f"variant); {SUPPORTED}")
  stem = sd["conv1.weight"]
  width, in_channels = int(stem.shape[0]), int(stem.shape[1])
  if tuple(stem.shape[2:]) != (7, 7):
    raise UserError(f"{source} has a {stem.shape[2]}x{stem.shape[3]} stem; {SUPPORTED} (7x7 stem)")
  blocks = {}
  for k in sd:
    m = re.match(r"layer(\d+)\.(\d+)\.", k)
    if m:
      blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  stages = sorted(blocks)
  if not stages or stages != list(range(1, len(stages) + 1)):
    raise UserError(f"{source} has no ResNet stages layer1..layerN; {SUPPORTED}")
  kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
  counts = tuple(len(blocks[s]) for s in stages)
  depth = next((d for d, (k, c) in resnet_model.DEPTHS.items()
                if k == kind and c[:len(counts)] == counts), None)
  if depth is None:
    raise UserError(f"{source} is a ResNet with {kind} blocks {list(counts)} per stage, which is no "
                    f"standard depth; {SUPPORTED}")
  conv2 = sd.get("layer1.0.conv2.weight")
  if conv2 is not None and conv2.shape[1] != conv2.shape[0]:
    raise UserError(f"{source} uses grouped convolutions (ResNeXt); {SUPPORTED}")
  expected_planes = width
  if kind == "bottleneck" and int(sd["layer1.0.conv1.weight"].shape[0]) != expected_planes:
    raise UserError(f"{source} has bottlenecks {sd['layer1.0.conv1.weight'].shape[0]} wide for a "
                    f"{width}-channel stem (a Wide ResNet); {SUPPORTED}")
  return dict(resnet_model.DEFAULTS, depth=depth, width=width, stem="imagenet", norm="batch",
              num_stages=len(stages), zero_init_residual=False, dtype="auto"), in_channels


def _tv_blocks(cfg: dict):
  """(jembed block index, torchvision 'layerS.I') in order."""
  _, counts = resnet_model.DEPTHS[int(cfg["depth"])]
  i = 0
  for s in range(int(cfg["num_stages"])):
    for j in range(counts[s]):
      yield i, f"layer{s + 1}.{j}"
      i += 1


def _name_pairs(cfg: dict, has_downsample) -> list[tuple[str, str, str]]:
  """(jembed path without prefix, torchvision prefix, kind 'conv'|'bn')."""
  kind, _ = resnet_model.DEPTHS[int(cfg["depth"])]
  n_convs = 3 if kind == "bottleneck" else 2
  pairs = [("stem_conv", "conv1", "conv"), ("stem_norm", "bn1", "bn")]
  for i, tv in _tv_blocks(cfg):
    for c in range(1, n_convs + 1):
      pairs.append((f"blocks/{i}/conv{c}", f"{tv}.conv{c}", "conv"))
      pairs.append((f"blocks/{i}/norm{c}", f"{tv}.bn{c}", "bn"))
    if has_downsample(tv):
      pairs.append((f"blocks/{i}/downsample/conv", f"{tv}.downsample.0", "conv"))
      pairs.append((f"blocks/{i}/downsample/norm", f"{tv}.downsample.1", "bn"))
  return pairs


def to_jembed(sd: dict, cfg: dict, source: str) -> tuple[dict, dict, np.ndarray | None]:
  """torchvision-named weights -> (flat backbone params, flat batch stats, fc (W, b) or None).
  Every key must be used (the first that is not is named in the error)."""
  used = set()
  params, stats = {}, {}

  def take(key):
    if key not in sd:
      raise UserError(f"{source} lacks '{key}' of a ResNet-{cfg['depth']}; the file is incomplete "
                      f"or another architecture ({SUPPORTED})")
    used.add(key)
    return np.asarray(sd[key], np.float32)

  for ours, tv, kind in _name_pairs(cfg, lambda tv: f"{tv}.downsample.0.weight" in sd):
    if kind == "conv":
      params[f"{ours}/kernel"] = np.ascontiguousarray(take(f"{tv}.weight").transpose(2, 3, 1, 0))
    else:
      for theirs, mine in _BN.items():
        (stats if mine in _STAT else params)[f"{ours}/{mine}"] = take(f"{tv}.{theirs}")
      used.add(f"{tv}.num_batches_tracked")
  head = None
  if "fc.weight" in sd:
    head = (np.ascontiguousarray(take("fc.weight").T), take("fc.bias"))
  extra = sorted(k for k in sd if k not in used)
  if extra:
    raise UserError(f"{source} has '{extra[0]}', which no supported ResNet layout has; {SUPPORTED}")
  return params, stats, head


def from_jembed(params: dict, stats: dict, cfg: dict, head=None) -> dict:
  """Flat backbone params / batch stats (jembed paths) -> torchvision-named float32 arrays."""
  out = {}
  downsampled = {p.split("/downsample/")[0] for p in params if "/downsample/" in p}
  index = dict(_tv_blocks(cfg))
  has = lambda tv: any(f"blocks/{i}" in downsampled for i, t in index.items() if t == tv)
  for ours, tv, kind in _name_pairs(cfg, has):
    if kind == "conv":
      out[f"{tv}.weight"] = np.ascontiguousarray(np.asarray(params[f"{ours}/kernel"], np.float32).transpose(3, 2, 0, 1))
    else:
      for theirs, mine in _BN.items():
        out[f"{tv}.{theirs}"] = np.ascontiguousarray(np.asarray((stats if mine in _STAT else params)[f"{ours}/{mine}"], np.float32))
      out[f"{tv}.num_batches_tracked"] = np.zeros((), np.int64)
  if head is not None:
    out["fc.weight"] = np.ascontiguousarray(np.asarray(head[0], np.float32).T)
    out["fc.bias"] = np.ascontiguousarray(np.asarray(head[1], np.float32))
  return out
