"""What keeps a long run safe, apart from the loop that uses it: non-finite steps (caught on device
every step, read by the host at log steps and before saves), preemption (SIGTERM / Ctrl-C finish the
step, save and stop; every process stops at the same step), time-based checkpoints, and a barrier on
the coordination service. The loop (jembed/train.py) calls these at its log, eval and save steps.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jembed.state import TrainState


# ---------------------------------------------------------------------------------------------------
# Non-finite steps: caught on device every step, read by the host at log steps and before saves
# ---------------------------------------------------------------------------------------------------
def nonfinite_record() -> dict[str, jax.Array]:
  """skipped: steps whose update was dropped; first: the first such step (-1: none); run: the
  current streak of them; longest: the longest streak."""
  z = lambda v=0: jnp.full((), v, jnp.int32)
  return dict(skipped=z(), first=z(-1), run=z(), longest=z())


def step_is_finite(loss, grads, step) -> jax.Array:
  """Whether a step may be applied. Tests monkeypatch this to inject a non-finite step (it is
  called when the step is traced, so a normal run pays nothing for that)."""
  del step
  return jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))


def keep_if_finite(finite, new, old):
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def update_nonfinite(record, finite, step) -> dict[str, jax.Array] | None:
  if record is None:  # a state built without a record (e.g. by a benchmark) keeps none
    return None
  bad = jnp.logical_not(finite).astype(jnp.int32)
  run = (record["run"] + 1) * bad
  first = jnp.where((record["first"] < 0) & (bad > 0), step + 1, record["first"])
  return dict(skipped=record["skipped"] + bad, first=first, run=run,
              longest=jnp.maximum(record["longest"], run))


def check_nonfinite(state: TrainState, config, checkpointer) -> dict[str, int]:
  """Stops the run when a step was not finite (or, with config.skip_nonfinite, after
  config.max_consecutive_nonfinite of them in a row). The parameters stay the last finite ones,
  so nothing non-finite is ever saved."""
  record = {k: int(v) for k, v in jax.device_get(state.nonfinite).items()}
  if record["first"] < 0:
    return record
  if config.skip_nonfinite and record["longest"] < config.max_consecutive_nonfinite:
    return record
  checkpointer.wait()
  good = checkpointer.latest_step()
  where = f"the last good checkpoint is step {good}" if good is not None else "no checkpoint was saved"
  if config.skip_nonfinite:
    raise FloatingPointError(
        f"{record['longest']} steps in a row had a non-finite loss or gradient (the first bad step was "
        f"{record['first']}, {record['skipped']} skipped in all); {where}: lower --config.learning_rate "
        "or raise warmup_steps")
  raise FloatingPointError(
      f"the loss or gradient is not finite at step {record['first']} (the update was not applied); {where}: "
      "lower --config.learning_rate or raise warmup_steps, or set --config.skip_nonfinite=True to skip "
      "such steps")


def legacy_restore(abstract: TrainState):
  """Checkpoints written before TrainState had `nonfinite` restore with a clean record."""
  def fill(restored):
    fresh = nonfinite_record()
    return restored.replace(nonfinite={k: jax.device_put(fresh[k], abstract.nonfinite[k].sharding)
                                       for k in fresh})
  return abstract.replace(nonfinite=None), fill


# ---------------------------------------------------------------------------------------------------
# Preemption and time-based checkpoints
# ---------------------------------------------------------------------------------------------------
class StepsInFlight:
  """Bounds how far the host runs ahead of the device. JAX dispatches asynchronously: without a
  bound the host queues steps up to the next log step's `device_get` and reads the stop flag only
  then, so a SIGTERM could wait `log_every` steps (a spot VM gives ~30 s). After dispatching step k
  the host waits for step k - `limit` + 1 (a scalar already computed), so at most `limit` steps are
  queued: the device always has the next step waiting (no idle time), and a signal that arrives
  while the device runs step j is read before step j + 2 is dispatched. `limit=None`: no bound
  (what the loop did before; benchmarks/mlm_step.py --in-flight compares the two)."""

  def __init__(self, limit: int | None = 2):
    self.limit = limit
    self._pending: list = []

  def dispatched(self, result) -> None:
    if self.limit is None:
      return
    self._pending.append(result)
    while len(self._pending) >= self.limit:
      jax.block_until_ready(self._pending.pop(0))


class Preempted(Exception):
  """The run stopped on SIGTERM / SIGINT after committing a checkpoint; the same command resumes."""


class StopSignals:
  """SIGTERM (what preemptible VMs, SLURM and Kubernetes send) and SIGINT ask the loop to finish the
  step in progress, save it and stop. A second Ctrl-C stops at once.

  Every process must stop at the same step. One process: a local flag. Several: SIGTERM goes to
  JAX's preemption sync manager (active after jax.distributed.initialize; it catches SIGTERM itself
  and agrees on a step, read with `reached_preemption_sync_point` every step), and a Ctrl-C on any
  process is agreed on at log steps by an all-gather of the flags.
  """

  def __init__(self):
    import signal
    self._signal = signal
    self.signal_name = ""
    self._previous = {}
    self.multi = jax.process_count() > 1
    if threading_is_main():
      wanted = [signal.SIGINT] if self.multi else [signal.SIGINT, signal.SIGTERM]
      for sig in wanted:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    name = self._signal.Signals(signum).name
    if self.signal_name and signum == self._signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now (the last committed checkpoint stands)
    self.signal_name = name
    print(f"jembed: {name} received: finishing the current step and saving a checkpoint",
          flush=True)

  def reached(self, step: int, log_step: bool) -> bool:
    if not self.multi:
      return bool(self.signal_name)
    from jax.experimental import multihost_utils
    try:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or "SIGTERM"
        return True
    except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
      pass
    if not log_step:
      return False
    flags = multihost_utils.process_allgather(np.asarray(bool(self.signal_name)))
    if np.any(flags):
      self.signal_name = self.signal_name or "SIGINT"
      return True
    return False

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      self._signal.signal(sig, handler)
    self._previous = {}


def threading_is_main() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def time_to_save(t_saved: float, every_secs: float, log_step: bool) -> bool:
  """config.checkpoint_every_secs: every process must decide alike, so with several processes
  process 0's clock decides, broadcast at log steps (one process: checked every step)."""
  if not every_secs:
    return False
  due = time.monotonic() - t_saved >= every_secs
  if jax.process_count() == 1:
    return due
  if not log_step:
    return False
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))


def all_processes_ready(name: str, timeout_s: int = 1800) -> None:
  """A barrier on the coordination service (not a device collective). CPU collectives (gloo) give a
  process 30 s to join the first collective of a program; a peer still compiling on a busy host
  takes longer, so every process waits here until all have compiled."""
  if jax.process_count() == 1:
    return
  # The public jax.experimental.multihost_utils.sync_global_devices is a device collective (an
  # all-gather), the very thing that times out here; jax 0.10 has no public accessor for the client
  # jax.distributed.initialize() made, so it is read from jax's private state, with a fallback.
  try:
    from jax._src import distributed
    client = distributed.global_state.client
  except (ImportError, AttributeError):
    client = None
  if client is not None:
    client.wait_at_barrier(f"jembed_{name}", timeout_in_ms=timeout_s * 1000)
