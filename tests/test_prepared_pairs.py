"""Contrastive pairs at scale: `python -m jembed.data.prepare` with a contrastive config writes
tokenized pair rows into ArrayRecord shards, and training streams each process's own shards
(data.prepared, data.streams). The reference is the in-memory path (pairs.load_pair_splits ->
the task's tokenizer and columns)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jembed.data import pairs as pairs_lib, prepare, streaming
from jembed.errors import UserError
from jembed.tasks import get_task
from spine_helpers import apply_overrides, assert_resumes_exactly, load_config_file, read_shard

SHARDS = 3


def pairs_config(train_file, **overrides):
  c = load_config_file("contrastive_text")
  c.batch_size = 8
  c.data.train = train_file
  c.data.eval_fraction = 0.3
  c.data.seq_len = 24
  c.data.vocab_size = 400
  return apply_overrides(c, overrides)


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
  train, held = pairs_lib.embedded_pairs()
  rows = (train + held)[:150]
  path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
  with open(path, "w") as f:
    for i, p in enumerate(rows):  # one hard negative each: another pair's positive
      f.write(json.dumps({"anchor": p.anchor, "positive": p.positive,
                          "negative": rows[(i + 7) % len(rows)].positive}) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def prepared(pair_file, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("prep") / "pairs")
  meta = prepare.prepare(pairs_config(pair_file), out, shards=SHARDS, log=lambda _: None)
  return out, meta


@pytest.fixture(scope="module")
def in_memory(pair_file, tmp_path_factory):
  task = get_task(pairs_config(pair_file), str(tmp_path_factory.mktemp("mem")))
  data = task.load_data()
  return task, data


def test_prepared_pairs_equal_the_in_memory_rows(prepared, in_memory):
  out, meta = prepared
  task, data = in_memory
  cols = data.train
  n = len(cols["anchor"])
  assert meta["kind"] == "pairs" and meta["num_negatives"] == 1 == task.num_negatives
  assert meta["train_rows"] == n and meta["layout"] == {"anchor": [24], "positive": [24],
                                                        "negative": [1, 24]}
  rows = np.concatenate([cols["anchor"], cols["positive"], cols["negative"].reshape(n, -1)], axis=1)
  for i, s in enumerate(meta["shards"]):   # pair j is row j of shard j % SHARDS
    np.testing.assert_array_equal(read_shard(os.path.join(out, s["file"])), rows[i::SHARDS])
  from jembed.data import wordpiece
  assert wordpiece.build_tokenizer((), 0, path=os.path.join(out, "tokenizer.json")).to_str() == \
      task.tokenizer.to_str()
  held, _ = pairs_lib.load_pairs(os.path.join(out, "eval.jsonl"))
  assert held == task.held_out


def test_training_streams_prepared_pairs_per_process_and_resumes_exactly(pair_file, prepared,
                                                                        in_memory, tmp_path,
                                                                        monkeypatch):
  out, meta = prepared
  task = get_task(pairs_config(pair_file, **{"data.prepared": out, "data.train": "",
                                             "data.streams": 3}), str(tmp_path))
  data = task.load_data()
  assert isinstance(data.train, streaming.PreparedTrain)
  assert data.info["train_pairs"] == meta["train_rows"] and task.held_out == in_memory[0].held_out
  assert data.eval is not None
  for k, v in in_memory[1].eval.items():   # the held-out loss batches are the in-memory ones
    np.testing.assert_array_equal(data.eval[k], v)
  shapes = {k: v.shape for k, v in data.train.example_columns().items()}
  assert shapes == {"anchor": (1, 24), "positive": (1, 24), "negative": (1, 1, 24)}
  # Three streams read as one process or as three: the same global batches, each process its shards.
  one = data.train.dataset(6, seed=1, process_count=1, process_index=0)
  cfg = dict(process_count=3)
  parts = [data.train.dataset(6, seed=1, process_index=i, **cfg) for i in range(3)]
  one_rows = set()
  for step in range(4):
    whole = one[step]
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([p[step][k] for p in parts]), whole[k])
    one_rows |= {r.tobytes() for r in whole["anchor"]}
  valid = {r.tobytes() for r in in_memory[1].train["anchor"]}
  assert one_rows <= valid
  # Exact resume: the iterator state the checkpoint saves restores the stream.
  assert_resumes_exactly(data.train, 6, 1, process_count=1, process_index=0)


def test_prepared_pairs_bad_input_is_one_line(pair_file, prepared, tmp_path):
  out, _ = prepared
  from spine_helpers import tiny_mlm_config
  mlm = get_task(tiny_mlm_config(pair_file, **{"data.prepared": out}), str(tmp_path / "m"))
  with pytest.raises(UserError, match="holds pairs rows, this task reads text"):
    mlm.load_data()
  for over, problem in ((dict(**{"data.seq_len": 32}), "holds rows of seq_len=24"),
                        (dict(**{"data.num_negatives": 0}), "holds 1 per pair")):
    task = get_task(pairs_config("", **{"data.prepared": out}, **over), str(tmp_path / "c"))
    with pytest.raises(UserError, match=problem):
      task.load_data()
  with pytest.raises(UserError, match="exists and is not empty"):
    prepare.prepare(pairs_config(pair_file), out, shards=SHARDS, log=lambda _: None)
  with pytest.raises(UserError, match="needs data.train"):
    prepare.prepare(pairs_config(""), str(tmp_path / "x"), shards=SHARDS, log=lambda _: None)
  assert not os.path.exists(tmp_path / "x")
