"""Multi-process input of the in-memory pipeline: every process walks the same seeded global order
and takes its slice of each global batch, so the processes' local batches, concatenated, are the
one-process global batch.

The real two-process job (`jembed.main` in two JAX processes over loopback, gloo collectives) is
`tests/test_prepared_data.py::test_two_processes_on_a_prepared_corpus_match_one_with_two_streams`:
it checks their losses against one 8-device process. The end of a run on two processes (summaries,
evaluations, LoRA exports) is the two-process job at the bottom of this file."""
import jax
import numpy as np

from jembed.data import pipeline


def batches(columns, monkeypatch, count, index, steps=5):
  with monkeypatch.context() as m:
    m.setattr(jax, "process_count", lambda: count)
    m.setattr(jax, "process_index", lambda: index)
    it = pipeline.train_iterator(columns, 8, seed=3, prefetch=0)
    train = [next(it)["x"] for _ in range(steps)]
    held = [b["x"] for b in pipeline.eval_batches(columns, 8, 0)]
  return train, held


def test_process_shares_are_disjoint_and_make_the_global_batch(monkeypatch):
  columns = {"x": np.arange(24 * 3).reshape(24, 3)}  # whole batches per epoch
  whole, whole_eval = batches(columns, monkeypatch, 1, 0)
  parts = [batches(columns, monkeypatch, 2, i) for i in range(2)]
  for step, global_batch in enumerate(whole):
    a, b = parts[0][0][step], parts[1][0][step]
    assert len(a) == len(b) == 4
    assert not set(a[:, 0]) & set(b[:, 0])                  # disjoint shares
    np.testing.assert_array_equal(np.concatenate([a, b]), global_batch)
  for step, global_batch in enumerate(whole_eval):
    np.testing.assert_array_equal(np.concatenate([parts[0][1][step], parts[1][1][step]]), global_batch)
  assert len(whole_eval) == 3


# ------------------------------------------------------------------------------ end of a run
# One two-process job (two JAX processes of 4 CPU devices over loopback, gloo collectives; the model
# sharded over all 8 devices with mesh.fsdp=8, so no process holds a whole parameter) runs three
# short fine-tunings to the end: LoRA classification (report + LoRA exports), contrastive training
# (retrieval evaluation + summary) and MLM with LoRA (merged export). Each must end as the same runs
# in one 8-device process do. Before the fix, process 0 alone ran the export and the retrieval model
# copy, and the job hung or crashed at the last step.
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from spine_helpers import ROOT, tiny_mlm_config, write_corpus, write_workdir  # noqa: E402

RUNNER = os.path.join(ROOT, "tests", "multiprocess_runner.py")
SHARED = {"total_steps": 2, "batch_size": 16, "warmup_steps": 1, "log_every": 1, "eval_every": 2,
          "eval_batches": 1, "async_checkpointing": False, "mesh.data": 1, "mesh.fsdp": 8,
          "data.seq_len": 32, "model.dropout": 0.0, "model.attention_dropout": 0.0}


def _jobs(root, pretrained, labelled, pairs):
  lora = {"peft.method": "lora", "peft.rank": 4, "init.checkpoint": pretrained}
  return [
      dict(config="finetune_text", workdir=os.path.join(root, "cls"),
           overrides=dict(SHARED, **lora, **{"data.train": labelled[0], "data.eval": labelled[1]})),
      dict(config="contrastive_text", workdir=os.path.join(root, "ct"),
           overrides=dict(SHARED, **{"init.checkpoint": pretrained, "data.train": pairs[0],
                                     "data.eval": pairs[1], "data.num_negatives": 0,
                                     "retrieval_batch": 16})),
      dict(config="mlm", workdir=os.path.join(root, "mlm"),
           overrides=dict(SHARED, **lora, **{"data.train": pairs[2], "data.eval_fraction": 0.2})),
  ]


@pytest.fixture(scope="module")
def end_of_run_inputs(tmp_path_factory):
  from jembed.data import labeled_text, pairs as pairs_lib
  root = tmp_path_factory.mktemp("end_of_run")
  corpus = write_corpus(str(root))
  pretrained = str(root / "pretrained")
  write_workdir(tiny_mlm_config(corpus), pretrained)
  texts, labels = labeled_text.embedded_examples()
  labelled = []
  for name, offset, n in (("train.jsonl", 0, 64), ("test.jsonl", 3, 24)):
    with open(root / name, "w") as f:
      for i in range(n):  # spread over the topics, which the embedded list holds in blocks
        j = (offset + i * 7) % len(texts)
        f.write(json.dumps({"text": texts[j], "label": labels[j]}) + "\n")
    labelled.append(str(root / name))
  train, held = pairs_lib.embedded_pairs()
  pair_files = []
  for name, rows in (("pairs.jsonl", train[:64]), ("held.jsonl", held[:24])):
    with open(root / name, "w") as f:
      for p in rows:
        f.write(json.dumps({"anchor": p.anchor, "positive": p.positive}) + "\n")
    pair_files.append(str(root / name))
  return root, pretrained, labelled, pair_files + [corpus]


@pytest.fixture(scope="module")
def end_of_run(end_of_run_inputs):
  """(one-process root, two-process root, the two processes' stdout)."""
  from spine_helpers import apply_overrides, load_config_file
  from jembed import train
  root, *inputs = end_of_run_inputs
  two = _jobs(str(root / "two"), *inputs)
  jobs_path = root / "jobs.json"
  jobs_path.write_text(json.dumps(two))
  port = free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=ROOT,
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, RUNNER, str(jobs_path)], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  # The one-process runs go meanwhile, in this process (8 devices, the same mesh).
  for job in _jobs(str(root / "one"), *inputs):
    train.train_and_evaluate(apply_overrides(load_config_file(job["config"]), job["overrides"]),
                             job["workdir"])
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, err[-4000:]
    outs.append(out)
  return str(root / "one"), str(root / "two"), outs


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _rows(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def _close_trees(a, b):
  from jembed import tree
  fa, fb = tree.flatten(a), tree.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), rtol=1e-4, atol=1e-5, err_msg=k)


def _same_lora_exports(one, two):
  from jembed.peft import export
  _close_trees(export.load_params(os.path.join(one, export.MERGED_DIR)),
               export.load_params(os.path.join(two, export.MERGED_DIR)))
  adapters = [os.path.join(w, export.ADAPTER_DIR) for w in (one, two)]
  configs = [json.load(open(os.path.join(a, "lora_config.json"))) for a in adapters]
  assert configs[0] == configs[1]          # the same settings and base fingerprint
  _close_trees(export.load_params(os.path.join(adapters[0], "state")),
               export.load_params(os.path.join(adapters[1], "state")))
  for w in (one, two):  # nothing but the exports (no temporary directory left behind)
    assert not [n for n in os.listdir(w) if ".tmp-" in n or n.endswith(".old")], os.listdir(w)


def _same_losses(one, two):
  for split in ("train", "eval"):
    a, b = _rows(one, split), _rows(two, split)
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-4)


@pytest.mark.slow
def test_two_processes_end_lora_classification_as_one(end_of_run):
  one, two, outs = end_of_run
  one, two = os.path.join(one, "cls"), os.path.join(two, "cls")
  _same_losses(one, two)
  reports = [json.load(open(os.path.join(w, "classification_report.json"))) for w in (one, two)]
  assert reports[0] and reports[0] == reports[1]
  assert os.path.exists(os.path.join(two, "confusion_matrix.png"))
  _same_lora_exports(one, two)
  assert "classification report on the whole eval split" in outs[0]
  assert "classification report" not in outs[1]   # only process 0 reports


@pytest.mark.slow
def test_two_processes_end_contrastive_with_retrieval_as_one(end_of_run):
  one, two, outs = end_of_run
  one, two = os.path.join(one, "ct"), os.path.join(two, "ct")
  _same_losses(one, two)
  a, b = _rows(one, "eval")[-1], _rows(two, "eval")[-1]
  for k in ("recall@1", "recall@10", "mrr@10", "ndcg@10"):
    assert k in b
    np.testing.assert_allclose(b[k], a[k], atol=1e-6, err_msg=k)
  assert "held-out retrieval (24 queries)" in outs[0] and "held-out retrieval" not in outs[1]


@pytest.mark.slow
def test_two_processes_end_mlm_with_merged_lora_export_as_one(end_of_run):
  one, two, _ = end_of_run
  one, two = os.path.join(one, "mlm"), os.path.join(two, "mlm")
  _same_losses(one, two)
  _same_lora_exports(one, two)
