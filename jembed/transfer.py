"""Fine-tuning defaults that follow the source: `learning_rate = 0` in a config means "auto".

A classifier trained from scratch wants a high rate (1e-3); the same rate on a pretrained encoder
destroys what it learned (issue 19: all-MiniLM-L6-v2 fully fine-tuned at 1e-3 ended below a logistic
regression on its frozen features, PyTorch's AdamW 5e-5 recipe above it). So the fine-tuning configs
leave `learning_rate` at 0 and the rate is chosen from (modality, whether a pretrained source is
given, peft.method) by the table below, once, before the run starts; the chosen rate is written to
the run's config.json and printed. A rate given on the command line is never replaced.

Sources: `init.checkpoint` (a jembed workdir), `init.hf` (a Hugging Face / sentence-transformers
text directory) or `init.pretrained` (image weights: torchvision / timm / HF / big_vision).

Rates (AdamW, peak after warm-up):
  full          text 5e-5 (BERT / sentence-transformers recipe), images 1e-4 (AdamW fine-tuning of
                ResNet / ViT as timm does it); from scratch: text 1e-3, images 2e-3
  lora          1e-3 (the adapters start at zero and need a larger step; issue 19 measured 0.83 on
                MiniLM at 1e-3)
  adapter       1e-3 (Houlsby bottleneck adapters)
  linear_probe  1e-3 (only the head trains, on frozen features)
The pooling of a text classifier follows its source the same way (`model.pooling = ""`,
jembed/tasks/classification_text.py).
"""
from __future__ import annotations

from jembed import config as config_lib
from jembed.errors import UserError

# (modality, pretrained source?, peft.method) -> learning rate; "*" matches any method.
LEARNING_RATES = {
    ("text", True, "full"): 5e-5,
    ("image", True, "full"): 1e-4,
    ("text", True, "lora"): 1e-3,
    ("image", True, "lora"): 1e-3,
    ("text", True, "adapter"): 1e-3,
    ("image", True, "adapter"): 1e-3,
    ("text", True, "linear_probe"): 1e-3,
    ("image", True, "linear_probe"): 1e-3,
    ("text", False, "*"): 1e-3,
    ("image", False, "*"): 2e-3,
}
SOURCE_FIELDS = ("checkpoint", "hf", "pretrained")


def source_of(config) -> str:
  """The warm-start source a config names ("" for none)."""
  for field in SOURCE_FIELDS:
    value = config.init[field]
    if value:
      return str(value)
  return ""


def auto_learning_rate(config) -> float:
  """The rate `LEARNING_RATES` gives this config's modality, source and peft.method."""
  modality = config.data.modality
  method = config.peft.method
  pretrained = bool(source_of(config))
  for key in ((modality, pretrained, method), (modality, pretrained, "*")):
    if key in LEARNING_RATES:
      return LEARNING_RATES[key]
  raise UserError(f"no default learning rate for a {modality} model with peft.method={method}; set "
                  "--config.learning_rate")


def resolve(config) -> str:
  """Fills the fields left at 0 = auto (today: `learning_rate` of a classification config) in
  place; returns a line saying what was chosen and why ("" when nothing was)."""
  config_lib.complete(config)
  if config.learning_rate != 0 or config.task != "classification":
    return ""
  config.learning_rate = auto_learning_rate(config)
  source = source_of(config)
  method = config.peft.method
  why = f"fine-tuning {source} with peft.method={method}" if source else "training from scratch"
  return (f"learning_rate={config.learning_rate:g} (auto: {why}; set --config.learning_rate to "
          "choose another)")
