"""Warm starts (config.init) for every text task from a Hugging Face directory written without
torch: the backbone arrives bit for bit, heads are fresh unless the source has the same one, the
architecture and tokenizer come from the source, and a disagreeing setting is one line."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from jembed import hf, train, tree
from jembed.data import wordpiece
from jembed.errors import UserError
from jembed.models.heads import MlmHead
from jembed.models.transformer import TransformerConfig, TransformerEncoder
from spine_helpers import load_config_file, tiny_mlm_config, write_corpus

CFG = TransformerConfig(num_layers=1, hidden_size=32, num_heads=2, mlp_dim=64, vocab_size=512,
                        max_position=64, dropout=0.0, attention_dropout=0.0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  corpus = write_corpus(str(root))
  tok = wordpiece.build_tokenizer(open(corpus).read().splitlines(), 512)
  rngs = nnx.Rngs(params=7, dropout=0)
  encoder = TransformerEncoder(CFG, rngs=rngs)
  head = MlmHead(CFG.hidden_size, CFG.vocab_size, rngs=rngs)
  path = str(root / "model")
  hf.save_dir(path, encoder_config=CFG, params=nnx.to_pure_dict(nnx.state(encoder, nnx.Param)),
              tokenizer=tok, pooling="cls", normalize=True, max_seq_length=32,
              mlm_head=nnx.to_pure_dict(nnx.state(head, nnx.Param)))
  return path, corpus


def _flat(t):
  return {p: np.asarray(jax.device_get(v)) for p, v in tree.flatten(t).items()}


def _check_encoder(state, path):
  source = hf.load_dir(path)
  got = _flat(state.params)
  want = {"encoder/" + p: v for p, v in _flat(source.params).items()}
  assert want and all(np.array_equal(got[p], v) for p, v in want.items())
  return got, source


def test_mlm_continues_from_hf_with_its_head_and_tokenizer(hf_dir, tmp_path):
  path, corpus = hf_dir
  config = tiny_mlm_config(corpus, **{"init.hf": path, "model.num_layers": 0, "model.hidden_size": 0,
                                      "model.num_heads": 0, "model.mlp_dim": 0, "model.max_position": 0})
  setup = train.Setup(config, str(tmp_path), devices=jax.devices()[:1])
  assert setup.spec["encoder"]["num_layers"] == 1 and setup.spec["encoder"]["vocab_size"] == 512
  got, source = _check_encoder(setup.init_state(), path)
  for p, v in _flat(source.mlm_head).items():  # same task: the MLM head comes along
    assert np.array_equal(got["mlm_head/" + p], v)
  assert setup.task.ids == source.special_ids


def test_classification_and_contrastive_take_the_encoder_not_the_head(hf_dir, tmp_path):
  path, corpus = hf_dir
  ft = load_config_file("finetune_text")
  ft.init.hf = path
  ft.data.seq_len = 32
  setup = train.Setup(ft, str(tmp_path / "ft"), devices=jax.devices()[:1])
  got, _ = _check_encoder(setup.init_state(), path)
  assert not any(p.startswith("mlm_head") for p in got) and "head/dense/kernel" in got

  ct = load_config_file("contrastive_text")
  ct.init.hf = path
  ct.data.seq_len = 32
  setup = train.Setup(ct, str(tmp_path / "ct"), devices=jax.devices()[:1])
  assert setup.spec["pooling"] == "cls"  # the sentence-transformers pooling of the source
  _check_encoder(setup.init_state(), path)


def test_disagreeing_architecture_and_two_sources_are_one_line(hf_dir, tmp_path):
  path, corpus = hf_dir
  config = tiny_mlm_config(corpus, **{"init.hf": path})  # tiny_mlm_config sets hidden_size=32 etc.
  config.model.num_layers = 3
  with pytest.raises(UserError, match=r"model.num_layers=3 disagrees with the warm-start source"):
    train.Setup(config, str(tmp_path), devices=jax.devices()[:1])
  config = tiny_mlm_config(corpus, **{"init.hf": path, "init.checkpoint": str(tmp_path)})
  with pytest.raises(UserError, match="both set"):
    train.Setup(config, str(tmp_path), devices=jax.devices()[:1])
  config = tiny_mlm_config(corpus, **{"init.hf": str(tmp_path / "nope")})
  with pytest.raises(UserError) as e:
    train.Setup(config, str(tmp_path), devices=jax.devices()[:1])
  assert len(str(e.value).splitlines()) == 1


def test_a_model_keeps_its_maximum_sequence_length(hf_dir, tmp_path):
  # Fine-tuning at data.seq_len=16 a source whose maximum is 32: model.json, the export and
  # jembed.embed keep 32 (data.seq_len is the training truncation only); the held-out retrieval and
  # its "start" baseline embed at 32 too. --max-seq-length / model.max_seq_length choose another.
  from jembed import embed, export
  from jembed.hf import st
  from spine_helpers import write_workdir
  path, _ = hf_dir
  ct = load_config_file("contrastive_text")
  ct.init.hf = path
  ct.data.seq_len = 16
  ct.batch_size = 8
  workdir = str(tmp_path / "ct")
  setup, state = write_workdir(ct, workdir)
  assert setup.spec["seq_len"] == 16 and setup.spec["max_seq_length"] == 32
  setup.task._embed_texts(setup.task._start_model(), ["a held-out query"])
  assert setup.task._embedder.max_seq_length == 32
  export.export(workdir, str(tmp_path / "out"))
  assert st.read_st(str(tmp_path / "out"))["max_seq_length"] == 32
  assert embed.load(workdir).max_seq_length == 32
  assert embed.load(workdir, max_seq_length=8).max_seq_length == 8

  ct.model.max_seq_length = 48   # set explicitly (within the position table of 64)
  assert train.Setup(ct, str(tmp_path / "x"), devices=jax.devices()[:1]).spec["max_seq_length"] == 48
  ct.model.max_seq_length = 65
  with pytest.raises(UserError, match="model.max_seq_length=65 does not fit the position table"):
    train.Setup(ct, str(tmp_path / "y"), devices=jax.devices()[:1])
  scratch = tiny_mlm_config(write_corpus(str(tmp_path)))  # from scratch: the position table (64)
  assert train.Setup(scratch, str(tmp_path / "z"), devices=jax.devices()[:1]).spec["max_seq_length"] == 64
