"""Labelled text at scale: `python -m jembed.data.prepare` with a text-classification config writes
tokenized (ids, label) rows into ArrayRecord shards, with the class names in prepared.json, and
training streams each process's own shards (data.prepared, data.streams). The reference is the
in-memory path (labeled_text.load_labeled_text -> the task's tokenizer and columns)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jembed.data import labeled_text, pipeline, prepare, streaming, wordpiece
from jembed.errors import UserError
from jembed.tasks import get_task
from spine_helpers import apply_overrides, assert_resumes_exactly, load_config_file, read_shard, tiny_encoder

SHARDS = 3


def labelled_config(train_file, **overrides):
  c = tiny_encoder(load_config_file("finetune_text"))
  c.batch_size = 8
  c.data.update(dict(train=train_file, eval_fraction=0.25, seq_len=24, vocab_size=400))
  return apply_overrides(c, overrides)


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory):
  texts, labels = labeled_text.embedded_examples()
  path = tmp_path_factory.mktemp("labelled") / "train.jsonl"
  with open(path, "w") as f:
    for i in range(120):  # spread over the topics, which the embedded list holds in blocks
      j = (i * 7) % len(texts)
      f.write(json.dumps({"text": texts[j], "label": labels[j]}) + "\n")
    f.write('{"text": "no label field"}\n')   # one bad record, skipped and counted
  return str(path)


@pytest.fixture(scope="module")
def prepared(labelled_file, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("prep") / "labelled")
  config = labelled_config(labelled_file, **{"data.on_bad_record": "skip"})
  meta = prepare.prepare(config, out, shards=SHARDS, log=lambda _: None)
  return out, meta


@pytest.fixture(scope="module")
def in_memory(labelled_file, tmp_path_factory):
  config = labelled_config(labelled_file, **{"data.on_bad_record": "skip"})
  task = get_task(config, str(tmp_path_factory.mktemp("mem")))
  return task, task.load_data()


def test_prepared_labelled_rows_equal_the_in_memory_columns(prepared, in_memory):
  out, meta = prepared
  task, data = in_memory
  train_cols, held = data.train, data.eval
  n = len(train_cols["label"])
  assert meta["kind"] == "labeled_text" and meta["layout"] == {"tokens": [24], "label": []}
  assert meta["classes"] == task.class_names and len(meta["classes"]) == 5
  assert meta["train_rows"] == n and meta["eval"]["rows"] == len(held["label"])
  assert meta["skipped_records"] == 1   # the one bad line, counted once over all the passes
  rows = np.concatenate([train_cols["tokens"], train_cols["label"][:, None]], axis=1)
  for i, s in enumerate(meta["shards"]):   # example j is row j of shard j % SHARDS
    np.testing.assert_array_equal(read_shard(os.path.join(out, s["file"])), rows[i::SHARDS])
  eval_rows = np.concatenate([held["tokens"], held["label"][:, None]], axis=1)
  np.testing.assert_array_equal(read_shard(os.path.join(out, "eval.array_record")), eval_rows)
  assert wordpiece.build_tokenizer((), 0, path=os.path.join(out, "tokenizer.json")).to_str() == \
      task.tokenizer.to_str()


def test_training_streams_prepared_labelled_text_and_resumes_exactly(prepared, in_memory, tmp_path):
  out, meta = prepared
  config = labelled_config("", **{"data.prepared": out, "data.streams": 3})
  task = get_task(config, str(tmp_path / "w"))
  data = task.load_data()
  assert isinstance(data.train, streaming.PreparedTrain) and len(data.train) == meta["train_rows"]
  assert task.class_names == in_memory[0].class_names   # the classifier keeps the class names
  for k, v in in_memory[1].eval.items():   # the whole held-out split, as the in-memory path has it
    np.testing.assert_array_equal(data.eval[k], v)
  # Three streams read as one process or as three: the same global batches, each process its own
  # shards (disjoint rows), and every row one of the in-memory path's.
  one = data.train.dataset(6, seed=1, process_count=1, process_index=0)
  parts = [data.train.dataset(6, seed=1, process_count=3, process_index=i) for i in range(3)]
  valid = {r.tobytes() for r in np.concatenate(
      [in_memory[1].train["tokens"], in_memory[1].train["label"][:, None]], axis=1)}
  for step in range(3):
    whole = one[step]
    assert whole["tokens"].shape == (6, 24) and whole["label"].shape == (6,)
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([p[step][k] for p in parts]), whole[k])
    rows = np.concatenate([whole["tokens"], whole["label"][:, None]], axis=1)
    assert {r.tobytes() for r in rows} <= valid
  seen = [{r.tobytes() for p_step in (parts[i][s] for s in range(4)) for r in p_step["tokens"]}
          for i in range(3)]
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  # Exact resume: the iterator state the checkpoint saves restores the stream.
  assert_resumes_exactly(data.train, 6, 1, process_count=1, process_index=0)
  # The loop's input (make_train_iterator) feeds the task's classifier, built from its description,
  # which keeps the class names; a gradient step lowers the loss on that batch.
  import jax
  import optax
  from flax import nnx
  from jembed import modelspec
  spec = task.model_spec()
  assert spec["class_names"] == meta["classes"]
  model = modelspec.build(spec, nnx.Rngs(params=0, dropout=0))
  model.eval()
  batch = next(pipeline.make_train_iterator(data.train, 6, seed=0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
  loss_of = lambda m: task.loss(m, batch, jax.random.key(0), train=False)[0]

  @nnx.jit
  def step(m, opt):
    loss, grads = nnx.value_and_grad(loss_of)(m)
    opt.update(m, grads)
    return loss
  before, after = step(model, optimizer), step(model, optimizer)
  assert np.isfinite(before) and after < before


def test_prepared_labelled_bad_input_is_one_line(labelled_file, prepared, tmp_path):
  out, _ = prepared
  for over, problem in (({"data.seq_len": 32}, "holds rows of seq_len=24"),
                        ({"data.streams": 2, "data.prepared": ""}, "applies only to data.prepared")):
    task = get_task(labelled_config(labelled_file, **{"data.prepared": out, **over}), str(tmp_path))
    with pytest.raises(UserError, match=problem):
      task.load_data()
  contrastive = apply_overrides(load_config_file("contrastive_text"), {"data.prepared": out})
  with pytest.raises(UserError, match="holds labeled_text rows, this task reads pairs"):
    get_task(contrastive, str(tmp_path / "c")).load_data()
  # A bad record stops prepare with one line naming file:line, and nothing is written.
  with pytest.raises(UserError, match=r"train\.jsonl:121: needs a string 'text' and a 'label'"):
    prepare.prepare(labelled_config(labelled_file), str(tmp_path / "x"), shards=SHARDS,
                    log=lambda _: None)
  with pytest.raises(UserError, match="needs data.train"):
    prepare.prepare(labelled_config(""), str(tmp_path / "x"), shards=SHARDS, log=lambda _: None)
  # An eval label that training never saw: refused in one line, or skipped and counted.
  clean = tmp_path / "clean.jsonl"
  clean.write_text("".join(open(labelled_file).readlines()[:120]))
  ev = tmp_path / "eval.jsonl"
  ev.write_text('{"text": "a socket reads bytes", "label": "network"}\n'
                '{"text": "an unknown topic", "label": "cooking"}\n')
  with pytest.raises(UserError, match=r"eval labels \['cooking'\] never occur"):
    prepare.prepare(labelled_config(str(clean), **{"data.eval": str(ev)}), str(tmp_path / "x"),
                    shards=SHARDS, log=lambda _: None)
  assert not os.path.exists(tmp_path / "x")
  meta = prepare.prepare(labelled_config(str(clean), **{"data.eval": str(ev), "data.on_bad_record": "skip"}),
                         str(tmp_path / "y"), shards=SHARDS, log=lambda _: None)
  assert meta["eval"]["rows"] == 1 and meta["skipped_records"] == 1 and meta["train_rows"] == 120
  assert not os.path.exists(tmp_path / "x")
  image = load_config_file("finetune_image")
  with pytest.raises(UserError, match="not 'classification' \\(images\\)"):
    prepare.prepare(image, str(tmp_path / "x"), shards=SHARDS, log=lambda _: None)
  pipeline.reset_bad_records()
