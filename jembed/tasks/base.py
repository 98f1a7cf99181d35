"""The interface between an objective and the train loop.

A task says how to build its model (backbone and heads), what its data looks like, and its loss
and metrics for a batch. The loop in `jembed/train.py` knows nothing else about it.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx


@dataclasses.dataclass
class Data:
  """In-memory columns (name -> array with examples on axis 0) for the train and eval splits."""
  train: dict[str, np.ndarray]
  eval: dict[str, np.ndarray] | None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


class Task(abc.ABC):
  """Base class: subclasses implement `load_data`, `build_model` and `loss`."""

  # What one example counts as for throughput: `items_per_example` items of `unit`.
  unit = "examples"

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = workdir

  # -- data (host side; runs before anything is written, so bad input fails early) --
  @abc.abstractmethod
  def load_data(self) -> Data:
    """Loads and validates the train and eval splits (UserError on bad input)."""

  def items_per_example(self) -> int:
    return 1

  def save_artifacts(self) -> None:
    """Writes what the run needs to be reproduced (e.g. a trained tokenizer); called only once every
    check has passed, so bad input leaves nothing behind."""

  # -- model --
  @abc.abstractmethod
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """The backbone and heads, unsharded; the loop places them on the mesh."""

  def tuning(self):
    """How parameters split into trained and frozen; full training unless a task says otherwise."""
    from jembed.peft import FullTuning
    return FullTuning()

  def load_pretrained(self, params: dict, model_state: dict, mesh, rules) -> tuple[dict, dict]:
    """Hook for fine-tuning tasks to overwrite freshly initialised (sharded) parameters."""
    return params, model_state

  # -- objective (inside jit) --
  @abc.abstractmethod
  def loss(self, model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array, train: bool
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and a dict of scalar metrics (means over the global batch); `accuracy` expected."""

  # -- reporting (host side) --
  def extra_eval(self, model: nnx.Module, step: int) -> dict[str, float]:
    """Evaluations beyond held-out loss (e.g. a kNN probe on frozen features); merged into eval rows."""
    return {}

  def final_summary(self, model: nnx.Module, eval_metrics: dict[str, float], logger) -> None:
    """Printed and saved at the end of training."""

  def export(self, state, tuning) -> None:
    """Called once after `final_summary` with the final TrainState and the tuning, for exports that
    need the trained/frozen split (e.g. LoRA adapters apart from their base)."""
