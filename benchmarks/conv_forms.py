"""Forward+backward time of ResNet-50's convolutions (and BatchNorm) in several forms, on XLA:CPU
and in PyTorch, to pick the form jembed's ResNet uses.

  PYTHONPATH=. python benchmarks/conv_forms.py [--batch 32] [--resolution 64] [--repeats 5]
      [--forms lax,dot,im2col,shifted,patches,torch,torch_cl] [--bn]

Every distinct convolution of ResNet-50 v1.5 at the given batch and image size (NHWC, HWIO
kernels) is timed as value + input and kernel gradients (the stem without the input gradient, as
in a train step). Forms:
  lax       lax.conv_general_dilated (what nnx.Conv runs)
  dot       1x1 only: stride by slicing, then a matmul over channels
  im2col    k*k shifted slices concatenated on channels, one matmul (1x1: same as dot)
  shifted   k*k shifted slices, one matmul each, summed (no patch matrix)
  patches   lax.conv_general_dilated_patches + matmul
  torch     torch conv2d, NCHW contiguous; torch_cl: channels_last
Times are the minimum over --repeats (the machine is shared); the table gives each layer's time
and the sum weighted by how often the layer occurs in the network. Set XLA_FLAGS before the run
to measure XLA's CPU options. The last line printed is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def resnet50_convs(batch: int, res: int) -> list[dict]:
  """The distinct convolutions of ResNet-50 v1.5 (ImageNet stem) with their counts."""
  layers: dict[tuple, dict] = {}

  def add(h, cin, cout, k, s, first=False):
    key = (h, cin, cout, k, s, first)
    if key in layers:
      layers[key]["count"] += 1
    else:
      layers[key] = dict(batch=batch, h=h, cin=cin, cout=cout, k=k, stride=s, first=first, count=1)

  add(res, 3, 64, 7, 2, first=True)
  h = res // 4  # stem stride 2, max-pool stride 2
  cin = 64
  for stage, n in enumerate((3, 4, 6, 3)):
    p = 64 * 2**stage
    for i in range(n):
      s = 2 if (stage > 0 and i == 0) else 1
      add(h, cin, p, 1, 1)
      add(h, p, p, 3, s)
      add(h // s, p, 4 * p, 1, 1)
      if i == 0:
        add(h, cin, 4 * p, 1, s)
      cin = 4 * p
      h //= s
  return list(layers.values())


def _pad(k):
  return ((k // 2, k // 2), (k // 2, k // 2))


def conv_lax(x, w, s):
  k = w.shape[0]
  return jax.lax.conv_general_dilated(x, w, (s, s), _pad(k), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _out(h, k, s):
  return (h + 2 * (k // 2) - k) // s + 1


def _shifts(x, k, s):
  """The k*k strided windows of the padded input, each (B, Ho, Wo, C), in (i, j) order."""
  ho, wo = _out(x.shape[1], k, s), _out(x.shape[2], k, s)
  xp = jnp.pad(x, ((0, 0), *_pad(k), (0, 0))) if k > 1 else x
  return [jax.lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + (ho - 1) * s + 1, j + (wo - 1) * s + 1, xp.shape[3]),
                        (1, s, s, 1)) for i in range(k) for j in range(k)]


def conv_dot(x, w, s):
  if w.shape[0] != 1:
    return None
  if s > 1:
    x = x[:, ::s, ::s, :]
  return jnp.einsum("bhwc,co->bhwo", x, w[0, 0])


def conv_im2col(x, w, s):
  k, _, cin, cout = w.shape
  if k == 1:
    return conv_dot(x, w, s)
  cols = jnp.concatenate(_shifts(x, k, s), axis=-1)
  return jnp.einsum("bhwc,co->bhwo", cols, w.reshape(k * k * cin, cout))


def conv_shifted(x, w, s):
  k = w.shape[0]
  if k == 1:
    return conv_dot(x, w, s)
  out = None
  for n, xs in enumerate(_shifts(x, k, s)):
    y = jnp.einsum("bhwc,co->bhwo", xs, w[n // k, n % k])
    out = y if out is None else out + y
  return out


def conv_patches(x, w, s):
  k, _, cin, cout = w.shape
  if k == 1:
    return None
  p = jax.lax.conv_general_dilated_patches(x, (k, k), (s, s), _pad(k),
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # Patch channels are ordered (c, i, j).
  return jnp.einsum("bhwc,co->bhwo", p, w.transpose(2, 0, 1, 3).reshape(cin * k * k, cout))


JAX_FORMS = {"lax": conv_lax, "dot": conv_dot, "im2col": conv_im2col, "shifted": conv_shifted,
             "patches": conv_patches}


def _time(fn, repeats):
  fn()
  best = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best.append(time.perf_counter() - t)
  return min(best)


def time_jax(form, L, repeats):
  f = JAX_FORMS[form]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((L["batch"], L["h"], L["h"], L["cin"]), np.float32))
  w = jnp.asarray(rng.standard_normal((L["k"], L["k"], L["cin"], L["cout"]), np.float32) * 0.05)
  if (form == "dot" and L["k"] != 1) or (form == "patches" and L["k"] == 1):
    return None
  ho = _out(L["h"], L["k"], L["stride"])
  dy = jnp.asarray(rng.standard_normal((L["batch"], ho, ho, L["cout"]), np.float32))
  argnums = (1,) if L["first"] else (0, 1)

  @jax.jit
  def step(x, w, dy):
    y, vjp = jax.vjp(lambda x, w: f(x, w, L["stride"]), x, w)
    g = vjp(dy)
    return y, tuple(g[i] for i in argnums)

  def run():
    jax.block_until_ready(step(x, w, dy))
  return _time(run, repeats)


def time_torch(channels_last, L, repeats):
  import torch
  g = torch.Generator().manual_seed(0)
  x = torch.randn(L["batch"], L["cin"], L["h"], L["h"], generator=g)
  w = torch.randn(L["cout"], L["cin"], L["k"], L["k"], generator=g) * 0.05
  if channels_last:
    x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
  x.requires_grad_(not L["first"])
  w.requires_grad_(True)
  ho = _out(L["h"], L["k"], L["stride"])
  dy = torch.randn(L["batch"], L["cout"], ho, ho, generator=g)
  if channels_last:
    dy = dy.to(memory_format=torch.channels_last)

  def run():
    x.grad = w.grad = None
    y = torch.nn.functional.conv2d(x, w, stride=L["stride"], padding=L["k"] // 2)
    y.backward(dy)
  return _time(run, repeats)


def bn_jax(kind, shape, repeats):
  """Train-mode BatchNorm + ReLU, value and gradients, float32."""
  from flax import nnx
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape, np.float32))
  dy = jnp.asarray(rng.standard_normal(shape, np.float32))
  c = shape[-1]
  if kind == "nnx":
    bn = nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    gd, params, rest = nnx.split(bn, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def f(x, params):
      m = nnx.merge(gd, params, rest)
      return jax.nn.relu(m(x))
  else:
    params = {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))}

    def f(x, params):
      # One pass over x for both moments.
      mean = jnp.mean(x, axis=(0, 1, 2))
      var = jnp.maximum(jnp.mean(jnp.square(x), axis=(0, 1, 2)) - jnp.square(mean), 0.0)
      inv = jax.lax.rsqrt(var + 1e-5) * params["scale"]
      return jax.nn.relu(x * inv + (params["bias"] - mean * inv))

  @jax.jit
  def step(x, params, dy):
    y, vjp = jax.vjp(f, x, params)
    return y, vjp(dy)

  def run():
    jax.block_until_ready(step(x, params, dy))
  return _time(run, repeats)


def bn_torch(channels_last, shape, repeats):
  import torch
  b, h, w, c = shape
  x = torch.randn(b, c, h, w)
  if channels_last:
    x = x.to(memory_format=torch.channels_last)
  x.requires_grad_(True)
  bn = torch.nn.BatchNorm2d(c)
  dy = torch.randn_like(x)

  def run():
    x.grad = None
    bn.zero_grad(set_to_none=True)
    torch.relu(bn(x)).backward(dy)
  return _time(run, repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--resolution", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--forms", default="lax,dot,im2col,shifted,patches,torch,torch_cl")
  parser.add_argument("--bn", action="store_true", help="also time BatchNorm+ReLU")
  parser.add_argument("--layers", default="", help="comma-separated layer indices, or none (default: all)")
  args = parser.parse_args()
  forms = args.forms.split(",")
  layers = resnet50_convs(args.batch, args.resolution)
  if args.layers:
    layers = [] if args.layers == "none" else [layers[int(i)] for i in args.layers.split(",")]
  rows = []
  print(f"{'layer':28s} " + " ".join(f"{f:>9s}" for f in forms) + "   (ms, fwd+bwd)")
  totals = {f: 0.0 for f in forms}
  for L in layers:
    row = {"layer": f"{L['h']}x{L['h']} {L['cin']}->{L['cout']} k{L['k']}s{L['stride']} x{L['count']}"}
    for f in forms:
      if f.startswith("torch"):
        t = time_torch(f == "torch_cl", L, args.repeats)
      else:
        t = time_jax(f, L, args.repeats)
      row[f] = t
    # A form that does not apply to a layer (dot for k>1) counts as the lax form in the total.
    for f in forms:
      totals[f] += L["count"] * (row[f] if row[f] is not None else row.get("lax") or 0.0)
    rows.append(row)
    print(f"{row['layer']:28s} " + " ".join(f"{row[f] * 1e3:9.2f}" if row[f] is not None else f"{'-':>9s}"
                                           for f in forms), flush=True)
  print(f"{'weighted total (ms)':28s} " + " ".join(f"{totals[f] * 1e3:9.1f}" for f in forms))
  bn = {}
  if args.bn:
    res = args.resolution
    shapes = [(args.batch, res // 2, res // 2, 64), (args.batch, res // 4, res // 4, 256),
              (args.batch, res // 8, res // 8, 512), (args.batch, res // 16, res // 16, 1024)]
    print(f"{'batchnorm+relu':28s} {'nnx':>9s} {'onepass':>9s} {'torch':>9s} {'torch_cl':>9s}")
    for shape in shapes:
      r = {"nnx": bn_jax("nnx", shape, args.repeats), "onepass": bn_jax("onepass", shape, args.repeats)}
      try:
        r["torch"] = bn_torch(False, shape, args.repeats)
        r["torch_cl"] = bn_torch(True, shape, args.repeats)
      except ImportError:
        pass
      bn[str(shape)] = r
      print(f"{str(shape):28s} " + " ".join(f"{v * 1e3:9.2f}" for v in r.values()), flush=True)
  import os
  print(json.dumps({"batch": args.batch, "resolution": args.resolution, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "rows": rows, "totals": totals, "batchnorm": bn}))


if __name__ == "__main__":
  main()
