"""Frozen-embedding evaluation: linear probe, weighted kNN, a low-label variant, vs random init.

A backbone's features are extracted once (no gradients), then
  * a linear probe: multinomial logistic regression trained in JAX, full batch, on standardised
    features (deterministic: no sampling, fixed zero init);
  * weighted kNN (Wu et al. 2018, as in DINO): cosine similarity, the k nearest training
    features vote for their class with weight exp(sim / T);
  * the same two with only n labelled examples per class;
and every number also for a randomly initialised backbone of the same architecture, reported
beside it, so a run shows what pretraining bought.

Standalone, from a pretraining workdir (config.json + latest checkpoint):

  python -m jembed.evaluate --workdir /tmp/rot

Retrieval and similarity of any text model (a jembed workdir or export, a Hugging Face directory):

  python -m jembed.evaluate --model runs/ct --retrieval held_out_pairs.jsonl
  python -m jembed.evaluate --model all-MiniLM-L6-v2 --retrieval sts.jsonl   # text1, text2, score

A pairs file (anchor, positive, optional negative) gives recall@1, recall@10, MRR@10 and nDCG@10
(BEIR definitions: each anchor's relevant document is its positive; the corpus is every positive and
negative in the file); a scored-pairs file gives the Spearman correlation of cosine similarity with
the scores. The figures are printed and written to --output (default: retrieval.json in a jembed
workdir given as the model, else in the current directory; never into a downloaded model).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from jembed.probe import (eval_kwargs, extract_features, feature_metrics, format_table,  # noqa: F401
                          knn_accuracy, linear_probe, low_label_subset)  # (evaluate.X, as before)


# ---------------------------------------------------------------------------------------------------
# Standalone: evaluate a pretraining workdir's latest checkpoint
# ---------------------------------------------------------------------------------------------------
def evaluate_workdir(workdir: str, step: int | None = None) -> dict[str, float]:
  """Probe/kNN metrics of the frozen backbone of the vision run in `workdir` (its checkpoint, on the
  labelled images its config names), next to a random-init backbone of the same architecture."""
  import ml_collections

  from jembed import modelspec
  from jembed.errors import UserError
  from jembed.tasks import get_task

  from jembed import fs
  path = fs.join(workdir, "config.json")
  if not fs.exists(path):
    raise UserError(f"{path} does not exist; point --workdir at the workdir of a pretraining run")
  config = ml_collections.ConfigDict(json.loads(fs.read_text(path)))
  task = get_task(config, workdir)
  if not hasattr(task, "frozen_eval_metrics"):
    raise UserError(f"task '{config.task}' has no frozen-embedding evaluation; use a vision "
                    "pretraining workdir (rotation or simclr)")
  _, model, step = modelspec.load_model(workdir, step)
  task.load_data()  # the labelled images the probes train and test on
  return dict(task.frozen_eval_metrics(model), step=step)


def evaluate_retrieval(model_path: str, pairs_file: str, *, batch_size: int = 64,
                       anchor_key: str = "anchor", positive_key: str = "positive",
                       negative_key: str = "negative", max_seq_length: int | None = None) -> dict:
  """Retrieval metrics (pairs file) or Spearman correlation (scored pairs) of a text model, with
  texts truncated at `max_seq_length` tokens (None: the model's own maximum). The model and the
  file may be local or gs://."""
  from jembed.embed import load
  from jembed.errors import UserError
  from jembed import fs
  model = load(model_path, max_seq_length=max_seq_length)
  if model.modality != "text":
    raise UserError(f"{model_path} is an image model; retrieval evaluation is for text models")
  with fs.local_file(pairs_file) as local:   # a gs:// file is read from a temporary download
    return _evaluate_pairs(model, local, batch_size, anchor_key, positive_key, negative_key)


def _evaluate_pairs(model, pairs_file, batch_size, anchor_key, positive_key, negative_key) -> dict:
  from jembed import retrieval
  from jembed.data import pairs as pairs_lib
  first = _first_record(pairs_file)
  if {"text1", "text2", "score"} <= set(first):
    scored, skipped = pairs_lib.load_scored_pairs(pairs_file)
    a = model.embed([p.text1 for p in scored], batch_size=batch_size)
    b = model.embed([p.text2 for p in scored], batch_size=batch_size)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"spearman": retrieval.spearman(cos, [p.score for p in scored]), "pairs": len(scored),
            "skipped_records": skipped}
  pairs, skipped = pairs_lib.load_pairs(pairs_file, anchor_key=anchor_key, positive_key=positive_key,
                                        negative_key=negative_key)
  queries, corpus, qrels = pairs_lib.retrieval_set(pairs)
  scores = retrieval.retrieval_metrics(model.embed(queries, batch_size=batch_size),
                                       model.embed(corpus, batch_size=batch_size), qrels)
  out = {k: scores[k] for k in ("recall@1", "recall@10", "mrr@10", "ndcg@10")}
  return dict(out, queries=len(queries), corpus=len(corpus), skipped_records=skipped)


def _first_record(path: str) -> dict:
  """The field names of a pairs file's first record (JSON object or CSV header)."""
  import csv
  from jembed.errors import UserError
  if not os.path.isfile(path):
    raise UserError(f"pairs file '{path}' does not exist; fix --retrieval")
  with open(path, encoding="utf-8") as f:
    if path.endswith(".csv"):
      return {k: None for k in (csv.DictReader(f).fieldnames or [])}
    for line in f:
      if line.strip():
        try:
          record = json.loads(line)
        except ValueError:
          return {}
        return record if isinstance(record, dict) else {}
  raise UserError(f"pairs file '{path}' is empty; give held-out pairs")


def default_retrieval_output(model: str) -> str:
  """Into the model only when it is a jembed workdir (the run's own report); any other model
  directory (an export, a Hugging Face download, one inside site-packages) is left untouched and
  the metrics go to the current directory."""
  from jembed import fs, modelspec
  if fs.exists(fs.join(model, modelspec.MODEL_FILE)) and fs.exists(fs.join(model, "config.json")):
    return fs.join(model, "retrieval.json")
  return "retrieval.json"


def main(argv=None) -> int:
  import argparse

  from jembed.errors import UserError
  parser = argparse.ArgumentParser(prog="python -m jembed.evaluate",
                                   description="Evaluate embeddings: frozen-feature probes of a vision "
                                   "workdir, or retrieval / similarity of a text model.")
  parser.add_argument("--workdir", help="frozen-embedding probes of a rotation/simclr run")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--model", help="a text model: jembed workdir or export, or Hugging Face dir")
  parser.add_argument("--retrieval", help="held-out pairs (.jsonl/.csv) or scored pairs (text1, text2, score)")
  parser.add_argument("--output", help="where to write the metrics JSON (default: MODEL/retrieval.json "
                      "for a jembed workdir, else ./retrieval.json)")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--max-seq-length", type=int, default=None,
                      help="truncate texts to this many tokens (default: the model's maximum)")
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)
  try:
    if args.model or args.retrieval:
      if not (args.model and args.retrieval):
        raise UserError("--model and --retrieval go together: give the model and the pairs file")
      metrics = evaluate_retrieval(args.model, args.retrieval, batch_size=args.batch_size,
                                   max_seq_length=args.max_seq_length)
      from jembed import fs
      out = args.output or default_retrieval_output(args.model)
      fs.write_json(out, dict(metrics, model=args.model, file=args.retrieval))
      print(f"retrieval evaluation of {args.model} on {args.retrieval}")
      for k, v in metrics.items():
        print(f"  {k:<16}{v:.4f}" if isinstance(v, float) else f"  {k:<16}{v}")
      print(f"saved {out}")
      return 0
    if not args.workdir:
      raise UserError("give --workdir (vision probes) or --model with --retrieval")
    metrics = evaluate_workdir(args.workdir, args.step)
  except UserError as e:
    print(f"jembed: error: {e}", file=sys.stderr)
    return 2
  print(f"frozen-embedding evaluation of {args.workdir} at step {metrics['step']}")
  print(format_table(metrics))
  print(json.dumps(metrics))
  return 0


if __name__ == "__main__":
  sys.exit(main())
