"""The train state and the task model split for functional use (what the train step closes over).

`TrainState` is the pytree the step carries (trained and frozen parameters, optimizer and model
state, the non-finite record); `ModelDef` turns a task model into graph definitions in train and
eval mode, so the step merges parameters into a model inside jit. Both depend on nothing in jembed,
so tasks (which compute their gradients through `ModelDef.model_state`) and the loop share them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any        # the trained parameters (all of them for full training)
  frozen: Any        # parameters that do not train (a frozen backbone, a LoRA base)
  opt_state: Any     # optax state, for `params` only
  model_state: Any   # non-parameter variables, e.g. BatchNorm statistics
  nonfinite: Any = None  # on-device record of non-finite steps (see `reliability.nonfinite_record`)


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """A task model split for functional use: graph definitions in train and eval mode, and a template
  for the dropout stream's state (reseeded every step, so its value never matters)."""
  train_graph: Any
  eval_graph: Any
  rng_template: Any

  @classmethod
  def from_abstract(cls, model: nnx.Module, *, frozen_backbone: str | None = None) -> "ModelDef":
    model.train()
    if frozen_backbone:
      # A frozen backbone runs in inference mode: no dropout, BatchNorm keeps its statistics.
      getattr(model, frozen_backbone).eval()
    train_graph, _, rng, _ = nnx.split(model, nnx.Param, nnx.RngState, ...)
    model.eval()
    eval_graph = nnx.split(model, nnx.Param, nnx.RngState, ...)[0]
    template = jax.tree.map(lambda s: jax.random.key(0) if _is_key(s) else jnp.zeros(s.shape, s.dtype),
                            rng)
    return cls(train_graph, eval_graph, template)

  def merge(self, params, model_state, *, train: bool, dropout_key=None) -> nnx.Module:
    rng = self.rng_template
    if train and dropout_key is not None:
      # The dropout stream (the only stream models keep) starts from this step's key.
      rng = jax.tree.map(lambda t: dropout_key if _is_key(t) else t, rng)
    return nnx.merge(self.train_graph if train else self.eval_graph, params, rng, model_state)

  @staticmethod
  def model_state(model: nnx.Module):
    """The non-parameter, non-RNG variables (BatchNorm statistics) as a pure dict."""
    return nnx.to_pure_dict(nnx.split(model, nnx.Param, nnx.RngState, ...)[3])


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
