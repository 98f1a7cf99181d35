"""Text classification: a Transformer encoder, pooled as `model.pooling` says ("" = as the warm-start
source pools, else [CLS]), then a head (`model.head`):

  linear  a fresh linear layer on the pooled features (jembed's own; any pooling)
  hf      the encoder family's Hugging Face *ForSequenceClassification head, so the fine-tuned model
          exports as one (jembed.export): BERT's pooler (dense + tanh on [CLS], from the source's
          pooler weights when it has them) then a linear layer; RoBERTa / XLM-R / MPNet dense + tanh +
          linear on [CLS]; ModernBERT dense + GELU + LayerNorm + linear on [CLS] or the mean
  ""      auto: hf when warm-starting from a source whose family's head computes the pooling the run
          uses anyway (and, for BERT, that carries pooler weights), else linear

Data: jembed/data/labeled_text.py in memory, or rows prepared by `python -m jembed.data.prepare`
(jembed/data/prepare_labeled.py) streamed from disk with data.prepared.
"""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jembed.data import encode, labeled_text, streaming, wordpiece
from jembed.errors import UserError
from jembed.models.heads import (HF_SEQUENCE_HEADS, POOLINGS, Classifier, PoolerClassifier,
                                 SequenceClassifierHead, pool)
from jembed.models.transformer import TransformerConfig, TransformerEncoder
from jembed.tasks.base import Data
from jembed.tasks.classification_base import ClassificationBase
from jembed.tasks.text_base import TextTask

HEADS = ("linear", "hf")


class TextClassifier(nnx.Module):

  def __init__(self, cfg: TransformerConfig, num_classes: int, pooling: str, *, head: str = "linear",
               rngs: nnx.Rngs):
    self.encoder = TransformerEncoder(cfg, rngs=rngs)
    self.head = (SequenceClassifierHead.for_encoder(cfg, num_classes, rngs=rngs) if head == "hf"
                 else Classifier(cfg.hidden_size, num_classes, rngs=rngs))
    self.pooling = pooling
    # BERT's Hugging Face head reads the encoder's pooler output, not the pooled features.
    self.uses_pooler = head == "hf" and cfg.family == "bert"

  def classifier_head(self) -> nnx.Module:
    """What maps the pooled features (`pooling`) to logits: the head, after BERT's pooler when the
    head is BERT's Hugging Face one (what jembed.load runs for predictions)."""
    return PoolerClassifier(self.encoder.pooler, self.head) if self.uses_pooler else self.head

  def __call__(self, tokens, mask):
    hidden = self.encoder(tokens, mask)
    if self.uses_pooler:
      return self.head(self.encoder.pooled(hidden))
    return self.head(pool(hidden, mask, self.pooling))


class TextClassificationTask(TextTask, ClassificationBase):

  def load_data(self) -> Data:
    d = self.config.data
    if streaming.check_streams(d):
      return self._load_prepared()
    data = labeled_text.load_labeled_text(d)
    tok = self.resolve_tokenizer(data.train_texts)
    self.class_names = data.class_names
    self.encoder_config()  # checks seq_len against the position table before encoding anything
    seq_len = int(d.seq_len)
    train = {"tokens": encode.encode_texts(tok, data.train_texts, seq_len, self.ids),
             "label": data.train_labels}
    held = {"tokens": encode.encode_texts(tok, data.eval_texts, seq_len, self.ids),
            "label": data.eval_labels}
    self.eval_columns = held
    return Data(train=train, eval=held, info={
        "train_texts": len(data.train_texts), "eval_texts": len(data.eval_texts),
        "classes": len(self.class_names), "vocab_size": self.vocab})

  def _load_prepared(self) -> Data:
    """Labelled text from jembed.data.prepare: training rows streamed from this process's shards, the
    held-out rows (the whole split: the classification report reads it) in memory, the tokenizer and
    the class names from the directory."""
    d = self.config.data
    meta, train, tok = streaming.open_prepared_text(d.prepared, int(d.streams), "labeled_text",
                                                    int(d.seq_len), self.init)
    self.tokenizer, self.ids, self.vocab = tok, wordpiece.special_ids(tok), tok.get_vocab_size()
    self.class_names = list(meta["classes"])
    self.encoder_config()  # checks seq_len against the position table
    held = streaming.read_eval_columns(d.prepared, meta)
    self.eval_columns = held
    return Data(train=train, eval=held, info={
        "train_texts": len(train), "eval_texts": len(held["label"]),
        "classes": len(self.class_names), "vocab_size": self.vocab, "prepared": d.prepared,
        "streams": train.stream_count(jax.process_count())})

  def _source_encoder(self) -> dict:
    return dict(self.init.spec.get("encoder") or {}) if self.init is not None else {}

  def head_and_pooling(self) -> tuple[str, str]:
    """(model.head, model.pooling) resolved: "" takes the source's (see the module docstring)."""
    m = self.config.model
    head, pooling = m.head, m.pooling
    if head not in ("",) + HEADS:
      raise UserError(f"model.head='{head}' is unknown; use linear, hf or '' (auto)")
    if pooling and pooling not in POOLINGS:
      raise UserError(f"model.pooling='{pooling}' is unknown; use one of {', '.join(POOLINGS)}")
    family = self._source_encoder().get("family") or "bert"
    allowed = HF_SEQUENCE_HEADS[family][0]
    source_pooling = self.init.spec.get("pooling", "") if self.init is not None else ""
    if not head:
      would_pool = pooling or source_pooling or "cls"
      has_pooler = family != "bert" or bool(self._source_encoder().get("pooler"))
      head = "hf" if self.init is not None and has_pooler and would_pool in allowed else "linear"
    if head == "linear":
      return head, pooling or source_pooling or "cls"
    if pooling and pooling not in allowed:
      raise UserError(f"model.head=hf is the {family} family's Hugging Face classification head, which "
                      f"pools with {' or '.join(allowed)}, not model.pooling='{pooling}'; set "
                      f"model.pooling={allowed[0]} (or '') or model.head=linear")
    return head, pooling or (source_pooling if source_pooling in allowed else allowed[0])

  def encoder_config(self) -> TransformerConfig:
    cfg = super().encoder_config()
    head, _ = self.head_and_pooling()
    if head == "hf" and cfg.family == "bert" and not cfg.pooler:
      # BERT's head reads its pooler: a fresh one when the source has none (as transformers does).
      cfg = dataclasses.replace(cfg, pooler=True)
      self.fresh_params = r"^encoder/pooler/"
    return cfg

  def model_spec(self):
    head, pooling = self.head_and_pooling()
    return self.text_spec(modality="text", pooling=pooling, normalize=False, head=head,
                          class_names=list(self.class_names))

  @classmethod
  def build_model(cls, spec, rngs):
    # Workdirs written before model.head existed hold a linear head.
    return TextClassifier(TransformerConfig.from_json(spec["encoder"]), len(spec["class_names"]),
                          spec["pooling"], head=spec.get("head", "linear"), rngs=rngs)

  def logits(self, model, batch):
    tokens = batch["tokens"]
    return model(tokens, tokens != self.ids["pad"])
