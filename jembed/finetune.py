"""Exports of a fine-tuned model: LoRA adapters alone, or merged into dense weights.

  WORKDIR/lora_adapter/   orbax {adapters, extra} + lora_config.json (settings and the fingerprint
                          of the base it was trained on; loading onto another base is refused)
  WORKDIR/merged/         orbax dense parameter tree (W + s * A @ B folded in), loadable as a
                          plain model with no LoRA code
"""
from __future__ import annotations

import os
import shutil

import jax
import numpy as np

from jembed.peft import lora
from jembed.tuning import LoraTuning, flat_adapters

ADAPTER_DIR = "lora_adapter"
MERGED_DIR = "merged"


def _str_keys(tree):
  return {str(k): _str_keys(v) if isinstance(v, dict) else v for k, v in tree.items()}


def save_params(directory: str, params: dict) -> None:
  """A dense parameter tree as an orbax checkpoint (replaces an existing one)."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  # Written beside the old export and swapped in only when complete, so a crash mid-save never
  # leaves the workdir without a readable export.
  tmp, old = directory + ".tmp", directory + ".old"
  for path in (tmp, old):
    if os.path.exists(path):
      shutil.rmtree(path)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp, _str_keys(params))
  ckpt.wait_until_finished()
  if os.path.exists(directory):
    os.replace(directory, old)
  os.replace(tmp, directory)
  if os.path.exists(old):
    shutil.rmtree(old)


def load_params(directory: str) -> dict:
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(os.path.abspath(directory))


def export_lora(workdir: str, tuning: LoraTuning, trained: dict, frozen: dict) -> tuple[str, str]:
  """Writes the adapter-only checkpoint and the merged dense params; returns both directories."""
  adapters = flat_adapters(trained["adapters"])
  # The fingerprint is of the frozen base without the trained extras, which change in training.
  fp = lora.fingerprint(frozen)
  adapter_dir = os.path.join(workdir, ADAPTER_DIR)
  lora.save_adapters(adapter_dir, adapters, trained["extra"], tuning.cfg, fp)
  merged_dir = os.path.join(workdir, MERGED_DIR)
  save_params(merged_dir, jax.jit(tuning.merged)(trained, frozen))
  return adapter_dir, merged_dir


def load_lora(directory: str, frozen: dict, extra_like: dict) -> tuple[dict, dict, lora.LoraConfig]:
  """(adapters, extra, cfg) from an adapter-only checkpoint onto the base `frozen` (the parameters
  that were not trained); `extra_like` has the structure of the trained extras (e.g. a fresh head).
  Refuses a base other than the one the adapters were trained on."""
  cfg, _ = lora._read_config(os.path.abspath(directory))  # pylint: disable=protected-access
  full = lora.combine(frozen, extra_like)
  shapes = jax.eval_shape(lambda p: lora.init_adapters(p, cfg, jax.random.key(0)), full)
  like = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
  abstract = {"adapters": jax.tree.map(like, shapes), "extra": jax.tree.map(like, extra_like)}
  if any(s.sharding is None for s in jax.tree.leaves(abstract)):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding or dev),
                            abstract)
  return lora.load_adapters(directory, frozen, abstract)


def directory_bytes(directory: str) -> int:
  total = 0
  for root, _, files in os.walk(directory):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total
