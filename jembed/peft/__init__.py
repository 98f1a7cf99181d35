"""Parameter-efficient fine-tuning: which parameters train (base), LoRA (lora), bottleneck adapters
(adapters) and LoRA's exports (export). `tuning_from_config` builds the tuning `config.peft` names."""
from __future__ import annotations

from typing import Any

from jembed.errors import UserError
from jembed.peft.adapters import ADAPTER_TRAINABLE, AdapterTuning, BottleneckAdapter
from jembed.peft.base import FROZEN, TRAINED, FullTuning, LinearProbeTuning, RegexTuning, Tuning
from jembed.peft.lora import LoraConfig, LoraTuning

METHODS = ("full", "linear_probe", "lora", "adapter")


def tuning_from_config(peft: Any = None, task_params: str = "") -> Tuning:
  """The tuning named by the `peft` config section's `method` (full when there is no section);
  `task_params`: a regex of the task's own parameters, which train whatever the method."""
  tuning = _tuning(peft)
  tuning.task_params = task_params
  return tuning


def _tuning(peft: Any) -> Tuning:
  method = "full" if peft is None else peft["method"]
  if method == "full":
    return FullTuning()
  if method == "linear_probe":
    return LinearProbeTuning()
  if method == "lora":
    return LoraTuning(LoraConfig.from_peft(peft))
  if method == "adapter":
    return AdapterTuning(int(peft["adapter_dim"])) if "adapter_dim" in peft else AdapterTuning()
  raise UserError(f"peft.method='{method}' is unknown; choose one of {', '.join(METHODS)}")
