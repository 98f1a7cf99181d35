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

import functools
import json
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


# ---------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------
def extract_features(forward_fn: Callable[[np.ndarray], jax.Array], images: np.ndarray,
                     batch: int) -> np.ndarray:
  """forward_fn over `images` in batches of `batch` -> (N, D) float32 NumPy.

  The last batch is padded to full size (and the padding dropped) so `forward_fn` compiles once.
  """
  n = len(images)
  out = []
  for lo in range(0, n, batch):
    chunk = images[lo:lo + batch]
    real = len(chunk)
    if real < batch:
      pad = np.zeros((batch - real,) + chunk.shape[1:], chunk.dtype)
      chunk = np.concatenate([chunk, pad])
    out.append(np.asarray(jax.device_get(forward_fn(chunk)), np.float32)[:real])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_logreg(x, y, *, num_classes: int, steps: int, l2: float, lr: float):
  d = x.shape[1]
  params = (jnp.zeros((d, num_classes)), jnp.zeros((num_classes,)))
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))

  def objective(p):
    logits = x @ p[0] + p[1]
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return xent + 0.5 * l2 * jnp.sum(p[0] ** 2)

  def body(_, carry):
    p, s = carry
    g = jax.grad(objective)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  params, _ = jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))
  return params


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 *, steps: int = 300, l2: float = 1e-4, lr: float = 0.05,
                 num_classes: int | None = None) -> float:
  """Test accuracy of multinomial logistic regression fit on (train_x, train_y).

  Features are standardised with the training split's mean and std; training is full-batch Adam
  from zeros with an L2 penalty `l2` on the weights, so the result depends on the data only.
  """
  train_x = np.asarray(train_x, np.float32)
  test_x = np.asarray(test_x, np.float32)
  mean = train_x.mean(0)
  std = train_x.std(0) + 1e-6
  k = int(num_classes or max(train_y.max(), test_y.max()) + 1)
  w, b = _fit_logreg(jnp.asarray((train_x - mean) / std), jnp.asarray(train_y, jnp.int32),
                     num_classes=k, steps=int(steps), l2=float(l2), lr=float(lr))
  pred = np.asarray(((test_x - mean) / std) @ np.asarray(w) + np.asarray(b)).argmax(-1)
  return float((pred == test_y).mean())


# ---------------------------------------------------------------------------------------------------
# Weighted kNN
# ---------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_predict(train_x, train_y, test_x, *, k: int, temperature: float, num_classes: int):
  normalise = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
  sim = normalise(test_x) @ normalise(train_x).T                        # (Q, N) cosine
  top_sim, top_idx = jax.lax.top_k(sim, k)
  votes = jax.nn.one_hot(train_y[top_idx], num_classes) * jnp.exp(top_sim / temperature)[..., None]
  return votes.sum(1).argmax(-1)


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 k: int = 20, temperature: float = 0.07, *, num_classes: int | None = None,
                 chunk: int = 1024) -> float:
  """Accuracy of cosine kNN with votes weighted by exp(similarity / temperature)."""
  k = min(int(k), len(train_x))
  classes = int(num_classes or max(train_y.max(), test_y.max()) + 1)
  tx, ty = jnp.asarray(train_x, jnp.float32), jnp.asarray(train_y, jnp.int32)
  preds = [np.asarray(_knn_predict(tx, ty, jnp.asarray(test_x[lo:lo + chunk], jnp.float32), k=k,
                                   temperature=float(temperature), num_classes=classes))
           for lo in range(0, len(test_x), chunk)]
  return float((np.concatenate(preds) == test_y).mean())


# ---------------------------------------------------------------------------------------------------
# Low-label subsets and the full report
# ---------------------------------------------------------------------------------------------------
def low_label_subset(labels: np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
  """Sorted indices of `n_per_class` examples of each class (all of a class that has fewer),
  chosen reproducibly from `seed`."""
  rng = np.random.default_rng(seed)
  picked = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    picked.append(rng.permutation(idx)[:n_per_class])
  return np.sort(np.concatenate(picked))


def feature_metrics(train_x, train_y, test_x, test_y, *, probe_steps: int = 300, probe_l2: float = 1e-4,
                    probe_lr: float = 0.05, knn_k: int = 20, knn_temperature: float = 0.07,
                    n_per_class: int = 0, seed: int = 0, num_classes: int | None = None
                    ) -> dict[str, float]:
  """probe_acc and knn_acc on one feature set, plus the `_{n}shot` variants when n_per_class > 0."""
  classes = int(num_classes or max(train_y.max(), test_y.max()) + 1)
  probe = functools.partial(linear_probe, steps=probe_steps, l2=probe_l2, lr=probe_lr, num_classes=classes)
  knn = functools.partial(knn_accuracy, k=knn_k, temperature=knn_temperature, num_classes=classes)
  out = {"probe_acc": probe(train_x, train_y, test_x, test_y),
         "knn_acc": knn(train_x, train_y, test_x, test_y)}
  if n_per_class:
    sub = low_label_subset(train_y, n_per_class, seed)
    out[f"probe_acc_{n_per_class}shot"] = probe(train_x[sub], train_y[sub], test_x, test_y)
    out[f"knn_acc_{n_per_class}shot"] = knn(train_x[sub], train_y[sub], test_x, test_y)
  return out


def eval_kwargs(config) -> dict:
  """feature_metrics keyword arguments from `config.frozen_eval`."""
  f = config.get("frozen_eval", None) or {}
  get = lambda key, default: f.get(key, default) if hasattr(f, "get") else default
  return dict(probe_steps=int(get("probe_steps", 300)), probe_l2=float(get("probe_l2", 1e-4)),
              probe_lr=float(get("probe_lr", 0.05)), knn_k=int(get("knn_k", 20)),
              knn_temperature=float(get("knn_temperature", 0.07)),
              n_per_class=int(get("n_per_class", 10)), seed=int(config.get("seed", 0)))


def format_table(metrics: dict[str, float]) -> str:
  """A small text table: each frozen-eval metric, pretrained vs random init, and the gain."""
  names = [k for k in metrics if (k.startswith("probe_acc") or k.startswith("knn_acc"))]
  lines = [f"{'frozen features':<22}{'pretrained':>11}{'random init':>13}{'gain':>8}"]
  for k in names:
    rnd = metrics.get(f"random_{k}")
    if rnd is None:
      lines.append(f"{k:<22}{metrics[k]:>11.4f}{'-':>13}{'-':>8}")
    else:
      lines.append(f"{k:<22}{metrics[k]:>11.4f}{rnd:>13.4f}{metrics[k] - rnd:>+8.4f}")
  return "\n".join(lines)


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
