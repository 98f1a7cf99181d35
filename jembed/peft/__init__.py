"""Parameter-efficient fine-tuning: LoRA (lora) and bottleneck adapters (adapters)."""
from jembed.peft import adapters, lora
from jembed.peft.adapters import ADAPTER_TRAINABLE, BottleneckAdapter, adapter_trainable_mask
from jembed.peft.lora import LoraConfig


# ---- temporary shim (replaced when the PEFT package lands) ----
def tuning_from_config(peft):
  from jembed import tuning as _t
  import ml_collections
  cfg = ml_collections.ConfigDict({"peft": peft}) if peft is not None else ml_collections.ConfigDict()
  t = _t.tuning_from_config(cfg)
  method = t.name
  t.backbone_mode = "inference" if method == "linear_probe" else "train"
  t.new_params = r"adapter" if method == "adapter" else None
  def model_overrides(spec):
    if method == "adapter":
      spec = dict(spec)
      dim = int(peft.get("adapter_dim", 64))
      if "encoder" in spec:
        spec["encoder"] = dict(spec["encoder"], adapter_dim=dim)
    return spec
  t.model_overrides = model_overrides
  def export(workdir, state):
    if method == "lora":
      from jembed import finetune
      finetune.export_lora(workdir, t, state.params, state.frozen)
  t.export = export
  return t
