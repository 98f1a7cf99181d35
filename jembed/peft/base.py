"""Which parameters train: the Tuning interface, full fine-tuning and regex-chosen trained leaves.

A tuning labels every leaf of the parameter tree "trained" or "frozen" (`labels`, one label tree).
The trained and frozen values (`split`) and their sharding specs (`split_specs`) are both cut from
that one tree, and the optimizer is initialised on the trained part only, so frozen weights get no
gradient and no optimizer state. `combine` puts the parts back together inside the train step.

A tuning also carries what a task would otherwise infer from the method name: whether the backbone
runs in inference mode (`backbone_mode`), what it adds to the model description
(`model_overrides`), which parameters may be missing at a warm start (`new_params`) and what it
writes at the end of a run (`export`).
"""
from __future__ import annotations

import re
from typing import Any

import jax

from jembed import tree
from jembed.errors import UserError

TRAINED, FROZEN = "trained", "frozen"
HEAD_REGEX = r"^head/"


def count(params: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


class Tuning:
  """The interface, with the behaviour every tuning shares; subclasses set `trains`."""
  name = "tuning"
  backbone_mode = "train"   # "inference": the frozen backbone keeps BatchNorm statistics, no dropout
  new_params = ""           # regex of parameters a warm start may lack ("" = none)
  task_params = ""          # regex of the task's own parameters (Task.task_params): always trained

  def trains(self, path: str, leaf: Any) -> bool:
    raise NotImplementedError

  def labels(self, params: dict) -> dict:
    """The label tree: TRAINED or FROZEN at every leaf of `params` (values or abstract shapes)."""
    task = re.compile(self.task_params) if self.task_params else None
    return tree.labels(params, lambda p, x: TRAINED if self.trains(p, x) or (
        task is not None and task.search(p)) else FROZEN)

  def split(self, params: dict, key: jax.Array) -> tuple[dict, dict]:
    """(trained, frozen) values. `key` seeds parameters a tuning adds (LoRA factors)."""
    parts = tree.partition(params, self.labels(params))
    return parts.get(TRAINED, {}), parts.get(FROZEN, {})

  def split_specs(self, specs: dict, abstract_params: dict) -> tuple[dict, dict]:
    """The same split of the tree of PartitionSpecs of the parameters (shapes: `abstract_params`)."""
    parts = tree.partition(specs, self.labels(abstract_params))
    return parts.get(TRAINED, {}), parts.get(FROZEN, {})

  def combine(self, trained: dict, frozen: dict, *, rng: jax.Array | None = None,
              train: bool = False) -> dict:
    """The full parameter tree the model runs on (inside jit; differentiable in `trained`)."""
    return tree.merge(frozen, trained) if frozen else trained

  def model_overrides(self, model_config: dict) -> dict:
    """The model description (a plain dict) with what this tuning needs added."""
    return dict(model_config)

  def export(self, workdir: str, state: Any) -> None:
    """Writes this tuning's artifacts from the final TrainState (nothing by default)."""

  def describe(self, trained: Any, frozen: Any) -> str:
    n_train = count(trained)
    total = n_train + count(frozen)
    return f"{self.name}: {n_train:,} of {total:,} parameters train ({100 * n_train / max(total, 1):.2f}%)"


class FullTuning(Tuning):
  """Every parameter trains."""
  name = "full"

  def trains(self, path, leaf):
    return True


class RegexTuning(Tuning):
  """Leaves whose path matches `trainable` (re.search) train; the rest is frozen."""
  name = "regex"

  def __init__(self, trainable: str):
    try:
      self._trainable = re.compile(trainable)
    except re.error as e:
      raise UserError(f"trainable regex {trainable!r} is invalid ({e}); fix the pattern") from None
    self.trainable = trainable

  def trains(self, path, leaf):
    return self._trainable.search(path) is not None

  def labels(self, params):
    out = super().labels(params)
    if TRAINED not in jax.tree.leaves(out):
      raise UserError(f"{self.name}: no parameter matches {self.trainable!r}, nothing would train; "
                      "check that the model has the expected head/adapter modules")
    return out


class LinearProbeTuning(RegexTuning):
  """Only the task head trains; the frozen backbone runs in inference mode (BatchNorm keeps its
  pretrained statistics rather than drifting to fine-tuning batch statistics)."""
  name = "linear_probe"
  backbone_mode = "inference"

  def __init__(self, head_regex: str = HEAD_REGEX):
    super().__init__(head_regex)
