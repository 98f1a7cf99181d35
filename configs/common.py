"""Config sections shared by several configs/*.py files (imported as `configs.common`).

The library's defaults equal these (jembed.peft.LoraConfig, AdapterTuning; tests/test_tuning.py
checks that they agree), so a config section that leaves a field out means the same thing.
"""
import ml_collections


def peft_config(**overrides) -> ml_collections.ConfigDict:
  """`config.peft`: which parameters train (jembed/peft), with overrides."""
  c = ml_collections.ConfigDict(dict(
      method="full",            # full | linear_probe | lora | adapter
      rank=8,                   # LoRA
      alpha=16.0,
      rslora=False,             # scale alpha/sqrt(rank) instead of alpha/rank
      dropout=0.0,              # on the LoRA input features (rows of A)
      targets="attention_qv",   # a preset (attention_qv | attention | all_dense | all_dense_and_conv) or a regex over parameter paths
      exclude=r"^head/",        # regex of kernels never LoRA-adapted
      trainable=r"^head/",      # regex of extra leaves trained in full next to LoRA (head, biases, norms)
      adapter_dim=64,           # bottleneck width of the Houlsby adapters
  ))
  c.update(overrides)
  return c
