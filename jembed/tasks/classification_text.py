"""Text classification: a Transformer encoder pooled as `model.pooling` says ("" = as the warm-start
source pools, else [CLS]), then a fresh linear head. Data: jembed/data/labeled_text.py in memory, or
rows prepared by `python -m jembed.data.prepare` (jembed/data/prepare_labeled.py) streamed from disk
with data.prepared."""
from __future__ import annotations

import jax
from flax import nnx

from jembed.data import encode, labeled_text, streaming, wordpiece
from jembed.errors import UserError
from jembed.models.heads import POOLINGS, Classifier, pool
from jembed.models.transformer import TransformerConfig, TransformerEncoder
from jembed.tasks.base import Data
from jembed.tasks.classification_base import ClassificationBase
from jembed.tasks.text_base import TextTask


class TextClassifier(nnx.Module):

  def __init__(self, cfg: TransformerConfig, num_classes: int, pooling: str, *, rngs: nnx.Rngs):
    self.encoder = TransformerEncoder(cfg, rngs=rngs)
    self.head = Classifier(cfg.hidden_size, num_classes, rngs=rngs)
    self.pooling = pooling

  def __call__(self, tokens, mask):
    return self.head(pool(self.encoder(tokens, mask), mask, self.pooling))


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

  def model_spec(self):
    # "" = the source's pooling (a sentence-transformers model's mean, say), else [CLS].
    pooling = (self.config.model.pooling
               or (self.init.spec.get("pooling", "") if self.init is not None else "") or "cls")
    if pooling not in POOLINGS:
      raise UserError(f"model.pooling='{pooling}' is unknown; use one of {', '.join(POOLINGS)}")
    return self.text_spec(modality="text", pooling=pooling, normalize=False,
                          class_names=list(self.class_names))

  @classmethod
  def build_model(cls, spec, rngs):
    return TextClassifier(TransformerConfig.from_json(spec["encoder"]), len(spec["class_names"]),
                          spec["pooling"], rngs=rngs)

  def logits(self, model, batch):
    tokens = batch["tokens"]
    return model(tokens, tokens != self.ids["pad"])
