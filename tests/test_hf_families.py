"""RoBERTa / XLM-RoBERTa, MPNet and ModernBERT in and out of jembed (jembed.hf), without torch on
jembed's side.

Each family: a tiny random model saved by transformers (with a tokenizer built here with
`tokenizers`: byte-level BPE, SentencePiece-style Unigram, WordPiece), read by jembed and compared
on a padded batch (last hidden states, pooler, MLM logits, sentence-transformers embeddings), then
exported and read back by transformers and sentence-transformers; a second export of the import is
byte-identical. Architectures jembed does not have are refused in one line.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jembed import hf
from jembed.errors import UserError
from jembed.hf.io import abstract_module
from jembed.models.heads import MlmHead

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a sentence embedding maps text to a vector of numbers",
    "transformers read tokens, attend to each other and write hidden states",
    "hello world! this is a small test of tokenizers and pooling.",
    "relative positions, rotary embeddings and sliding windows over long sequences",
] * 4
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog, and then the dog chases the fox around the world! " * 2,
    "a",
    "tokens attend to each other <mask> here",
    "embeddings of sentences",
]
TOL = 1e-5
FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "modules.json",
         "1_Pooling/config.json", "sentence_bert_config.json")


# ----------------------------------------------------------------------------- torch-free

# Each family's options, as jembed's import sets them (tiny sizes).
FAMILY_OPTIONS = {
    "roberta": dict(positions="padded", position_offset=1, type_vocab_size=1, layer_norm_eps=1e-5),
    "xlm-roberta": dict(positions="padded", position_offset=1, type_vocab_size=1, layer_norm_eps=1e-5),
    "mpnet": dict(positions="padded", position_offset=1, type_vocab_size=0, relative_buckets=32,
                  relative_max_distance=128, layer_norm_eps=1e-5),
    "modernbert": dict(pre_ln=True, embedding_norm=True, positions="rotary", gated_mlp=True, use_bias=False,
                       norm_bias=False, type_vocab_size=0, local_window=8, global_every=2, rope_theta=1000.0,
                       local_rope_theta=50.0, layer_norm_eps=1e-5, max_position=128),
}


@pytest.fixture(scope="module")
def fairseq_tokenizer():
  """A WordPiece vocabulary with RoBERTa's special tokens (<pad> at 1, the padding index)."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers  # pylint: disable=import-outside-toplevel
  tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
      vocab_size=160, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
  return tok


def _family_config(tokenizer, family, **changes):
  from jembed.models.transformer import TransformerConfig  # pylint: disable=import-outside-toplevel
  fields = dict(num_layers=3, hidden_size=32, num_heads=4, mlp_dim=48, vocab_size=tokenizer.get_vocab_size(),
                max_position=66, dropout=0.0, attention_dropout=0.0, family=family)
  fields.update(FAMILY_OPTIONS[family])
  fields.update(changes)
  return TransformerConfig(**fields)


def _random_tree(build, seed):
  # Random values everywhere (norm scales too): the tree's structure and shapes from an abstract build.
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32),
                      nnx.to_pure_dict(nnx.state(abstract_module(build), nnx.Param)))


def _encoder_params(cfg, seed=0):
  from jembed.models.transformer import TransformerEncoder  # pylint: disable=import-outside-toplevel
  return _random_tree(lambda rngs: TransformerEncoder(cfg, rngs=rngs), seed)


def _hidden(cfg, params, ids, mask):
  from jembed.models.transformer import TransformerEncoder  # pylint: disable=import-outside-toplevel
  graphdef, state = nnx.split(abstract_module(lambda rngs: TransformerEncoder(cfg, rngs=rngs)), nnx.Param)
  nnx.replace_by_pure_dict(state, hf.io.jax_tree(params))
  return np.asarray(nnx.merge(graphdef, state)(jnp.asarray(ids), jnp.asarray(mask, bool)))


@pytest.mark.parametrize("family", sorted(FAMILY_OPTIONS))
def test_family_export_import_is_exact_without_torch(tmp_path, fairseq_tokenizer, family):
  cfg = _family_config(fairseq_tokenizer, family, pooler=family != "modernbert")
  params = _encoder_params(cfg)
  head = _random_tree(lambda rngs: MlmHead.for_encoder(cfg, rngs=rngs), 1)
  ids = {"pad": 1, "unk": 3, "cls": 0, "sep": 2, "mask": 4}
  first = hf.save_dir(tmp_path / "a", encoder_config=cfg, params=params, tokenizer=fairseq_tokenizer,
                      mlm_head=head, special_ids=ids, pooling="mean", normalize=True, max_seq_length=24)
  config = json.load(open(os.path.join(first, "config.json")))
  assert config["model_type"] == family and config["architectures"][0].endswith("ForMaskedLM")
  model = hf.load_dir(first)
  for got, want in ((model.params, params), (model.mlm_head, head)):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
  import dataclasses  # pylint: disable=import-outside-toplevel
  expected = {k: v for k, v in dataclasses.asdict(cfg).items() if k in model.encoder_config}
  assert model.encoder_config == expected and model.special_ids == ids
  second = hf.save_model(tmp_path / "b", model)
  for rel in FILES:
    assert open(os.path.join(first, rel), "rb").read() == open(os.path.join(second, rel), "rb").read(), rel
  tok_ids, mask = model.encode(TEXTS)
  assert tok_ids[0, 0] == 0 and (tok_ids[mask == 0] == 1).all()


# Options that change what the same weights compute: each must change the output.
_NUMERIC_OPTIONS = [
    ("modernbert", "rope_theta", 10000.0), ("modernbert", "local_rope_theta", 10000.0),
    ("modernbert", "local_window", 0), ("modernbert", "global_every", 3), ("modernbert", "local_window", 4),
    ("mpnet", "relative_max_distance", 16), ("roberta", "position_offset", 3),
]


@pytest.mark.parametrize("family,option,value", _NUMERIC_OPTIONS)
def test_encoder_options_change_the_output(fairseq_tokenizer, family, option, value):
  cfg = _family_config(fairseq_tokenizer, family)
  params = _encoder_params(cfg)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, cfg.vocab_size, (2, 40)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 25:] = 0
  import dataclasses  # pylint: disable=import-outside-toplevel
  base = _hidden(cfg, params, ids, mask)
  other = _hidden(dataclasses.replace(cfg, **{option: value}), params, ids, mask)
  assert np.abs(base - other)[mask.astype(bool)].max() > 1e-3, option


def test_sharded_forward_matches_one_device(fairseq_tokenizer, family="modernbert"):
  """The new parameters and activations carry logical axis names: on a data x fsdp x tensor mesh of
  the 8 test devices, with the default rules, the encoder computes what it does on one device
  (ModernBERT: rotary, sliding windows, the GeGLU gate; MPNet's bias table is replicated)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from jembed import sharding  # pylint: disable=import-outside-toplevel
  from jembed.models.transformer import TransformerEncoder  # pylint: disable=import-outside-toplevel
  cfg = _family_config(fairseq_tokenizer, family)
  params = _encoder_params(cfg)
  ids = np.random.default_rng(1).integers(5, cfg.vocab_size, (4, 40)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 25:] = 0
  want = _hidden(cfg, params, ids, mask)
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  graphdef, state = nnx.split(abstract_module(lambda rngs: TransformerEncoder(cfg, rngs=rngs)), nnx.Param)
  placement = sharding.logical_to_sharding(sharding.logical_specs(state), mesh, sharding.DEFAULT_RULES)
  placed = jax.tree.map(jax.device_put, hf.io.jax_tree(params), placement)
  assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(placed))

  @jax.jit
  def forward(values, tokens, valid):
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)(tokens, valid)

  rows = sharding.batch_sharding(mesh, sharding.DEFAULT_RULES, 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    got = forward(placed, jax.device_put(ids, rows), jax.device_put(mask.astype(bool), rows))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_structural_options_shape_the_tree(fairseq_tokenizer):
  cfg = _family_config(fairseq_tokenizer, "modernbert")
  params = _encoder_params(cfg)
  assert "wg" in params["layers"][0]["mlp"] and "attention_norm" not in params["layers"][0]
  assert "bias" not in params["layers"][1]["attention"]["query"] and "bias" not in params["final_norm"]
  assert "position" not in params["embeddings"] and "segment" not in params["embeddings"]
  mpnet = _encoder_params(_family_config(fairseq_tokenizer, "mpnet"))
  assert mpnet["relative_bias"]["embedding"].shape == (32, 4) and "segment" not in mpnet["embeddings"]


def test_what_a_family_cannot_hold_is_refused(tmp_path, fairseq_tokenizer):
  from jembed.models.transformer import TransformerConfig  # pylint: disable=import-outside-toplevel
  ids = {"pad": 1, "unk": 3, "cls": 0, "sep": 2, "mask": 4}
  save = lambda cfg, **kw: hf.save_dir(tmp_path / "x", encoder_config=cfg, params=_encoder_params(cfg),
                                       tokenizer=fairseq_tokenizer, pooling="mean", normalize=False,
                                       max_seq_length=16, **dict({"special_ids": ids}, **kw))
  import dataclasses  # pylint: disable=import-outside-toplevel
  as_family = lambda family, name, **kw: dataclasses.replace(_family_config(fairseq_tokenizer, family, **kw), family=name)
  cases = [
      (as_family("roberta", "bert"), "positions"),  # BERT counts positions from 0, over the pads too
      (_family_config(fairseq_tokenizer, "roberta", pre_ln=True), "pre_ln"),
      (as_family("modernbert", "mpnet", use_bias=True), "mpnet"),
  ]
  for cfg, word in cases:
    with pytest.raises(UserError) as e:
      save(cfg)
    assert word in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(UserError) as e:  # RoBERTa's positions would treat id 1 as padding
    save(_family_config(fairseq_tokenizer, "roberta"), special_ids=dict(ids, pad=3, unk=1))
  assert "pads with id 3" in str(e.value)
  assert not os.path.exists(tmp_path / "x")
  with pytest.raises(UserError) as e:
    TransformerConfig(num_layers=1, hidden_size=8, num_heads=2, mlp_dim=8, vocab_size=10, embedding_norm=True)
  assert "pre_ln" in str(e.value)
  with pytest.raises(UserError) as e:
    TransformerConfig(num_layers=1, hidden_size=8, num_heads=2, mlp_dim=8, vocab_size=10, positions="alibi")
  assert "alibi" in str(e.value)


def test_configs_jembed_cannot_run_are_refused(tmp_path):
  def load(**config):
    path = tmp_path / "m"
    path.mkdir(exist_ok=True)
    json.dump(config, open(path / "config.json", "w"))
    with pytest.raises(UserError) as e:
      hf.load_dir(path)
    assert "\n" not in str(e.value)
    return str(e.value)
  assert "32" in load(model_type="mpnet", relative_attention_num_buckets=64)
  assert "layer_types" in load(model_type="modernbert", num_hidden_layers=3,
                               layer_types=["sliding_attention", "full_attention", "full_attention"])
  assert "rope_type" in load(model_type="modernbert", rope_parameters={"full_attention": {"rope_type": "yarn"}})
  assert "is_decoder" in load(model_type="roberta", is_decoder=True)


def _libs():
  torch = pytest.importorskip("torch")
  return torch, pytest.importorskip("transformers")


def _randomize(torch, model, seed):
  # Random everything (norm scales and biases too), so a swapped tensor cannot go unnoticed.
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if ("norm" in name.lower() and name.endswith("weight")) else 0.0
      p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))


def _bpe_vocab():
  """A byte-level BPE (RoBERTa's kind) trained here: (vocab, merges)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  merges = json.loads(tok.to_str())["model"]["merges"]
  return tok.get_vocab(), [tuple(m) for m in merges]


def _unigram_vocab():
  """A SentencePiece-style Unigram (XLM-RoBERTa's kind) trained here: [(piece, score)]."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  tok = Tokenizer(models.Unigram())
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(
      vocab_size=150, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>"))
  return [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]] + [("<mask>", 0.0)]


def _save(torch, model, tokenizer, path, seed):
  _randomize(torch, model.eval(), seed)
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)
  return str(path)


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
  """A tiny random RobertaForMaskedLM (with its byte-level BPE tokenizer) saved by transformers."""
  torch, transformers = _libs()
  vocab, merges = _bpe_vocab()
  tokenizer = transformers.RobertaTokenizer(vocab=vocab, merges=merges)
  config = transformers.RobertaConfig(
      vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=66, type_vocab_size=1, layer_norm_eps=1e-5,
      pad_token_id=1, bos_token_id=0, eos_token_id=2)
  torch.manual_seed(0)
  return _save(torch, transformers.RobertaForMaskedLM(config), tokenizer,
               tmp_path_factory.mktemp("roberta") / "m", 0)


@pytest.fixture(scope="module")
def xlmr_dir(tmp_path_factory):
  """A tiny random XLMRobertaModel with its pooler (SentencePiece Unigram tokenizer)."""
  torch, transformers = _libs()
  vocab = _unigram_vocab()
  tokenizer = transformers.XLMRobertaTokenizer(vocab=vocab)
  config = transformers.XLMRobertaConfig(
      vocab_size=len(vocab) + 3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=1e-5,
      hidden_act="gelu_new", pad_token_id=1, bos_token_id=0, eos_token_id=2)
  torch.manual_seed(1)
  return _save(torch, transformers.XLMRobertaModel(config), tokenizer,
               tmp_path_factory.mktemp("xlmr") / "m", 1)


def _jembed_hidden(encoder, ids, mask):
  return np.asarray(hf.hidden_states(encoder, jnp.asarray(ids), jnp.asarray(mask)))


def _reference(transformers, cls_name, path):
  return getattr(transformers, cls_name).from_pretrained(path, attn_implementation="eager").eval()


def _batch(transformers, path, max_length):
  tok = transformers.AutoTokenizer.from_pretrained(path)
  return tok(TEXTS, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def _check_hidden(path, cls_name, family, *, label):
  """jembed's import of `path` against transformers' `cls_name` on a padded batch; returns what the
  later checks reuse."""
  torch, transformers = _libs()
  encoder, model = hf.encoder_from_dir(path)
  assert model.encoder_config["family"] == family
  ids, mask = model.encode(TEXTS)
  batch = _batch(transformers, path, model.max_seq_length)
  np.testing.assert_array_equal(ids, batch["input_ids"].numpy())
  np.testing.assert_array_equal(mask, batch["attention_mask"].numpy())
  assert (mask == 0).any()  # the batch has padding
  reference = _reference(transformers, cls_name, path)
  with torch.no_grad():
    out = reference(**batch)
    # The base model's output (a task model's hidden_states[-1] may precede ModernBERT's final_norm).
    want = reference.base_model(**batch).last_hidden_state.numpy()
  ours = _jembed_hidden(encoder, ids, mask)
  valid = mask.astype(bool)
  diff = np.abs(ours - want)[valid].max()
  print(f"\n{label} last_hidden_state max|jembed - transformers| = {diff:.3g}")
  assert diff < TOL
  return encoder, model, batch, out, ours


def _check_export(tmp_path, model, batch, ours, family, architecture):
  """The import exported: transformers loads it and computes the same; a second export of the
  export is byte-identical."""
  torch, transformers = _libs()
  first = hf.save_model(tmp_path / "export", model)
  config = json.load(open(os.path.join(first, "config.json")))
  assert config["model_type"] == family and config["architectures"] == [architecture]
  again = hf.load_dir(first)
  second = hf.save_model(tmp_path / "again", again)
  for rel in FILES:
    assert open(os.path.join(first, rel), "rb").read() == open(os.path.join(second, rel), "rb").read(), rel
  base = transformers.AutoModel.from_pretrained(first, attn_implementation="eager").eval()
  assert type(base).__name__ == architecture.replace("ForMaskedLM", "Model")
  np.testing.assert_array_equal(_batch(transformers, first, model.max_seq_length)["input_ids"].numpy(),
                                batch["input_ids"].numpy())
  with torch.no_grad():
    hidden = base(**batch).last_hidden_state.numpy()
  valid = batch["attention_mask"].numpy().astype(bool)
  diff = np.abs(hidden - ours)[valid].max()
  print(f"jembed export in {type(base).__name__}: last_hidden_state max diff = {diff:.3g}")
  assert diff < TOL
  return first


def _mlm_logits(model, encoder, hidden):
  from jembed.models.transformer import TransformerConfig  # pylint: disable=import-outside-toplevel
  cfg = TransformerConfig(**model.encoder_config)
  graphdef, state = nnx.split(abstract_module(lambda rngs: MlmHead.for_encoder(cfg, rngs=rngs)))
  nnx.replace_by_pure_dict(state, hf.io.jax_tree(model.mlm_head))
  head = nnx.merge(graphdef, state)
  return np.asarray(head(jnp.asarray(hidden), encoder.embeddings.token))


# ----------------------------------------------------------------------------- RoBERTa / XLM-R


def test_roberta_matches_transformers_and_round_trips(roberta_dir, tmp_path):
  torch, transformers = _libs()
  encoder, model, batch, out, ours = _check_hidden(roberta_dir, "RobertaForMaskedLM", "roberta",
                                                   label="tiny RoBERTa")
  cfg = model.encoder_config
  assert (cfg["positions"], cfg["position_offset"], cfg["type_vocab_size"]) == ("padded", 1, 1)
  assert model.special_ids == {"pad": 1, "unk": 3, "cls": 0, "sep": 2, "mask": 4}
  assert model.max_seq_length == 64  # 66 positions, of which the first two are never a token's
  assert model.mlm_head is not None and not cfg["pooler"]
  logits = _mlm_logits(model, encoder, ours)
  ref = out.logits.numpy()
  valid = batch["attention_mask"].numpy().astype(bool)
  diff = np.abs(logits - ref)[valid].max()
  print(f"tiny RoBERTa MLM logits max|jembed - transformers| = {diff:.3g}")
  assert diff < 1e-4 * max(1.0, np.abs(ref).max())
  exported = _check_export(tmp_path, model, batch, ours, "roberta", "RobertaForMaskedLM")
  names = load_file(os.path.join(exported, "model.safetensors"))
  assert "lm_head.layer_norm.weight" in names and "roberta.encoder.layer.1.output.dense.weight" in names
  with torch.no_grad():
    again = _reference(transformers, "RobertaForMaskedLM", exported)(**batch).logits.numpy()
  np.testing.assert_array_equal(again, ref)  # same weights, same torch maths


def test_xlm_roberta_pooler_and_sentence_transformers(xlmr_dir, tmp_path):
  torch, transformers = _libs()
  st = pytest.importorskip("sentence_transformers")
  encoder, model, batch, out, ours = _check_hidden(xlmr_dir, "XLMRobertaModel", "xlm-roberta",
                                                   label="tiny XLM-RoBERTa")
  assert model.encoder_config["pooler"] and model.encoder_config["hidden_act"] == "gelu_new"
  assert model.max_seq_length == 38
  pooled = np.asarray(encoder.pooled(jnp.asarray(ours)))
  assert np.abs(pooled - out.pooler_output.numpy()).max() < TOL
  _check_export(tmp_path, model, batch, ours, "xlm-roberta", "XLMRobertaModel")
  _check_sentence_transformers(st, xlmr_dir, tmp_path, "cls", max_seq_length=12, label="XLM-RoBERTa")


def _check_sentence_transformers(st, path, tmp_path, pooling, *, max_seq_length, label):
  """A sentence-transformers model around `path` (pooling, Normalize): jembed reads it and embeds
  the same; jembed's export of it loads back in sentence-transformers and embeds the same."""
  try:  # sentence-transformers >= 6; `sentence_transformers.models` before
    from sentence_transformers.sentence_transformer import modules as models  # pylint: disable=import-outside-toplevel
  except ImportError:
    from sentence_transformers import models  # pylint: disable=import-outside-toplevel
  transformer = models.Transformer(str(path), max_seq_length=max_seq_length,
                                   model_args={"attn_implementation": "eager"})
  reference = st.SentenceTransformer(modules=[transformer, models.Pooling(32, pooling_mode=pooling),
                                              models.Normalize()], device="cpu")
  st_dir = tmp_path / "st"
  reference.save(str(st_dir))
  want = reference.encode(TEXTS, convert_to_numpy=True)
  encoder, model = hf.encoder_from_dir(st_dir)
  assert (model.pooling, model.normalize, model.max_seq_length) == (pooling, True, max_seq_length)
  got = hf.embed(encoder, model, TEXTS)
  diff = np.abs(got - want).max()
  print(f"{label} {pooling}+normalize: max|jembed - sentence-transformers| = {diff:.3g}")
  assert diff < TOL
  # jembed.load (the batched, bucketed embedder) computes the same.
  import jembed  # pylint: disable=import-outside-toplevel
  assert np.abs(jembed.load(str(st_dir)).embed(TEXTS) - want).max() < TOL
  exported = hf.save_model(tmp_path / "st_export", model)
  loaded = st.SentenceTransformer(str(exported), device="cpu",
                                  model_kwargs={"attn_implementation": "eager"})
  diff = np.abs(loaded.encode(TEXTS, convert_to_numpy=True) - got).max()
  print(f"jembed export in SentenceTransformer: max diff = {diff:.3g}")
  assert diff < TOL


def test_mlm_step_on_an_imported_roberta_and_its_export(roberta_dir, tmp_path):
  """init.hf = a RoBERTa directory: an MLM step runs with its tokenizer, special tokens and head, and
  a workdir of it exports (python -m jembed.export) as a RoBERTa that transformers loads."""
  torch, transformers = _libs()
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from jembed import export as export_lib  # pylint: disable=import-outside-toplevel
  from jembed import train, tree  # pylint: disable=import-outside-toplevel
  from jembed.data import pipeline  # pylint: disable=import-outside-toplevel
  from spine_helpers import tiny_mlm_config, write_corpus, write_workdir  # pylint: disable=import-outside-toplevel
  corpus = write_corpus(str(tmp_path), n_docs=60)
  config = tiny_mlm_config(corpus, **{
      "init.hf": roberta_dir, "model.num_layers": 0, "model.hidden_size": 0, "model.num_heads": 0,
      "model.mlp_dim": 0, "model.max_position": 0, "data.seq_len": 16, "batch_size": 8,
      "warmup_steps": 0})  # the first step moves the weights
  source = hf.load_dir(roberta_dir)
  setup = train.Setup(config, str(tmp_path / "step"), devices=jax.devices()[:1])
  assert setup.task.ids == source.special_ids and setup.spec["encoder"]["family"] == "roberta"
  state = setup.init_state()
  before = {p: np.asarray(jax.device_get(v)) for p, v in tree.flatten(state.params).items()}
  it = pipeline.train_iterator(setup.data.train, config.batch_size, config.seed)
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    state, metrics = setup.jit_train_step(setup.data.train)(state, setup.to_global(next(it)))
  assert np.isfinite(float(metrics["loss"]))
  after = {p: np.asarray(jax.device_get(v)) for p, v in tree.flatten(state.params).items()}
  assert np.array_equal(before["mlm_head/bias"], np.asarray(source.mlm_head["bias"]))  # the head came along
  assert not np.array_equal(before["encoder/layers/0/attention/query/kernel"],
                            after["encoder/layers/0/attention/query/kernel"])

  workdir = str(tmp_path / "run")
  write_workdir(config, workdir)
  out = str(tmp_path / "export")
  export_lib.export(workdir, out)
  assert json.load(open(os.path.join(out, "config.json")))["architectures"] == ["RobertaForMaskedLM"]
  exported = hf.load_dir(out)
  assert exported.special_ids == source.special_ids
  for a, b in zip(jax.tree.leaves(exported.params), jax.tree.leaves(source.params)):
    np.testing.assert_array_equal(a, b)  # step 0 = the source, through a jembed workdir
  encoder, _ = hf.encoder_from_dir(out)
  batch = _batch(transformers, out, 16)
  ours = _jembed_hidden(encoder, batch["input_ids"].numpy(), batch["attention_mask"].numpy())
  with torch.no_grad():
    ref = _reference(transformers, "AutoModelForMaskedLM", out)(**batch, output_hidden_states=True)
  valid = batch["attention_mask"].numpy().astype(bool)
  assert np.abs(ours - ref.hidden_states[-1].numpy())[valid].max() < TOL


# ----------------------------------------------------------------------------- MPNet


def _wordpiece_vocab(specials):
  """A lower-casing WordPiece vocabulary (MPNet's kind) trained here, specials first."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  tok = Tokenizer(models.WordPiece(unk_token=specials[3]))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=list(specials)))
  return tok.get_vocab()


@pytest.fixture(scope="module")
def mpnet_dir(tmp_path_factory):
  """A tiny random MPNetModel with its pooler (all-mpnet-base-v2's architecture) and an
  MPNetTokenizer: <s> </s> <pad> <mask> with [UNK]."""
  torch, transformers = _libs()
  vocab = _wordpiece_vocab(["<s>", "<pad>", "</s>", "[UNK]", "<unk>", "<mask>"])
  tokenizer = transformers.MPNetTokenizer(vocab=vocab)
  config = transformers.MPNetConfig(
      vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=66, layer_norm_eps=1e-5,
      relative_attention_num_buckets=32, pad_token_id=1, bos_token_id=0, eos_token_id=2)
  torch.manual_seed(2)
  return _save(torch, transformers.MPNetModel(config), tokenizer, tmp_path_factory.mktemp("mpnet") / "m", 2)


def test_relative_position_buckets_match_transformers_mpnet():
  _, transformers = _libs()
  import torch  # pylint: disable=import-outside-toplevel
  from jembed.models.transformer import relative_position_buckets  # pylint: disable=import-outside-toplevel
  from transformers.models.mpnet.modeling_mpnet import MPNetEncoder  # pylint: disable=import-outside-toplevel
  length = 700  # distances past max_distance (128) hit the last bucket
  pos = torch.arange(length)
  want = MPNetEncoder.relative_position_bucket(pos[None, :] - pos[:, None], num_buckets=32, max_distance=128)
  got = relative_position_buckets(length, 32, 128)
  np.testing.assert_array_equal(got, want.numpy())
  assert len(np.unique(got)) == 31  # every bucket but 16 (distance 0 counts as "query side")


def test_mpnet_matches_transformers_and_sentence_transformers(mpnet_dir, tmp_path):
  _, transformers = _libs()
  st = pytest.importorskip("sentence_transformers")
  encoder, model, batch, out, ours = _check_hidden(mpnet_dir, "MPNetModel", "mpnet", label="tiny MPNet")
  cfg = model.encoder_config
  assert (cfg["positions"], cfg["position_offset"], cfg["type_vocab_size"], cfg["relative_buckets"]) == \
      ("padded", 1, 0, 32)
  assert model.special_ids == {"pad": 1, "unk": 3, "cls": 0, "sep": 2, "mask": 5}
  assert batch["input_ids"].shape[1] > 40  # distances in the logarithmic buckets are exercised
  pooled = np.asarray(encoder.pooled(jnp.asarray(ours)))
  assert np.abs(pooled - out.pooler_output.numpy()).max() < TOL
  exported = _check_export(tmp_path, model, batch, ours, "mpnet", "MPNetModel")
  names = load_file(os.path.join(exported, "model.safetensors"))
  assert names["encoder.relative_attention_bias.weight"].shape == (32, 4)
  assert "encoder.layer.1.attention.attn.q.weight" in names and "pooler.dense.weight" in names
  # all-mpnet-base-v2 is this, wrapped in mean pooling and normalisation.
  _check_sentence_transformers(st, mpnet_dir, tmp_path, "mean", max_seq_length=20, label="MPNet")


# ----------------------------------------------------------------------------- ModernBERT


@pytest.fixture(scope="module")
def modernbert_dir(tmp_path_factory):
  """A tiny random ModernBertForMaskedLM: 3 layers (global, local, global), a 9-token window that
  the long text exceeds, its own rotary bases; a byte-level BPE with [CLS] [SEP] [PAD] [MASK] [UNK]."""
  torch, transformers = _libs()
  from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers  # pylint: disable=import-outside-toplevel
  specials = ["[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"]
  tok = Tokenizer(models.BPE(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=260, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = processors.TemplateProcessing(single="[CLS]:0 $A:0 [SEP]:0",
                                                     special_tokens=[("[CLS]", 0), ("[SEP]", 1)])
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]",
      unk_token="[UNK]")
  config = transformers.ModernBertConfig(
      vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
      num_attention_heads=4, max_position_embeddings=128, local_attention=8, global_attn_every_n_layers=2,
      global_rope_theta=1000.0, local_rope_theta=50.0, pad_token_id=2, cls_token_id=0, sep_token_id=1,
      bos_token_id=0, eos_token_id=1)
  torch.manual_seed(3)
  return _save(torch, transformers.ModernBertForMaskedLM(config), tokenizer,
               tmp_path_factory.mktemp("modernbert") / "m", 3)


def test_modernbert_matches_transformers_and_round_trips(modernbert_dir, tmp_path):
  torch, transformers = _libs()
  st = pytest.importorskip("sentence_transformers")
  encoder, model, batch, out, ours = _check_hidden(modernbert_dir, "ModernBertForMaskedLM", "modernbert",
                                                   label="tiny ModernBERT")
  cfg = model.encoder_config
  assert (cfg["positions"], cfg["gated_mlp"], cfg["use_bias"], cfg["norm_bias"], cfg["pre_ln"]) == \
      ("rotary", True, False, False, True)
  assert (cfg["local_window"], cfg["global_every"], cfg["rope_theta"], cfg["local_rope_theta"]) == (8, 2, 1000.0, 50.0)
  assert batch["input_ids"].shape[1] > 2 * 8  # the sliding window cuts
  assert "attention_norm" not in model.params["layers"][0] and "bias" not in model.params["layers"][1]["mlp"]["wi"]
  logits = _mlm_logits(model, encoder, ours)
  ref = out.logits.numpy()
  valid = batch["attention_mask"].numpy().astype(bool)
  diff = np.abs(logits - ref)[valid].max()
  print(f"tiny ModernBERT MLM logits max|jembed - transformers| = {diff:.3g}")
  assert diff < 1e-4 * max(1.0, np.abs(ref).max())
  exported = _check_export(tmp_path, model, batch, ours, "modernbert", "ModernBertForMaskedLM")
  names = load_file(os.path.join(exported, "model.safetensors"))
  assert names["model.layers.1.attn.Wqkv.weight"].shape == (96, 32) and names["model.layers.1.mlp.Wi.weight"].shape == (96, 32)
  with torch.no_grad():
    again = _reference(transformers, "ModernBertForMaskedLM", exported)(**batch).logits.numpy()
  np.testing.assert_array_equal(again, ref)
  _check_sentence_transformers(st, modernbert_dir, tmp_path, "mean", max_seq_length=40, label="ModernBERT")


# ----------------------------------------------------------------------------- refused


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "t5"])
def test_unsupported_architectures_are_one_line(tmp_path, model_type):
  # The model type is checked before anything else is read: a config.json is enough.
  path = tmp_path / model_type
  path.mkdir()
  json.dump({"model_type": model_type, "architectures": ["X"], "hidden_size": 32}, open(path / "config.json", "w"))
  with pytest.raises(UserError) as e:
    hf.load_dir(path)
  message = str(e.value)
  assert "\n" not in message and repr(model_type) in message
  for family in ("bert", "roberta", "xlm-roberta", "mpnet", "modernbert"):
    assert family in message


# ----------------------------------------------------------------------------- classifiers


@pytest.mark.parametrize("family,pooling", [("roberta", "cls"), ("xlm-roberta", "cls"), ("mpnet", "cls"),
                                            ("modernbert", "cls"), ("modernbert", "mean")])
def test_classifier_head_exports_as_the_family_s_sequence_classifier(tmp_path, fairseq_tokenizer, family,
                                                                      pooling):
  """A text classifier with the Hugging Face head (model.head=hf) of each family: exported, read by
  transformers' *ForSequenceClassification with nothing missing, the same logits."""
  torch, transformers = _libs()
  from jembed.hf.io import SequenceClassifier  # pylint: disable=import-outside-toplevel
  from jembed.tasks.classification_text import TextClassifier  # pylint: disable=import-outside-toplevel
  # A pooler the source had: RoBERTa's classifier has none, so the export leaves it out.
  cfg = _family_config(fairseq_tokenizer, family, pooler=family != "modernbert")
  labels = ["neg", "neutral", "pos"]
  params = _random_tree(lambda rngs: TextClassifier(cfg, 3, pooling, head="hf", rngs=rngs), 5)
  ids = {"pad": 1, "unk": 3, "cls": 0, "sep": 2, "mask": 4}
  out = hf.save_dir(tmp_path / "m", encoder_config=cfg, params=params["encoder"], tokenizer=fairseq_tokenizer,
                    special_ids=ids, pooling=pooling, normalize=False, max_seq_length=24,
                    classifier=SequenceClassifier(params["head"], labels, pooling))
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, output_loading_info=True, attn_implementation="eager")
  assert type(model).__name__ == hf.config.SEQUENCE_CLASSIFIERS[family]
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert model.config.id2label == dict(enumerate(labels))
  enc = fairseq_tokenizer.encode_batch(TEXTS)
  length = min(24, max(len(e.ids) for e in enc))
  tokens = np.full((len(TEXTS), length), 1, np.int32)
  for i, e in enumerate(enc):
    tokens[i, :min(len(e.ids), length)] = e.ids[:length]
  mask = tokens != 1
  graphdef, state = nnx.split(abstract_module(lambda rngs: TextClassifier(cfg, 3, pooling, head="hf",
                                                                          rngs=rngs)), nnx.Param)
  nnx.replace_by_pure_dict(state, hf.io.jax_tree(params))
  ours = np.asarray(nnx.merge(graphdef, state)(jnp.asarray(tokens), jnp.asarray(mask)))
  with torch.no_grad():
    ref = model.eval()(input_ids=torch.tensor(tokens.astype(np.int64)),
                       attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
  print(f"{family} ({pooling}) classifier logits max|jembed - transformers| = {np.abs(ours - ref).max():.3g}")
  np.testing.assert_allclose(ours, ref, atol=TOL)
