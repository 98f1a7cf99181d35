"""What a run reports: one stdout line per logged step, a progress bar with ETA, TensorBoard event
files and `metrics.jsonl` in the workdir, and MFU from the compiled step's FLOPs."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip, from the vendors' spec sheets (TPU: cloud.google.com/tpu/docs;
# GPU: NVIDIA datasheets, dense tensor-core figures without sparsity).
PEAK_FLOPS = {
    "TPU v2": 45e12, "TPU v3": 123e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU7x": 2307e12,
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12, "V100": 125e12,
    "B200": 2250e12, "GB200": 2500e12, "L40S": 362e12, "T4": 65e12,
}

CACHE = os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "jembed")


def measure_cpu_matmul_peak(sizes=(1024, 2048), repeats: int = 8) -> float:
  """Best f32 matmul FLOP/s of this host through XLA (all cores), measured once and cached.

  The best over a few square sizes and repeats: smaller sizes underuse the cores, larger ones fall
  out of cache, and a single timing catches noise from other processes.
  """
  path = os.path.join(CACHE, "cpu_peak_flops_v2.json")
  try:
    with open(path) as f:
      return float(json.load(f)["f32_matmul_flops"])
  except (OSError, ValueError, KeyError):
    pass
  cpu = jax.devices("cpu")[0]
  f = jax.jit(lambda x: x @ x)
  best_flops = 0.0
  for n in sizes:
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
      t = time.perf_counter()
      f(a).block_until_ready()
      best = min(best, time.perf_counter() - t)
    best_flops = max(best_flops, 2 * n ** 3 / best)
  try:
    os.makedirs(CACHE, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as fh:
      json.dump({"f32_matmul_flops": best_flops, "sizes": list(sizes)}, fh)
    os.replace(tmp, path)
  except OSError:
    pass
  return best_flops


def peak_flops_total(devices=None) -> float | None:
  """Peak FLOP/s of all devices the step runs on. Fake CPU devices share one host, so on CPU the
  host's measured matmul peak is the total."""
  devices = devices or jax.devices()
  d = devices[0]
  if d.platform == "cpu":
    return measure_cpu_matmul_peak()
  kind = d.device_kind
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name.lower() in kind.lower():
      return PEAK_FLOPS[name] * len(devices)
  return None


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled function, from XLA's cost analysis."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  # Cost analysis reports one device's share of a partitioned program.
  return float(cost["flops"]) * jax.device_count()


class ProgressBar:
  """A one-line bar with ETA on stderr, redrawn in place when stderr is a terminal."""

  def __init__(self, total: int, start: int = 0, stream=sys.stderr):
    self.total, self.start, self.stream = total, start, stream
    self.t0 = time.perf_counter()
    self.enabled = stream.isatty() and jax.process_index() == 0

  def update(self, step: int) -> None:
    if not self.enabled:
      return
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / done * (self.total - step) if done else 0.0
    frac = step / self.total
    bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
    self.stream.write(f"\r[{bar}] {step}/{self.total} ETA {eta:5.0f}s")
    self.stream.flush()

  def close(self) -> None:
    if self.enabled:
      self.stream.write("\n")


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
      return f"{v:.3e}"
    return f"{v:.4f}"
  return str(v)


class Logger:
  """Writes each logged row to stdout, TensorBoard and metrics.jsonl (process 0 only)."""

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0):
    self.main = jax.process_index() == 0
    self.workdir = workdir
    self.bar = ProgressBar(total_steps, start_step)
    self._tb = None
    self._jsonl = None

  def _open(self):
    if self._jsonl is None and self.main:
      from tensorboardX import SummaryWriter
      os.makedirs(self.workdir, exist_ok=True)
      path = os.path.join(self.workdir, "metrics.jsonl")
      self._drop_rows_after(path, self.bar.start)
      self._jsonl = open(path, "a")
      self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"))

  @staticmethod
  def _drop_rows_after(path: str, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint; their old rows are dropped so every
    step appears once."""
    if not os.path.exists(path):
      return
    with open(path) as f:
      lines = f.readlines()
    keep = [l for l in lines if l.strip() and json.loads(l).get("step", 0) <= step]
    if len(keep) != len(lines):
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, path)

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.main:
      return
    self._open()
    row = {"step": int(step), "split": split}
    row.update({k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in row.items():
      if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(f"{split}/{k}", v, step)
    self._tb.flush()
    if self.bar.enabled:
      sys.stderr.write("\r\033[K")
    print(f"[{split}] step {step}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()), flush=True)

  def info(self, text: str) -> None:
    if self.main:
      if self.bar.enabled:
        sys.stderr.write("\r\033[K")
      print(text, flush=True)

  def progress(self, step: int) -> None:
    self.bar.update(step)

  def close(self) -> None:
    self.bar.close()
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
      self._jsonl = self._tb = None
