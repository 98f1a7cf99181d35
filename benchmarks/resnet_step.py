"""ResNet-50 train-step throughput and MFU: jembed (JAX/NNX) and, when installed, torchvision.

  PYTHONPATH=. python benchmarks/resnet_step.py [--batch 32] [--resolution 64] [--steps 5]

ResNet-50 v1.5 with the ImageNet stem and a 1000-way linear head, BatchNorm in train mode,
AdamW, cross-entropy on random labels. The default resolution is 64x64 (not 224) so a CPU run
takes seconds per step; MFU uses the XLA cost analysis of the compiled step (the same FLOP count
is used for torch, same shapes) over `jembed.metrics.peak_flops_total()`. The last line printed
is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import optax
from flax import nnx

from jembed import metrics as metrics_lib
from jembed.models.resnet import ResNet


class _Net(nnx.Module):

  def __init__(self, rngs):
    self.backbone = ResNet(depth=50, width=64, stem="imagenet", norm="batch", in_channels=3, rngs=rngs)
    self.head = nnx.Linear(self.backbone.out_features, 1000, rngs=rngs)

  def __call__(self, x):
    return self.head(self.backbone(x))


def bench_jax(batch: int, res: int, steps: int) -> dict:
  model = _Net(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Plain dicts, as the trainer uses: merge then builds fresh variables inside each trace.
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  tx = optax.adamw(1e-3, weight_decay=0.05)
  opt = tx.init(params)
  x = jax.random.normal(jax.random.key(1), (batch, res, res, 3))
  y = jax.random.randint(jax.random.key(2), (batch,), 0, 1000)

  def step(params, rest, opt, x, y):
    def loss_fn(p):
      m = nnx.merge(graphdef, p, rest)
      loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
      return loss, nnx.to_pure_dict(nnx.split(m, nnx.Param, ...)[2])
    (loss, new_rest), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), new_rest, opt, loss

  compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(params, rest, opt, x, y).compile()
  flops = metrics_lib.compiled_flops(compiled) / jax.device_count()  # one device runs it here
  for _ in range(2):  # warm-up
    params, rest, opt, loss = compiled(params, rest, opt, x, y)
  loss.block_until_ready()
  t = time.perf_counter()
  for _ in range(steps):
    params, rest, opt, loss = compiled(params, rest, opt, x, y)
  loss.block_until_ready()
  dt = (time.perf_counter() - t) / steps
  peak = metrics_lib.peak_flops_total(jax.devices()[:1])
  return {"step_s": dt, "images_per_s": batch / dt, "flops_per_step": flops,
          "mfu": flops / dt / peak if peak else None, "peak_flops": peak}


def bench_torch(batch: int, res: int, steps: int, flops: float, peak: float | None) -> dict | None:
  try:
    import torch
    import torchvision
  except ImportError:
    return None
  torch.manual_seed(0)
  model = torchvision.models.resnet50()
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
  x = torch.randn(batch, 3, res, res)
  y = torch.randint(0, 1000, (batch,))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss

  for _ in range(2):
    step()
  t = time.perf_counter()
  for _ in range(steps):
    step()
  dt = (time.perf_counter() - t) / steps
  return {"step_s": dt, "images_per_s": batch / dt, "mfu": flops / dt / peak if peak else None,
          "torch": torch.__version__, "threads": torch.get_num_threads()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--resolution", type=int, default=64)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  jx = bench_jax(args.batch, args.resolution, args.steps)
  print(f"jembed ResNet-50 {args.resolution}x{args.resolution} batch {args.batch}: "
        f"{jx['images_per_s']:.1f} images/s, {jx['step_s']:.3f} s/step, MFU {jx['mfu']:.3f}")
  tv = bench_torch(args.batch, args.resolution, args.steps, jx["flops_per_step"], jx["peak_flops"])
  if tv is None:
    print("torchvision: not installed (pip install torch torchvision to compare)")
  else:
    print(f"torchvision ResNet-50 same shape: {tv['images_per_s']:.1f} images/s, {tv['step_s']:.3f} s/step, "
          f"MFU {tv['mfu']:.3f} (torch {tv['torch']}, {tv['threads']} threads)")
  print(json.dumps({"model": "resnet50", "batch": args.batch, "resolution": args.resolution,
                    "platform": jax.devices()[0].platform, "jax": jx, "torchvision": tv}))


if __name__ == "__main__":
  main()
