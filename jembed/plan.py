"""Memory planner: will a config fit, and at what batch, before paying for the accelerators.

  python -m jembed.plan --config configs/mlm.py --config.model.size=large \
      --devices 64 --accelerator tpu-v5e [--batch N] [--config.key=value ...]

It runs on a CPU: `--devices N` fake CPU devices stand in for the accelerators (XLA_FLAGS is set
before jax is imported; the command re-executes itself if jax came up with fewer). It builds the
train loop's `Setup` on them, compiles the real train step on abstract state (ShapeDtypeStructs
carrying the loop's shardings: no parameter is allocated) and prints per-device memory: parameters,
optimizer state (from shapes and shardings), and XLA's memory analysis of the compiled step
(arguments, outputs, temporaries, generated code); whether that fits the accelerator's HBM; the
largest global batch that fits (a few compiles over powers of two); and a suggested mesh.

Only shapes matter, so a text task whose config names TFDS, remote files or over 64 MiB of files
reads the small embedded corpus instead (set --config.model.vocab_size to the real vocabulary), and
such an image task reads the embedded digits resized to data.image_size x data.channels when both
are set.

The figures are XLA's CPU compiler's: a TPU or GPU compiler fuses and pads differently, so read
temporaries as an estimate (the state figures are exact).
"""
from __future__ import annotations

import os
import sys


def _argv_devices(argv) -> int | None:
  for i, a in enumerate(argv):
    if a == "--devices" and i + 1 < len(argv):
      value = argv[i + 1]
    elif a.startswith("--devices="):
      value = a.split("=", 1)[1]
    else:
      continue
    try:
      return int(value)
    except ValueError:
      return None
  return None


if __name__ == "__main__" and "jax" not in sys.modules:
  # Fake devices must be requested before jax initialises its CPU backend.
  _n = _argv_devices(sys.argv)
  if _n and _n > 0:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_n}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import copy  # noqa: E402
import dataclasses  # noqa: E402
import glob  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

from jembed import config as config_lib  # noqa: E402  (ml_collections only: no jax yet)

# The batch search stops here (a tiny model "fits" any batch a real run would use).
MAX_BATCH = 2**20
GiB = 2.0**30
MiB = 2.0**20

# HBM per chip (per GPU), bytes. Sources: Google Cloud TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4: 32 GiB; /v5e: 16 GiB; /v5p: 95 GiB; /v6e: 32 GiB per chip) and
# NVIDIA's data sheets (A100 40GB / 80GB, H100 SXM 80GB, H200 141GB; NVIDIA's "GB" for the A100 and
# H100 are GiB-sized parts, 40960 / 81920 MiB; the H200's 141 GB are decimal).
ACCELERATORS = {
    "tpu-v4": 32 * GiB,
    "tpu-v5e": 16 * GiB,
    "tpu-v5p": 95 * GiB,
    "tpu-v6e": 32 * GiB,
    "a100-40": 40 * GiB,
    "a100-80": 80 * GiB,
    "h100": 80 * GiB,
    "h200": 141e9,
}
# JAX preallocates 75% of a GPU's memory for its allocator by default (XLA_PYTHON_CLIENT_MEM_FRACTION;
# docs.jax.dev/en/latest/gpu_memory_allocation.html); TPUs give XLA the whole HBM.
GPU_FRACTION = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75))


def usable_bytes(accelerator: str) -> float:
  return ACCELERATORS[accelerator] * (1.0 if accelerator.startswith("tpu") else GPU_FRACTION)


def check_accelerator(name: str) -> str:
  from jembed.errors import UserError
  key = name.strip().lower()
  if key not in ACCELERATORS:
    raise UserError(f"--accelerator={name!r} is unknown; choose one of {', '.join(ACCELERATORS)}")
  return key


@dataclasses.dataclass
class Compiled:
  """Per-device bytes of one compiled train step at one global batch."""
  batch: int
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int

  @property
  def total(self) -> int:
    # Donated state: outputs that alias arguments need no second buffer.
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


# ---------------------------------------------------------------------------------------------------
# Building the loop's Setup from shapes only
# ---------------------------------------------------------------------------------------------------
def planning_config(config) -> tuple[Any, list[str]]:
  """A copy of `config` whose data section is cheap to load with the same shapes, and notes on
  what was replaced. Only existing fields are set, so a locked ConfigDict takes them."""
  c = config_lib.complete(copy.deepcopy(config))
  notes = []
  d = c.data
  external = bool(d.get("tfds_name")) or _big(str(d.get("train") or ""))
  if "seq_len" in d and external:  # a text task: only seq_len and the vocabulary shape the model
    notes.append("shapes from the embedded corpus (vocabulary: model.vocab_size, else the tokenizer's)")
    d.source, d.train, d.eval, d.tfds_name = "embedded", "", "", ""
  elif "image_size" in d and external and d.image_size and d.channels:
    notes.append(f"shapes from the embedded digits at {d.image_size}x{d.image_size}x{d.channels}")
    d.source, d.train, d.eval, d.tfds_name = "embedded", "", "", ""
  # The accelerators planned for are TPUs and GPUs, where a compute dtype of "auto" is bfloat16 (on
  # this CPU it would resolve to float32 and overstate the activations).
  autos = _auto_dtypes(c.model)
  for section in autos:
    section.dtype = "bfloat16"
  if autos:
    notes.append("compute dtype 'auto' planned as bfloat16 (as on TPU and GPU)")
  if "frozen_eval" in c:
    c.frozen_eval.enabled = False  # an evaluation the planner never runs
  return c, notes


def _auto_dtypes(section) -> list:
  """The model config sections (nested too) whose compute dtype is "auto"."""
  found = [section] if section.get("dtype") == "auto" else []
  for value in section.values():
    if hasattr(value, "values") and hasattr(value, "get"):
      found += _auto_dtypes(value)
  return found


def _big(spec: str, limit: int = 64 * 2**20) -> bool:
  """Whether the files `spec` names (comma-separated paths or globs) are remote or over `limit`
  bytes: worth replacing by the embedded sample when only shapes matter."""
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  if any("://" in p for p in parts):
    return True
  return sum(os.path.getsize(f) for p in parts for f in glob.glob(p) if os.path.isfile(f)) > limit


def build_setup(config, devices):
  """The train loop's Setup on `devices`, in a scratch workdir nothing is written to."""
  from jembed import train
  workdir = tempfile.mkdtemp(prefix="jembed-plan-")
  try:
    return train.Setup(config, workdir, devices=devices)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def abstract_state(setup):
  """The TrainState as ShapeDtypeStructs carrying the loop's shardings (nothing allocated)."""
  import jax
  shapes = jax.eval_shape(setup._make_state, setup.abs_params, setup.abs_rest, jax.random.key(0))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, setup.shardings)


def abstract_batch(setup, batch: int) -> dict:
  """A global batch of `batch` examples shaped like the task's training columns."""
  import jax
  cols = setup.data.train
  if hasattr(cols, "example_columns"):  # a source streamed from disk (data.prepared)
    cols = cols.example_columns()
  shardings = setup.batch_shardings(cols)
  return {k: jax.ShapeDtypeStruct((batch,) + tuple(v.shape[1:]), v.dtype, sharding=shardings[k])
          for k, v in cols.items()}


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard: shards of
  a dimension that does not divide evenly are padded to the same size)."""
  import jax
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * x.dtype.itemsize
  return total


def total_bytes(tree) -> int:
  import jax
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compile_step(setup, state, batch: int) -> Compiled:
  import flax.linen as nn
  import jax
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    b = abstract_batch(setup, batch)
    compiled = setup.jit_train_step(b).lower(state, b).compile()
  m = compiled.memory_analysis()
  return Compiled(batch=batch, arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
                  aliased=int(m.alias_size_in_bytes), temporaries=int(m.temp_size_in_bytes),
                  code=int(m.generated_code_size_in_bytes))


# ---------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------
def plan(config, devices, accelerator: str, batch: int = 0, search: bool = True) -> dict:
  """Compiles the train step of `config` on `devices` and returns the per-device figures, whether
  they fit `accelerator`, the largest power-of-two global batch that fits (when `search`) and a
  suggested mesh. Raises UserError on bad input."""
  import jax
  from jembed import sharding
  from jembed.errors import UserError
  accelerator = check_accelerator(accelerator)
  n = len(devices)
  config, notes = planning_config(config)
  shape = sharding.mesh_shape(config.mesh, n)  # refuses a mesh that does not fill the devices
  mesh = dict(zip(sharding.MESH_AXES, shape))
  # The default rules' batch axes, times the micro-batches of gradient accumulation.
  shards = math.prod(mesh[a] for a in ("data", "fsdp")) * int(config.grad_accum_steps or 1)
  if batch < 0:
    raise UserError(f"--batch={batch} must be positive (0 = the config's batch_size)")
  if batch:
    config.batch_size = batch
  elif config.batch_size % shards:
    notes.append(f"batch_size {config.batch_size} rounded up to a multiple of {shards} batch shards")
    config.batch_size = -(-config.batch_size // shards) * shards
  setup = build_setup(config, devices)
  shards = setup.batch_shards * int(config.grad_accum_steps or 1)
  state = abstract_state(setup)
  hbm = usable_bytes(accelerator)

  first = compile_step(setup, state, config.batch_size)
  compiled = {first.batch: first.total}
  params = per_device_bytes((state.params, state.frozen))
  optimizer = per_device_bytes(state.opt_state)
  model_state = per_device_bytes(state.model_state)
  full_state = total_bytes(state)

  largest = None
  if search:
    measure = lambda b: compiled[b] if b in compiled else compile_step(setup, state, b).total
    largest, tried = largest_batch(measure, first.batch, shards, hbm)
    compiled.update(tried)

  # Suggested mesh: the least FSDP (most data parallelism: no weight gathers) whose state / f plus
  # temporaries fits. Temporaries depend on the per-device batch, the same for every data x fsdp
  # split of the devices, except the gradients, which are sharded like the trained parameters:
  # this compile's are swapped for an f-th of the whole (an estimate; rerun with the mesh to check).
  grads_here, grads_total = per_device_bytes(state.params), total_bytes(state.params)
  act = max(first.temporaries - grads_here, 0) + first.code
  suggestion = None
  f = 1
  while f <= n:
    if n % f == 0 and (full_state + grads_total) / f + act <= hbm:
      suggestion = {"data": n // f, "fsdp": f, "tensor": 1}
      break
    f *= 2
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves((state.params, state.frozen)))
  return {
      "task": config.task, "devices": n, "mesh": mesh, "accelerator": accelerator,
      "hbm_bytes": ACCELERATORS[accelerator], "usable_bytes": hbm,
      "parameters": n_params, "batch": config.batch_size, "batch_shards": shards,
      "param_bytes": params, "optimizer_bytes": optimizer, "model_state_bytes": model_state,
      "state_bytes_total": full_state,
      "arguments": first.arguments, "outputs": first.outputs, "aliased": first.aliased,
      "temporaries": first.temporaries, "generated_code": first.code, "total": first.total,
      "fits": first.total <= hbm, "largest_batch": largest,
      "compiled_batches": compiled,
      "suggested_mesh": suggestion, "sharding_report": setup.sharding_report, "notes": notes,
  }


def largest_batch(measure, b0: int, shards: int, hbm: float) -> tuple[int | None, dict]:
  """The largest global batch shards * 2^k (k >= 0) whose step fits `hbm`, where `measure(b)`
  compiles at batch b and returns its per-device total (non-decreasing in b). Memory is about
  affine in the batch, so the next k comes from a line through the compiles nearest the boundary
  (starting from b0 and 4 * b0), kept strictly between the largest k known to fit and the smallest
  known not to; after three such guesses, bisection. Returns it (None if even `shards` does not
  fit) and {batch: total} of every compile."""
  done: dict[int, int] = {}

  def total(b):
    if b not in done:
      done[b] = measure(b)
    return done[b]

  top = max(int(math.log2(MAX_BATCH // shards)), 0)
  batch = lambda k: shards * 2**k

  def bounds():
    # Largest k known to fit and smallest known not to, from every compile so far (monotonicity).
    fits = [b for b, t in done.items() if t <= hbm]
    fails = [b for b, t in done.items() if t > hbm]
    lo = max((k for k in range(top + 1) if fits and batch(k) <= max(fits)), default=-1)
    hi = min((k for k in range(top + 1) if fails and batch(k) >= min(fails)), default=top + 1)
    return lo, hi

  def predict(lo, hi):
    fits = sorted(b for b, t in done.items() if t <= hbm)
    fails = sorted(b for b, t in done.items() if t > hbm)
    pair = (fits[-1], fails[0]) if fits and fails else tuple(sorted(done)[-2:] if fits else sorted(done)[:2])
    (b1, t1), (b2, t2) = [(b, done[b]) for b in pair]
    slope = max((t2 - t1) / (b2 - b1), 1e-9) if b2 != b1 else 1e-9
    guess = b1 + (hbm - t1) / slope
    k = int(math.floor(math.log2(guess / shards))) if guess >= shards else 0
    return min(max(k, lo + 1), hi - 1)

  total(b0), total(4 * b0)
  lo, hi = bounds()
  for i in range(4 * (top + 2)):
    if hi - lo <= 1:
      break
    total(batch(predict(lo, hi) if i < 3 else (lo + hi) // 2))
    lo, hi = bounds()
  return (batch(lo) if lo >= 0 else None), done


def human(v: float) -> str:
  unit, div = next((u, d) for u, d in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024.0), ("B", 1.0))
                   if v >= d or d == 1.0)
  return f"{v / div:.2f} {unit}"


def format_plan(r: dict) -> str:
  unit, div = next((u, d) for u, d in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024.0), ("B", 1.0))
                   if r["total"] >= d or d == 1.0)
  g = lambda v: f"{v / div:10.3f} {unit}"
  mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [
      f"jembed plan: task={r['task']}, {r['parameters']:,} parameters, {r['devices']} devices "
      f"(mesh {mesh}), global batch {r['batch']} ({r['batch'] // r['batch_shards']} per batch shard)",
  ]
  lines += [f"  note: {n}" for n in r["notes"]]
  if r["sharding_report"]:
    lines.append(f"  {r['sharding_report']}")
  lines += [
      "per device (state from shapes and shardings; the rest from XLA's memory analysis of the "
      "compiled step, CPU compiler):",
      f"  parameters           {g(r['param_bytes'])}",
      f"  optimizer state      {g(r['optimizer_bytes'])}",
      f"  model state          {g(r['model_state_bytes'])}",
      f"  arguments            {g(r['arguments'])}   (state + batch)",
      f"  outputs not donated  {g(r['outputs'] - r['aliased'])}",
      f"  temporaries          {g(r['temporaries'])}   (activations, gradients, optimizer scratch)",
      f"  generated code       {g(r['generated_code'])}",
      f"  total                {g(r['total'])}",
  ]
  hbm, usable = r["hbm_bytes"], r["usable_bytes"]
  frac = "" if usable == hbm else f", {usable / GiB:.1f} GiB usable by JAX"
  verdict = "fits" if r["fits"] else "does NOT fit"
  lines.append(f"{r['accelerator']} ({hbm / GiB:.1f} GiB HBM{frac}): {verdict} "
               f"({100 * r['total'] / usable:.1f}% used)")
  if r["largest_batch"] is not None or r["compiled_batches"]:
    tried = ", ".join(f"{b}: {human(t)}" for b, t in sorted(r["compiled_batches"].items()))
    largest = r["largest_batch"]
    what = (f"{largest} ({largest // r['batch_shards']} per batch shard)" if largest
            else "none (the state alone does not fit)")
    lines.append(f"largest global batch that fits (powers of two x {r['batch_shards']}): {what}; "
                 f"compiled {tried}")
  s = r["suggested_mesh"]
  if s:
    lines.append(f"suggested mesh: --config.mesh.data={s['data']} --config.mesh.fsdp={s['fsdp']} "
                 f"--config.mesh.tensor={s['tensor']} ({'pure data parallel: the replicated state fits' if s['fsdp'] == 1 else 'FSDP: the replicated state does not fit'}; "
                 f"state {human(r['state_bytes_total'] / s['fsdp'])} per device; an estimate, "
                 "check it with those flags)")
  else:
    lines.append(f"suggested mesh: none of data x fsdp on {r['devices']} devices fits at this batch; "
                 "use more devices, a smaller batch, or tensor parallelism")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
def main(argv) -> None:
  from jembed.errors import UserError
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    check_accelerator(_ACCELERATOR.value)
    if _DEVICES.value is None:
      raise UserError("--devices is required: how many accelerators to plan for (e.g. --devices 64 "
                      "for a v5e-64 slice); fake CPU devices stand in for them")
    if _DEVICES.value < 1:
      raise UserError(f"--devices={_DEVICES.value} must be a positive number of devices")
    if _CONFIG.value is None:
      raise UserError("no config given; pass --config configs/mlm.py (or another file in configs/)")
    from jembed import sharding
    sharding.mesh_shape(_CONFIG.value.mesh, _DEVICES.value)  # before starting jax: cheap, one line
    import jax
    if jax.device_count() < _DEVICES.value:
      _reexec()
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    result = plan(_CONFIG.value, jax.devices()[:_DEVICES.value], _ACCELERATOR.value, _BATCH.value)
  except UserError as e:
    _fail(str(e))
  print(format_plan(result))


def _reexec() -> None:
  """jax came up with fewer devices than asked for (it was imported first): start again with the
  fake-device flag set before it is imported."""
  if os.environ.get("_JEMBED_PLAN_REEXEC"):
    _fail(f"could not get {_DEVICES.value} devices (jax has {__import__('jax').device_count()}); "
          "unset XLA_FLAGS / JAX_PLATFORMS and retry")
  env = dict(os.environ, _JEMBED_PLAN_REEXEC="1", JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + f" --xla_force_host_platform_device_count={_DEVICES.value}").strip()
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, "-m", "jembed.plan"] + sys.argv[1:], env)


def _fail(message: str) -> None:
  print(f"jembed.plan: error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  """absl's flag errors are one line here too (a mistyped config key names its dotted name)."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
                argv[argv.index("--config") + 1] if "--config" in argv[:-1] else "?")
    _fail(config_lib.unknown_key_line(e, argv, path))
  except (flags.Error, ValueError, TypeError) as e:
    _fail((str(e).strip().splitlines() or [type(e).__name__])[0])


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                            lock_config=True)
  _DEVICES = flags.DEFINE_integer("devices", None, "How many accelerators to plan for (fake CPU "
                                  "devices stand in for them).")
  _ACCELERATOR = flags.DEFINE_string("accelerator", "tpu-v5e", "Whose memory to plan against: "
                                     + ", ".join(ACCELERATORS))
  _BATCH = flags.DEFINE_integer("batch", 0, "Global batch to compile first (0 = the config's "
                                "batch_size, rounded up to a multiple of the batch shards).")
  app.run(main, flags_parser=_parse_flags)
