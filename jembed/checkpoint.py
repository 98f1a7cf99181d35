"""orbax checkpoints of the train state and the grain iterator, saved together.

Checkpoints live under WORKDIR/checkpoints/<step>; WORKDIR may be a local path or a gs:// URL (orbax
and tensorstore take either). Saving is asynchronous: orbax writes WORKDIR/checkpoints/<step>.orbax-
checkpoint-tmp* and renames it (locally; on GCS it writes a commit_success.txt last) only when every
file is written, so a run killed mid-save leaves no checkpoint that a later run would read: orbax
lists finalized steps only, and the leftover temporary directory is deleted when the next run opens
the manager. Restoring reads straight into the current mesh's shardings; a checkpoint that cannot be
read is moved aside to WORKDIR/unreadable_checkpoints/<step> (kept, never deleted) and the previous
one is tried, unless the config asks to refuse instead.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import grain
import jax
import orbax.checkpoint as ocp

from jembed import fs
from jembed.errors import UserError


@contextlib.contextmanager
def _quiet():
  """orbax warns that a read-only manager will not save, every time one is opened for reading."""
  from absl import logging
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def _reader(path: str) -> ocp.CheckpointManager:
  with _quiet():
    return ocp.CheckpointManager(fs.path(path), options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_names=("state", "data"))


def checkpoint_dir(workdir: str) -> str:
  return fs.join(fs.absolute(workdir), "checkpoints")


def unreadable_dir(workdir: str) -> str:
  return fs.join(fs.absolute(workdir), "unreadable_checkpoints")


def all_steps(workdir: str) -> list[int]:
  """The complete (finalized) checkpoint steps in `workdir`, oldest first; temporary directories of
  unfinished saves are not listed."""
  path = checkpoint_dir(workdir)
  if not fs.isdir(path):
    return []
  return sorted(ocp.utils.checkpoint_steps(fs.path(path)))


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint step in `workdir`, without creating anything."""
  steps = all_steps(workdir)
  return steps[-1] if steps else None


_OS_REASONS = ("No space left on device", "Disk quota exceeded", "Read-only file system",
               "Permission denied")


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  for reason in _OS_REASONS:  # tensorstore buries the OS error deep in a long message
    if reason in text:
      return reason
  return (text.splitlines()[0] if text else type(e).__name__)[:300]


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.workdir = workdir
    self.path = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        # A run killed mid-save leaves <step>.orbax-checkpoint-tmp*; orbax never reads it as a
        # checkpoint, and this deletes it so it does not pile up.
        cleanup_tmp_directories=True)
    try:
      self.manager = ocp.CheckpointManager(fs.path(self.path), options=options,
                                           item_names=("state", "data"))
    except OSError as e:
      raise fs.write_error(self.path, e) from None
    self._pending: int | None = None

  def save(self, step: int, state, data_iter) -> None:
    """Starts writing checkpoint `step` (asynchronously when configured); errors of the previous
    asynchronous save surface here or in `wait`."""
    if step in self.manager.all_steps():
      return
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    with self._errors(step):
      self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    self._pending = step

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def wait(self) -> None:
    """Blocks until the last save is committed (renamed into place)."""
    with self._errors(self._pending):
      self.manager.wait_until_finished()
    self._pending = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()

  @contextlib.contextmanager
  def _errors(self, step):
    try:
      yield
    except (OSError, ValueError, RuntimeError) as e:
      # A full disk or a read-only workdir: orbax left at most a temporary directory, which no run
      # reads as a checkpoint; the earlier checkpoints are untouched.
      good = [s for s in all_steps(self.workdir) if s != step]
      kept = f"checkpoint {good[-1]} is intact" if good else "no earlier checkpoint exists"
      raise UserError(f"cannot write checkpoint {self.path}/{step} ({type(e).__name__}: {_first_line(e)}); "
                      f"{kept}: free disk space or fix the workdir's permissions and run the same "
                      "command again") from e


def abstract_with_sharding(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore(workdir: str, step: int, abstract_state, data_iter=None, *, items=("state", "data"),
            legacy=None):
  """Restores the state (into the shardings carried by `abstract_state`) and the iterator in place.

  A checkpoint that cannot be read, or whose shapes differ from the current model, is reported as
  a UserError; nothing is deleted. `legacy` = (abstract state of an older layout, function that
  turns a restored old state into the current one) is tried when the current layout does not fit.
  """
  path = checkpoint_dir(workdir)
  manager = _reader(path)
  args = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None and "data" in items:
    args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception:  # pylint: disable=broad-except
      if legacy is None:
        raise
      # A checkpoint from before the state gained fields: read it into the older tree, then fill
      # the new fields with their defaults.
      legacy_abstract, fill = legacy
      args["state"] = ocp.args.StandardRestore(legacy_abstract)
      restored = manager.restore(step, args=ocp.args.Composite(**args))
      restored = dict(restored, state=fill(restored["state"]))
  except Exception as e:  # orbax raises many types (ValueError, FileNotFoundError, tensorstore errors)
    raise UserError(f"checkpoint {path}/{step} cannot be restored ({type(e).__name__}: {_first_line(e)}); it is "
                    "corrupt or from a different model/config: fix the config to match, or use a new --workdir "
                    "(the checkpoint was left untouched)") from e
  finally:
    manager.close()
  return restored["state"]


def restore_latest(workdir: str, abstract_state, data_iter=None, *, fallback: bool = True,
                   log: Callable[[str], None] = print, legacy=None):
  """Restores the newest readable checkpoint: (state, step), or (None, None) when there is none.

  An unreadable checkpoint (a truncated or missing file) is reported in one line; with `fallback`
  it is moved aside to WORKDIR/unreadable_checkpoints/<step> (so that neither this run's
  keep_checkpoints cleanup nor the next restart counts it) and the previous one is tried. Without
  `fallback`, or when none is readable, a UserError names them; nothing is ever deleted.
  """
  steps = all_steps(workdir)
  failed: list[int] = []
  first_error = ""
  for step in reversed(steps):
    try:
      state = restore(workdir, step, abstract_state, data_iter, legacy=legacy)
    except UserError as e:
      if not fallback:
        raise UserError(f"{e}; or set --config.checkpoint_fallback=True to resume from the previous "
                        "checkpoint instead") from e
      log(f"jembed: checkpoint {checkpoint_dir(workdir)}/{step} cannot be read "
          f"({_first_line(e.__cause__ or e)}); trying the previous one")
      failed.append(step)
      first_error = first_error or str(e)
      continue
    for bad in failed:
      _move_aside(workdir, bad, log)
    if failed:
      log(f"jembed: resuming from the previous good checkpoint {checkpoint_dir(workdir)}/{step}")
    return state, step
  if failed:
    raise UserError(f"{first_error} (and no earlier checkpoint of steps {failed} can be read either)")
  return None, None


def config_changes(workdir: str, config) -> list[str]:
  """`field: old -> new` for every field in which `config` differs from the config.json that the
  workdir's earlier run saved (empty when there is none)."""
  import json
  path = fs.join(workdir, "config.json")
  if not fs.exists(path):
    return []
  try:
    old = json.loads(fs.read_text(path))
  except (OSError, ValueError):
    return []
  new = json.loads(config.to_json_best_effort())

  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out

  old, new = flat(old), flat(new)
  return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def local_target(state_dir: str):
  """The shapes and dtypes of the orbax tree saved in `state_dir`, each placed whole on this
  process's first device: a restore target that works whatever devices (or processes) saved it."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with _quiet():
    meta = ocp.StandardCheckpointer().metadata(fs.path(state_dir))
  meta = getattr(meta, "item_metadata", meta)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), meta)


def _move_aside(workdir: str, step: int, log) -> None:
  if not fs.is_writer():
    return
  src = fs.path(checkpoint_dir(workdir)) / str(step)
  dst_dir = fs.path(unreadable_dir(workdir))
  dst_dir.mkdir(parents=True, exist_ok=True)
  dst = dst_dir / str(step)
  n = 1
  while dst.exists():
    dst, n = dst_dir / f"{step}.{n}", n + 1
  src.rename(dst)
  log(f"jembed: moved the unreadable checkpoint to {dst} (kept for inspection)")


def restore_params_only(ckpt_root: str, step: int | None = None):
  """Raw restore of a checkpoint's `state` item onto this process's first device (for fine-tuning
  init). Every process of a multi-process run reads the whole tree itself: without a target orbax
  would place the arrays as they were saved, on devices that may belong to another process."""
  path = checkpoint_dir(ckpt_root) if fs.isdir(checkpoint_dir(ckpt_root)) else fs.absolute(ckpt_root)
  if not fs.isdir(path):
    raise UserError(f"init.checkpoint '{ckpt_root}' is not a jembed workdir or checkpoint directory; "
                    "point it at the --workdir of a pretraining run")
  manager = _reader(path)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint found under {path}; train with --workdir={ckpt_root} first")
    try:
      target = local_target(fs.join(path, str(step), "state"))
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as e:
      raise UserError(f"checkpoint {path}/{step} cannot be read ({type(e).__name__}); it is corrupt or "
                      "incomplete: pick another with init.step or retrain") from e
    return restored["state"], step
  finally:
    manager.close()
