"""Frozen-feature evaluation: a linear probe, weighted kNN, a low-label variant (the numbers the
image tasks report at eval steps and `python -m jembed.evaluate --workdir` prints).

A backbone's features are extracted once (no gradients), then
  * a linear probe: multinomial logistic regression trained in JAX, full batch, on standardised
    features (deterministic: no sampling, fixed zero init);
  * weighted kNN (Wu et al. 2018, as in DINO): cosine similarity, the k nearest training
    features vote for their class with weight exp(sim / T);
  * the same two with only n labelled examples per class.
"""
from __future__ import annotations

import functools
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
  f = config.frozen_eval
  return dict(probe_steps=int(f.probe_steps), probe_l2=float(f.probe_l2), probe_lr=float(f.probe_lr),
              knn_k=int(f.knn_k), knn_temperature=float(f.knn_temperature),
              n_per_class=int(f.n_per_class), seed=int(config.seed))


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
