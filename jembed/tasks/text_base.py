"""What every text task shares: its tokenizer and its encoder's architecture, from scratch or from
the warm-start source (config.init), and the text part of the model description.

Tokenizer, first that applies: `data.tokenizer` (a tokenizer.json), the warm-start source's, the one
a resumed run saved in its workdir, else a WordPiece vocabulary trained on the task's texts.
"""
from __future__ import annotations

from typing import Any, Sequence

from jembed import fs
from jembed.data import encode
from jembed.data import wordpiece
from jembed.errors import UserError
from jembed.models.transformer import TransformerConfig
from jembed.tasks.base import Task

TOKENIZER_FILE = "tokenizer.json"


class TextTask(Task):
  """A task on a Transformer encoder (attribute `encoder`) over WordPiece ids."""

  backbone = "encoder"

  def _saved_tokenizer_path(self) -> str:
    saved = fs.join(self.workdir, TOKENIZER_FILE)
    return saved if fs.exists(saved) else ""

  def _tokenizer_path(self) -> str:
    path = self.config.data.tokenizer
    if not path and self.init is None:
      path = self._saved_tokenizer_path()  # a resumed run keeps its vocabulary
    return path

  def vocab_size_setting(self) -> int:
    return int(self.config.data.vocab_size)

  def tokenizer_needs_texts(self) -> bool:
    """Whether `resolve_tokenizer` trains a tokenizer (so needs the texts): no tokenizer file, no
    warm-start tokenizer and none saved in the workdir."""
    return not self._tokenizer_path() and (self.init is None or self.init.tokenizer is None)

  def resolve_tokenizer(self, train_texts: Sequence[str] = ()):
    d = self.config.data
    path = self._tokenizer_path()
    if path or self.init is None or self.init.tokenizer is None:
      tok = wordpiece.build_tokenizer(train_texts, int(d.vocab_size), path=path or None)
    else:
      tok = encode.plain(self.init.tokenizer)
    self.tokenizer = tok
    self.ids = wordpiece.special_ids(tok)
    self.vocab = tok.get_vocab_size()
    return tok

  def encoder_config(self) -> TransformerConfig:
    source = self.init.spec.get("encoder") if self.init is not None else None
    if self.init is not None and not source:
      raise UserError(f"init source {self.init.description} has no text encoder; warm-start a text "
                      "task from a text model")
    cfg = TransformerConfig.resolve(self.config.model, vocab_size=self.vocab, source=source)
    seq_len = int(self.config.data.seq_len)
    if seq_len > cfg.max_length:
      raise UserError(f"data.seq_len={seq_len} is longer than the position table allows "
                      f"({cfg.max_length} tokens, max_position={cfg.max_position}); lower data.seq_len "
                      "or raise model.max_position")
    return cfg

  def max_seq_length(self, cfg: TransformerConfig | None = None) -> int:
    """The model's inference length: what `embed`, `evaluate` and `export` truncate at
    (model.json's max_seq_length). Separate from the training truncation `data.seq_len`: fine-tuning
    at 64 tokens does not make a 256-token model a 64-token one. model.max_seq_length, else the
    warm-start source's, else the position table."""
    cfg = cfg or self.encoder_config()
    length = int(self.config.model.max_seq_length or 0)
    if not length and self.init is not None:
      length = int(self.init.spec.get("max_seq_length") or 0)
    length = length or cfg.max_position
    if not 2 <= length <= cfg.max_position:
      raise UserError(f"model.max_seq_length={length} does not fit the position table "
                      f"(max_position={cfg.max_position}); use 2..{cfg.max_position} or 0 for the default")
    return length

  def text_spec(self, **extra: Any) -> dict[str, Any]:
    """The text part of the model description: encoder, tokenizer file, special ids, the training
    length (seq_len) and the model's inference length (max_seq_length)."""
    cfg = self.encoder_config()
    return dict(task=self.config.task, encoder=cfg.to_json(),
                tokenizer=TOKENIZER_FILE, special_ids=dict(self.ids),
                seq_len=int(self.config.data.seq_len), max_seq_length=self.max_seq_length(cfg),
                **extra)

  def save_artifacts(self) -> None:
    path = fs.join(self.workdir, TOKENIZER_FILE)
    if not fs.exists(path):
      encode.save_tokenizer(self.tokenizer, path)
