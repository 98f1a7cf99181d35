"""The interface between an objective and the train loop.

A task says what its data looks like, how its model is described (`model_spec`) and built from that
description alone (`build_model`), and its loss and metrics for a batch. The loop in
`jembed/train.py` knows nothing else about it: which parameters train comes from `config.peft`
(jembed/peft/), warm starts from `config.init` (jembed/init.py).
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from jembed import config as config_lib
from jembed import init as init_lib
from jembed.state import ModelDef

# The metric a loss reports its weight in (see `Task.loss`).
LOSS_WEIGHT = "loss_weight"


@dataclasses.dataclass
class Data:
  """In-memory columns (name -> array with examples on axis 0) for the train and eval splits; or,
  for train, a source that makes its own iterator (`train_iterator(global_batch, seed)`, e.g. a
  prepared corpus streamed from disk: jembed.data.streaming.PreparedTrain)."""
  train: Any
  eval: dict[str, np.ndarray] | None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


class Task(abc.ABC):
  """Base class: subclasses implement `load_data`, `model_spec`, `build_model` and `loss`."""

  # What one example counts as for throughput: `items_per_example` items of `unit`.
  unit = "examples"
  # The attribute of the task model that holds the backbone: what a warm start restores from another
  # task's checkpoint, what a frozen-backbone tuning runs in inference mode, what `embed` runs.
  backbone = "encoder"
  # Why gradient accumulation (config.grad_accum_steps > 1) would change this task's objective, or
  # "" when it does not. A loss that compares examples within the batch (in-batch negatives) would
  # see one micro-batch's worth of them: such tasks refuse accumulation with this reason.
  no_accumulation = ""
  # A regex of task-owned parameters (e.g. a learnable temperature) that train under every tuning:
  # a LoRA or adapter tuning freezes the backbone, not the objective's own scalars.
  task_params = ""
  # A regex of backbone parameters the task adds to what a warm-start source has (e.g. BERT's pooler
  # under a text classifier's Hugging Face head): they start fresh instead of failing the warm start.
  fresh_params = ""
  # True when `value_and_grad` itself leaves the model state unchanged on a step whose loss or
  # gradients are not finite (two_tower's row-wise tables), so the loop need not select between the
  # old and new state: for catalogue-sized tables that select would cost more than the step.
  guards_model_state = False

  def __init__(self, config, workdir: str):
    self.config = config_lib.complete(config)  # fields it lacks take the base's values
    self.workdir = workdir
    # The warm-start source named by config.init (None: from scratch). Resolved (and its path checked)
    # before any data is read, so tasks can take their architecture and tokenizer from it.
    self.init = init_lib.source_from_config(config)

  @classmethod
  def backbone_of(cls, spec: dict[str, Any]) -> str:
    """The backbone attribute of the model `spec` describes."""
    return cls.backbone

  @classmethod
  def create(cls, config, workdir: str) -> "Task":
    """The task object for `config` (a task may pick a subclass, e.g. by data modality)."""
    return cls(config, workdir)

  # -- data (host side; runs before anything is written, so bad input fails early) --
  @abc.abstractmethod
  def load_data(self) -> Data:
    """Loads and validates the train and eval splits (UserError on bad input)."""

  def items_per_example(self) -> int:
    return 1

  def save_artifacts(self) -> None:
    """Writes what the model description refers to (e.g. a trained tokenizer); called only once
    every check has passed, so bad input leaves nothing behind."""

  # -- model --
  @abc.abstractmethod
  def model_spec(self) -> dict[str, Any]:
    """The resolved model description (JSON-able; saved as WORKDIR/model.json); may use what
    `load_data` learned (vocabulary size, image shape, class names)."""

  @classmethod
  @abc.abstractmethod
  def build_model(cls, spec: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
    """The backbone and heads from `spec` alone, unsharded; `rngs` has `params` and `dropout`."""

  # -- objective (inside jit) --
  def prepare(self, batch: dict[str, jax.Array], rng: jax.Array, train: bool) -> dict[str, jax.Array]:
    """The batch with its random inputs drawn (MLM masks, augmentations), once for the whole global
    batch and before it is split into micro-batches, so they do not depend on grad_accum_steps.
    Runs inside the step; `loss` receives its result. Default: the batch unchanged."""
    return batch

  @abc.abstractmethod
  def loss(self, model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array, train: bool
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and a dict of scalar metrics; `accuracy` expected. The model is already in train
    or eval mode; `batch` comes from `prepare`.

    The loss and the metrics are means over the batch with one weight: the number of examples, or,
    when the loss is a mean over something else (MLM: the masked tokens), that total as the metric
    `LOSS_WEIGHT`. Gradient accumulation weights each micro-batch by it, so the accumulated update
    is the full batch's (the loop removes it from the logged metrics)."""

  def value_and_grad(self, make_model: Callable[..., nnx.Module], trained: Any, batch, rng):
    """((loss, (metrics, model_state)), grads w.r.t. `trained`); `make_model(trained)` merges the
    trained parameters into a train-mode model. Tasks that compute gradients another way (e.g. a
    gradient-cached contrastive loss) override it."""
    def loss_fn(t):
      model = make_model(t)
      loss, metrics = self.loss(model, batch, rng, True)
      return loss, (metrics, ModelDef.model_state(model))

    return jax.value_and_grad(loss_fn, has_aux=True)(trained)

  # -- reporting (host side) --
  def extra_eval(self, model: nnx.Module, step: int) -> dict[str, float]:
    """Evaluations beyond held-out loss (e.g. a kNN probe on frozen features); merged into eval rows."""
    return {}

  def final_summary(self, model: nnx.Module, eval_metrics: dict[str, float], logger) -> None:
    """Printed and saved at the end of training."""
