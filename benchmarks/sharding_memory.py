"""Per-device parameter + optimizer memory of BERT-Large MLM (vocab 30522, seq 128) on 8 fake CPU
devices under data=8, fsdp=8 and fsdp=4 x tensor=2, against the ideal: the whole state for data=8
(every device holds a replica), the whole state / 8 for the sharded layouts. Target: within 10%.

  python benchmarks/sharding_memory.py [--compile]

The figures come from the train loop's own shardings (jembed.train.Setup, built through
jembed.plan on abstract state, so nothing is allocated): the bytes of each leaf's shard on one
device. With --compile the train step is also compiled at batch 8 and XLA's argument size (state +
batch) is printed beside them as a cross-check. Ends with one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from jembed import plan  # noqa: E402
from configs import mlm  # noqa: E402

LAYOUTS = {"data=8": (8, 1, 1), "fsdp=8": (1, 8, 1), "fsdp=4 x tensor=2": (1, 4, 2)}
MiB = 2.0**20


def config(data: int, fsdp: int, tensor: int):
  c = mlm.get_config()
  c.model.size = "large"
  c.model.vocab_size = 30522
  c.data.seq_len = 128
  c.batch_size = 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return c


def measure(name: str, compile_step: bool) -> dict:
  c, _ = plan.planning_config(config(*LAYOUTS[name]))
  setup = plan.build_setup(c, jax.devices())
  state = plan.abstract_state(setup)
  trained = (state.params, state.frozen, state.opt_state)
  per_device = plan.per_device_bytes(trained)
  total = plan.total_bytes(trained)
  ideal = total if name == "data=8" else total / 8
  row = {"layout": name, "params": sum(x.size for x in jax.tree.leaves(setup.abs_params)),
         "state_total_bytes": total, "per_device_bytes": per_device, "ideal_bytes": ideal,
         "over_ideal": per_device / ideal - 1, "sharding_report": setup.sharding_report}
  if compile_step:
    t = time.perf_counter()
    compiled = plan.compile_step(setup, state, c.batch_size)
    row["compiled_argument_bytes"] = compiled.arguments
    row["compile_s"] = time.perf_counter() - t
  return row


def main() -> None:
  compile_step = "--compile" in sys.argv
  rows = [measure(name, compile_step) for name in LAYOUTS]
  print(f"BERT-Large MLM ({rows[0]['params']:,} parameters; fp32 parameters + Adam moments = "
        f"{rows[0]['state_total_bytes'] / MiB:,.1f} MiB), per device on 8 devices:")
  head = f"{'layout':20s}{'param+opt MiB':>15s}{'ideal MiB':>12s}{'over ideal':>12s}"
  if compile_step:
    head += f"{'XLA args MiB':>14s}"
  print(head)
  for r in rows:
    line = (f"{r['layout']:20s}{r['per_device_bytes'] / MiB:15.1f}{r['ideal_bytes'] / MiB:12.1f}"
            f"{100 * r['over_ideal']:11.2f}%")
    if compile_step:
      line += f"{r['compiled_argument_bytes'] / MiB:14.1f}"
    print(line)
  for r in rows:
    if r["sharding_report"]:
      print(f"{r['layout']}: {r['sharding_report']}")
  print(json.dumps({"rows": rows, "target_met": all(r["over_ideal"] <= 0.10 for r in rows)}))


if __name__ == "__main__":
  main()
