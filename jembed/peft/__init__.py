"""Parameter-efficient fine-tuning: LoRA (lora) and bottleneck adapters (adapters)."""
from jembed.peft import adapters, lora
from jembed.peft.adapters import ADAPTER_TRAINABLE, BottleneckAdapter, adapter_trainable_mask
from jembed.peft.lora import LoraConfig
