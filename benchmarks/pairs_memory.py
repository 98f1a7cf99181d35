"""Peak memory of the contrastive input paths at two pair-set sizes: `jembed.data.prepare` on the
pairs, then the training input streamed from the prepared shards (data.prepared), next to the
in-memory path (pair files read into lists, every pair tokenized into columns) as the baseline.

    python benchmarks/pairs_memory.py [--sizes 10000,1000000] [--dir /tmp/jembed-pairs-bench] [--batches 50]

The pairs are the embedded docstring pairs repeated (each copy's anchor and positive prefixed by its
number, so the pairs differ) up to each size, one hard negative each; the tokenizer (vocab 8192) is
trained once on the embedded pairs and given to every path. The input measurement builds the
contrastive task from the config (as `jembed.main` does), loads its data and draws --batches global
batches of 64 pairs, without a model: it is the input side alone. Each command runs in its own
process; its peak RSS is that child's ru_maxrss. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from input_memory import measured  # noqa: E402  (the same child-process RSS measurement)

# Builds the task from configs/contrastive_text.py with the given overrides, loads the data and
# draws N batches through the loop's iterator.
_DRAW = """
import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from spine_helpers import apply_overrides, load_config_file
from jembed.data import pipeline
from jembed.tasks import get_task
config = apply_overrides(load_config_file("contrastive_text"), {overrides!r})
task = get_task(config, {workdir!r})
data = task.load_data()
it = pipeline.make_train_iterator(data.train, config.batch_size, config.seed)
for _ in range({batches}):
  batch = next(it)
print("drew", {batches}, "batches of", {{k: v.shape for k, v in batch.items()}})
"""


def write_pairs(path: str, n: int) -> None:
  from jembed.data import pairs as pairs_lib
  train, held = pairs_lib.embedded_pairs()
  base = train + held
  with open(path, "w") as f:
    for i in range(n):
      p, copy = base[i % len(base)], i // len(base)
      neg = base[(i + 7) % len(base)].positive
      f.write(json.dumps({"anchor": f"{copy} {p.anchor}", "positive": f"{copy} {p.positive}",
                          "negative": neg}) + "\n")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="10000,1000000")
  ap.add_argument("--dir", default="/tmp/jembed-pairs-bench")
  ap.add_argument("--batches", type=int, default=50)
  args = ap.parse_args()
  import shutil
  from jembed.data import pairs as pairs_lib, wordpiece
  shutil.rmtree(args.dir, ignore_errors=True)
  os.makedirs(args.dir)
  tok = os.path.join(args.dir, "tokenizer.json")
  train, held = pairs_lib.embedded_pairs()
  wordpiece.build_tokenizer([t for p in train + held for t in (p.anchor, p.positive)], 8192, save_to=tok)
  py = sys.executable
  results = {}
  for n in (int(s) for s in args.sizes.split(",")):
    d = os.path.join(args.dir, str(n))
    os.makedirs(d)
    pairs = os.path.join(d, "pairs.jsonl")
    write_pairs(pairs, n)
    data = {"data.train": pairs, "data.tokenizer": tok, "data.seq_len": 64, "data.eval_fraction": 0.01}
    prep = os.path.join(d, "prepared")
    row = {"file_mb": round(os.path.getsize(pairs) / 1e6)}
    row["prepare"] = measured([py, "-m", "jembed.data.prepare", "--config=configs/contrastive_text.py",
                               f"--out={prep}", "--shards=8",
                               *(f"--config.{k}={v}" for k, v in data.items())], f"{d}/prepare.log")

    def draw(overrides, name):
      code = _DRAW.format(root=ROOT, tests=os.path.join(ROOT, "tests"), overrides=overrides,
                          workdir=os.path.join(d, f"w_{name}"), batches=args.batches)
      return measured([py, "-c", code], f"{d}/{name}.log")
    row["input_prepared"] = draw({"data.prepared": prep, "data.seq_len": 64}, "prepared")
    row["input_in_memory"] = draw(data, "in_memory")
    results[n] = row
  for n, row in results.items():
    for name in ("prepare", "input_prepared", "input_in_memory"):
      print(f"{n:>9} pairs ({row['file_mb']:5d} MB)  {name:16s} peak RSS {row[name]['peak_rss_mb']:6d} MB"
            f"   wall {row[name]['wall_s']:7.1f} s")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
