"""The memory planner (jembed/plan.py): every figure in its output, per-device parameter bytes
against a hand computation, the batch search, and one-line refusals of bad input."""
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jembed import plan
from spine_helpers import ROOT, tiny_mlm_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(str(tmp_path_factory.mktemp("corpus")))


def _tiny_bert_params(vocab: int) -> list[tuple[tuple[int, ...], bool]]:
  """Every parameter of tiny_mlm_config's BERT (hidden 32, mlp 64, 1 layer, 64 positions, 2 token
  types), written out from BERT's architecture, with whether it has a hidden (`embed`)
  dimension: the one FSDP splits."""
  h, mlp, pos = 32, 64, 64
  p = [((vocab, h), True), ((pos, h), True), ((2, h), True), ((h,), True), ((h,), True)]  # embeddings + LN
  for _ in ("query", "key", "value", "out"):
    p += [((h, h), True), ((h,), False)]
  p += [((h,), True), ((h,), True)]  # attention LN
  p += [((h, mlp), True), ((mlp,), False), ((mlp, h), True), ((h,), True), ((h,), True), ((h,), True)]
  p += [((h, h), True), ((h,), True), ((h,), True), ((h,), True), ((vocab,), False)]  # MLM head
  return p


def test_parameter_bytes_match_hand_computation(corpus):
  """data=8 holds every parameter on every device; fsdp=8 an eighth of each leaf with a hidden
  dimension and at least MIN_SHARD_ELEMENTS elements, the rest whole."""
  got = {}
  for name, mesh in (("data", (8, 1)), ("fsdp", (1, 8))):
    config = tiny_mlm_config(corpus, **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1]})
    setup = plan.build_setup(config, jax.devices())
    state = plan.abstract_state(setup)
    got[name] = plan.per_device_bytes((state.params, state.frozen))
    vocab = setup.task.vocab
    n_opt = plan.per_device_bytes(state.opt_state)
  params = _tiny_bert_params(vocab)
  assert sum(math.prod(s) for s, _ in params) == sum(x.size for x in jax.tree.leaves(setup.abs_params))
  assert got["data"] == 4 * sum(math.prod(s) for s, _ in params)
  fsdp = sum(math.prod(s) // 8 if embed and math.prod(s) >= plan_min() else math.prod(s)
             for s, embed in params)
  assert got["fsdp"] == 4 * fsdp
  # Adam keeps two moments shaped and sharded like the parameters, plus scalar counts.
  assert 2 * got["fsdp"] <= n_opt <= 2 * got["fsdp"] + 64


def plan_min():
  from jembed.sharding import MIN_SHARD_ELEMENTS
  return MIN_SHARD_ELEMENTS


def test_output_has_every_figure(corpus):
  config = tiny_mlm_config(corpus, **{"mesh.data": 2, "mesh.fsdp": 4})
  r = plan.plan(config, jax.devices(), "tpu-v5e", batch=32, search=False)  # config: 16
  text = plan.format_plan(r)
  for label in ("parameters", "optimizer state", "arguments", "temporaries", "generated code",
                "total", "tpu-v5e (16.0 GiB HBM): fits", "suggested mesh: --config.mesh.data=8",
                "compute dtype 'auto' planned as bfloat16"):
    assert label in text, (label, text)
  # The compiled step's arguments are the state and the batch, one device's shard of each.
  assert r["batch"] == 32
  batch = 32 // 8 * 32 * 4  # int32 tokens, 4 sequences of 32 per device
  state = r["param_bytes"] + r["optimizer_bytes"] + r["model_state_bytes"]
  assert abs(r["arguments"] - (state + batch)) <= 64, (r["arguments"], state + batch)
  assert r["total"] == r["arguments"] + r["outputs"] - r["aliased"] + r["temporaries"] + r["generated_code"]
  assert r["fits"] and r["total"] < 16 * 2**30


def test_largest_batch_search():
  """Against memory models whose answer is known: the largest shards*2^k with measure <= hbm."""
  affine = lambda c, s: (lambda b: c + s * b)
  # A flat stretch (CPU buffer assignment rounds small batches up), then a jump.
  step = lambda b: 2.2e9 if b < 5000 else 2.2e9 * b / 64
  for measure, hbm, b0, shards, limit in ((affine(1000, 10), 1e6, 16, 8, 4), (affine(5e5, 3), 6e5, 16, 8, 4),
                                          (affine(2e6, 1), 1e6, 16, 8, 3), (step, 16e9, 64, 64, 8)):
    calls = []
    largest, tried = plan.largest_batch(lambda b: (calls.append(b), measure(b))[1], b0, shards, hbm)
    fits = [shards * 2**k for k in range(30) if shards * 2**k <= plan.MAX_BATCH and measure(shards * 2**k) <= hbm]
    assert largest == (max(fits) if fits else None)
    assert len(calls) <= limit and set(tried) == set(calls) and len(calls) == len(set(calls))


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "jembed.plan", "--config", os.path.join(ROOT, "configs", "mlm.py"),
                         *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("args, words", [
    (("--devices", "6", "--config.mesh.data=4"), "mesh"),
    (("--devices", "8", "--accelerator", "tpu-v9"), "tpu-v9"),
    ((), "--devices is required"),
    (("--devices", "2", "--config.totl_steps=3"), "did you mean 'total_steps'"),
])
def test_bad_input_is_one_line(args, words):
  r = _cli(*args)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and words in lines[0] and r.stdout == "", r.stderr
