"""Exports of a LoRA fine-tuning: the adapters alone, or merged into dense weights.

  WORKDIR/lora_adapter/   orbax {adapters, extra} (state/) + lora_config.json: the LoRA settings and
                          the fingerprint of the frozen base it was trained on; loading it onto
                          another base is refused
  WORKDIR/merged/         orbax dense parameter tree (W + s * A @ B folded in), loadable as a plain
                          model with no LoRA code

Each directory is written beside the old one and swapped in only when complete (fs.swap_dir), so a
crash mid-save never leaves a half-written export. WORKDIR may be local or gs://. In a multi-process
run every process calls these functions (the merge and the fingerprint are collectives, orbax writes
each process's shards); process 0 alone writes lora_config.json and renames. Reading an adapter
back (it needs the LoRA settings) is jembed.peft.lora.load_adapters.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import jax
import numpy as np

from jembed import fs, multihost, tree

ADAPTER_DIR = "lora_adapter"
MERGED_DIR = "merged"
CONFIG_FILE = "lora_config.json"
STATE_DIR = "state"


def _sample_index(shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
  size = math.prod(shape)
  rng = np.random.default_rng(size)
  flat = np.unique(np.concatenate([np.arange(min(size, 4)), rng.integers(0, size, 12)]))
  return np.unravel_index(flat, shape)


def fingerprint(base: Tree) -> str:
  """Hash of paths, shapes, dtypes and a few exact sample values of every leaf.

  Samples are gathered at fixed indices (first elements plus a fixed pseudo-random set)
  rather than summed, so the result does not depend on how the base is sharded, and only
  ~16 values per leaf leave the device (one jitted gather for the whole tree).
  """
  items = sorted(tree.flatten(base).items())
  shapes = [tuple(np.shape(leaf)) for _, leaf in items]
  sampled = {i for i, s in enumerate(shapes) if math.prod(s) > 0 and s}
  on_device = [i for i, (_, leaf) in enumerate(items) if isinstance(leaf, jax.Array)]
  pick = [i in sampled for i in on_device]
  gather = jax.jit(lambda xs: [x[_sample_index(x.shape)] if p else x for x, p in zip(xs, pick)])
  # host_values, not device_get: the leaves (and so the samples) may be sharded over several
  # processes; every process computes the fingerprint, so this collective runs on all of them.
  host = dict(zip(on_device, multihost.host_values(gather([items[i][1] for i in on_device]))))
  h = hashlib.sha256()
  for i, (path, leaf) in enumerate(items):
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    h.update(f"{path}|{shapes[i]}|{np.dtype(dtype)}|".encode())
    if i in host:
      values = host[i].ravel()
    elif i in sampled:
      values = np.asarray(leaf)[_sample_index(shapes[i])]
    else:
      values = np.asarray(leaf).ravel()
    h.update(np.asarray(values, np.float64).tobytes())
  return h.hexdigest()[:32]


def _save_tree(path: str, params: Any) -> None:
  """An orbax save of `params` into `path` (an empty directory, replaced). Every process of a
  multi-process run calls it: orbax writes each process's shards of the global arrays."""
  import orbax.checkpoint as ocp  # heavy import, only needed here
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(fs.path(path), params, force=True)
  ckpt.wait_until_finished()


def save_params(directory: str, params: dict) -> None:
  """A dense parameter tree as an orbax checkpoint (replaces an existing one). Local or gs://; with
  several processes every process calls it."""
  fs.swap_dir(fs.absolute(directory), lambda tmp: _save_tree(tmp, params), all_processes=True)


def load_params(directory: str) -> dict:
  """The tree `save_params` wrote (numpy leaves; layer keys come back as strings, which
  jembed.tree paths treat like ints)."""
  import orbax.checkpoint as ocp
  from jembed import checkpoint
  directory = fs.absolute(directory)
  # With a target on this process's device: the saved shardings name the devices of the run that
  # wrote it (several processes, perhaps), which a reader does not have.
  return ocp.StandardCheckpointer().restore(fs.path(directory), checkpoint.local_target(directory))


def save_adapters(directory: str, tuning: "LoraTuning", trained: dict, frozen: dict) -> None:
  """The adapter-only checkpoint: the trained tree and lora_config.json with the fingerprint of
  `frozen` (the base without the trained extras, which change in training). Local or gs://; with
  several processes every process calls it (process 0 writes lora_config.json)."""
  meta = {"config": dataclasses.asdict(tuning.cfg), "base_fingerprint": fingerprint(frozen)}

  def write(tmp):
    _save_tree(fs.join(tmp, STATE_DIR), trained)
    if fs.is_writer():
      fs.write_json(fs.join(tmp, CONFIG_FILE), meta)
  fs.swap_dir(fs.absolute(directory), write, all_processes=True)


def export_lora(workdir: str, tuning: "LoraTuning", trained: dict, frozen: dict) -> tuple[str, str]:
  """Writes the adapter-only checkpoint and the merged dense params; returns both directories.
  `workdir` may be local or gs://. With several processes EVERY process calls it: the merge and the
  fingerprint are jitted over global arrays and orbax saves each process's shards."""
  adapter_dir = fs.join(fs.absolute(workdir), ADAPTER_DIR)
  save_adapters(adapter_dir, tuning, trained, frozen)
  merged_dir = fs.join(fs.absolute(workdir), MERGED_DIR)
  save_params(merged_dir, jax.jit(tuning.combine)(trained, frozen))
  return adapter_dir, merged_dir
