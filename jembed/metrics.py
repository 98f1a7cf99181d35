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

from jembed import fs
from jembed.errors import UserError

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
    fs.write_json(path, {"f32_matmul_flops": best_flops, "sizes": list(sizes)})
  except UserError:
    pass  # only a cache
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


def step_flops(lowered) -> float | None:
  """FLOPs of one call of a jitted function over all devices, from XLA's cost analysis of the
  lowered (not yet partitioned) program: the global computation, counted once. (A compiled SPMD
  program reports one device's share, and multiplying that by the device count would count
  replicated work, such as a data-parallel optimizer update, once per device.)"""
  try:
    cost = lowered.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


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
  """Writes each logged row to stdout, TensorBoard and metrics.jsonl (process 0 only, `fs.is_writer`).

  metrics.jsonl: appended and flushed per row on a local disk (a crash can leave at most a partial
  last line, which the next run drops); on an object store, which cannot append, the whole file is
  rewritten atomically per row. A resumed run drops rows past its checkpoint and marks a restart in
  TensorBoard, which then discards the orphaned events past that step.
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0):
    self.main = fs.is_writer()
    self.workdir = workdir
    self.bar = ProgressBar(total_steps, start_step)
    self._tb = None
    self._jsonl = None
    self._rows: list[str] | None = None  # the whole file, on an object store

  def _open(self):
    if (self._jsonl is None and self._rows is None) and self.main:
      from tensorboardX import SummaryWriter
      fs.makedirs(self.workdir)
      path = fs.join(self.workdir, "metrics.jsonl")
      kept = self._rows_up_to(path, self.bar.start)
      try:
        if fs.is_local(path):
          self._jsonl = open(path, "a")
        else:
          self._rows = kept
        self._tb = SummaryWriter(fs.join(self.workdir, "tensorboard"))
        if self.bar.start:
          from tensorboardX.proto.event_pb2 import Event, SessionLog
          # TensorBoard drops the events at and after a restart's step: the resumed run's first.
          self._tb.file_writer.add_event(
              Event(step=self.bar.start + 1, session_log=SessionLog(status=SessionLog.START)))
      except OSError as e:
        raise fs.write_error(path, e) from None

  @staticmethod
  def _rows_up_to(path: str, step: int) -> list[str]:
    """A resumed run repeats the steps after its checkpoint; their old rows are dropped so every
    step appears once. A partial last line (a crash or a full disk mid-write) is dropped too."""
    if not fs.exists(path):
      return []
    lines = fs.read_text(path).splitlines(keepends=True)
    keep = []
    for line in lines:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if row.get("step", 0) <= step and line.endswith("\n"):
        keep.append(line)
    if len(keep) != len(lines):
      fs.write_text(path, "".join(keep))
    return keep

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.main:
      return
    self._open()
    row = {"step": int(step), "split": split}
    row.update({k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()})
    line = json.dumps(row) + "\n"
    path = fs.join(self.workdir, "metrics.jsonl")
    try:
      if self._jsonl is not None:
        self._jsonl.write(line)
        self._jsonl.flush()
      else:
        self._rows.append(line)
        fs.write_text(path, "".join(self._rows))
      for k, v in row.items():
        if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f"{split}/{k}", v, step)
      self._tb.flush()
    except OSError as e:
      raise fs.write_error(path, e) from None
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
    for handle in (self._jsonl, self._tb):
      if handle is not None:
        try:
          handle.close()
        except OSError:
          pass  # a full disk: the error was reported when the row failed to write
    self._jsonl = self._tb = self._rows = None
