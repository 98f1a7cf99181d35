"""Tokenizer files of a Hugging Face directory: read, write, and encode text as transformers does.

Reading prefers `tokenizer.json` (WordPiece, byte-level BPE, SentencePiece Unigram: whatever the
`tokenizers` library reads); without one, a BERT WordPiece tokenizer is rebuilt from `vocab.txt`
and `tokenizer_config.json` the way transformers' BertTokenizer builds it (BertNormalizer +
BertPreTokenizer + WordPiece + the `[CLS] $A [SEP]` template), or RoBERTa's byte-level BPE from
`vocab.json` + `merges.txt`. Special tokens are looked up by the strings the directory names (the
family's defaults when it names none), never assumed to sit at fixed ids.
"""
from __future__ import annotations

import json
import os

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from jembed.errors import UserError

SPECIAL_KEYS = ("pad", "unk", "cls", "sep", "mask")
BERT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
# RoBERTa's (fairseq's) spelling, also XLM-RoBERTa's and MPNet's.
ROBERTA_SPECIALS = {"pad": "<pad>", "unk": "<unk>", "cls": "<s>", "sep": "</s>", "mask": "<mask>"}


def family_specials(family: str) -> dict[str, str]:
  """The special token strings a family's tokenizers use when their files name none."""
  if family == "mpnet":  # MPNetTokenizer's defaults
    return dict(ROBERTA_SPECIALS, unk="[UNK]")
  return dict(ROBERTA_SPECIALS if family in ("roberta", "xlm-roberta") else BERT_SPECIALS)


def read_json(path: str, what: str) -> dict | list:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); repair or re-save the "
                    f"{what}") from None
  except OSError as e:
    raise UserError(f"cannot read {path} ({e.strerror}); check the path and permissions") from None


def _token_string(value) -> str | None:
  # tokenizer_config.json spells a token as a string or as a serialized AddedToken {"content": ...}.
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def special_tokens(directory: str, family: str = "bert") -> dict[str, str]:
  """{"pad", "unk", "cls", "sep", "mask"} -> token string, from the directory's tokenizer configs."""
  names = family_specials(family)
  for filename in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
    path = os.path.join(directory, filename)
    if os.path.isfile(path):
      cfg = read_json(path, "tokenizer configuration")
      for key in SPECIAL_KEYS:
        token = _token_string(cfg.get(f"{key}_token"))
        if token is not None:
          names[key] = token
  return names


def special_ids(tokenizer: tokenizers.Tokenizer, names: dict[str, str], *, source: str) -> dict[str, int]:
  ids = {}
  for key in SPECIAL_KEYS:
    token_id = tokenizer.token_to_id(names[key])
    if token_id is None:
      raise UserError(f"{source}: the tokenizer has no {key} token {names[key]!r}; set {key}_token in "
                      "tokenizer_config.json to a token of the vocabulary")
    ids[key] = token_id
  return ids


def _bert_template(cls: str, cls_id: int, sep: str, sep_id: int) -> processors.TemplateProcessing:
  return processors.TemplateProcessing(
      single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
      special_tokens=[(cls, cls_id), (sep, sep_id)])


def read_vocab(path: str) -> dict[str, int]:
  # As transformers' load_vocab: one token per line, its id the line number.
  with open(path, encoding="utf-8") as f:
    return {line.rstrip("\n"): i for i, line in enumerate(f.readlines())}


def _byte_level_bpe(directory: str, names: dict[str, str]) -> tokenizers.Tokenizer:
  """RoBERTa's tokenizer from vocab.json + merges.txt, as transformers' RobertaTokenizer builds it."""
  cfg_path = os.path.join(directory, "tokenizer_config.json")
  cfg = read_json(cfg_path, "tokenizer configuration") if os.path.isfile(cfg_path) else {}
  try:
    bpe = models.BPE.from_file(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f"cannot read {directory}/vocab.json + merges.txt ({first}); re-save the tokenizer") from None
  tok = tokenizers.Tokenizer(bpe)
  prefix_space = bool(cfg.get("add_prefix_space", False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([names[k] for k in SPECIAL_KEYS if tok.token_to_id(names[k]) is not None])
  cls, sep = names["cls"], names["sep"]
  if tok.token_to_id(cls) is not None and tok.token_to_id(sep) is not None:
    tok.post_processor = processors.RobertaProcessing((sep, tok.token_to_id(sep)), (cls, tok.token_to_id(cls)),
                                                      add_prefix_space=prefix_space)
  return tok


def load_tokenizer(directory: str, family: str = "bert") -> tuple[tokenizers.Tokenizer, dict[str, int]]:
  """(tokenizer without padding or truncation, special ids) of a Hugging Face directory."""
  names = special_tokens(directory, family)
  json_path = os.path.join(directory, "tokenizer.json")
  vocab_path = os.path.join(directory, "vocab.txt")
  if os.path.isfile(json_path):
    try:
      tok = tokenizers.Tokenizer.from_file(json_path)
    except Exception as e:  # pylint: disable=broad-except
      first = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise UserError(f"cannot read {json_path} ({first}); re-save it with a current tokenizers") from None
  elif os.path.isfile(vocab_path):
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    cfg = read_json(cfg_path, "tokenizer configuration") if os.path.isfile(cfg_path) else {}
    tok = tokenizers.Tokenizer(models.WordPiece(read_vocab(vocab_path), unk_token=names["unk"],
                                                continuing_subword_prefix="##",
                                                max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=cfg.get("tokenize_chinese_chars", True),
        strip_accents=cfg.get("strip_accents"), lowercase=cfg.get("do_lower_case", True))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    # transformers registers the special tokens, so "[MASK]" in a text stays one token.
    tok.add_special_tokens([names[k] for k in SPECIAL_KEYS if tok.token_to_id(names[k]) is not None])
  elif os.path.isfile(os.path.join(directory, "vocab.json")) and os.path.isfile(
      os.path.join(directory, "merges.txt")):
    tok = _byte_level_bpe(directory, names)
  elif any(os.path.isfile(os.path.join(directory, f)) for f in ("sentencepiece.bpe.model", "spm.model")):
    raise UserError(f"{directory} has only a SentencePiece model and no tokenizer.json; save the "
                    "tokenizer once with transformers (AutoTokenizer ... .save_pretrained) to write it")
  else:
    raise UserError(f"{directory} has no tokenizer.json, vocab.txt or vocab.json + merges.txt; copy the "
                    "tokenizer files of the model into it")
  ids = special_ids(tok, names, source=directory)
  if tok.post_processor is None:
    # transformers' BertTokenizer installs this template whatever the file says; without it no
    # [CLS] / [SEP] would be added.
    tok.post_processor = _bert_template(names["cls"], ids["cls"], names["sep"], ids["sep"])
  tok.no_padding()
  tok.no_truncation()
  return tok, ids


def encode(tokenizer: tokenizers.Tokenizer, texts, max_seq_length: int, *, pad_id: int | None = None,
           lowercase: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Texts -> (ids, mask), int32 [B, T] with T the batch's longest, as sentence-transformers makes them.

  Each text is stripped (and lower-cased when `lowercase`, sentence_bert_config's do_lower_case),
  then tokenized with special tokens and truncated to `max_seq_length` tokens in all (longest_first,
  from the right), and padded with `pad_id` (default: the tokenizer's "[PAD]").
  """
  if isinstance(texts, str):
    raise UserError("encode takes a list of texts, not one string; wrap it: [text]")
  if max_seq_length < 2:
    raise UserError(f"max_seq_length={max_seq_length} leaves no room for [CLS] and [SEP]; use >= 2")
  texts = [str(t).strip() for t in texts]
  if lowercase:
    texts = [t.lower() for t in texts]
  want = {"max_length": int(max_seq_length), "stride": 0, "strategy": "longest_first", "direction": "right"}
  if tokenizer.truncation != want or tokenizer.padding is not None:
    # A copy, so the caller's tokenizer keeps its settings.
    tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    tokenizer.no_padding()
    tokenizer.enable_truncation(int(max_seq_length))
  if pad_id is None:
    pad_id = tokenizer.token_to_id("[PAD]") or 0
  encodings = tokenizer.encode_batch(texts, add_special_tokens=True)
  width = max([len(e.ids) for e in encodings], default=0)
  ids = np.full((len(texts), width), pad_id, np.int32)
  mask = np.zeros((len(texts), width), np.int32)
  for row, e in enumerate(encodings):
    ids[row, :len(e.ids)] = e.ids
    mask[row, :len(e.ids)] = 1
  return ids, mask


def _bert_options(tokenizer: tokenizers.Tokenizer) -> dict:
  """BertTokenizer's options as the tokenizer's normalizer has them; {} for other tokenizers."""
  spec = json.loads(tokenizer.to_str())
  norm, model = spec.get("normalizer") or {}, spec.get("model") or {}
  if norm.get("type") != "BertNormalizer" or model.get("type") != "WordPiece":
    return {}
  return {"do_lower_case": bool(norm.get("lowercase", True)), "strip_accents": norm.get("strip_accents"),
          "tokenize_chinese_chars": bool(norm.get("handle_chinese_chars", True))}


def tokenizer_files(tokenizer: tokenizers.Tokenizer, ids: dict[str, int],
                    model_max_length: int, *, family: str = "bert") -> dict[str, str]:
  """{filename: text} of tokenizer.json, tokenizer_config.json, special_tokens_map.json and, for a
  BERT WordPiece tokenizer, vocab.txt. Other families' tokenizers load through tokenizer.json
  (PreTrainedTokenizerFast), whatever their model (BPE, Unigram, WordPiece)."""
  tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  tok.no_padding()
  tok.no_truncation()
  names = {key: tok.id_to_token(ids[key]) for key in SPECIAL_KEYS}
  if tok.post_processor is None:
    # jembed's own tokenizers add [CLS] / [SEP] by hand when packing; readers of tokenizer.json need
    # the template.
    tok.post_processor = _bert_template(names["cls"], ids["cls"], names["sep"], ids["sep"])
  missing = [names[k] for k in SPECIAL_KEYS if names[k] not in
             {t.content for t in tok.get_added_tokens_decoder().values()}]
  if missing:
    tok.add_special_tokens(missing)
  files = {"tokenizer.json": tok.to_str(pretty=True)}
  options = _bert_options(tok) if family == "bert" else {}
  config = {f"{key}_token": names[key] for key in SPECIAL_KEYS}
  if family != "bert":
    config.update(bos_token=names["cls"], eos_token=names["sep"])
  config.update({"model_max_length": int(model_max_length), "clean_up_tokenization_spaces": False,
                 "tokenizer_class": "BertTokenizer" if options else "PreTrainedTokenizerFast"})
  config.update(options)
  files["tokenizer_config.json"] = json.dumps(config, indent=2, sort_keys=True) + "\n"
  files["special_tokens_map.json"] = json.dumps(
      {f"{key}_token": names[key] for key in SPECIAL_KEYS}, indent=2, sort_keys=True) + "\n"
  if options:
    vocab = tok.get_vocab(with_added_tokens=False)
    order = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in order] == list(range(len(order))):  # vocab.txt can only say contiguous ids
      files["vocab.txt"] = "".join(token + "\n" for token, _ in order)
  return files
