"""ResNet-50 train-step throughput and MFU: jembed (JAX/NNX) and, when installed, torchvision.

  PYTHONPATH=. python benchmarks/resnet_step.py [--batch 32] [--resolution 64] [--steps 5]

ResNet-50 v1.5 with the ImageNet stem and a 1000-way linear head, BatchNorm in train mode,
AdamW, cross-entropy on random labels. The default resolution is 64x64 (not 224) so a CPU run
takes seconds per step; MFU uses the XLA cost analysis of the compiled step (the same FLOP count
is used for torch, same shapes) over `jembed.metrics.peak_flops_total()`. The two steps take
turns and each figure is the median over --steps, so that their ratio holds on a shared machine
whose load changes. The last line printed is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
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


def setup_jax(batch: int, res: int):
  """The compiled step as a closure that runs one step and waits for it, and its FLOP count."""
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

  lowered = jax.jit(step, donate_argnums=(0, 1, 2)).lower(params, rest, opt, x, y)
  compiled = lowered.compile()
  flops = metrics_lib.step_flops(lowered)
  state = [params, rest, opt]

  def run():
    state[0], state[1], state[2], loss = compiled(*state, x, y)
    loss.block_until_ready()
  return run, flops


def setup_torch(batch: int, res: int):
  """torchvision's step as a closure, or None without torch/torchvision."""
  import sys
  import types
  # PyPI's torchvision is built against CUDA torch: its compiled detection ops cannot load with the
  # CPU torch wheel; the model code used here is pure Python (tests/conftest.py does the same).
  sys.modules.setdefault("torchvision._meta_registrations",
                         types.ModuleType("torchvision._meta_registrations"))
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

  return step


def time_interleaved(runs: dict, steps: int) -> dict:
  """Seconds per step of each closure, median over `steps`, the closures taking turns step by step
  so that a change in the load of a shared machine hits them alike."""
  for run in runs.values():  # warm-up
    run()
    run()
  times = {name: [] for name in runs}
  for _ in range(steps):
    for name, run in runs.items():
      t = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--resolution", type=int, default=64)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  peak = metrics_lib.peak_flops_total(jax.devices()[:1])
  run_jax, flops = setup_jax(args.batch, args.resolution)
  runs = {"jax": run_jax}
  step_torch = setup_torch(args.batch, args.resolution)
  if step_torch is not None:
    runs["torch"] = step_torch
  dt = time_interleaved(runs, args.steps)

  def figures(step_s):
    return {"step_s": step_s, "images_per_s": args.batch / step_s,
            "mfu": flops / step_s / peak if peak else None}
  jx = {**figures(dt["jax"]), "flops_per_step": flops, "peak_flops": peak}
  print(f"jembed ResNet-50 {args.resolution}x{args.resolution} batch {args.batch}: "
        f"{jx['images_per_s']:.1f} images/s, {jx['step_s']:.3f} s/step, MFU {jx['mfu']:.3f}")
  tv = None
  if step_torch is None:
    print("torchvision: not installed (pip install torch torchvision to compare)")
  else:
    import torch
    tv = {**figures(dt["torch"]), "torch": torch.__version__, "threads": torch.get_num_threads(),
          "jax_over_torch_speed": dt["torch"] / dt["jax"]}
    print(f"torchvision ResNet-50 same shape: {tv['images_per_s']:.1f} images/s, {tv['step_s']:.3f} s/step, "
          f"MFU {tv['mfu']:.3f} (torch {tv['torch']}, {tv['threads']} threads); "
          f"jembed/torchvision speed {tv['jax_over_torch_speed']:.2f}x")
  print(json.dumps({"model": "resnet50", "batch": args.batch, "resolution": args.resolution,
                    "platform": jax.devices()[0].platform, "jax": jx, "torchvision": tv}))


if __name__ == "__main__":
  main()
