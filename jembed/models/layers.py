"""Small NNX building blocks whose parameters carry logical axis names."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name


def param(rngs: nnx.Rngs | None, init, shape: Sequence[int], names: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
  value = init(rngs.params(), tuple(shape), dtype) if rngs is not None else init(None, tuple(shape), dtype)
  return nnx.Param(value, **logical(*names))


def logical(*names: str | None) -> dict:
  """Variable metadata: the logical axis names of each dimension, mapped to mesh axes by the rules
  in the config (jembed/sharding.py). Eager sharding is off for the variable, so models build the
  same with or without a mesh; the loop places them on the mesh with explicit shardings."""
  return {"out_sharding": tuple(names), "eager_sharding": False}


def compute_dtype(name) -> jnp.dtype:
  """The dtype matmuls and convolutions run in; parameters and optimizer state stay float32.
  "auto": bfloat16 on TPU and GPU, float32 on a CPU (where XLA's bfloat16 was measured no faster,
  `python benchmarks/mlm_step.py --dtype bfloat16`)."""
  if name == "auto":
    return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("tpu", "gpu", "cuda", "rocm")
                     else jnp.float32)
  return jnp.dtype(name)


def zeros_init(_key, shape, dtype):
  return jnp.zeros(shape, dtype)


def ones_init(_key, shape, dtype):
  return jnp.ones(shape, dtype)


# The name of Dense's matmul outputs, for remat policies (transformer.REMAT_POLICIES "dots"): a
# low-precision one is a custom_vjp call (see `einsum`), which jax's dot-based policies do not see.
DENSE_DOT = "dense_dot"


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """jnp.einsum(spec, a, b) of two operands of one dtype, accumulated and returned in float32.

  Low-precision (bfloat16) operands are multiplied with float32 accumulation and a float32 result
  (preferred_element_type): XLA:CPU runs that form at about twice its float32 speed, while a dot
  with a bfloat16 result runs no faster than float32 (measured with `python
  benchmarks/embed_throughput.py --micro`); TPU and GPU matrix units accumulate in float32 anyway.
  Callers cast the result back to their compute dtype. The backward pass is the plain einsum's
  (bfloat16 cotangents and dots, as before this), so training keeps its speed and memory on
  accelerators. (It cannot take the float32-accumulating form on a CPU: XLA:CPU has no generic
  bfloat16 x bfloat16 -> float32 kernel, and some of the backward contractions, e.g.
  "bqnh,bnqk->bknh", miss the fast one and fail with "Unsupported element type for DotThunk"; the
  forward ones were checked at batch 1-32, lengths 1-128, 1-12 heads.) float32 operands take
  jnp.einsum itself: the same graph as always.
  """
  if a.dtype == jnp.float32 and b.dtype == jnp.float32:
    return jnp.einsum(spec, a, b)
  return _einsum_f32_out(spec, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_f32_out(spec, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_out_fwd(spec, a, b):
  return _einsum_f32_out(spec, a, b), (a, b)


def _einsum_f32_out_bwd(spec, residuals, cotangent):
  a, b = residuals
  _, vjp = jax.vjp(lambda x, y: jnp.einsum(spec, x, y), a, b)
  return vjp(cotangent.astype(jnp.result_type(a, b)))


_einsum_f32_out.defvjp(_einsum_f32_out_fwd, _einsum_f32_out_bwd)


class Dense(nnx.Module):
  """y = x @ kernel + bias over the last axis; kernel is (in, out) with logical names `axes`."""

  def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
               use_bias: bool = True, dtype=jnp.float32, init_std: float = 0.02,
               kernel_init=None, rngs: nnx.Rngs):
    kernel_init = kernel_init or nnx.initializers.truncated_normal(init_std)
    self.kernel = param(rngs, kernel_init, (in_features, out_features), axes)
    self.bias = param(rngs, zeros_init, (out_features,), (axes[1],)) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    # Accumulated in float32 (`einsum`); the bias is added before the result is rounded to the
    # compute dtype. The leading axes stay as they are: XLA canonicalises a dot without batch axes
    # to one 2-D (tokens x features) matmul itself, and the sharded axes stay visible.
    y = einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    y = checkpoint_name(y, DENSE_DOT)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y.astype(self.dtype)


class Conv(nnx.Module):
  """2-D convolution without bias: NHWC input, an HWIO kernel (k, k, in, out) with logical names
  `axes`, stride `stride` and symmetric zero padding k // 2 (as torchvision's ResNets).

  The parameter is the one nnx.Conv keeps (`kernel`, same shape, init and random draw), so
  checkpoints, LoRA on conv kernels and sharding rules see no difference; `conv2d` says how it runs.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
               axes: tuple = (None, None, "conv_in", "conv_out"), dtype=jnp.float32, kernel_init,
               rngs: nnx.Rngs):
    self.kernel = param(rngs, kernel_init, (kernel_size, kernel_size, in_features, out_features), axes)
    self.stride = stride
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride)


# conv2d's k x k convolutions with fewer input channels stay native on a CPU too (see conv2d).
IM2COL_MIN_CHANNELS = 128


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """lax.conv_general_dilated(x, kernel, (stride, stride), padding k // 2, NHWC/HWIO), as matmuls.

  A 1x1 convolution is a matmul over channels (a strided one reads every stride-th pixel first).
  On a CPU a k x k one with 128 or more input channels is one matmul too, over the k*k shifted
  windows of the padded input concatenated on channels ("im2col"): XLA:CPU's own convolution is
  very slow on those when the output is small (3x3, 512 channels, 2x2 output: 1.2-1.8 s against
  24 ms forward and backward at batch 16, `python benchmarks/conv_forms.py`) and slower at most
  other such shapes; on narrow inputs (the RGB stem, 64 channels) it was as fast or faster
  (16x16x64 3x3: 76 against 140 ms, one thread). GPUs and TPUs keep the native k x k convolution:
  they run it well, and the window matrix would hold k*k copies of the input.
  """
  k, _, cin, cout = kernel.shape
  if k == 1:
    if stride > 1:
      x = x[:, ::stride, ::stride, :]
    return jnp.dot(x, kernel[0, 0])
  pad = ((k // 2, k // 2), (k // 2, k // 2))
  if jax.default_backend() != "cpu" or cin < IM2COL_MIN_CHANNELS:
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pad,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.dot(jnp.concatenate(_windows(x, k, stride, pad), axis=-1), kernel.reshape(k * k * cin, cout))


def _windows(x: jax.Array, k: int, stride: int, pad) -> list[jax.Array]:
  """The k*k strided windows of the zero-padded input, each (B, Ho, Wo, C), in kernel (i, j) order."""
  xp = jnp.pad(x, ((0, 0), *pad, (0, 0)))
  b, h, w, c = xp.shape
  ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
  return [jax.lax.slice(xp, (0, i, j, 0), (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                        (1, stride, stride, 1))
          for i in range(k) for j in range(k)]


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 (BERT uses eps 1e-12)."""

  def __init__(self, features: int, *, eps: float = 1e-12, axis_name: str | None = "embed",
               use_bias: bool = True, rngs: nnx.Rngs | None = None):
    self.scale = param(None, ones_init, (features,), (axis_name,))
    # ModernBERT's norms have no shift (norm_bias=False): no parameter rather than a frozen zero.
    self.bias = param(None, zeros_init, (features,), (axis_name,)) if use_bias else None
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(dtype)


class Embed(nnx.Module):
  """A lookup table (num, features) with logical names `axes`."""

  def __init__(self, num: int, features: int, axes: tuple[str | None, str | None], *,
               init_std: float = 0.02, rngs: nnx.Rngs):
    self.embedding = param(rngs, nnx.initializers.truncated_normal(init_std), (num, features), axes)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:
    """x @ table.T: the tied output projection."""
    return jnp.dot(x, self.embedding[...].astype(x.dtype).T)


class Dropout(nnx.Module):
  """Inverted dropout that owns its random stream and follows the model's train/eval mode.

  There is no keyword to forget: the module draws its key from the `dropout` stream it was built
  with (an `nnx.Rngs` without one is an error at construction), and `model.train()` /
  `model.eval()` switch every Dropout (and BatchNorm) in the tree at once. The train step reseeds
  the stream from the step's key, so masks are reproducible and independent of sharding.

  One random byte per element: random bits are a large share of a CPU step's time (threefry costs
  tens of integer ops per 32-bit word), so each word is split into four bytes, 4x fewer words for
  the same mask. The drop probability is quantised to k/256 (0.1 -> 26/256 = 0.1016) and the
  scaling uses that exact value, so the expectation is preserved.
  """

  def __init__(self, rate: float, *, rngs: nnx.Rngs):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    self.rate = float(rate)
    self.threshold = int(round(self.rate * 256))
    self.deterministic = False
    # Only a module that can drop needs the stream; the others keep their graph free of RNG state.
    self.rng = rngs.dropout if self.threshold else None

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or not self.threshold:
      return x
    return byte_dropout(x, self.threshold, self.rng())


def byte_dropout(x: jax.Array, threshold: int, key: jax.Array) -> jax.Array:
  """Drops each element with probability threshold/256 and rescales the rest."""
  n = x.shape[-1]
  words = jax.random.bits(key, x.shape[:-1] + ((n + 3) // 4,), jnp.uint32)
  bytes_ = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(x.shape[:-1] + (-1,))[..., :n]
  keep_prob = 1.0 - threshold / 256
  return jnp.where(bytes_ >= threshold, x / keep_prob, 0).astype(x.dtype)
