"""Memory of one compiled train step: BERT-Base with LoRA (rank 8, query and value) against full
fine-tuning, at batch 32 x 128 tokens, from XLA's memory analysis of the compiled step. The step is
the train loop's own (jembed.train.Setup.jit_train_step, through jembed.plan) for
configs/finetune_text.py at BERT-Base size on its embedded 6-class data.

  python benchmarks/lora_memory.py            # one device, then (re-executed) 8 fake CPU devices, fsdp=8

Nothing is materialised: states are abstract (ShapeDtypeStructs with the loop's shardings) and the
step is only lowered and compiled, with the state donated as in the train loop. Memory per device =
arguments + outputs + temporaries - aliased (donated outputs reuse argument buffers). Ends with one
JSON line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

if "--devices" in sys.argv:  # the child run: fake devices must be set before jax is imported
  _n = int(sys.argv[sys.argv.index("--devices") + 1])
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={_n}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from jembed import plan  # noqa: E402
from configs import finetune_text  # noqa: E402
from configs.common import peft_config  # noqa: E402

BATCH, SEQ = 32, 128
MiB = 2.0**20


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def config(method: str, devices: int):
  """configs/finetune_text.py at BERT-Base size (vocab 30522) on the embedded 6-class data."""
  c = finetune_text.get_config()
  c.total_steps, c.warmup_steps, c.batch_size = 1000, 100, BATCH
  c.peft = peft_config(method=method, rank=8, targets="attention_qv")
  c.model.size, c.model.vocab_size = "base", 30522
  c.model.dtype = "float32"  # as the README's figures were measured (jembed.plan would take "auto" as bf16)
  c.data.seq_len = SEQ
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, devices, 1
  return c


def measure(method: str, devices: int) -> dict:
  # The train loop's own Setup and jitted step (Setup.jit_train_step), compiled on abstract state.
  cfg, _ = plan.planning_config(config(method, devices))
  setup = plan.build_setup(cfg, jax.devices()[:devices])
  state = plan.abstract_state(setup)
  m = plan.compile_step(setup, state, BATCH)
  n_trained = _count(state.params)
  n_total = n_trained + _count(state.frozen)
  n_base = n_total - (_count(state.params["adapters"]) if method == "lora" else 0)
  out = {
      "method": method, "devices": devices,
      "trained_params": n_trained, "base_params": n_base,
      "trainable_share": n_trained / n_base,
      "param_bytes": plan.per_device_bytes((state.params, state.frozen)),
      "base_param_bytes": n_base * 4 / devices,
      "optimizer_bytes": plan.per_device_bytes(state.opt_state),
      "argument_bytes": m.arguments, "output_bytes": m.outputs,
      "temp_bytes": m.temporaries, "alias_bytes": m.aliased,
  }
  out["total_bytes"] = m.arguments + m.outputs + m.temporaries - m.aliased
  return out


def run(devices: int) -> dict:
  full, lora = measure("full", devices), measure("lora", devices)
  saved = full["total_bytes"] - lora["total_bytes"]
  print(f"\n== {devices} device(s){' (fsdp=%d)' % devices if devices > 1 else ''}, per device, "
        f"BERT-Base classifier, batch {BATCH} x {SEQ} ==")
  print(f"{'':26s}{'full':>12s}{'lora r8 qv':>12s}")
  rows = [("trainable parameters", "trained_params", 1, "{:>12,d}"),
          ("parameters (MiB)", "param_bytes", MiB, "{:>12.1f}"),
          ("optimizer state (MiB)", "optimizer_bytes", MiB, "{:>12.1f}"),
          ("arguments (MiB)", "argument_bytes", MiB, "{:>12.1f}"),
          ("outputs (MiB)", "output_bytes", MiB, "{:>12.1f}"),
          ("aliased/donated (MiB)", "alias_bytes", MiB, "{:>12.1f}"),
          ("activations+temps (MiB)", "temp_bytes", MiB, "{:>12.1f}"),
          ("step total (MiB)", "total_bytes", MiB, "{:>12.1f}")]
  for name, key, div, fmt in rows:
    conv = (lambda v: int(v)) if div == 1 else (lambda v: v / div)
    print(f"{name:26s}" + fmt.format(conv(full[key])) + fmt.format(conv(lora[key])))
  print(f"LoRA trains {100 * lora['trainable_share']:.3f}% of the base's parameters; its step needs "
        f"{saved / MiB:.1f} MiB less = {saved / full['base_param_bytes']:.2f}x the base parameter bytes "
        f"({full['base_param_bytes'] / MiB:.1f} MiB). Of the saving, "
        f"{(full['optimizer_bytes'] - lora['optimizer_bytes']) / MiB:.1f} MiB is optimizer state, "
        f"{(full['temp_bytes'] - lora['temp_bytes']) / MiB:.1f} MiB temporaries (gradients of frozen "
        f"weights), {(full['output_bytes'] - full['alias_bytes'] - lora['output_bytes'] + lora['alias_bytes']) / MiB:.1f}"
        " MiB non-donated outputs.")
  return {"devices": devices, "trainable_share": lora["trainable_share"],
          "full_bytes": full["total_bytes"], "lora_bytes": lora["total_bytes"],
          "saved_over_base_param_bytes": saved / full["base_param_bytes"],
          "full": full, "lora": lora}


def main() -> None:
  if "--devices" in sys.argv:
    result = run(int(sys.argv[sys.argv.index("--devices") + 1]))
    print(json.dumps(result))
    return
  single = run(1)
  child = subprocess.run([sys.executable, os.path.abspath(__file__), "--devices", "8"],
                         capture_output=True, text=True, check=False)
  lines = child.stdout.strip().splitlines()
  if child.returncode != 0 or not lines:
    sys.exit(f"8-device run failed:\n{child.stderr[-2000:]}")
  print("\n".join(lines[:-1]))
  eight = json.loads(lines[-1])
  summary = {
      "trainable_share": single["trainable_share"],
      "one_device": {"full_mib": single["full_bytes"] / MiB, "lora_mib": single["lora_bytes"] / MiB,
                     "saved_over_base_param_bytes": single["saved_over_base_param_bytes"]},
      "eight_devices_fsdp8_per_device": {
          "full_mib": eight["full_bytes"] / MiB, "lora_mib": eight["lora_bytes"] / MiB,
          "saved_over_base_param_bytes": eight["saved_over_base_param_bytes"]},
      "targets_met": bool(single["trainable_share"] < 0.01
                          and single["saved_over_base_param_bytes"] >= 2
                          and eight["saved_over_base_param_bytes"] >= 2),
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
