"""jembed.export of fine-tuned text classifiers and MLM runs, as a user loads them.

A text classifier with the Hugging Face head (model.head=hf, the default from a source whose
family's head fits) leaves as BertForSequenceClassification with id2label and the same logits; one
with jembed's linear head is refused in one line (or exported as an encoder with --encoder_only). An
MLM export loads in AutoModelForMaskedLM and SentenceTransformer with nothing missing and nothing
invented, and its files get the usual mode (0644 under umask 022), not safetensors' 0600.
"""
from __future__ import annotations

import json
import logging
import os
import stat

import numpy as np
import pytest

from jembed import embed, export, hf, predict
from jembed.data import labeled_text, wordpiece
from jembed.errors import UserError
from spine_helpers import load_config_file, tiny_text_workdir, write_workdir

TEXTS = ["Create a new socket connection to the host", "format a date and time as a string",
         "read the lines of a file", "x " * 40]


def _one_line(excinfo) -> str:
  message = str(excinfo.value)
  assert message and "\n" not in message, message
  return message


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("export_classifier")


@pytest.fixture(scope="module")
def labelled(root):
  texts, labels = labeled_text.embedded_examples()
  paths = []
  for name, offset, n in (("train.jsonl", 0, 80), ("test.jsonl", 3, 20)):
    with open(root / name, "w") as f:
      for i in range(n):
        j = (offset + i * 11) % len(texts)
        f.write(json.dumps({"text": texts[j], "label": labels[j]}) + "\n")
    paths.append(str(root / name))
  return paths


@pytest.fixture(scope="module")
def bert_dir(root):
  """A tiny BERT Hugging Face directory with pooler weights and [CLS] pooling (random values)."""
  import jax
  from flax import nnx
  from jembed.models.transformer import TransformerConfig, TransformerEncoder
  texts, _ = labeled_text.embedded_examples()
  tok = wordpiece.build_tokenizer(texts[:300], 300)
  cfg = TransformerConfig(num_layers=1, hidden_size=16, num_heads=2, mlp_dim=32,
                          vocab_size=tok.get_vocab_size(), max_position=64, pooler=True)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32), nnx.to_pure_dict(
      nnx.state(hf.io.abstract_module(lambda rngs: TransformerEncoder(cfg, rngs=rngs)), nnx.Param)))
  return hf.save_dir(str(root / "bert"), encoder_config=cfg, params=params, tokenizer=tok,
                     pooling="cls", normalize=False, max_seq_length=48), params


def _classifier(root, labelled, name, **model):
  c = load_config_file("finetune_text")
  c.async_checkpointing = False
  c.data.train, c.data.eval = labelled
  c.data.seq_len = 32
  c.model.update(model)
  return c


@pytest.fixture(scope="module")
def hf_head_run(root, labelled, bert_dir):
  """A classifier warm-started from the BERT directory with every default: the Hugging Face head."""
  c = _classifier(root, labelled, "hf")
  c.init.hf = bert_dir[0]
  wd = str(root / "hf_run")
  write_workdir(c, wd)
  return wd


@pytest.fixture(scope="module")
def hf_head_export(root, hf_head_run):
  return hf_head_run, str(root / "hf_export"), export.export(hf_head_run, str(root / "hf_export"))


def _torch_logits(model, jembed_model, texts):
  import torch
  out = []
  for row in jembed_model.tokenize(texts):
    with torch.no_grad():
      out.append(model(input_ids=torch.tensor(row[None].astype(np.int64))).logits.numpy()[0])
  return np.stack(out)


def test_default_head_from_a_bert_source_is_bert_s_and_keeps_its_pooler(hf_head_run, bert_dir):
  from jembed import modelspec
  spec, model, _ = modelspec.load_model(hf_head_run)
  assert spec["head"] == "hf" and spec["pooling"] == "cls" and spec["encoder"]["pooler"]
  # The pooler is the source's (BertForSequenceClassification.from_pretrained keeps it too).
  np.testing.assert_array_equal(np.asarray(model.encoder.pooler.kernel[...]),
                                bert_dir[1]["pooler"]["kernel"])


def test_classifier_exports_as_bert_for_sequence_classification(hf_head_export):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  workdir, out, message = hf_head_export
  assert message.endswith("as BertForSequenceClassification")
  config = json.load(open(os.path.join(out, "config.json")))
  ours = embed.load(workdir)
  assert config["architectures"] == ["BertForSequenceClassification"]
  assert [config["id2label"][str(i)] for i in range(len(ours.classes))] == ours.classes
  assert config["label2id"] == {name: i for i, name in enumerate(ours.classes)}
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, output_loading_info=True)
  assert type(model).__name__ == "BertForSequenceClassification"
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert model.config.id2label == dict(enumerate(ours.classes))
  np.testing.assert_allclose(_torch_logits(model.eval(), ours, TEXTS), ours.logits(TEXTS), atol=1e-5)


def test_fine_tuned_workdir_still_predicts(hf_head_run, tmp_path):
  from jembed import modelspec
  from jembed.data import encode
  spec, model, _ = modelspec.load_model(hf_head_run)
  ours = embed.load(hf_head_run)
  ids = spec["special_ids"]
  tokens = encode.encode_texts(ours.tokenizer, TEXTS, spec["max_seq_length"], ids)
  np.testing.assert_allclose(ours.logits(TEXTS), np.asarray(model(tokens, tokens != ids["pad"])), atol=1e-5)
  (tmp_path / "in.txt").write_text("\n".join(TEXTS[:3]) + "\n")
  assert predict.main(["--model", hf_head_run, "--input", str(tmp_path / "in.txt"),
                       "--output", str(tmp_path / "p.jsonl")]) == 0
  rows = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
  assert [r["label"] for r in rows] == [p["label"] for p in ours.predict(TEXTS[:3])]


@pytest.fixture(scope="module")
def mlm_run(root):
  """A tiny mean-pooling MLM workdir with no pooler (jembed pretraining has none)."""
  os.makedirs(root / "mlm", exist_ok=True)
  return tiny_text_workdir(str(root / "mlm"))


def test_linear_head_is_refused_in_one_line_or_exported_as_an_encoder(root, labelled, mlm_run):
  transformers = pytest.importorskip("transformers")
  c = _classifier(root, labelled, "linear", pooling="mean")
  c.init.checkpoint = mlm_run
  wd = str(root / "linear_run")
  write_workdir(c, wd)
  assert json.load(open(os.path.join(wd, "model.json")))["head"] == "linear"  # auto: mean pooling
  with pytest.raises(UserError) as e:
    export.export(wd, str(root / "nothing"))
  message = _one_line(e)
  assert "linear head on mean-pooled features" in message and "--config.model.head=hf" in message
  assert "--encoder_only" in message and not os.path.exists(root / "nothing")
  out = str(root / "encoder_only")
  assert export.main(["--model", wd, "--output", out, "--encoder_only"]) == 0
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["architectures"] == ["BertModel"] and "id2label" not in config
  model = transformers.AutoModel.from_pretrained(out, add_pooling_layer=False)
  assert type(model).__name__ == "BertModel"


def test_hf_head_without_source_pooler_starts_a_fresh_one(root, labelled, mlm_run):
  """model.head=hf from a jembed MLM run (no pooler): a fresh pooler, exported with the head."""
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  c = _classifier(root, labelled, "fresh", head="hf")
  c.init.checkpoint = mlm_run
  wd = str(root / "fresh_run")
  write_workdir(c, wd)
  spec = json.load(open(os.path.join(wd, "model.json")))
  assert spec["head"] == "hf" and spec["pooling"] == "cls" and spec["encoder"]["pooler"]
  out = str(root / "fresh_export")
  export.export(wd, out)
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ours = embed.load(wd)
  np.testing.assert_allclose(_torch_logits(model.eval(), ours, TEXTS), ours.logits(TEXTS), atol=1e-5)


def test_hf_head_refuses_a_pooling_it_cannot_compute(root, labelled, mlm_run):
  c = _classifier(root, labelled, "bad", head="hf", pooling="mean")
  c.init.checkpoint = mlm_run
  with pytest.raises(UserError) as e:
    write_workdir(c, str(root / "bad_run"))
  assert "model.pooling=cls" in _one_line(e) and "model.head=linear" in _one_line(e)


# ----------------------------------------------------------------------------- MLM export (item 9)


def _transformers_log(transformers):
  """A list that collects what transformers logs while loading (its LOAD REPORT is a warning)."""
  records = []
  handler = logging.Handler()
  handler.emit = lambda record: records.append(record.getMessage())
  transformers.utils.logging.add_handler(handler)
  return records, handler


def test_mlm_export_loads_cleanly_with_the_usual_file_modes(root, mlm_run):
  transformers = pytest.importorskip("transformers")
  st = pytest.importorskip("sentence_transformers")
  old = os.umask(0o027)
  try:
    out = str(root / "mlm_export")
    export.export(mlm_run, out)
  finally:
    os.umask(old)
  for name in ("model.safetensors", "config.json", "tokenizer.json", os.path.join("1_Pooling", "config.json")):
    assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o640, name   # 0666 & ~027
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o750
  sbert = json.load(open(os.path.join(out, "sentence_bert_config.json")))
  assert sbert["model_args"] == {"add_pooling_layer": False}   # no pooler weights: none invented
  _, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  _, info = transformers.AutoModel.from_pretrained(out, add_pooling_layer=False, output_loading_info=True)
  assert not info["missing_keys"], info
  records, handler = _transformers_log(transformers)
  try:
    st.SentenceTransformer(out, device="cpu")
  finally:
    transformers.utils.logging.remove_handler(handler)
  assert not any("MISSING" in r or "newly initialized" in r for r in records), records


def test_exported_classifier_loads_back_into_jembed(hf_head_export, tmp_path):
  """jembed.load of the *ForSequenceClassification directory predicts as the workdir does, and a
  second export of it is byte-identical."""
  workdir, out, _ = hf_head_export
  ours, back = embed.load(workdir), embed.load(out)
  assert back.classes == ours.classes
  np.testing.assert_allclose(back.logits(TEXTS), ours.logits(TEXTS), atol=1e-5)
  model = hf.load_dir(out)
  again = hf.save_model(str(tmp_path / "again"), model)
  for name in ("model.safetensors", "config.json"):
    assert open(os.path.join(out, name), "rb").read() == open(os.path.join(again, name), "rb").read()
  (tmp_path / "in.txt").write_text("\n".join(TEXTS[:2]) + "\n")
  assert predict.main(["--model", out, "--input", str(tmp_path / "in.txt"),
                       "--output", str(tmp_path / "p.jsonl")]) == 0
  assert [json.loads(line)["label"] for line in open(tmp_path / "p.jsonl")] == \
      [p["label"] for p in ours.predict(TEXTS[:2])]


@pytest.mark.parametrize("change,message", [
    ({"problem_type": "multi_label_classification"}, "multi_label_classification head"),
    ({"id2label": {"0": "a", "7": "b"}}, "id2label has ids [0, 7]"),
])
def test_classifier_directories_jembed_cannot_read_are_one_line(hf_head_export, tmp_path, change, message):
  import shutil
  _, out, _ = hf_head_export
  bad = shutil.copytree(out, tmp_path / "bad")
  config = json.load(open(bad / "config.json"))
  config.update(change)
  json.dump(config, open(bad / "config.json", "w"))
  with pytest.raises(UserError) as e:
    hf.load_dir(str(bad))
  assert message in _one_line(e)
