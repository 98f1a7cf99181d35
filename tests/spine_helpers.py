"""Small MLM configs and data shared by the spine tests (tiny model, short sequences)."""
from __future__ import annotations

import os
import sys

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_file(name: str) -> ml_collections.ConfigDict:
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  try:
    module = __import__(name)
  finally:
    sys.path.pop(0)
  return module.get_config()


def write_corpus(directory: str, n_docs: int = 300) -> str:
  from jembed.data.corpus_embedded import embedded_documents
  path = os.path.join(directory, "corpus.txt")
  if not os.path.exists(path):
    with open(path, "w") as f:
      f.write("\n".join(embedded_documents()[:n_docs]) + "\n")
  return path


def tiny_mlm_config(corpus: str, **overrides) -> ml_collections.ConfigDict:
  c = load_config_file("mlm")
  c.total_steps = 6
  c.batch_size = 16
  c.warmup_steps = 2
  c.log_every = 2
  c.eval_every = 3
  c.checkpoint_every = 3
  c.eval_batches = 2
  c.async_checkpointing = False
  tiny_encoder(c)
  c.data.train = corpus
  c.data.eval_fraction = 0.1
  c.data.vocab_size = 512
  c.data.seq_len = 32
  return apply_overrides(c, overrides)


def tiny_encoder(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A text config's encoder at test size: one layer of width 32."""
  c.model.num_layers = 1
  c.model.hidden_size = 32
  c.model.num_heads = 2
  c.model.mlp_dim = 64
  c.model.max_position = 64
  return c


def read_shard(path: str):
  """Every row of an ArrayRecord file of prepared rows (jembed.data.prepare), in order."""
  import numpy as np
  from array_record.python import array_record_module
  from jembed.data import shards
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return np.stack([shards.decode_row(r) for r in reader.read_all()])
  finally:
    reader.close()


def assert_resumes_exactly(source, global_batch: int, seed: int, steps: int = 3, **process) -> None:
  """A prepared training split's iterator, restored from the state it saved after one batch (what the
  checkpoint holds), yields what the uninterrupted iterator yields next."""
  import numpy as np
  it = source.train_iterator(global_batch, seed, prefetch=0, **process)
  next(it)
  state = it.get_state()
  want = [next(it) for _ in range(steps)]
  again = source.train_iterator(global_batch, seed, prefetch=0, **process)
  again.set_state(state)
  for w in want:
    got = next(again)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Sets dotted keys ("mesh.data": 8) as --config.mesh.data=8 would."""
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def write_workdir(config, workdir: str, devices=None):
  """A workdir as a run leaves it (config.json, model.json, tokenizer, a step-0 checkpoint of the
  freshly initialised state) without compiling a train step. Returns the Setup and the state."""
  import json
  import jax
  from jembed import modelspec, train
  from jembed.checkpoint import Checkpointer
  setup = train.Setup(config, workdir, devices=devices or jax.devices()[:1])
  state = setup.init_state()
  os.makedirs(workdir, exist_ok=True)
  setup.task.save_artifacts()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(json.loads(config.to_json_best_effort()), f)
  modelspec.save(workdir, setup.spec)
  saver = Checkpointer(workdir, async_save=False)
  saver.save(0, state, None)
  saver.close()
  return setup, state


def tiny_text_workdir(root: str) -> str:
  """A mean-pooling tiny MLM workdir under `root` (no training step): the small text model the
  embedding, index and serving tests load."""
  config = tiny_mlm_config(write_corpus(root))
  config.model.pooling = "mean"
  wd = os.path.join(root, "run")
  write_workdir(config, wd)
  return wd
