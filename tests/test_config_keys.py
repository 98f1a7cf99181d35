"""Every key of every config in configs/ is read by the library: a field that reaches no code is a
silent no-op (an option accepted and ignored).

A key counts as read when library code takes its value while a run is built: reads of the config's
ConfigDicts are recorded (`__getitem__`, which attribute access, `.get` and iteration go through,
and `to_dict`, which hands a whole section on) while `train.Setup` builds each config's task on its
default data (data loading, model description, tuning, optimizer, mesh), its train step is traced
(what the loss reads) and its evaluation hook runs on the initial model; then again for VARIANTS
that take the other branches (LoRA, adapters, a learnable temperature, data files). The loop's own
keys are recorded over one short real run (`loop_reads`).
"""
import contextlib
import os

import jax
import ml_collections
import pytest

from spine_helpers import ROOT, apply_overrides, load_config_file, tiny_mlm_config, write_corpus

CONFIGS = sorted(p[:-3] for p in os.listdir(os.path.join(ROOT, "configs"))
                 if p.endswith(".py") and p not in ("__init__.py", "common.py"))

# Overrides that reach code the defaults do not (each key must be read under some setting); FILES
# stand for data files the module fixture writes.
LORA, ADAPTER = {"peft.method": "lora"}, {"peft.method": "adapter"}
CONV_LORA = {**LORA, "peft.targets": "all_dense_and_conv"}
VARIANTS = {
    "contrastive_text": [{"loss.learn_temperature": True, **LORA}, ADAPTER, {"data.train": "PAIRS"}],
    "finetune_text": [LORA, ADAPTER],
    "finetune_image": [LORA, {**ADAPTER, "model.backbone": "vit"}],
    "mlm": [LORA, ADAPTER, {"data.train": "CORPUS"}],
    "rotation": [CONV_LORA, {**ADAPTER, "model.backbone": "vit"}, {"data.train": "IMAGES", "batch_size": 8}],
    "simclr": [CONV_LORA, {**ADAPTER, "model.backbone": "vit"}, {"data.train": "IMAGES", "batch_size": 8}],
    "two_tower": [{"data.train": "INTERACTIONS", "data.format": "csv", "batch_size": 8}],
}
# Smaller values that keep the test fast; which keys are read does not depend on them.
TEXT_CHEAP = {"data.vocab_size": 256, "model.num_layers": 1, "model.hidden_size": 16,
              "model.num_heads": 2, "model.mlp_dim": 32}
IMAGE_MODEL_CHEAP = {"model.resnet.width": 4, "model.resnet.num_stages": 1, "model.vit.hidden_size": 16,
                     "model.vit.num_layers": 1, "model.vit.num_heads": 2, "model.vit.mlp_dim": 32}
IMAGE_CHEAP = {"frozen_eval.probe_steps": 2, "frozen_eval.max_train": 64, "frozen_eval.batch": 64,
               **IMAGE_MODEL_CHEAP}
CHEAP = {"contrastive_text": TEXT_CHEAP, "finetune_text": TEXT_CHEAP, "mlm": TEXT_CHEAP,
         "rotation": IMAGE_CHEAP, "simclr": IMAGE_CHEAP,
         "finetune_image": IMAGE_MODEL_CHEAP}

# Keys whose reading needs what a test cannot have offline (a prepared TFDS dataset, a warm-start
# source) or a whole run's end: where each is read, so a reviewer can check it.
ELSEWHERE = {
    "data.tfds_name": "jembed/data/tfds_source.py (a prepared TFDS dataset)",
    "data.tfds_split": "jembed/data/tfds_source.py", "data.tfds_eval_split": "jembed/data/tfds_source.py",
    "data.tfds_text_key": "jembed/data/tfds_source.py", "data.tfds_label_key": "jembed/data/tfds_source.py",
    "data.data_dir": "jembed/data/tfds_source.py",
    "init.step": "jembed/init.py, with init.checkpoint",
}


@contextlib.contextmanager
def recording(config):
  """Yields the set of dotted keys of `config` read while the context is open."""
  prefixes = {}

  def index(c, prefix):
    prefixes[id(c)] = prefix
    for key in c.keys():
      value = c._fields[key]
      if isinstance(value, ml_collections.ConfigDict):
        index(value, prefix + key + ".")
  index(config, "")
  read = set()
  getitem, to_dict = ml_collections.ConfigDict.__getitem__, ml_collections.ConfigDict.to_dict

  def all_keys(c, prefix):
    for key in c.keys():
      read.add(prefix + key)
      if isinstance(c._fields[key], ml_collections.ConfigDict):
        all_keys(c._fields[key], prefix + key + ".")

  def recorded_getitem(self, key):
    if id(self) in prefixes and isinstance(key, str):
      read.add(prefixes[id(self)] + key.split(".", 1)[0])
    return getitem(self, key)

  def recorded_to_dict(self, *args, **kwargs):
    if id(self) in prefixes:
      all_keys(self, prefixes[id(self)])
    return to_dict(self, *args, **kwargs)
  ml_collections.ConfigDict.__getitem__ = recorded_getitem
  ml_collections.ConfigDict.to_dict = recorded_to_dict
  try:
    yield read
  finally:
    ml_collections.ConfigDict.__getitem__ = getitem
    ml_collections.ConfigDict.to_dict = to_dict


def keys_of(config, prefix=""):
  for key in config.keys():
    value = config._fields[key]
    if isinstance(value, ml_collections.ConfigDict) and len(value):
      yield from keys_of(value, prefix + key + ".")
    else:
      yield prefix + key


def reads_of_run_parts(config, workdir, files, full: bool) -> set:
  """Keys read by building the run (`train.Setup`), tracing its train step (what the loss reads)
  and, when `full`, the task's evaluation hook on the initial model."""
  import flax.linen as nn
  from jembed import train
  from jembed.data import pipeline
  for key, value in list(keys_and_values(config)):
    if value in files:
      apply_overrides(config, {key: files[value]})
  config.lock()
  with recording(config) as read:
    setup = train.Setup(config, workdir)
    it = pipeline.make_train_iterator(setup.data.train, config.batch_size, config.seed)
    batch = next(it)
    abstract = jax.eval_shape(setup._make_state, setup.abs_params, setup.abs_rest, jax.random.key(0))
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      jax.eval_shape(lambda s, b: train.train_step(setup.ctx, s, b), abstract, batch)
      if full:
        setup.task.extra_eval(setup.model_from(setup.init_state()), 1)
  return read


def keys_and_values(config, prefix=""):
  for key in config.keys():
    value = config._fields[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from keys_and_values(value, prefix + key + ".")
    else:
      yield prefix + key, value


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Small data files for the variants that read them (FILES)."""
  import json
  import numpy as np
  from PIL import Image
  root = tmp_path_factory.mktemp("data")
  pairs = root / "pairs.jsonl"
  words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
  pairs.write_text("".join(json.dumps({"anchor": f"{a} {b}", "positive": f"{b} {a} {a}"}) + "\n"
                           for a in words for b in words))
  for cls in ("a", "b"):
    (root / "images" / cls).mkdir(parents=True)
    for i in range(8):
      Image.fromarray(np.full((8, 8), 20 * i + (cls == "b") * 100, np.uint8)).save(
          root / "images" / cls / f"{i}.png")
  interactions = root / "interactions.csv"
  interactions.write_text("user,item,rating,timestamp\n" + "".join(
      f"u{u},i{(u * 7 + j) % 13},{1 + j % 5},{j}\n" for u in range(12) for j in range(6)))
  return {"PAIRS": str(pairs), "IMAGES": str(root / "images"), "CORPUS": write_corpus(str(root)),
          "INTERACTIONS": str(interactions)}


@pytest.fixture(scope="module")
def loop_reads(tmp_path_factory):
  """The keys the train loop reads, over one short real run (the loop is every task's) in which a
  step is not finite and skipped (what skip_nonfinite and max_consecutive_nonfinite govern)."""
  from jembed import reliability, train
  tmp = tmp_path_factory.mktemp("loop")
  config = tiny_mlm_config(write_corpus(str(tmp)), total_steps=2, log_every=1, eval_every=2,
                           checkpoint_every=2, skip_nonfinite=True)
  config.lock()
  original = reliability.step_is_finite
  reliability.step_is_finite = lambda loss, grads, step: original(loss, grads, step) & (step != 0)
  try:
    with recording(config) as read:
      train.train_and_evaluate(config, str(tmp / "run"))
  finally:
    reliability.step_is_finite = original
  return {k for k in read if "." not in k}


def unread_keys(name, tmp_path, loop_reads, files) -> list:
  config = load_config_file(name)
  read = set(loop_reads)
  for i, overrides in enumerate([{}] + VARIANTS.get(name, [])):
    cheap = apply_overrides(load_config_file(name), CHEAP.get(name, {}))
    read |= reads_of_run_parts(apply_overrides(cheap, overrides),
                               str(tmp_path / str(i)), files, full=not overrides)
  return [k for k in keys_of(config) if k not in read and k not in ELSEWHERE]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_key_is_read(name, tmp_path, loop_reads, files):
  unread = unread_keys(name, tmp_path, loop_reads, files)
  assert not unread, f"configs/{name}.py sets keys no library code reads: {unread}"


def test_the_check_catches_a_dead_key(tmp_path, loop_reads, files, monkeypatch):
  real = load_config_file

  def with_dead_key(name):
    config = real(name)
    config.model.frobnicate_level = 3   # named like a real option, read by nothing
    return config
  monkeypatch.setitem(globals(), "load_config_file", with_dead_key)
  assert unread_keys("finetune_text", tmp_path, loop_reads, files) == ["model.frobnicate_level"]
