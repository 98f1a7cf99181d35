"""Exports of a LoRA fine-tuning: the adapters alone, or merged into dense weights.

  WORKDIR/lora_adapter/   orbax {adapters, extra} (state/) + lora_config.json: the LoRA settings and
                          the fingerprint of the frozen base it was trained on; loading it onto
                          another base is refused
  WORKDIR/merged/         orbax dense parameter tree (W + s * A @ B folded in), loadable as a plain
                          model with no LoRA code

Each directory is written beside the old one and swapped in only when complete, so a crash
mid-save never leaves a half-written export.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import uuid
from typing import Any, Callable

import jax
import numpy as np

from jembed import tree
from jembed.errors import UserError
from jembed.peft.lora import LoraConfig, LoraTuning, init_adapters, nest

ADAPTER_DIR = "lora_adapter"
MERGED_DIR = "merged"
_CONFIG_FILE = "lora_config.json"
_STATE_DIR = "state"


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
  sampled = [i for i, s in enumerate(shapes) if math.prod(s) > 0 and s]
  on_device = [i for i in sampled if isinstance(items[i][1], jax.Array)]
  gather = jax.jit(lambda xs: [x[_sample_index(x.shape)] for x in xs])
  samples = dict(zip(on_device, jax.device_get(gather([items[i][1] for i in on_device]))))
  h = hashlib.sha256()
  for i, (path, leaf) in enumerate(items):
    h.update(f"{path}|{shapes[i]}|{np.dtype(getattr(leaf, 'dtype', np.asarray(leaf).dtype))}|".encode())
    if i in samples:
      values = samples[i]
    elif i in sampled:
      values = np.asarray(leaf)[_sample_index(shapes[i])]
    else:
      values = np.asarray(leaf).ravel()
    h.update(np.asarray(values, np.float64).tobytes())
  return h.hexdigest()[:32]


def _publish(directory: str, write: Callable[[str], None]) -> None:
  """Runs write(tmp) (which creates the sibling path tmp), then swaps tmp in for `directory`."""
  directory = os.path.abspath(os.fspath(directory))
  tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    write(tmp)
    if os.path.exists(directory):
      old = f"{directory}.old-{uuid.uuid4().hex[:8]}"
      os.rename(directory, old)
      os.rename(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _save_tree(path: str, params: Any) -> None:
  import orbax.checkpoint as ocp  # heavy import, only needed here
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(path, params)
  ckpt.wait_until_finished()


def save_params(directory: str, params: dict) -> None:
  """A dense parameter tree as an orbax checkpoint (replaces an existing one)."""
  _publish(directory, lambda tmp: _save_tree(tmp, params))


def load_params(directory: str) -> dict:
  """The tree `save_params` wrote (numpy leaves; layer keys come back as strings, which
  jembed.tree paths treat like ints)."""
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(os.path.abspath(directory))


def save_adapters(directory: str, tuning: LoraTuning, trained: dict, frozen: dict) -> None:
  """The adapter-only checkpoint: the trained tree and lora_config.json with the fingerprint of
  `frozen` (the base without the trained extras, which change in training)."""
  meta = {"config": dataclasses.asdict(tuning.cfg), "base_fingerprint": fingerprint(frozen)}

  def write(tmp):
    os.makedirs(tmp)
    _save_tree(os.path.join(tmp, _STATE_DIR), trained)
    with open(os.path.join(tmp, _CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2)
  _publish(directory, write)


def _read_config(directory: str) -> tuple[LoraConfig, str]:
  path = os.path.join(directory, _CONFIG_FILE)
  if not os.path.isdir(directory):
    raise UserError(f"adapter directory {directory} does not exist; pass the directory written "
                    "by save_adapters (WORKDIR/lora_adapter)")
  try:
    with open(path) as f:
      meta = json.load(f)
    return LoraConfig.from_peft(meta["config"]), str(meta["base_fingerprint"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path} is missing or corrupt ({type(e).__name__}: {e}); re-save the "
                    "adapter with save_adapters") from None


def load_adapters(directory: str, frozen: dict, extra_like: dict) -> tuple[dict, LoraConfig]:
  """(trained, cfg) from an adapter-only checkpoint, for `LoraTuning(cfg).combine(trained, frozen)`.
  `frozen` is the base the adapters were trained on (refused otherwise); `extra_like` has the
  structure of the trained extras (e.g. a fresh head). Leaves keep `frozen`'s and `extra_like`'s
  shardings (the default device where they have none)."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(os.fspath(directory))
  cfg, saved_fp = _read_config(directory)
  actual = fingerprint(frozen)
  if saved_fp != actual:
    raise UserError(f"adapter was trained on a different base model: {directory} expects base "
                    f"fingerprint {saved_fp}, this base is {actual}; load the matching base weights")
  full = tree.merge(frozen, extra_like)
  shapes = jax.eval_shape(lambda p: init_adapters(p, cfg, jax.random.key(0)), full)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  like = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                        sharding=getattr(x, "sharding", None) or dev)
  abstract = {"adapters": jax.tree.map(like, nest(shapes, like=frozen)),
              "extra": jax.tree.map(like, extra_like)}
  try:
    trained = ocp.StandardCheckpointer().restore(os.path.join(directory, _STATE_DIR), abstract)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise UserError(f"cannot restore adapters from {directory} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); re-save them with "
                    "save_adapters") from None
  return trained, cfg


def export_lora(workdir: str, tuning: LoraTuning, trained: dict, frozen: dict) -> tuple[str, str]:
  """Writes the adapter-only checkpoint and the merged dense params; returns both directories."""
  adapter_dir = os.path.join(workdir, ADAPTER_DIR)
  save_adapters(adapter_dir, tuning, trained, frozen)
  merged_dir = os.path.join(workdir, MERGED_DIR)
  save_params(merged_dir, jax.jit(tuning.combine)(trained, frozen))
  return adapter_dir, merged_dir
