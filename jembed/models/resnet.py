"""ResNet v1.5 backbones (18/34/50/101) in Flax NNX, returning pooled features.

v1.5 places the stride of a bottleneck block on its 3x3 conv (as torchvision does), which
is slightly more accurate than v1's strided 1x1. There is no classification head: the
model maps images to globally average-pooled features for embedding heads downstream.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jembed.errors import UserError
from jembed.models.layers import Conv, compute_dtype, logical

# (block type, blocks per stage) per depth.
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}
_STEMS = ("imagenet", "cifar")
_NORMS = ("batch", "group")

# He init on fan_out, as torchvision does for ResNets.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(cin: int, cout: int, k: int, stride: int, dtype, rngs: nnx.Rngs) -> Conv:
  # Symmetric padding k//2 matches torchvision; "SAME" pads asymmetrically for strided
  # even-sized inputs and would shift the receptive field.
  return Conv(cin, cout, k, stride=stride, axes=(None, None, "conv_in", "conv_out"), dtype=dtype,
              kernel_init=_CONV_INIT, rngs=rngs)


def _group_count(channels: int) -> int:
  # 32 groups is standard; narrow layers (small widths) need a divisor of channels.
  return math.gcd(32, channels)


def _norm(kind: str, channels: int, dtype, rngs: nnx.Rngs, zero_scale: bool = False):
  scale_init = nnx.initializers.zeros if zero_scale else nnx.initializers.ones
  meta = logical("conv_out")
  if kind == "batch":
    # Flax momentum is the weight of the old running value (PyTorch's 0.1 == Flax's 0.9).
    return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, dtype=dtype,
                         scale_init=scale_init, scale_metadata=meta, bias_metadata=meta,
                         rngs=rngs)
  return nnx.GroupNorm(channels, num_groups=_group_count(channels), epsilon=1e-5,
                       dtype=dtype, scale_init=scale_init, scale_metadata=meta,
                       bias_metadata=meta, rngs=rngs)


class _Downsample(nnx.Module):
  """1x1 strided projection on the shortcut when shape changes."""

  def __init__(self, cin, cout, stride, norm, dtype, rngs):
    self.conv = _conv(cin, cout, 1, stride, dtype, rngs)
    self.norm = _norm(norm, cout, dtype, rngs)

  def __call__(self, x):
    return self.norm(self.conv(x))


class BasicBlock(nnx.Module):
  """Two 3x3 convs (ResNet-18/34)."""

  def __init__(self, cin: int, planes: int, stride: int, norm: str, dtype,
               zero_init_residual: bool, *, rngs: nnx.Rngs):
    cout = planes
    self.conv1 = _conv(cin, planes, 3, stride, dtype, rngs)
    self.norm1 = _norm(norm, planes, dtype, rngs)
    self.conv2 = _conv(planes, cout, 3, 1, dtype, rngs)
    self.norm2 = _norm(norm, cout, dtype, rngs, zero_scale=zero_init_residual)
    self.downsample = (_Downsample(cin, cout, stride, norm, dtype, rngs)
                       if stride != 1 or cin != cout else None)
    self.out_channels = cout

  def __call__(self, x):
    y = jax.nn.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return jax.nn.relu(y + shortcut)


class Bottleneck(nnx.Module):
  """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand x4 (ResNet-50/101)."""

  def __init__(self, cin: int, planes: int, stride: int, norm: str, dtype,
               zero_init_residual: bool, *, rngs: nnx.Rngs):
    cout = planes * _EXPANSION["bottleneck"]
    self.conv1 = _conv(cin, planes, 1, 1, dtype, rngs)
    self.norm1 = _norm(norm, planes, dtype, rngs)
    self.conv2 = _conv(planes, planes, 3, stride, dtype, rngs)
    self.norm2 = _norm(norm, planes, dtype, rngs)
    self.conv3 = _conv(planes, cout, 1, 1, dtype, rngs)
    self.norm3 = _norm(norm, cout, dtype, rngs, zero_scale=zero_init_residual)
    self.downsample = (_Downsample(cin, cout, stride, norm, dtype, rngs)
                       if stride != 1 or cin != cout else None)
    self.out_channels = cout

  def __call__(self, x):
    y = jax.nn.relu(self.norm1(self.conv1(x)))
    y = jax.nn.relu(self.norm2(self.conv2(y)))
    y = self.norm3(self.conv3(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return jax.nn.relu(y + shortcut)


class ResNet(nnx.Module):
  """ResNet v1.5 feature extractor: (B, H, W, C) images -> (B, out_features).

  BatchNorm follows the module's mode: batch statistics after `model.train()`, the running ones
  after `model.eval()`.

  Attributes:
    out_features: channels of the pooled feature vector.
  """

  def __init__(self, depth: int = 18, width: int = 64, stem: str = "imagenet",
               norm: str = "batch", in_channels: int = 3, num_stages: int = 4,
               dtype: Any = jnp.float32, zero_init_residual: bool = False, *,
               rngs: nnx.Rngs):
    if depth not in DEPTHS:
      raise UserError(f"ResNet depth {depth} is not supported; use one of {sorted(DEPTHS)}")
    if stem not in _STEMS:
      raise UserError(f"ResNet stem {stem!r} is unknown; use one of {_STEMS}")
    if norm not in _NORMS:
      raise UserError(f"ResNet norm {norm!r} is unknown; use one of {_NORMS}")
    if not 1 <= num_stages <= 4:
      raise UserError(f"ResNet num_stages={num_stages} must be in 1..4")
    if width < 1:
      raise UserError(f"ResNet width={width} must be positive")
    kind, blocks_per_stage = DEPTHS[depth]
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    self.stem_kind = stem
    self.norm_kind = norm
    if stem == "imagenet":
      self.stem_conv = _conv(in_channels, width, 7, 2, dtype, rngs)
    else:
      self.stem_conv = _conv(in_channels, width, 3, 1, dtype, rngs)
    self.stem_norm = _norm(norm, width, dtype, rngs)

    blocks = []
    cin = width
    for stage in range(num_stages):
      planes = width * 2**stage
      for i in range(blocks_per_stage[stage]):
        stride = 2 if (stage > 0 and i == 0) else 1
        block = block_cls(cin, planes, stride, norm, dtype, zero_init_residual, rngs=rngs)
        blocks.append(block)
        cin = block.out_channels
    self.blocks = nnx.List(blocks)
    self.out_features = cin

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.stem_norm(self.stem_conv(x))
    x = jax.nn.relu(x)
    if self.stem_kind == "imagenet":
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(x)
    # Pool in float32 so low-precision compute dtypes do not lose the mean.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# The `model.resnet` config section's defaults (configs/common.py builds the section from these),
# sized for small images on a CPU; the ResNet class's own defaults are the standard ImageNet ResNet.
DEFAULTS = dict(
    depth=18,             # 18 | 34 | 50 | 101
    width=16,             # channels of the first stage (64 in the paper)
    stem="cifar",         # cifar (3x3, stride 1: small images) | imagenet (7x7/2 + max-pool)
    norm="batch",         # batch | group
    num_stages=3,         # 8x8 inputs: three stages end at 2x2
    zero_init_residual=False,
    dtype="auto",         # compute dtype: auto = bfloat16 on TPU/GPU, float32 on CPU
)


def resnet_from_config(cfg: Any, *, in_channels: int = 3, rngs: nnx.Rngs) -> ResNet:
  """A ResNet from a `model.resnet` section; fields it leaves out take DEFAULTS."""
  c = {**DEFAULTS, **{k: v for k, v in dict(cfg).items() if v not in ("", None)}}
  return ResNet(depth=int(c["depth"]), width=int(c["width"]), stem=str(c["stem"]), norm=str(c["norm"]),
                in_channels=in_channels, num_stages=int(c["num_stages"]),
                zero_init_residual=bool(c["zero_init_residual"]), dtype=compute_dtype(c["dtype"]),
                rngs=rngs)
