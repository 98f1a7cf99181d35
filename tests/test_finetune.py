"""Fine-tuning through the real train loop: restore from an MLM pretraining workdir, mismatch
errors, LoRA / adapter steps sharded over 8 devices equal to one device, the final report."""
import json
import os

import jax
import numpy as np
import pytest
from sklearn.metrics import classification_report as sk_report

import jax.numpy as jnp
from flax import nnx

import flax.linen as nn

from jembed import train
from jembed.checkpoint import restore_params_only
from jembed.data import labeled_text, pipeline
from jembed.errors import UserError
from jembed import tree
from spine_helpers import apply_overrides, load_config_file, tiny_mlm_config, write_corpus, write_workdir


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A pretraining workdir as the MLM run leaves it (config.json, model.json, tokenizer.json, an
  orbax checkpoint of the state), written directly so no MLM step has to compile."""
  root = str(tmp_path_factory.mktemp("mlm"))
  config = tiny_mlm_config(write_corpus(root), **{"data.vocab_size": 512})
  workdir = os.path.join(root, "run")
  write_workdir(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
  root = tmp_path_factory.mktemp("labelled")
  texts, labels = labeled_text.embedded_examples()
  paths = []
  for name, offset, n in (("train.jsonl", 0, 160), ("test.jsonl", 3, 50)):
    path = root / name
    with open(path, "w") as f:
      for i in range(n):  # spread over the topics, which the embedded list holds in blocks
        j = (offset + i * 7) % len(texts)
        t, l = texts[j], labels[j]
        f.write(json.dumps({"text": t, "label": l}) + "\n")
    paths.append(str(path))
  return paths


def ft_config(pretrained, labelled, **overrides):
  c = load_config_file("finetune_text")
  c.init.checkpoint = pretrained
  c.total_steps = 2
  c.batch_size = 16
  c.warmup_steps = 1
  c.eval_batches = 1
  c.async_checkpointing = False
  c.model.dropout = 0.0
  c.model.attention_dropout = 0.0
  c.data.train, c.data.eval = labelled
  c.data.seq_len = 32
  return apply_overrides(c, overrides)


def run_steps(config, workdir, devices, steps=2):
  """Setup, init (restoring the pretrained backbone) and `steps` train steps; only the train step
  is compiled, as the loop compiles it."""
  setup = train.Setup(config, workdir, devices=devices)
  state = setup.init_state()
  it = pipeline.train_iterator(setup.data.train, config.batch_size, config.seed)
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    step = setup.jit_train_step(setup.data.train)
    for _ in range(steps):
      state, _ = step(state, setup.to_global(next(it)))
  return setup, state


def _flat(params):
  return {p: np.asarray(jax.device_get(v)) for p, v in tree.flatten(params).items()}


def test_architecture_mismatch_names_the_field(pretrained, labelled, tmp_path):
  config = ft_config(pretrained, labelled, **{"model.mlp_dim": 48})
  with pytest.raises(UserError, match=r"model.mlp_dim=48 disagrees with the warm-start source \(mlp_dim=64\)"):
    train.Setup(config, str(tmp_path), devices=jax.devices()[:1])


OVERRIDES = {"peft.adapter_dim": 8, "peft.dropout": 0.1, "peft.targets": "attention"}


@pytest.fixture(scope="module")
def lora_runs(pretrained, labelled, tmp_path_factory):
  root = tmp_path_factory.mktemp("lora")
  over = dict(OVERRIDES, **{"peft.method": "lora"})
  one = run_steps(ft_config(pretrained, labelled, **over), str(root / "one"), jax.devices()[:1])
  eight = run_steps(ft_config(pretrained, labelled, **over, **{"mesh.data": 2, "mesh.fsdp": 4}),
                    str(root / "eight"), jax.devices())
  return one, eight


def _check_sharded_equals_single(single, sharded, pretrained):
  a, b = _flat(single.params), _flat(sharded.params)
  assert a.keys() == b.keys()
  for p in a:
    np.testing.assert_allclose(a[p], b[p], rtol=2e-5, atol=2e-6, err_msg=p)
  # The frozen base is bitwise the pretrained encoder after training; the MLM head is dropped.
  raw, _ = restore_params_only(pretrained)
  source = _flat(raw["params"])
  frozen = _flat(sharded.frozen)
  encoder = [p for p in frozen if p.startswith("encoder/")]
  assert encoder and all(np.array_equal(frozen[p], source[p]) for p in encoder)
  assert not any(p.startswith("mlm_head") for p in list(frozen) + list(_flat(sharded.params)))


def test_lora_sharded_step_equals_single_device(lora_runs, pretrained):
  (_, single), (setup, sharded) = lora_runs
  _check_sharded_equals_single(single, sharded, pretrained)
  assert set(tree.flatten(sharded.params["extra"])) == {"head/dense/kernel", "head/dense/bias"}
  # A is sharded like its kernel's input dim (fsdp), B like its output dim.
  kernel = "encoder/layers/0/attention/query/kernel"
  kernel_spec = tree.get(setup.frozen_shardings, kernel).spec
  ab = tree.get(setup.trained_shardings, f"adapters/{kernel}")
  assert ab["a"].spec[0] == kernel_spec[0] == "fsdp" and ab["a"].spec[1] is None
  assert ab["b"].spec[0] is None and tuple(ab["b"].spec)[1:] == tuple(kernel_spec)[1:]


def test_adapter_sharded_step_equals_single_device(pretrained, labelled, tmp_path):
  over = dict(OVERRIDES, **{"peft.method": "adapter"})
  _, single = run_steps(ft_config(pretrained, labelled, **over), str(tmp_path / "one"),
                        jax.devices()[:1])
  _, sharded = run_steps(ft_config(pretrained, labelled, **over, **{"mesh.data": 2, "mesh.fsdp": 4}),
                         str(tmp_path / "eight"), jax.devices())
  _check_sharded_equals_single(single, sharded, pretrained)
  assert any("adapter" in p for p in tree.flatten(sharded.params))


class _Logger:
  def __init__(self):
    self.lines = []

  def info(self, text):
    self.lines.append(text)


def test_final_report_matches_sklearn_and_lora_exports(lora_runs, tmp_path):
  (setup, state), _ = lora_runs
  setup.task.workdir = str(tmp_path)
  model = setup.model_from(state)
  logger = _Logger()
  setup.task.final_summary(model, {}, logger)
  setup.tuning.export(str(tmp_path), state)
  labels = setup.task.eval_columns["label"]
  preds = setup.task.predict(model, setup.task.eval_columns)
  assert len(preds) == len(labels) == 50  # the whole split, the last partial batch included
  with open(tmp_path / "classification_report.json") as f:
    ours = json.load(f)
  names = setup.task.class_names
  ref = sk_report(labels, preds, labels=list(range(len(names))), target_names=names,
                  output_dict=True, zero_division=0)
  assert ours["accuracy"] == pytest.approx(ref["accuracy"])
  for name in names:
    for key in ("precision", "recall", "f1-score"):
      assert ours["per_class"][name][key] == pytest.approx(ref[name][key])
    assert ours["per_class"][name]["support"] == ref[name]["support"]
  assert ours["macro_f1"] == pytest.approx(ref["macro avg"]["f1-score"])
  assert os.path.getsize(tmp_path / "confusion_matrix.png") > 0
  assert "macro avg" in logger.lines[-1]
  assert os.path.exists(tmp_path / "lora_adapter" / "lora_config.json")
  assert os.path.isdir(tmp_path / "merged")
