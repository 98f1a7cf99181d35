"""Two-tower train steps per second vs item-table size, tables sharded by rows vs replicated.

    python benchmarks/two_tower.py                       # 10k, 100k, 1M items, batch 1024, 8 CPU devices
    python benchmarks/two_tower.py --items 10000,100000 --batch 256 --steps 10 --devices 4

Both columns run jembed's own train step (jembed.train.Setup) on the same synthetic interactions;
"sharded" uses the default rules (a table's rows over the whole mesh: logical axis `table_rows`),
"replicated" the same rules without that entry, i.e. every device holding every table: the layout
of plain data parallelism. Per-device table memory is printed next to the speed. On a CPU the
devices are XLA's fake host devices (--devices), so the timings say more about overheads than about
an accelerator; run it on the accelerator for real figures.
"""
import argparse
import os
import sys
import time


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--items", default="10000,100000,1000000")
  p.add_argument("--users", type=int, default=10000)
  p.add_argument("--batch", type=int, default=1024)
  p.add_argument("--dim", type=int, default=32)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--devices", type=int, default=8, help="fake CPU devices (ignored on an accelerator)")
  args = p.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={args.devices}")
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  import jax
  import numpy as np
  from jembed import train, sharding
  from jembed.config import load_file
  from jembed.data import interactions as inter
  from jembed.tasks.base import Data
  from jembed.tasks.two_tower import TwoTowerTask

  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; batch {args.batch}, dim {args.dim}, "
        f"{args.users} users, {args.steps} timed steps")
  print(f"{'items':>10} {'sharded steps/s':>16} {'replicated steps/s':>19} {'table MiB/device sharded':>25} "
        f"{'replicated':>11}")
  rng = np.random.default_rng(0)
  for n_items in [int(v) for v in args.items.split(",")]:
    n = max(4 * args.batch, 50000)
    x = inter.Interactions(users=[str(i) for i in range(args.users)], items=[str(i) for i in range(n_items)],
                           train_user=rng.integers(0, args.users, n).astype(np.int32),
                           train_item=(rng.zipf(1.3, n) % n_items).astype(np.int32),
                           eval_user=np.zeros(0, np.int32), eval_item=np.zeros(0, np.int32))
    row = []
    for rules in (sharding.DEFAULT_RULES, tuple(r for r in sharding.DEFAULT_RULES if r[0] != "table_rows")):
      c = load_file(os.path.join(root, "configs", "two_tower.py"))
      c.batch_size, c.model.dim, c.sharding_rules = args.batch, args.dim, rules
      task = TwoTowerTask(c, "/tmp/unused")

      def load_data(task=task, x=x):
        task.data = x
        counts = x.item_counts()
        task.item_logq = np.log(np.maximum(counts, 1) / counts.sum()).astype(np.float32)
        task.seen = []
        return Data(train=task._columns(x.train_user, x.train_item), eval=None)

      task.load_data = load_data
      setup = train.Setup(c, "/tmp/unused", task=task)
      state = setup.init_state()
      from jembed.data import pipeline
      it = pipeline.make_train_iterator(setup.data.train, args.batch, 0)
      batches = [setup.to_global(next(it)) for _ in range(args.steps + 2)]
      setup.compile(state, batches[0])
      for b in batches[:2]:
        state, m = setup.compiled_train(state, b)
      jax.block_until_ready(m)
      t0 = time.perf_counter()
      for b in batches[2:]:
        state, m = setup.compiled_train(state, b)
      jax.block_until_ready(m)
      dt = time.perf_counter() - t0
      table = state.params["item_tower"]["table"]
      shard = table.addressable_shards[0].data
      row.append((args.steps / dt, shard.size * shard.dtype.itemsize / 2**20))
    print(f"{n_items:>10} {row[0][0]:>16.1f} {row[1][0]:>19.1f} {row[0][1]:>25.2f} {row[1][1]:>11.2f}",
          flush=True)


if __name__ == "__main__":
  main()
