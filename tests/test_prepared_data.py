"""Input at scale: `python -m jembed.data.prepare` (ArrayRecord shards), training that streams each
process's own shards of it (data.prepared, data.streams), and the token cache of text files
(data.cache_dir).

References are the in-memory path: `documents.load_documents` -> `build_tokenizer` -> `pack_documents`,
and a one-process run with the same number of streams."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from jembed import checkpoint, train
from jembed.data import corpus_embedded, documents, packing, prepare, shards, sources, streaming, wordpiece
from jembed.errors import UserError
from jembed.tasks import get_task
from spine_helpers import ROOT, assert_resumes_exactly, read_shard, tiny_mlm_config, write_corpus

SHARDS = 4
RUN = dict(total_steps=4, log_every=1, eval_every=4, checkpoint_every=2, keep_checkpoints=10,
           learning_rate=0.01, warmup_steps=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("prep") / "corpus")
  meta = prepare.prepare(tiny_mlm_config(corpus), out, shards=SHARDS, log=lambda _: None)
  return out, meta


# ------------------------------------------------------------------------------ prepare


def test_prepare_rows_and_tokenizer_equal_the_in_memory_path(corpus, prepared):
  out, meta = prepared
  config = tiny_mlm_config(corpus)
  train_docs, eval_docs = documents.load_documents(config.data)
  tok = wordpiece.build_tokenizer(train_docs, config.data.vocab_size)
  rows = packing.pack_documents(train_docs, tok, 32)
  held = packing.pack_documents(eval_docs, tok, 32)

  saved = wordpiece.build_tokenizer((), 0, path=os.path.join(out, "tokenizer.json"))
  assert saved.to_str() == tok.to_str()
  # Row j of the packed stream is dealt to shard j % SHARDS: each shard is a stride of the rows.
  sizes = [s["rows"] for s in meta["shards"]]
  assert sum(sizes) == meta["train_rows"] == len(rows) and max(sizes) - min(sizes) <= 1
  for i, s in enumerate(meta["shards"]):
    assert s["file"] == f"train-{i:05d}-of-{SHARDS:05d}.array_record"
    np.testing.assert_array_equal(read_shard(os.path.join(out, s["file"])), rows[i::SHARDS])
  np.testing.assert_array_equal(read_shard(os.path.join(out, meta["eval"]["file"])), held)

  on_disk = json.load(open(os.path.join(out, "prepared.json")))
  assert on_disk == json.loads(json.dumps(meta))
  import hashlib
  assert meta["tokenizer_sha256"] == hashlib.sha256(
      open(os.path.join(out, "tokenizer.json"), "rb").read()).hexdigest()
  assert meta["seq_len"] == 32 and meta["vocab_size"] == tok.get_vocab_size()
  assert meta["special_ids"] == wordpiece.special_ids(tok)
  freq = packing.token_frequencies(rows, tok.get_vocab_size(), special=wordpiece.special_ids(tok).values())
  assert meta["most_frequent"] == int(np.argmax(freq))


def test_prepare_with_explicit_eval_files_and_a_given_tokenizer(corpus, prepared, tmp_path):
  docs = open(corpus).read().splitlines()
  (tmp_path / "a.txt").write_text("\n".join(docs[:200]) + "\n")
  (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[200:260])
                                    + "not json\n")
  (tmp_path / "held.txt").write_text("\n".join(docs[260:]) + "\n")
  config = tiny_mlm_config(f"{tmp_path}/a.txt,{tmp_path}/b.jsonl")
  config.data.eval = str(tmp_path / "held.txt")
  config.data.tokenizer = os.path.join(prepared[0], "tokenizer.json")
  config.data.seq_len = 20
  config.data.on_bad_record = "skip"
  out = str(tmp_path / "prep")
  meta = prepare.prepare(config, out, shards=3, log=lambda _: None)
  assert meta["skipped_records"] == 1
  tok = wordpiece.build_tokenizer((), 0, path=config.data.tokenizer)
  train_docs, eval_docs = documents.load_documents(config.data)
  rows = packing.pack_documents(train_docs, tok, 20)
  got = np.concatenate([read_shard(os.path.join(out, s["file"])) for s in meta["shards"]])
  # As multisets: the same rows, dealt to three shards.
  np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(rows, axis=0))
  assert len(got) == len(rows)
  np.testing.assert_array_equal(read_shard(os.path.join(out, "eval.array_record")),
                                packing.pack_documents(eval_docs, tok, 20))


def test_prepare_refuses_bad_input_in_one_line_and_writes_nothing(corpus, prepared, tmp_path):
  out = tmp_path / "never"
  cmd = [sys.executable, "-m", "jembed.data.prepare", f"--config={ROOT}/configs/mlm.py",
         f"--out={out}", f"--config.data.train={tmp_path}/missing/*.txt"]
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().count("\n") == 0 and "matches no files" in r.stderr
  assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".never")]

  # An existing, non-empty --out is refused and left as it was; --overwrite replaces it.
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "keep.txt").write_text("mine")
  with pytest.raises(UserError, match="exists and is not empty.*--overwrite"):
    prepare.prepare(tiny_mlm_config(corpus), str(existing), shards=2, log=lambda _: None)
  assert os.listdir(existing) == ["keep.txt"]
  # A failure mid-build (too many shards for the rows) leaves the old directory intact.
  small = tmp_path / "small.txt"
  small.write_text("\n".join(open(corpus).read().splitlines()[:6]) + "\n")
  with pytest.raises(UserError, match="fewer than --shards=64"):
    prepare.prepare(tiny_mlm_config(str(small)), str(existing), shards=64, overwrite=True,
                    log=lambda _: None)
  assert os.listdir(existing) == ["keep.txt"]
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".existing")]


# ------------------------------------------------------------------------------ streams


def opened_files(monkeypatch):
  """Records every ArrayRecord file a reader is opened on."""
  from array_record.python import array_record_data_source as ards
  opened = []
  original = ards._create_reader

  def create(filename, options):
    opened.append(os.path.basename(os.fspath(filename)))
    return original(filename, options)
  monkeypatch.setattr(ards, "_create_reader", create)
  return opened


def test_each_process_reads_only_its_shards_and_the_union_is_the_global_batch(prepared, monkeypatch):
  out, _ = prepared
  _, source = streaming.open_prepared(out, streams=2)
  one = source.train_iterator(16, 7, process_count=1, process_index=0)
  want = [next(one)["tokens"] for _ in range(6)]
  got = {}
  for p in range(2):
    opened = opened_files(monkeypatch)
    it = source.train_iterator(16, 7, process_count=2, process_index=p)
    got[p] = [next(it)["tokens"] for _ in range(6)]
    # Streams: shard i belongs to stream i % 2; process p owns stream p.
    assert set(opened) == {shards.shard_name(i, SHARDS) for i in range(p, SHARDS, 2)}, opened
  for step in range(6):
    assert got[0][step].shape == (8, 32)
    np.testing.assert_array_equal(np.concatenate([got[0][step], got[1][step]]), want[step])
  # Each stream walks a shuffled order of its own rows, reshuffled per epoch.
  rows = np.concatenate(want)
  assert len(np.unique(rows, axis=0)) > len(rows) // 2

  # data.streams is read: one stream gives other batches than two.
  _, single = streaming.open_prepared(out, streams=1)
  other = single.train_iterator(16, 7, process_count=1, process_index=0)
  assert not np.array_equal(next(other)["tokens"], want[0])
  # 0 = one stream per process.
  _, auto = streaming.open_prepared(out, streams=0)
  assert auto.stream_count(2) == 2 and auto.stream_count(1) == 1

  # The iterator state restores the stream exactly (what the checkpoint saves).
  assert_resumes_exactly(source, 16, 7, steps=2, process_count=2, process_index=1)


@pytest.mark.parametrize("streams, batch, procs, message", [
    (3, 16, 2, "data.streams=3 does not divide over 2 JAX processes"),
    (2, 15, 1, "batch_size=15 does not split into data.streams=2"),
    (8, 16, 1, "has 4 shards, fewer than the 8 streams.*--shards a multiple of 8"),
])
def test_stream_sizes_that_do_not_fit_are_one_line(prepared, streams, batch, procs, message):
  _, source = streaming.open_prepared(prepared[0], streams=streams)
  with pytest.raises(UserError, match=message):
    source.dataset(batch, 0, process_count=procs, process_index=0)


def test_training_config_mismatches_are_refused(corpus, prepared, tmp_path):
  out, _ = prepared
  config = tiny_mlm_config(corpus, **{"data.prepared": out, "data.seq_len": 16})
  with pytest.raises(UserError, match="data.seq_len=16 .* seq_len=32"):
    get_task(config, str(tmp_path / "w")).load_data()
  other = str(tmp_path / "other.json")
  wordpiece.build_tokenizer(corpus_embedded.embedded_documents()[:50], 200, save_to=other)
  config = tiny_mlm_config(corpus, **{"data.prepared": out, "data.tokenizer": other})
  with pytest.raises(UserError, match="data.tokenizer .* differs from the tokenizer of data.prepared"):
    get_task(config, str(tmp_path / "w")).load_data()
  config = tiny_mlm_config(corpus, **{"data.streams": 2})
  with pytest.raises(UserError, match="data.streams=2 applies only to data.prepared"):
    get_task(config, str(tmp_path / "w")).load_data()
  # A tokenizer.json swapped after preparing does not match the rows: refused.
  swapped = tmp_path / "swapped"
  shutil.copytree(out, swapped)
  shutil.copy(other, swapped / "tokenizer.json")
  with pytest.raises(UserError, match="is not the tokenizer the rows .* were made with"):
    get_task(tiny_mlm_config(corpus, **{"data.prepared": str(swapped)}), str(tmp_path / "w")).load_data()
  with pytest.raises(UserError, match="has no prepared.json"):
    get_task(tiny_mlm_config(corpus, **{"data.prepared": str(tmp_path)}), str(tmp_path / "w")).load_data()


def test_prepared_task_reads_the_corpus_metadata(corpus, prepared, tmp_path):
  out, meta = prepared
  config = tiny_mlm_config(corpus, **{"data.prepared": out, "eval_batches": 2})
  task = get_task(config, str(tmp_path / "w"))
  data = task.load_data()
  assert isinstance(data.train, streaming.PreparedTrain) and len(data.train) == meta["train_rows"]
  assert data.eval["tokens"].shape == (2 * config.batch_size, 32)   # eval_batches x batch_size read
  np.testing.assert_array_equal(data.eval["tokens"],
                                read_shard(os.path.join(out, "eval.array_record"))[:32])
  assert task.most_frequent == meta["most_frequent"] and task.vocab == meta["vocab_size"]


# ------------------------------------------------------------------------------ training on it


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"]


def final_params(workdir):
  import jax
  state, step = checkpoint.restore_params_only(workdir)
  return step, {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(state)}


@pytest.fixture(scope="module")
def one_process_run(corpus, prepared, tmp_path_factory):
  """An uninterrupted one-process run on the prepared corpus with two streams."""
  workdir = str(tmp_path_factory.mktemp("one") / "run")
  config = tiny_mlm_config(corpus, **dict(RUN, **{"data.prepared": prepared[0], "data.streams": 2}))
  train.train_and_evaluate(config, workdir)
  return workdir


def test_resume_on_a_prepared_corpus_equals_an_uninterrupted_run(corpus, prepared, one_process_run,
                                                                 tmp_path):
  workdir = str(tmp_path / "resumed")
  config = tiny_mlm_config(corpus, **dict(RUN, **{"data.prepared": prepared[0], "data.streams": 2,
                                                  "stop_after_steps": 2}))
  train.train_and_evaluate(config, workdir)
  assert checkpoint.latest_step(workdir) == 2
  train.train_and_evaluate(config, workdir)
  assert losses(workdir) == losses(one_process_run)
  (step, params), (ref_step, ref) = final_params(workdir), final_params(one_process_run)
  assert step == ref_step == 4 and params.keys() == ref.keys()
  for k in ref:
    assert np.array_equal(params[k], ref[k]), k


def test_two_processes_on_a_prepared_corpus_match_one_with_two_streams(corpus, prepared,
                                                                       one_process_run, tmp_path):
  workdir = str(tmp_path / "two")
  settings = dict(RUN, **{"model.num_layers": 1, "model.hidden_size": 32, "model.num_heads": 2,
                          "model.mlp_dim": 64, "model.max_position": 64, "data.vocab_size": 512,
                          "data.seq_len": 32, "batch_size": 16, "eval_batches": 2,
                          "async_checkpointing": False, "data.prepared": prepared[0],
                          "data.train": corpus})   # data.streams left at 0: one per process
  flags = [f"--config.{k}={v}" for k, v in settings.items()]
  port = free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid))
    cmd = [sys.executable, "-m", "jembed.main", f"--config={ROOT}/configs/mlm.py",
           f"--workdir={workdir}", "--distributed=true", *flags]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    outs.append(out)
  # One job over both processes: 8 global devices, only process 0 reports and writes.
  assert "streams=2" in outs[0] and "devices=8" in outs[0] and "[train] step 4" in outs[0]
  assert "[train]" not in outs[1]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
  got, want = losses(workdir), losses(one_process_run)
  assert [s for s, _ in got] == [s for s, _ in want]
  np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5)


# ------------------------------------------------------------------------------ token cache


def cache_files(root):
  return sorted(os.listdir(root)) if os.path.isdir(root) else []


def test_token_cache_hit_miss_and_off(corpus, tmp_path, monkeypatch):
  src = tmp_path / "corpus.txt"
  shutil.copy(corpus, src)
  workdir = str(tmp_path / "w")
  config = tiny_mlm_config(str(src))
  ref_docs, ref_eval = documents.load_documents(config.data)
  ref_tok = wordpiece.build_tokenizer(ref_docs, 512)
  ref = packing.pack_documents(ref_docs, ref_tok, 32)

  task = get_task(config, workdir)
  data = task.load_data()
  assert data.info["token_cache"].startswith("miss")
  task.save_artifacts()   # the run's checks passed: tokenizer and cache entry written
  root = os.path.join(workdir, "cache")
  assert len(cache_files(root)) == 1

  # A restart reads neither documents nor tokenizes: both are made to fail.
  def boom(*a, **k):
    raise AssertionError("read or tokenized on a cache hit")
  with monkeypatch.context() as m:
    m.setattr(documents, "load_documents", boom)
    m.setattr(packing, "pack_documents", boom)
    m.setattr(wordpiece, "tokenizer_from_word_counts", boom)
    task = get_task(config, workdir)
    data = task.load_data()
  assert data.info["token_cache"].startswith("hit")
  np.testing.assert_array_equal(data.train["tokens"], ref)
  np.testing.assert_array_equal(data.eval["tokens"], packing.pack_documents(ref_eval, ref_tok, 32))
  assert task.most_frequent == int(np.argmax(packing.token_frequencies(ref, 512, special=task.ids.values())))

  # A changed file (same size, new mtime) is a miss; the stale entry goes when the new is written.
  st = os.stat(src)
  os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  task = get_task(config, workdir)
  assert task.load_data().info["token_cache"].startswith("miss")
  old = cache_files(root)
  task.save_artifacts()
  assert len(cache_files(root)) == 1 and cache_files(root) != old

  # Another tokenizer is a miss too.
  other = str(tmp_path / "other.json")
  wordpiece.build_tokenizer(ref_docs, 300, save_to=other)
  config_tok = tiny_mlm_config(str(src), **{"data.tokenizer": other})
  task = get_task(config_tok, workdir)
  data = task.load_data()
  assert data.info["token_cache"].startswith("miss") and task.vocab == 300

  # Records skipped by the read that filled the cache are reported again on a hit.
  from jembed.data import pipeline
  bad = tmp_path / "bad.jsonl"
  bad.write_text("".join(json.dumps({"text": d}) + "\n" for d in ref_docs[:120]) + "not json\n")
  config_bad = tiny_mlm_config(str(bad), **{"data.on_bad_record": "skip", "data.tokenizer": other})
  counts = []
  for _ in range(2):
    pipeline.reset_bad_records()
    task = get_task(config_bad, str(tmp_path / "w_bad"))
    how = task.load_data().info["token_cache"]
    task.save_artifacts()
    counts.append((how.split()[0], pipeline.bad_records()))
  assert counts[0][0] == "miss" and counts[1][0] == "hit"
  assert counts[0][1] == counts[1][1] and counts[0][1]["skipped"] == 1

  # A named cache directory is used; 'none' writes nothing.
  named = str(tmp_path / "named")
  task = get_task(tiny_mlm_config(str(src), **{"data.cache_dir": named}), str(tmp_path / "w2"))
  task.load_data()
  task.save_artifacts()
  assert len(cache_files(named)) == 1 and not os.path.exists(tmp_path / "w2" / "cache")
  task = get_task(tiny_mlm_config(str(src), **{"data.cache_dir": "none"}), str(tmp_path / "w3"))
  assert task.load_data().info["token_cache"] == "off"
  task.save_artifacts()
  assert not os.path.exists(tmp_path / "w3" / "cache")

  # The embedded corpus has nothing to cache: a cache_dir there is refused rather than ignored.
  config = tiny_mlm_config("", **{"data.cache_dir": named})
  with pytest.raises(UserError, match="data.cache_dir=.* applies only to text files"):
    get_task(config, str(tmp_path / "w4")).load_data()


def test_prepare_holds_out_like_split_train_eval_on_a_tiny_corpus(corpus, tmp_path):
  """No document hashes below eval_fraction=0.001 in 40: split_train_eval then holds out the one
  with the lowest hash, and prepare (one streaming pass) must do the same."""
  small = tmp_path / "small.txt"
  lines = open(corpus).read().splitlines()[:40]
  # One line that is not UTF-8, skipped: counted once in prepared.json although read in two passes.
  small.write_bytes(("\n".join(lines[:20]) + "\n").encode() + b"\xff\xfe bad\n"
                    + ("\n".join(lines[20:]) + "\n").encode())
  config = tiny_mlm_config(str(small), **{"data.eval_fraction": 0.001, "data.on_bad_record": "skip"})
  train_docs, eval_docs = documents.load_documents(config.data)
  assert len(eval_docs) == 1 and not any(sources.hash_unit(d) < 0.001 for d in eval_docs)
  meta = prepare.prepare(config, str(tmp_path / "prep"), shards=1, log=lambda _: None)
  assert meta["skipped_records"] == 1
  tok = wordpiece.build_tokenizer(train_docs, 512)
  np.testing.assert_array_equal(read_shard(str(tmp_path / "prep" / meta["shards"][0]["file"])),
                                packing.pack_documents(train_docs, tok, 32))
  np.testing.assert_array_equal(read_shard(str(tmp_path / "prep" / "eval.array_record")),
                                packing.pack_documents(eval_docs, tok, 32))
