"""Memory of one compiled train step: BERT-Base with LoRA (rank 8, query and value) against full
fine-tuning, at batch 32 x 128 tokens, from XLA's memory analysis of the compiled step.

  python benchmarks/lora_memory.py            # one device, then (re-executed) 8 fake CPU devices, fsdp=8

Nothing is materialised: states are abstract (jax.eval_shape) and the step is only lowered and
compiled, with the state donated as in the train loop. Memory per device = arguments + outputs +
temporaries - aliased (donated outputs reuse argument buffers). Ends with one JSON line.
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

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jembed import config as config_lib, peft, sharding, train  # noqa: E402
from jembed.models.transformer import TransformerConfig  # noqa: E402
from jembed.tasks.classification import TextClassifier  # noqa: E402
from configs.common import peft_config  # noqa: E402

BATCH, SEQ, CLASSES = 32, 128, 2
MiB = 2.0**20


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(method: str, devices: int) -> dict:
  cfg = config_lib.base_config()
  cfg.total_steps, cfg.warmup_steps = 1000, 100
  cfg.peft = peft_config(method=method, rank=8, targets="attention_qv")
  cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=devices, tensor=1))
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.DEFAULT_RULES
  arch = TransformerConfig.from_config(ml_collections.ConfigDict(dict(size="base")), 30522)
  build = lambda: TextClassifier(arch, CLASSES, "cls", rngs=nnx.Rngs(0))
  with nn.logical_axis_rules(rules):
    abstract = nnx.eval_shape(build)
  graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
  specs = sharding.logical_specs(abs_params)
  abs_params = nnx.to_pure_dict(abs_params)
  tuning = peft.tuning_from_config(cfg.peft)
  tx = train.make_optimizer(cfg)

  def make_state(params, key):
    trained, frozen = tuning.split(params, key)
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=trained, frozen=frozen,
                            opt_state=tx.init(trained), model_state={})

  abs_state = jax.eval_shape(make_state, abs_params, jax.random.key(0))
  t_specs, f_specs = tuning.split_specs(specs, abs_params)
  to_sh = lambda s: sharding.logical_to_sharding(s, mesh, rules)
  rep = sharding.replicated(mesh)
  t_sh = to_sh(t_specs)
  shardings = train.TrainState(
      step=rep, params=t_sh, frozen=to_sh(f_specs),
      opt_state=optax.tree_map_params(tx, lambda _, s: s, abs_state.opt_state, t_sh,
                                      transform_non_params=lambda _: rep),
      model_state={})
  state_in = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abs_state, shardings)
  batch_sh = sharding.batch_sharding(mesh, rules, 2)
  batch = {"tokens": jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32, sharding=batch_sh),
           "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=sharding.batch_sharding(mesh, rules, 1))}
  base_key = jax.random.key(0)

  def step(state, batch):
    def loss_fn(trained):
      params = tuning.combine(trained, state.frozen, rng=base_key, train=True)
      model = nnx.merge(graphdef, params, {})
      tokens = batch["tokens"]
      logits = model(tokens, tokens != 0, train=True, rngs=nnx.Rngs(dropout=base_key))
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), loss

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = jax.jit(step, in_shardings=(shardings, {"tokens": batch_sh, "label": batch["label"].sharding}),
                       out_shardings=(shardings, rep), donate_argnums=(0,)).lower(state_in, batch).compile()
  m = compiled.memory_analysis()
  per_dev = lambda tree: _bytes(tree) / devices  # every state leaf is split over fsdp or tiny
  n_trained = sum(x.size for x in jax.tree.leaves(abs_state.params))
  n_total = n_trained + sum(x.size for x in jax.tree.leaves(abs_state.frozen))
  if method == "lora":
    n_base = n_total - sum(x.size for x in jax.tree.leaves(abs_state.params["adapters"]))
  else:
    n_base = n_total
  out = {
      "method": method, "devices": devices,
      "trained_params": n_trained, "base_params": n_base,
      "trainable_share": n_trained / n_base,
      "param_bytes": per_dev(abs_state.params) + per_dev(abs_state.frozen),
      "base_param_bytes": n_base * 4 / devices,
      "optimizer_bytes": per_dev(abs_state.opt_state),
      "argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
      "temp_bytes": m.temp_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
  }
  out["total_bytes"] = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                        - m.alias_size_in_bytes)
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
