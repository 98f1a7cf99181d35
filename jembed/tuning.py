"""Which parameters train. A tuning splits the parameter tree into a trained and a frozen part and
puts them back together inside the step; gradients and optimizer state exist only for the trained
part, so frozen weights cost no gradient computation and no optimizer memory."""
from __future__ import annotations

from typing import Any

import jax


class FullTuning:
  """Every parameter trains."""
  name = "full"

  def split(self, params: dict, key: jax.Array) -> tuple[dict, dict]:
    return params, {}

  def split_specs(self, specs: dict, abstract_params: dict) -> tuple[dict, dict]:
    """The same split applied to the tree of logical PartitionSpecs of the parameters (whose
    shapes are `abstract_params`): the shardings of the trained and frozen trees."""
    return specs, {}

  def combine(self, trained: dict, frozen: dict, *, rng: jax.Array | None = None,
              train: bool = False) -> dict:
    return trained

  def describe(self, trained: Any, frozen: Any) -> str:
    n_train = sum(x.size for x in jax.tree.leaves(trained))
    n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
    total = n_train + n_frozen
    return f"{self.name}: {n_train:,} of {total:,} parameters train ({100 * n_train / max(total, 1):.2f}%)"
