"""orbax checkpoints of the train state and the grain iterator, saved together.

Checkpoints live under WORKDIR/checkpoints/<step>. Saving is asynchronous; orbax writes to a
temporary directory and renames it when complete, so an interrupted save never replaces a good
checkpoint. Restoring reads straight into the current mesh's shardings.
"""
from __future__ import annotations

import contextlib
import os

import grain
import jax
import orbax.checkpoint as ocp

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
    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_names=("state", "data"))


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint step in `workdir`, without creating anything."""
  path = checkpoint_dir(workdir)
  if not os.path.isdir(path):
    return None
  steps = ocp.utils.checkpoint_steps(path)
  return max(steps) if steps else None


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                         item_names=("state", "data"))

  def save(self, step: int, state, data_iter) -> None:
    if step in self.manager.all_steps():
      return
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_sharding(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore(workdir: str, step: int, abstract_state, data_iter=None, *, items=("state", "data")):
  """Restores the state (into the shardings carried by `abstract_state`) and the iterator in place.

  A checkpoint that cannot be read, or whose shapes differ from the current model, is reported as
  a UserError; nothing is deleted.
  """
  path = checkpoint_dir(workdir)
  manager = _reader(path)
  args = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None and "data" in items:
    args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # orbax raises many types (ValueError, FileNotFoundError, tensorstore errors)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"checkpoint {path}/{step} cannot be restored ({type(e).__name__}: {first[:300]}); it is "
                    "corrupt or from a different model/config: fix the config to match, or use a new --workdir "
                    "(the checkpoint was left untouched)") from e
  finally:
    manager.close()
  return restored["state"]


def restore_params_only(ckpt_root: str, step: int | None = None):
  """Raw restore of a checkpoint's `state` item as numpy-backed arrays (for fine-tuning init)."""
  path = checkpoint_dir(ckpt_root) if os.path.isdir(checkpoint_dir(ckpt_root)) else ckpt_root
  if not os.path.isdir(path):
    raise UserError(f"init.checkpoint '{ckpt_root}' is not a jembed workdir or checkpoint directory; "
                    "point it at the --workdir of a pretraining run")
  manager = _reader(path)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint found under {path}; train with --workdir={ckpt_root} first")
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    except Exception as e:
      raise UserError(f"checkpoint {path}/{step} cannot be read ({type(e).__name__}); it is corrupt or "
                      "incomplete: pick another with init.step or retrain") from e
    return restored["state"], step
  finally:
    manager.close()
