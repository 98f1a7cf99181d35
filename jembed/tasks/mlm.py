"""Masked-language modelling, the BERT recipe.

15% of the non-special, non-padding tokens of each sequence are chosen; of those 80% become
[MASK], 10% a random token, 10% stay. Loss and accuracy only at the chosen positions, and the
output logits are computed only there: a fixed number per sequence is gathered before the tied
output projection, so the vocab-sized matmul costs K/T of the full one. Masking runs on device
inside the step, reproducibly from the seed and the step.
"""
from __future__ import annotations

import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jembed import fs
from jembed.data import documents, packing, pipeline, streaming, token_cache, wordpiece
from jembed.errors import UserError
from jembed.models.heads import MlmHead
from jembed.models.transformer import TransformerConfig, TransformerEncoder
from jembed.tasks.base import LOSS_WEIGHT, Data
from jembed.tasks.text_base import TextTask


def mask_tokens(rng, tokens, *, special_ids, mask_id: int, vocab_size: int, num_predictions: int,
                mask_prob: float = 0.15):
  """The BERT masking of a batch of token ids (B, T).

  Candidates are the tokens that are not special (`special_ids`: [PAD], [UNK], [CLS], [SEP], [MASK],
  wherever the tokenizer puts them). Returns (inputs, positions (B, K), targets (B, K), weights
  (B, K)); weight 0 marks the unused slots of a sequence with fewer than K chosen tokens. Random
  replacements are drawn uniformly from the ordinary (non-special) tokens.
  """
  k_choose, k_kind, k_rand = jax.random.split(rng, 3)
  candidate = ~jnp.isin(tokens, jnp.asarray(sorted(set(special_ids)), tokens.dtype))
  n_cand = candidate.sum(-1)
  # round(), as BERT does; at least one per non-empty sequence, at most K.
  n_mask = jnp.minimum(jnp.maximum(jnp.round(n_cand * mask_prob), jnp.minimum(n_cand, 1)),
                       num_predictions).astype(jnp.int32)
  scores = jnp.where(candidate, jax.random.uniform(k_choose, tokens.shape), -1.0)
  _, positions = jax.lax.top_k(scores, num_predictions)  # a uniformly random subset, in random order
  weights = (jnp.arange(num_predictions)[None, :] < n_mask[:, None])
  targets = jnp.take_along_axis(tokens, positions, axis=1)
  kind = jax.random.uniform(k_kind, positions.shape)
  specials = sorted(set(int(i) for i in special_ids))
  random_tokens = jax.random.randint(k_rand, positions.shape, 0, vocab_size - len(specials))
  for s in specials:  # skip over each special id: a uniform draw over the others
    random_tokens = random_tokens + (random_tokens >= s)
  replaced = jnp.where(kind < 0.8, mask_id, jnp.where(kind < 0.9, random_tokens, targets))
  replaced = jnp.where(weights, replaced, targets)
  rows = jnp.arange(tokens.shape[0])[:, None]
  inputs = tokens.at[rows, positions].set(replaced)
  return inputs, positions, targets, weights.astype(jnp.float32)


class MlmModel(nnx.Module):

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.encoder = TransformerEncoder(cfg, rngs=rngs)
    self.mlm_head = MlmHead.for_encoder(cfg, rngs=rngs)

  def __call__(self, tokens, mask, positions):
    hidden = self.encoder(tokens, mask)
    picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # (B, K, D)
    return self.mlm_head(picked, self.encoder.embeddings.token)


class MlmTask(TextTask):
  unit = "tokens"

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    d = config.data
    self.seq_len = d.seq_len
    self.num_predictions = d.max_predictions or math.ceil(d.mask_prob * d.seq_len)

  def items_per_example(self) -> int:
    return self.seq_len

  def load_data(self) -> Data:
    d = self.config.data
    if d.streams and not d.prepared:
      raise UserError(f"data.streams={d.streams} applies only to data.prepared (a corpus made by "
                      "jembed.data.prepare); set data.prepared or leave data.streams at 0")
    if d.prepared:
      return self._load_prepared()
    cache, how = self._token_cache()
    rows = None
    if cache is not None and not self.tokenizer_needs_texts():
      tok = self.resolve_tokenizer()
      rows = cache.load(tok)
      how = "hit" if rows is not None else "miss"
    if rows is None:
      train_docs, eval_docs = documents.load_documents(d)
      tok = self.resolve_tokenizer(train_docs)
      train = packing.pack_documents(train_docs, tok, self.seq_len)
      held = packing.pack_documents(eval_docs, tok, self.seq_len) if eval_docs else None
      if cache is not None:
        how = "miss"
        # Written by save_artifacts, with the records this read skipped (a hit reports them again).
        self._cache_pending = (cache, tok, train, held, pipeline.bad_records())
    else:
      train, held, bad = rows
      pipeline.add_bad_records(bad)
    if held is None or len(held) == 0:
      raise UserError("the held-out split is empty; give data.eval or raise data.eval_fraction")
    freq = packing.token_frequencies(train, self.vocab, special=self.ids.values())
    self.most_frequent = int(np.argmax(freq))
    info = {"train_sequences": len(train), "eval_sequences": len(held), "vocab_size": self.vocab}
    if how:
      info["token_cache"] = how if cache is None else f"{how} ({cache.root})"
    return Data(train={"tokens": train}, eval={"tokens": held}, info=info)

  def _token_cache(self):
    """(the token cache of a files corpus, or None; how it was used, for the log line)."""
    d = self.config.data
    if documents.resolve_source(d) != "files":
      if d.cache_dir:
        raise UserError(f"data.cache_dir={d.cache_dir!r} applies only to text files (data.train); "
                        "leave it empty")
      return None, ""
    root = token_cache.cache_root(d, self.workdir)
    if root is None:
      return None, "off"
    train_files, eval_files = documents.source_files(d)
    return token_cache.TokenCache(root, train_files, eval_files, d), ""

  def _load_prepared(self) -> Data:
    """The corpus of jembed.data.prepare: training rows streamed from its shards (this process's
    only), the held-out rows in memory, the tokenizer and baseline from its metadata."""
    d = self.config.data
    where = d.prepared
    meta, train = streaming.open_prepared(where, int(d.streams))
    if int(meta["seq_len"]) != self.seq_len:
      raise UserError(f"data.seq_len={self.seq_len} but data.prepared={where} holds rows of "
                      f"seq_len={meta['seq_len']}; set --config.data.seq_len={meta['seq_len']} or "
                      "prepare again with this seq_len")
    tok_path = fs.join(fs.absolute(where), meta["tokenizer"])
    if fs.exists(tok_path) and hashlib.sha256(fs.read_bytes(tok_path)).hexdigest() != (
        meta["tokenizer_sha256"]):
      raise UserError(f"{tok_path} is not the tokenizer the rows of data.prepared={where} were made "
                      "with (its sha256 differs from prepared.json); run jembed.data.prepare again")
    tok = wordpiece.build_tokenizer((), self.vocab_size_setting(), path=tok_path)
    for other, what in ((d.tokenizer, "data.tokenizer"),
                        (self._saved_tokenizer_path(), "the workdir's tokenizer.json")):
      if other and wordpiece.build_tokenizer((), 0, path=other).to_str() != tok.to_str():
        raise UserError(f"{what} ({other}) differs from the tokenizer of data.prepared={where}; "
                        "prepare the corpus with that tokenizer (--config.data.tokenizer) or drop it")
    if self.init is not None and self.init.tokenizer is not None and (
        self.init.tokenizer.get_vocab() != tok.get_vocab()):
      raise UserError(f"the warm-start source {self.init.description} has another vocabulary than "
                      f"data.prepared={where}; prepare the corpus with its tokenizer.json "
                      "(--config.data.tokenizer)")
    self.tokenizer, self.ids, self.vocab = tok, wordpiece.special_ids(tok), tok.get_vocab_size()
    max_eval = self.config.eval_batches * self.config.batch_size
    held = streaming.read_eval_columns(where, meta, max_eval)["tokens"]
    self.most_frequent = int(meta["most_frequent"])
    return Data(train=train, eval={"tokens": held},
                info={"train_sequences": len(train), "eval_sequences": int(meta["eval"]["rows"]),
                      "vocab_size": self.vocab, "prepared": where,
                      "streams": train.stream_count(jax.process_count())})

  def save_artifacts(self) -> None:
    super().save_artifacts()
    pending = getattr(self, "_cache_pending", None)
    if pending is not None:
      cache, tok, train, held, bad = pending
      cache.save(tok, train, held, bad)
      self._cache_pending = None

  def model_spec(self):
    return self.text_spec(pooling=self.config.model.pooling or "mean", normalize=False,
                          most_frequent=self.most_frequent)

  @classmethod
  def build_model(cls, spec, rngs):
    return MlmModel(TransformerConfig.from_json(spec["encoder"]), rngs=rngs)

  def prepare(self, batch, rng, train):
    # The masks of the whole batch, drawn before any split into micro-batches.
    inputs, positions, targets, weights = mask_tokens(
        rng, batch["tokens"], special_ids=self.ids.values(), mask_id=self.ids["mask"],
        vocab_size=self.vocab, num_predictions=self.num_predictions,
        mask_prob=self.config.data.mask_prob)
    return dict(batch, inputs=inputs, positions=positions, targets=targets, weights=weights)

  def loss(self, model, batch, rng, train):
    tokens, positions, targets, weights = (batch[k] for k in ("tokens", "positions", "targets",
                                                             "weights"))
    logits = model(batch["inputs"], tokens != self.ids["pad"], positions).astype(jnp.float32)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    count = weights.sum()
    n = jnp.maximum(count, 1.0)
    loss = (xent * weights).sum() / n
    # "The target's logit is the largest" instead of argmax: a plain max-reduce, where argmax's
    # variadic (value, index) reduce over the vocabulary is slow on CPU. Exact ties are vanishingly rare.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = target_logit >= logits.max(-1)
    metrics = {
        "loss": loss,
        "accuracy": (correct * weights).sum() / n,
        "baseline_accuracy": ((targets == self.most_frequent) * weights).sum() / n,
        LOSS_WEIGHT: count,  # a mean over the masked tokens: accumulation weights by their count
    }
    return loss, metrics

  def final_summary(self, model, eval_metrics, logger) -> None:
    if not eval_metrics:
      return
    logger.info(
        f"held-out MLM accuracy {eval_metrics['accuracy']:.4f} (loss {eval_metrics['loss']:.4f}) vs "
        f"{eval_metrics['baseline_accuracy']:.4f} for always predicting the most frequent token "
        f"'{self.tokenizer.id_to_token(self.most_frequent)}'")
