"""Peak memory of the contrastive (or, with --kind labeled, the text-classification) input paths at
several data-set sizes: `jembed.data.prepare` on the data, then the training input streamed from the
prepared shards (data.prepared), next to the in-memory path (files read into lists, every example
tokenized into columns) as the baseline.

    python benchmarks/pairs_memory.py [--kind pairs|labeled] [--sizes 10000,1000000]
        [--in-memory-max N] [--dir /tmp/jembed-pairs-bench] [--batches 50]

Pairs: the embedded docstring pairs repeated (each copy's anchor and positive prefixed by its number,
so the pairs differ) up to each size, one hard negative each. Labelled text: the embedded
classification examples (standard-library docstrings labelled by topic) repeated the same way. The
tokenizer (vocab 8192) is trained once on the embedded texts and given to every path. The input
measurement builds the task from the config (configs/contrastive_text.py or configs/finetune_text.py,
as `jembed.main` does), loads its data and draws --batches global batches of 64, without a model: it
is the input side alone. The in-memory baseline is skipped above --in-memory-max examples (it grows
with the data: 1.2 GB more per 100k pairs between 10k and 100k), so a large size can be measured
streamed on a machine too small for the baseline. Each command runs in its own process; its peak RSS
is that child's ru_maxrss. Ends with one JSON line.
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
config = apply_overrides(load_config_file({config!r}), {overrides!r})
task = get_task(config, {workdir!r})
data = task.load_data()
it = pipeline.make_train_iterator(data.train, config.batch_size, config.seed)
for _ in range({batches}):
  batch = next(it)
print("drew", {batches}, "batches of", {{k: v.shape for k, v in batch.items()}})
"""


CONFIGS = {"pairs": "contrastive_text", "labeled": "finetune_text"}


def embedded_texts(kind: str) -> list[str]:
  from jembed.data import labeled_text, pairs as pairs_lib
  if kind == "labeled":
    return labeled_text.embedded_examples()[0]
  train, held = pairs_lib.embedded_pairs()
  return [t for p in train + held for t in (p.anchor, p.positive)]


def write_labeled(path: str, n: int) -> None:
  from jembed.data import labeled_text
  texts, labels = labeled_text.embedded_examples()
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"text": f"{i // len(texts)} {texts[i % len(texts)]}",
                          "label": labels[i % len(texts)]}) + "\n")


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
  ap.add_argument("--kind", choices=sorted(CONFIGS), default="pairs")
  ap.add_argument("--sizes", default="10000,1000000")
  ap.add_argument("--in-memory-max", type=int, default=0,
                  help="skip the in-memory baseline above this many examples (0: never skip)")
  ap.add_argument("--dir", default="/tmp/jembed-pairs-bench")
  ap.add_argument("--batches", type=int, default=50)
  args = ap.parse_args()
  import shutil
  from jembed.data import wordpiece
  shutil.rmtree(args.dir, ignore_errors=True)
  os.makedirs(args.dir)
  tok = os.path.join(args.dir, "tokenizer.json")
  wordpiece.build_tokenizer(embedded_texts(args.kind), 8192, save_to=tok)
  config = CONFIGS[args.kind]
  py = sys.executable
  results = {}
  for n in (int(s) for s in args.sizes.split(",")):
    d = os.path.join(args.dir, str(n))
    os.makedirs(d)
    data_file = os.path.join(d, "data.jsonl")
    (write_labeled if args.kind == "labeled" else write_pairs)(data_file, n)
    data = {"data.train": data_file, "data.tokenizer": tok, "data.seq_len": 64,
            "data.eval_fraction": 0.01}
    prep = os.path.join(d, "prepared")
    row = {"file_mb": round(os.path.getsize(data_file) / 1e6)}
    row["prepare"] = measured([py, "-m", "jembed.data.prepare", f"--config=configs/{config}.py",
                               f"--out={prep}", "--shards=8",
                               *(f"--config.{k}={v}" for k, v in data.items())], f"{d}/prepare.log")

    def draw(overrides, name):
      code = _DRAW.format(root=ROOT, tests=os.path.join(ROOT, "tests"), config=config,
                          overrides=dict(overrides, batch_size=64),
                          workdir=os.path.join(d, f"w_{name}"), batches=args.batches)
      return measured([py, "-c", code], f"{d}/{name}.log")
    row["input_prepared"] = draw({"data.prepared": prep, "data.seq_len": 64}, "prepared")
    if not args.in_memory_max or n <= args.in_memory_max:
      row["input_in_memory"] = draw(data, "in_memory")
    results[n] = row
  for n, row in results.items():
    for name in ("prepare", "input_prepared", "input_in_memory"):
      if name in row:
        print(f"{n:>9} {args.kind} ({row['file_mb']:5d} MB)  {name:16s} peak RSS "
              f"{row[name]['peak_rss_mb']:6d} MB   wall {row[name]['wall_s']:7.1f} s")
      else:
        print(f"{n:>9} {args.kind} ({row['file_mb']:5d} MB)  {name:16s} not run (above --in-memory-max)")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
