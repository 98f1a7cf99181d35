"""Two-tower retrieval trained on user-item interactions (the recommendation recipe of YouTube's
"Sampling-Bias-Corrected Neural Modeling", Yi et al. 2019, and TensorFlow Recommenders).

A user tower and an item tower each map an id to a `model.dim`-d vector: an embedding table (rows
sharded over the whole mesh: logical axis `table_rows`), optionally followed by a small MLP
(`model.mlp_dims`), optionally L2-normalised (`model.normalize`). A user and an item score by dot
product / `loss.temperature`. Each example is one (user, item) interaction; the loss is a softmax
over the items of the global batch (jembed.losses.sampled_softmax) with the log-Q popularity
correction (`loss.logq`) and accidental hits removed (`loss.remove_accidental_hits`).

Every `eval_every` steps an eval row carries full-catalogue recall@10/100, ndcg@10 and hit_rate@10
of the held-out interactions, each user's training items excluded, next to the same metrics of a
popularity ranking (`popularity_*`). `jembed.load(workdir)` gives a jembed.recommend.Recommender.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jembed import fs, losses, ranking, row_optimizer
from jembed.optimizer import learning_rate_schedule
from jembed.state import ModelDef
from jembed.data import interactions as inter
from jembed.errors import UserError
from jembed.models.layers import logical
from jembed.tasks.base import Data, Task

VOCAB_FILE = "vocab.json"
HISTORY_FILE = "history.npz"


class TableRows(nnx.Variable):
  """An id table (and its per-row optimizer state) updated row-wise by the task itself
  (`model.table_updates` adam/adagrad/sgd: jembed.row_optimizer), not by the config's optimizer: a
  variable of the model state, so the dense optimizer never sees it."""


class Tower(nnx.Module):
  """id -> embedding table row (-> MLP) (-> L2 normalisation)."""

  def __init__(self, rows: int, dim: int, mlp_dims, normalize: bool, *, rngs: nnx.Rngs,
               table_updates: str = "dense"):
    width = mlp_dims[0] if mlp_dims else dim
    init = jax.random.normal(rngs.params(), (rows, width), jnp.float32) / np.sqrt(width)
    kind = nnx.Param if table_updates == "dense" else TableRows
    self.table = kind(init, **logical("table_rows", None))
    if table_updates != "dense":
      for name, value in row_optimizer.init_slots(table_updates, init).items():
        setattr(self, f"table_{name}", TableRows(value, **logical("table_rows", None)))
    sizes = list(mlp_dims) + ([dim] if mlp_dims else [])
    self.mlp = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.normalize = normalize

  def rows(self, ids):
    return jnp.take(self.table[...], ids, axis=0)

  def __call__(self, ids):
    return self.head(self.rows(ids))

  def head(self, x):
    """What follows the table: the MLP and the normalisation, on gathered rows."""
    for i, layer in enumerate(self.mlp):
      x = layer(x)
      if i < len(self.mlp) - 1:
        x = jax.nn.relu(x)
    if self.normalize:
      x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return x


class TwoTowerModel(nnx.Module):

  def __init__(self, num_users: int, num_items: int, dim: int, mlp_dims, normalize: bool, *,
               rngs: nnx.Rngs, table_updates: str = "dense"):
    self.user_tower = Tower(num_users, dim, mlp_dims, normalize, rngs=rngs, table_updates=table_updates)
    self.item_tower = Tower(num_items, dim, mlp_dims, normalize, rngs=rngs, table_updates=table_updates)
    if table_updates != "dense":   # row-wise updates made so far: the schedule's and Adam's step
      self.row_step = TableRows(jnp.zeros((), jnp.int32))


@functools.lru_cache(maxsize=8)
def _tower_fn(graphdef):
  """The jitted tower of a model structure (cached: every evaluation reuses the compile)."""
  def embed(state, ids, user):
    m = nnx.merge(graphdef, state)
    return (m.user_tower if user else m.item_tower)(ids)
  return jax.jit(embed, static_argnums=2)


def tower_vectors(model: TwoTowerModel, num_users: int, num_items: int, chunk: int = 65536
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Every user's and item's vector as float32 NumPy arrays, at most `chunk` ids per call."""
  graphdef, state = nnx.split(model)
  fn = _tower_fn(graphdef)

  def run(n, user):
    size = min(chunk, 1 << max(n - 1, 1).bit_length())   # one shape per table: one compile
    out = []
    for lo in range(0, n, size):
      ids = np.arange(lo, lo + size, dtype=np.int32) % n
      out.append(np.asarray(fn(state, ids, user), np.float32)[:min(size, n - lo)])
    return np.concatenate(out)

  return run(num_users, True), run(num_items, False)


class TwoTowerTask(Task):
  unit = "interactions"
  backbone = "item_tower"

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    if self.init is not None:
      raise UserError("config.init: two_tower trains its id tables from scratch; leave config.init empty")
    if config.peft.method != "full":
      raise UserError(f"peft.method='{config.peft.method}': two_tower trains its tables in full; use full")
    if config.data.item_features:
      raise UserError("data.item_features: feature towers (item text through a text encoder) are not "
                      "implemented yet; leave it empty to train id towers")
    if float(config.loss.temperature) <= 0:
      raise UserError(f"loss.temperature={config.loss.temperature} must be > 0")
    self.table_updates = str(config.model.table_updates)
    # Row-wise updates keep their own rows on a non-finite step (see value_and_grad).
    self.guards_model_state = self.table_updates != "dense"
    if self.table_updates not in ("dense",) + row_optimizer.KINDS:
      raise UserError(f"model.table_updates='{self.table_updates}' is unknown; use dense, or "
                      f"{', '.join(row_optimizer.KINDS)} (only the rows a batch touches change)")
    if self.table_updates != "dense":
      if float(config.weight_decay):
        raise UserError(f"weight_decay={config.weight_decay} with model.table_updates="
                        f"'{self.table_updates}': decaying every row each step is a dense update; set "
                        "--config.weight_decay=0 or model.table_updates=dense")
      if int(config.grad_accum_steps) > 1:
        raise UserError(f"grad_accum_steps={config.grad_accum_steps} with model.table_updates="
                        f"'{self.table_updates}': row-wise updates apply once per micro-batch; use "
                        "grad_accum_steps=1 or model.table_updates=dense")

  # -- data --
  def load_data(self) -> Data:
    d = self.config.data
    self.data = inter.load(d, seed=int(self.config.seed))
    x = self.data
    counts = x.item_counts()
    # log Q: the probability an in-batch column is this item, i.e. its share of training interactions.
    self.item_logq = np.log(np.maximum(counts, 1) / counts.sum()).astype(np.float32)
    self.seen = x.seen()
    info = {"users": len(x.users), "items": len(x.items), "train_interactions": len(x.train_user),
            "eval_interactions": len(x.eval_item), "eval_skipped_unseen": x.skipped_eval,
            "source": d.train or "stdlib imports"}
    fits = len(x.eval_user) >= int(self.config.batch_size)
    return Data(train=self._columns(x.train_user, x.train_item),
                eval=self._columns(x.eval_user, x.eval_item) if fits else None, info=info)

  def _columns(self, user, item) -> dict[str, np.ndarray]:
    return {"user": user.astype(np.int32), "item": item.astype(np.int32),
            "logq": self.item_logq[item]}

  def save_artifacts(self) -> None:
    fs.write_json(fs.join(self.workdir, VOCAB_FILE), {"users": self.data.users, "items": self.data.items},
                  indent=None)
    fs.write_npz(fs.join(self.workdir, HISTORY_FILE), user=self.data.train_user, item=self.data.train_item)

  # -- model --
  def model_spec(self) -> dict[str, Any]:
    m = self.config.model
    dims = [int(v) for v in m.mlp_dims]
    if int(m.dim) < 1 or any(v < 1 for v in dims):
      raise UserError(f"model.dim={m.dim} and model.mlp_dims={tuple(dims)} must be positive")
    return {"task": "two_tower", "vocab": VOCAB_FILE, "history": HISTORY_FILE,
            "backbone": {"num_users": len(self.data.users), "num_items": len(self.data.items),
                         "dim": int(m.dim), "mlp_dims": dims, "normalize": bool(m.normalize),
                         "table_updates": self.table_updates}}

  @classmethod
  def build_model(cls, spec, rngs):
    b = spec["backbone"]
    return TwoTowerModel(b["num_users"], b["num_items"], b["dim"], tuple(b["mlp_dims"]),
                         b["normalize"], rngs=rngs, table_updates=b.get("table_updates", "dense"))

  # -- objective --
  def loss(self, model, batch, rng, train):
    return self._loss_of(model.user_tower(batch["user"]), model.item_tower(batch["item"]), batch)

  def _loss_of(self, users, items, batch):
    lc = self.config.loss
    return losses.sampled_softmax(users, items, batch["item"], temperature=float(lc.temperature),
                                  log_q=batch["logq"] if lc.logq else None,
                                  remove_accidental_hits=bool(lc.remove_accidental_hits))

  def value_and_grad(self, make_model, trained, batch, rng):
    """Dense tables: the loop's gradients. Row-wise tables (`model.table_updates`): the touched rows
    are gathered outside the differentiated function, the loss differentiated w.r.t. them (and the
    dense parameters, e.g. an MLP), and the rows updated here by jembed.row_optimizer; the updated
    tables return in the model state, so the loop's optimizer sees only the dense parameters."""
    if self.table_updates == "dense":
      return super().value_and_grad(make_model, trained, batch, rng)
    c = self.config
    before = make_model(trained)
    user_rows = before.user_tower.rows(batch["user"])
    item_rows = before.item_tower.rows(batch["item"])

    def loss_fn(t, ur, ir):
      model = make_model(t)
      loss, metrics = self._loss_of(model.user_tower.head(ur), model.item_tower.head(ir), batch)
      return loss, (metrics, ModelDef.model_state(model))

    (loss, (metrics, state)), (grads, g_user, g_item) = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2), has_aux=True)(trained, user_rows, item_rows)
    towers = (("user_tower", batch["user"], g_user), ("item_tower", batch["item"], g_item))
    summed = [(name, *row_optimizer.unique_rows(ids, g, state[name]["table"].shape[0]))
              for name, ids, g in towers]
    # Clipped by the norm of every gradient, the rows' and the dense parameters', as a dense table's
    # would be (the loop clips the dense parameters by their own norm).
    norm = jnp.sqrt(sum(jnp.sum(g * g) for _, _, g in summed)
                    + sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(grads)))
    clip = float(c.grad_clip)
    scale = jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-12)) if clip else 1.0
    # The loop skips a step whose loss or gradients are not finite; it leaves this state to the task
    # (`guards_model_state`), as a select over whole tables would cost a catalogue-sized copy a step.
    finite = jnp.isfinite(loss) & jnp.isfinite(norm)
    step = state["row_step"]
    lr = learning_rate_schedule(c)(step)
    for name, rows, g in summed:
      tower = state[name]
      slots = {k: tower[f"table_{k}"] for k in row_optimizer.SLOTS[self.table_updates]}
      table, slots = row_optimizer.update(self.table_updates, tower["table"], slots, rows, g * scale,
                                          learning_rate=lr, step=step, b1=float(c.b1), b2=float(c.b2),
                                          apply=finite)
      state[name] = dict(tower, table=table, **{f"table_{k}": v for k, v in slots.items()})
    state["row_step"] = step + finite.astype(step.dtype)
    metrics = dict(metrics, table_grad_norm=norm)
    return (loss, (metrics, state)), grads

  # -- evaluation (host side) --
  def retrieval_metrics(self, model) -> dict[str, float]:
    x = self.data
    users, items = tower_vectors(model, len(x.users), len(x.items))
    return ranking.evaluate(users, items, x.item_counts(), self.seen, x.eval_user, x.eval_item)

  def extra_eval(self, model, step):
    return self.retrieval_metrics(model)

  def final_summary(self, model, eval_metrics, logger) -> None:
    scores = {k: v for k, v in eval_metrics.items() if k.startswith(("recall@", "ndcg@", "hit_rate@"))}
    if not scores:
      scores = self.retrieval_metrics(model)
    if not scores:
      return
    n = len(np.unique(self.data.eval_user))
    lines = [f"held-out interactions of {n} users, full catalogue of {len(self.data.items)} items, "
             "seen items excluded: two-tower vs popularity",
             f"{'metric':<14}{'two-tower':>10}{'popularity':>12}"]
    for k, v in scores.items():
      lines.append(f"{k:<14}{v:>10.4f}{eval_metrics.get('popularity_' + k, float('nan')):>12.4f}")
    logger.info("\n".join(lines))
