"""Which parameters train. A tuning splits the parameter tree into a trained and a frozen part and
puts them back together inside the step; gradients and optimizer state exist only for the trained
part, so frozen weights cost no gradient computation and no optimizer memory.

Tunings (chosen by `config.peft.method`, see `tuning_from_config`):
  full          every parameter trains.
  linear_probe  only the task head trains (leaves under `head/`); the backbone is frozen. Tasks run a
                frozen backbone in inference mode, so BatchNorm uses (and keeps) its pretrained
                running statistics rather than drifting to fine-tuning batch statistics.
  lora          low-rank factors for the kernels matched by `peft.targets`, plus `peft.trainable`
                leaves (e.g. the head), train; the base is frozen (jembed/peft/lora.py).
  adapter       Houlsby bottleneck adapters, LayerNorms and the head train
                (jembed.peft.adapters.ADAPTER_TRAINABLE); the model is built with adapters.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections

from jembed.errors import UserError
from jembed.peft import lora
from jembed.peft.adapters import ADAPTER_TRAINABLE

METHODS = ("full", "linear_probe", "lora", "adapter")
HEAD_REGEX = r"^head/"


def _count(tree: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


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
    n_train = _count(trained)
    total = n_train + _count(frozen)
    return f"{self.name}: {n_train:,} of {total:,} parameters train ({100 * n_train / max(total, 1):.2f}%)"


def _select(tree: dict, keep, prefix: str = "") -> dict:
  """Subtree of the leaves whose "/"-joined path satisfies keep(path); empty dicts pruned."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, dict):
      sub = _select(v, keep, path + "/")
      if sub:
        out[k] = sub
    elif keep(path):
      out[k] = v
  return out


class RegexTuning(FullTuning):
  """Leaves whose path matches `trainable` (re.search) train; the rest is frozen."""
  name = "regex"

  def __init__(self, trainable: str):
    self.trainable = trainable

  def _hit(self, path: str) -> bool:
    return re.search(self.trainable, path) is not None

  def split(self, params, key):
    trained = _select(params, self._hit)
    if not trained:
      raise UserError(f"{self.name}: no parameter matches {self.trainable!r}, nothing would train; "
                      "check that the model has the expected head/adapter modules")
    return trained, _select(params, lambda p: not self._hit(p))

  def split_specs(self, specs, abstract_params):
    return _select(specs, self._hit), _select(specs, lambda p: not self._hit(p))

  def combine(self, trained, frozen, *, rng=None, train=False):
    return lora.combine(frozen, trained)


class LinearProbeTuning(RegexTuning):
  """Only the task head trains; the backbone is frozen (run it in inference mode)."""
  name = "linear_probe"

  def __init__(self, head_regex: str = HEAD_REGEX):
    super().__init__(head_regex)


class AdapterTuning(RegexTuning):
  """Bottleneck adapters, LayerNorms and the head train (the model must be built with adapters)."""
  name = "adapter"

  def __init__(self, trainable: str = ADAPTER_TRAINABLE):
    super().__init__(trainable)


# ---------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------
# In the train state the adapters are nested by path segment ({"encoder": {"layers": {"0": ...}}} with
# {"a", "b"} leaves) rather than keyed by "/"-joined path strings, which checkpoint names cannot hold.
def nest_adapters(adapters: dict) -> dict:
  out: dict = {}
  for path, ab in adapters.items():
    node = out
    for part in path.split("/"):
      node = node.setdefault(part, {})
    node.update(ab)
  return out


def flat_adapters(nested: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in nested.items():
    if set(v) == {"a", "b"} and not isinstance(v["a"], dict):
      out[f"{prefix}{k}"] = v
    else:
      out.update(flat_adapters(v, f"{prefix}{k}/"))
  return out


class LoraTuning(FullTuning):
  """Trained: {"adapters": nested low-rank factors, "extra": fully trained leaves}; frozen: the rest
  of the base. `combine` folds W + s * A @ B into the base inside the step (lora.apply)."""
  name = "lora"

  def __init__(self, cfg: lora.LoraConfig):
    self.cfg = cfg

  def split(self, params, key):
    extra, frozen = lora.split_trainable(params, self.cfg)
    adapters = lora.init_adapters(params, self.cfg, key)
    return {"adapters": nest_adapters(adapters), "extra": extra}, frozen

  def split_specs(self, specs, abstract_params):
    extra, frozen = lora.split_trainable(specs, self.cfg)
    shapes = jax.eval_shape(lambda p: lora.init_adapters(p, self.cfg, jax.random.key(0)),
                            abstract_params)
    adapter_specs = lora.adapter_partition_specs(specs, shapes)
    return {"adapters": nest_adapters(adapter_specs), "extra": extra}, frozen

  def combine(self, trained, frozen, *, rng=None, train=False):
    return lora.apply(frozen, flat_adapters(trained["adapters"]), self.cfg, extra=trained["extra"],
                      dropout_key=rng if train else None)

  def merged(self, trained, frozen) -> dict:
    """The dense parameter tree for export: every adapter folded in, no dropout."""
    return lora.merge(frozen, flat_adapters(trained["adapters"]), self.cfg, extra=trained["extra"])

  def describe(self, trained, frozen):
    n_ad, n_extra = _count(trained["adapters"]), _count(trained["extra"])
    base = _count(frozen) + n_extra
    return (f"lora (rank {self.cfg.rank}, alpha {self.cfg.alpha}{', rsLoRA' if self.cfg.rslora else ''},"
            f" {len(flat_adapters(trained['adapters']))} kernels): {n_ad + n_extra:,} trained parameters"
            f" ({n_ad:,} LoRA + {n_extra:,} extra) on a {base:,}-parameter base"
            f" ({100 * (n_ad + n_extra) / max(base, 1):.2f}%)")


def lora_config(peft) -> lora.LoraConfig:
  if peft.get("unmerged", ""):
    # lora.apply leaves those kernels for the model to compute unmerged, which the models do not
    # do yet: the adapters would silently have no effect.
    raise UserError("peft.unmerged is not supported by the models yet; leave it empty (LoRA is "
                    "merged into the kernels inside the step)")
  return lora.LoraConfig(
      rank=int(peft.get("rank", 8)), alpha=float(peft.get("alpha", 16.0)),
      rslora=bool(peft.get("rslora", False)), dropout=float(peft.get("dropout", 0.0)),
      targets=str(peft.get("targets", "attention_qv")), exclude=str(peft.get("exclude", "")),
      trainable=str(peft.get("trainable", HEAD_REGEX)), unmerged=str(peft.get("unmerged", "")))


def tuning_from_config(config):
  """The tuning named by `config.peft.method` (full when there is no `peft` section)."""
  peft = config.get("peft", None)
  method = peft.get("method", "full") if peft is not None else "full"
  if method == "full":
    return FullTuning()
  if method == "linear_probe":
    return LinearProbeTuning()
  if method == "lora":
    return LoraTuning(lora_config(peft))
  if method == "adapter":
    return AdapterTuning()
  raise UserError(f"peft.method='{method}' is unknown; choose one of {', '.join(METHODS)}")


def peft_config(**overrides) -> ml_collections.ConfigDict:
  """`config.peft` of the fine-tuning configs (configs/finetune_*.py), with overrides."""
  c = ml_collections.ConfigDict(dict(
      method="full",            # full | linear_probe | lora | adapter
      rank=8,                   # LoRA
      alpha=16.0,
      rslora=False,             # scale alpha/sqrt(rank) instead of alpha/rank
      dropout=0.0,              # on the LoRA input features
      targets="attention_qv",   # a preset (attention_qv | attention | all_dense | all_dense_and_conv) or a regex over parameter paths
      exclude=r"^head/",        # regex of kernels never LoRA-adapted
      trainable=r"^head/",      # regex of extra leaves trained in full next to LoRA (head, biases, norms)
      unmerged="",              # x@W + s(x@A)@B for matching kernels: not wired into the models yet, must stay ""
      adapter_dim=64,           # bottleneck width of the Houlsby adapters
  ))
  c.update(overrides)
  return c
