"""The model described in the workdir: `model.json`, and building a task model from it.

A model description (a "spec") is a JSON-able dict that says everything needed to rebuild a task's
model without loading any data: the task name, the backbone's architecture, the input it expects
(tokenizer file and special ids, or image shape), the pooling, and the heads' sizes. A task makes
it once from its config and data (`Task.model_spec`); the loop saves it as WORKDIR/model.json and
builds the model with `build`, a pure function of it. `jembed.load` stands on the same two calls.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from jembed import checkpoint as ckpt_lib
from jembed import fs, peft, tree
from jembed.errors import UserError
from jembed.models import resnet, vit
from jembed.tasks import task_class

MODEL_FILE = "model.json"

# The image backbone's description with its defaults, sized for 8x8 digits on a CPU (each
# backbone's section from its module's DEFAULTS). The image configs' `model` section is built from it
# (configs/common.py), and a fine-tuning run from scratch fills the fields it leaves at 0/"" from it.
DEFAULT_BACKBONE = dict(backbone="resnet", resnet=dict(resnet.DEFAULTS), vit=dict(vit.DEFAULTS))


def build(spec: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
  """The task model `spec` describes, unsharded (the loop places it on the mesh); the task registry
  (jembed/tasks/__init__.py) names the class that builds it."""
  return task_class(spec["task"]).build_model(spec, rngs)


def save(workdir: str, spec: dict[str, Any]) -> None:
  fs.write_json(fs.join(workdir, MODEL_FILE), spec)


def read(directory: str) -> dict[str, Any] | None:
  """The spec saved in `directory`, or None when it has none."""
  path = fs.join(directory, MODEL_FILE)
  if not fs.exists(path):
    return None
  try:
    return json.loads(fs.read_text(path))
  except (OSError, ValueError) as e:
    raise UserError(f"{path} cannot be read ({type(e).__name__}); the workdir is damaged: "
                    "restore model.json from a backup or train into a new --workdir") from e


def load_model(workdir: str, step: int | None = None) -> tuple[dict[str, Any], nnx.Module, int]:
  """(spec, task model in eval mode with the checkpoint's parameters, step) of a jembed workdir,
  without loading any data. LoRA runs come back with their adapters merged."""
  spec = read(workdir)
  if spec is None:
    raise UserError(f"{workdir} has no {MODEL_FILE}; point at the --workdir of a jembed run (one "
                    "written by jembed 0.2 or later)")
  state, step = ckpt_lib.restore_params_only(workdir, step)
  params = dense_params(workdir, state)
  abstract = nnx.eval_shape(lambda: build(spec, nnx.Rngs(params=0, dropout=0)))
  graphdef, abs_params, rng, rest = nnx.split(abstract, nnx.Param, nnx.RngState, ...)
  concrete = jax.tree.map(lambda s: jax.random.key(0) if jax.dtypes.issubdtype(
      s.dtype, jax.dtypes.prng_key) else jax.numpy.zeros(s.shape, s.dtype), rng)
  model = nnx.merge(graphdef, fill_like(abs_params, params), concrete,
                    fill_like(rest, state.get("model_state") or {}))
  model.eval()
  return spec, model, step


def fill_like(abstract_state, values: dict):
  """`values` (a restored pure dict, int keys possibly as strings) in the structure of an abstract
  nnx.State, so merge gets exactly the tree it expects."""
  flat = tree.flatten(values)
  pure = nnx.to_pure_dict(abstract_state)
  missing = [p for p in tree.flatten(pure) if p not in flat]
  if missing:
    raise UserError(f"the checkpoint lacks '{missing[0]}' of the model its {MODEL_FILE} describes; "
                    "the workdir is damaged or mixed from two runs")
  filled = tree.replace(pure, {p: np.asarray(flat[p]) for p in tree.flatten(pure)})
  nnx.replace_by_pure_dict(abstract_state, filled)
  return abstract_state


def dense_params(workdir: str, state: dict) -> dict:
  """The full parameter tree of a checkpoint: trained and frozen parts put back together by the
  tuning the run used (LoRA factors merged into their kernels)."""
  run_config = json.loads(fs.read_text(fs.join(workdir, "config.json")))
  tuning = peft.tuning_from_config(ml_collections.ConfigDict(run_config["peft"])
                                   if run_config.get("peft") else None)
  return tuning.combine(state.get("params") or {}, state.get("frozen") or {})
