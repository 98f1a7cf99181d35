"""Two-tower train steps per second vs item-table size: dense tables sharded by rows, dense tables
replicated, and row-wise (sparse) table updates sharded by rows, side by side.

    python benchmarks/two_tower.py                       # 10k, 100k, 1M items, batch 1024, 8 CPU devices
    python benchmarks/two_tower.py --items 10000,100000 --batch 256 --steps 10 --devices 4
    python benchmarks/two_tower.py --modes dense,sparse --sparse adagrad

Every column runs jembed's own train step (jembed.train.Setup) on the same synthetic interactions.
"dense" is `model.table_updates=dense` (the tables are parameters of the config's AdamW: every row
is read and written every step) with the default rules (a table's rows over the whole mesh: logical
axis `table_rows`); "replicated" the same without that rule, i.e. every device holding every table
(plain data parallelism); "sparse" `model.table_updates=adam` (or --sparse): only the batch's rows
are gathered, updated and scattered back (jembed/row_optimizer.py), rows sharded. Per-device table
memory (the item table, without optimizer state) is printed next to the speed. On a CPU the devices
are XLA's fake host devices (--devices), so the timings say more about overheads than about an
accelerator; run it on the accelerator for real figures.
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
  p.add_argument("--modes", default="dense,replicated,sparse", help="columns to run, in this order")
  p.add_argument("--sparse", default="adam", help="the row optimizer of the sparse column")
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
  modes = args.modes.split(",")
  print(f"{'items':>10} " + " ".join(f"{m + ' steps/s':>20}" for m in modes)
        + " " + " ".join(f"{m + ' MiB/dev':>20}" for m in modes))
  rng = np.random.default_rng(0)
  for n_items in [int(v) for v in args.items.split(",")]:
    n = max(4 * args.batch, 50000)
    x = inter.Interactions(users=[str(i) for i in range(args.users)], items=[str(i) for i in range(n_items)],
                           train_user=rng.integers(0, args.users, n).astype(np.int32),
                           train_item=(rng.zipf(1.3, n) % n_items).astype(np.int32),
                           eval_user=np.zeros(0, np.int32), eval_item=np.zeros(0, np.int32))
    row = []
    for mode in modes:
      rules = sharding.DEFAULT_RULES
      if mode == "replicated":
        rules = tuple(r for r in sharding.DEFAULT_RULES if r[0] != "table_rows")
      c = load_file(os.path.join(root, "configs", "two_tower.py"))
      c.batch_size, c.model.dim, c.sharding_rules = args.batch, args.dim, rules
      c.model.table_updates = args.sparse if mode == "sparse" else "dense"
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
      tables = state.model_state if mode == "sparse" else state.params
      shard = tables["item_tower"]["table"].addressable_shards[0].data
      row.append((args.steps / dt, shard.size * shard.dtype.itemsize / 2**20))
    print(f"{n_items:>10} " + " ".join(f"{r[0]:>20.1f}" for r in row) + " "
          + " ".join(f"{r[1]:>20.2f}" for r in row), flush=True)


if __name__ == "__main__":
  main()
