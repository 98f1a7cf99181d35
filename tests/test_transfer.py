"""Fine-tuning defaults follow the source (jembed/transfer.py): one check per rule of the learning
rate table, a rate set by the user is kept, and a text classifier pools as its source does."""
import json
import os

import jax
import pytest

from jembed import train, transfer
from jembed.data import labeled_text
from spine_helpers import load_config_file, tiny_mlm_config, write_corpus, write_workdir


def _config(name, source="", method="full", lr=0.0):
  c = load_config_file(name)
  if source:
    c.init[source] = "/some/source"
  c.peft.method = method
  c.learning_rate = lr
  return c


@pytest.mark.parametrize("name, source, method, want", [
    ("finetune_text", "hf", "full", 5e-5),
    ("finetune_text", "checkpoint", "full", 5e-5),
    ("finetune_text", "hf", "lora", 1e-3),
    ("finetune_text", "hf", "adapter", 1e-3),
    ("finetune_text", "checkpoint", "linear_probe", 1e-3),
    ("finetune_text", "", "full", 1e-3),
    ("finetune_text", "", "lora", 1e-3),
    ("finetune_image", "checkpoint", "full", 1e-4),
    ("finetune_image", "checkpoint", "lora", 1e-3),
    ("finetune_image", "checkpoint", "adapter", 1e-3),
    ("finetune_image", "checkpoint", "linear_probe", 1e-3),
    ("finetune_image", "", "full", 2e-3),
])
def test_each_rule_of_the_learning_rate_table(name, source, method, want):
  c = _config(name, source, method)
  assert c.learning_rate == 0  # the configs leave it to the table
  line = transfer.resolve(c)
  assert c.learning_rate == want and f"learning_rate={want:g} (auto" in line
  assert ("from scratch" in line) == (not source)


def test_pretrained_image_weights_count_as_a_source():
  c = load_config_file("finetune_image")
  c.init.unlock()  # init.pretrained may not exist in this tree yet (configs/common.py adds it)
  c.init.pretrained = "/weights/resnet18.pth"
  assert transfer.resolve(c) and c.learning_rate == 1e-4


def test_an_explicit_rate_is_kept_and_other_tasks_are_untouched():
  c = _config("finetune_text", "hf", "full", lr=3e-4)
  assert transfer.resolve(c) == "" and c.learning_rate == 3e-4
  mlm = load_config_file("mlm")
  rate = mlm.learning_rate
  assert transfer.resolve(mlm) == "" and mlm.learning_rate == rate


@pytest.fixture(scope="module")
def mean_pooled_source(tmp_path_factory):
  """A tiny pretraining workdir whose model pools by the mean, and labelled data."""
  root = tmp_path_factory.mktemp("src")
  config = tiny_mlm_config(write_corpus(str(root)))
  config.model.pooling = "mean"
  write_workdir(config, str(root / "mlm"))
  texts, labels = labeled_text.embedded_examples()
  with open(root / "train.jsonl", "w") as f:
    for i in range(0, len(texts), max(1, len(texts) // 60)):
      f.write(json.dumps({"text": texts[i], "label": labels[i]}) + "\n")
  return str(root / "mlm"), str(root / "train.jsonl")


def _setup(source, train_file, workdir, **model):
  c = load_config_file("finetune_text")
  c.init.checkpoint = source
  c.data.train = train_file
  c.data.seq_len = 32
  c.model.update(model)
  return train.Setup(c, workdir, devices=jax.devices()[:1])


def test_text_classifier_pools_as_its_source_and_takes_the_transfer_rate(mean_pooled_source, tmp_path):
  source, train_file = mean_pooled_source
  setup = _setup(source, train_file, str(tmp_path / "a"))
  assert json.load(open(os.path.join(source, "model.json")))["pooling"] == "mean"
  assert setup.spec["pooling"] == "mean"        # not [CLS]: the source mean-pools
  assert setup.config.learning_rate == 5e-5     # full fine-tuning from a source
  explicit = _setup(source, train_file, str(tmp_path / "b"), pooling="cls")
  assert explicit.spec["pooling"] == "cls"      # a pooling you set is kept


def test_predict_refuses_a_model_without_a_classifier_head(mean_pooled_source, tmp_path, capsys):
  """An MLM run has a head, but not a classifier's: jembed.predict says what to load instead."""
  from jembed import predict
  source, _ = mean_pooled_source
  (tmp_path / "in.txt").write_text("a text\n")
  out = tmp_path / "p.jsonl"
  assert predict.main(["--model", source, "--input", str(tmp_path / "in.txt"), "--output", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert "has no classifier head" in err and "finetune_text.py" in err and len(err.splitlines()) == 1
  assert not out.exists()
