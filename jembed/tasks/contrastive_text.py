"""Contrastive text embeddings with in-batch negatives (the recipe behind OpenAI's and
sentence-transformers' text embeddings).

Each example is an (anchor, positive) pair and optionally K hard negatives. Anchors, positives and
negatives go through one shared encoder and pooling; symmetric InfoNCE (jembed.losses.info_nce)
asks each anchor to pick its positive out of every positive and negative of the *global* batch
(the loss is plain jnp over the global sharded arrays, so negatives span the whole mesh), at a fixed
scale (20 = temperature 0.05, sentence-transformers' default) or a learnable one clamped as CLIP
does. With `loss.chunk_size` the gradient is computed chunk by chunk (GradCache), so a global batch
larger than memory fits, with the same gradient. A `.txt` training file gives unsupervised pairs
(each line with itself: two dropout views, SimCSE).

Held-out retrieval (recall@1/10, MRR@10, nDCG@10 with the BEIR definitions) is an eval row every
`eval_every` steps, and the final summary prints it next to the model the run started from.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jembed import init as init_lib
from jembed import losses, retrieval
from jembed.state import ModelDef
from jembed.data import encode, pairs as pairs_lib, streaming, wordpiece
from jembed.errors import UserError
from jembed.models.heads import pool
from jembed.models.layers import logical
from jembed.models.transformer import TransformerConfig, TransformerEncoder
from jembed.tasks.base import Data
from jembed.tasks.text_base import TextTask

POOLINGS = ("cls", "mean", "max", "mean_sqrt_len")
METRICS = ("recall@1", "recall@10", "mrr@10", "ndcg@10")


class ContrastiveTextModel(nnx.Module):
  """encoder -> pooling (-> L2 normalisation in the loss); an optional learnable logit scale."""

  def __init__(self, cfg: TransformerConfig, pooling: str, learn_temperature: bool,
               init_temperature: float, *, rngs: nnx.Rngs):
    self.encoder = TransformerEncoder(cfg, rngs=rngs)
    self.pooling = pooling
    self.log_scale = (nnx.Param(losses.clip_logit_scale_init(init_temperature), **logical())
                      if learn_temperature else None)

  def __call__(self, tokens, mask):
    return pool(self.encoder(tokens, mask), mask, self.pooling).astype(jnp.float32)


class ContrastiveTextTask(TextTask):
  no_accumulation = ("the in-batch negatives would shrink to one micro-batch; set "
                     "grad_accum_steps=1 and loss.chunk_size (GradCache: the full batch's "
                     "negatives and gradient, one chunk in memory at a time)")
  task_params = r"^log_scale$"   # loss.learn_temperature's scale trains under LoRA and adapters too

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    loss = config.loss
    if loss.chunk_size and (loss.chunk_size < 0 or config.batch_size % loss.chunk_size):
      raise UserError(f"loss.chunk_size={loss.chunk_size} must divide batch_size={config.batch_size}")
    self._embedder = None

  # -- data --
  def load_data(self) -> Data:
    d = self.config.data
    if streaming.check_streams(d):
      return self._load_prepared()
    train, held, _ = pairs_lib.load_pair_splits(d)
    texts = [t for p in train for t in (p.anchor, p.positive, *p.negatives)]
    self.resolve_tokenizer(texts)
    self.encoder_config()  # checks seq_len against the position table before encoding anything
    self.num_negatives = _num_negatives(train, int(d.num_negatives))
    self.held_out = held
    columns = self._columns(train)
    info = {"train_pairs": len(train), "eval_pairs": len(held), "hard_negatives": self.num_negatives,
            "vocab_size": self.vocab}
    # The held-out loss needs full batches shaped like training's (same number of negatives);
    # retrieval metrics are computed on every held-out pair regardless.
    fits = (len(held) >= int(self.config.batch_size)
            and all(len(p.negatives) >= self.num_negatives for p in held))
    return Data(train=columns, eval=self._columns(held) if fits else None, info=info)

  def _load_prepared(self) -> Data:
    """Pairs from jembed.data.prepare: training rows streamed from this process's shards, the
    held-out pairs (text, for the retrieval evaluation) in memory, the tokenizer from the directory."""
    from jembed import fs
    d = self.config.data
    where = d.prepared
    meta, train, tok = streaming.open_prepared_text(where, int(d.streams), "pairs", int(d.seq_len),
                                                    self.init)
    setting = int(d.num_negatives)
    if setting >= 0 and setting != int(meta["num_negatives"]):
      raise UserError(f"data.num_negatives={setting} but data.prepared={where} holds "
                      f"{meta['num_negatives']} per pair; set it to {meta['num_negatives']} (or -1)")
    self.tokenizer, self.ids, self.vocab = tok, wordpiece.special_ids(tok), tok.get_vocab_size()
    self.encoder_config()  # checks seq_len against the position table
    self.num_negatives = int(meta["num_negatives"])
    held, _ = pairs_lib.load_pairs(fs.join(fs.absolute(where), meta["eval"]["file"]))
    self.held_out = held
    fits = len(held) >= int(self.config.batch_size) and all(
        len(p.negatives) >= self.num_negatives for p in held)
    info = {"train_pairs": len(train), "eval_pairs": len(held), "hard_negatives": self.num_negatives,
            "vocab_size": self.vocab, "prepared": where,
            "streams": train.stream_count(jax.process_count())}
    return Data(train=train, eval=self._columns(held) if fits else None, info=info)

  def _columns(self, rows) -> dict[str, np.ndarray]:
    seq_len = int(self.config.data.seq_len)
    enc = lambda texts: encode.encode_texts(self.tokenizer, texts, seq_len, self.ids)
    cols = {"anchor": enc([p.anchor for p in rows]), "positive": enc([p.positive for p in rows])}
    k = self.num_negatives
    if k:
      flat = enc([n for p in rows for n in p.negatives[:k]])
      cols["negative"] = flat.reshape(len(rows), k, seq_len)
    return cols

  def items_per_example(self) -> int:
    return 1

  # -- model --
  def model_spec(self):
    m = self.config.model
    pooling = m.pooling or (self.init.spec.get("pooling") if self.init else "") or "mean"
    if pooling not in POOLINGS:
      raise UserError(f"model.pooling='{pooling}' is unknown; use one of {', '.join(POOLINGS)}")
    loss = self.config.loss
    return self.text_spec(pooling=pooling, normalize=True,
                          learn_temperature=bool(loss.learn_temperature),
                          init_temperature=float(loss.init_temperature))

  @classmethod
  def build_model(cls, spec, rngs):
    return ContrastiveTextModel(TransformerConfig.from_json(spec["encoder"]), spec["pooling"],
                                spec["learn_temperature"], spec["init_temperature"], rngs=rngs)

  # -- objective --
  def _scale(self, model):
    if model.log_scale is not None:
      return losses.clip_logit_scale(model.log_scale[...], float(self.config.loss.max_scale))
    return float(self.config.loss.scale)

  def _embed_columns(self, model, batch) -> dict[str, jax.Array]:
    pad = self.ids["pad"]
    out = {}
    for name in ("anchor", "positive", "negative"):
      if name not in batch:
        continue
      tokens = batch[name]
      flat = tokens.reshape(-1, tokens.shape[-1])
      out[name] = model(flat, flat != pad).reshape(tokens.shape[:-1] + (-1,))
    return out

  def _loss_from(self, emb, scale):
    return losses.info_nce(emb["anchor"], emb["positive"], scale=scale,
                           negatives=emb.get("negative"), symmetric=bool(self.config.loss.symmetric))

  def loss(self, model, batch, rng, train):
    return self._loss_from(self._embed_columns(model, batch), self._scale(model))

  def value_and_grad(self, make_model, trained, batch, rng):
    chunk = int(self.config.loss.chunk_size)
    if not chunk:
      return super().value_and_grad(make_model, trained, batch, rng)
    model_state = ModelDef.model_state(make_model(trained))  # unchanged: text encoders keep none

    def encode_chunk(t, columns, key):
      return self._embed_columns(make_model(t, key), columns)

    def loss_from(emb, t):
      # The scale comes from the same trained tree, so a learnable one gets its gradient here.
      return self._loss_from(emb, self._scale(make_model(t)))

    (loss, metrics), grads = losses.grad_cache(encode_chunk, loss_from, trained, batch,
                                               chunk_size=chunk, rng=rng)
    return (loss, (metrics, model_state)), grads

  # -- retrieval evaluation (host side) --
  def _embed_texts(self, model, texts: list[str]) -> np.ndarray:
    from jembed.embed import TextEmbedder
    params = nnx.to_pure_dict(nnx.state(model.encoder, nnx.Param))
    if self._embedder is None:
      spec = self.model_spec()
      self._embedder = TextEmbedder(TransformerConfig.from_json(spec["encoder"]), params,
                                    self.tokenizer, self.ids, pooling=spec["pooling"], normalize=True,
                                    max_seq_length=spec["max_seq_length"])  # the model's, as embed
    else:
      self._embedder.set_params(params)
    return self._embedder.embed(texts, batch_size=int(self.config.retrieval_batch))

  def retrieval_metrics(self, model) -> dict[str, float]:
    queries, corpus, qrels = pairs_lib.retrieval_set(self.held_out)
    if not queries:
      return {}
    q, c = self._embed_texts(model, queries), self._embed_texts(model, corpus)
    scores = retrieval.retrieval_metrics(q, c, qrels)
    return {k: scores[k] for k in METRICS}

  def extra_eval(self, model, step):
    return self.retrieval_metrics(model)

  def _start_model(self):
    """The model the run started from: the warm-start source, else the same random init."""
    spec = self.model_spec()
    seed = int(self.config.seed)
    model = self.build_model(spec, nnx.Rngs(params=seed, dropout=seed))
    if self.init is not None:
      params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      params, _ = init_lib.warm_start(self.init, jax.tree.map(jnp.asarray, params), {},
                                      backbone="encoder", same_task=self.init.task == spec["task"])
      nnx.update(model, params)
    model.eval()
    return model

  def final_summary(self, model, eval_metrics, logger) -> None:
    after = {k: eval_metrics[k] for k in METRICS if k in eval_metrics}
    if not after:
      after = self.retrieval_metrics(model)
    if not after:
      return
    before = self.retrieval_metrics(self._start_model())
    start = self.init.description if self.init is not None else "random init"
    lines = [f"held-out retrieval ({len(self.held_out)} queries): trained vs start ({start})",
             f"{'metric':<12}{'trained':>10}{'start':>10}{'gain':>9}"]
    for k in after:
      lines.append(f"{k:<12}{after[k]:>10.4f}{before.get(k, float('nan')):>10.4f}"
                   f"{after[k] - before.get(k, float('nan')):>+9.4f}")
    logger.info("\n".join(lines))


def _num_negatives(rows, setting: int) -> int:
  """Hard negatives per pair in the batch columns: `setting` (> 0), none (0), or -1: as many as
  every pair has."""
  counts = [len(p.negatives) for p in rows]
  if setting == 0 or (setting < 0 and max(counts) == 0):
    return 0
  if setting < 0:
    if min(counts) == 0:
      raise UserError(f"{sum(c > 0 for c in counts)} of {len(counts)} training pairs have hard "
                      "negatives and the others none; give every pair one, or set "
                      "data.num_negatives=0 to train without them")
    return min(counts)
  if min(counts) < setting:
    raise UserError(f"data.num_negatives={setting} but some pairs have only {min(counts)}; lower it")
  return setting
