"""jembed.serve: the OpenAI-compatible embeddings server, on loopback, called with the real `openai`
client. Vectors equal `jembed.load(M).embed` (float and base64, texts and token ids, Matryoshka
`dimensions`); concurrent clients each get exactly their own vectors in order; 400 / 401 / 413 /
429 in OpenAI's error shape; /metrics counts; /health is open with a key; /v1/search over an index.

One tiny BERT (a Hugging Face directory declaring Matryoshka widths) is built per module, and two
servers share it: the main one (API key, 64 KiB request limit, no truncation) and a small one
(queue of 1, --truncate) whose worker a test blocks to make the 429 deterministic.
"""
from __future__ import annotations

import base64
import functools
import json
import socket
import threading
import time

import numpy as np
import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import jembed  # noqa: E402
from jembed.errors import UserError  # noqa: E402
from jembed.serve.app import create_app  # noqa: E402
from jembed.serve.batcher import Batcher, QueueFull  # noqa: E402

# A first request may compile a batch shape: on a busy 2-core machine that takes longer than httpx's
# default 5 s.
post = functools.partial(httpx.post, timeout=60)
get = functools.partial(httpx.get, timeout=60)
KEY = "sk-test-key"
MAX_BYTES = 64 * 1024
TEXTS = ["Hello world", "the quick brown fox jumps over the lazy dog", "a", "",
         "tokens attend to each other and write hidden states", "embedding maps text to numbers"]
LONG = "the quick brown fox " * 20  # far over the 16-token maximum


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  import jax
  from flax import nnx
  from jembed import hf
  from jembed.data import wordpiece
  from jembed.hf.io import abstract_module
  from jembed.models.transformer import TransformerConfig, TransformerEncoder
  tokenizer = wordpiece.build_tokenizer(TEXTS * 3 + [LONG], 120)
  cfg = TransformerConfig(num_layers=1, hidden_size=32, num_heads=4, mlp_dim=64,
                          vocab_size=tokenizer.get_vocab_size(), max_position=32)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32), nnx.to_pure_dict(
      nnx.state(abstract_module(lambda rngs: TransformerEncoder(cfg, rngs=rngs)), nnx.Param)))
  path = str(tmp_path_factory.mktemp("serve") / "tiny-bert")
  hf.save_dir(path, encoder_config=cfg, params=params, tokenizer=tokenizer, pooling="mean",
              normalize=True, max_seq_length=16)
  with open(f"{path}/config.json") as f:
    config = json.load(f)
  config["matryoshka_dimensions"] = [8, 16]
  with open(f"{path}/config.json", "w") as f:
    json.dump(config, f)
  return path


@pytest.fixture(scope="module")
def model(model_dir):
  return jembed.load(model_dir)


class Server:
  """uvicorn serving `app` on a free loopback port, in a thread, for the module."""

  def __init__(self, app):
    self.app = app
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    self.port = sock.getsockname()[1]
    self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
    self.thread.start()
    for _ in range(500):
      if self.server.started:
        break
      time.sleep(0.01)
    assert self.server.started, "the server did not start"
    self.url = f"http://127.0.0.1:{self.port}"

  def stop(self):
    self.server.should_exit = True
    self.thread.join(10)


@pytest.fixture(scope="module")
def server(model):
  s = Server(create_app(model, served_model_name="tiny", api_key=KEY, max_batch_tokens=128,
                        max_request_bytes=MAX_BYTES))
  yield s
  s.stop()


@pytest.fixture(scope="module")
def small_server(model):
  s = Server(create_app(model, served_model_name="tiny", max_queue=1, truncate=True))
  yield s
  s.stop()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference(model, texts, **kw):
  """`jembed.load(M).embed`, in batches of 8 rows: the shape the server's batches of up to 8 rows
  compile to here (8 devices), so the module compiles the model once (batch size does not change
  the vectors: test_embed checks that)."""
  return model.embed(texts, batch_size=8, **kw)


def error_of(response) -> dict:
  body = response.json()
  assert set(body["error"]) == {"message", "type", "param", "code"}
  return body["error"]


# ----------------------------------------------------------------------------- vectors


def test_float_and_base64_equal_embed(client, model):
  want = reference(model, TEXTS)
  for fmt in ("float", "base64"):
    res = client.embeddings.create(model="tiny", input=TEXTS, encoding_format=fmt)
    got = [d.embedding for d in res.data]
    if fmt == "base64":  # asked for explicitly, the client hands the strings over as they came
      got = [np.frombuffer(base64.b64decode(g), "<f4") for g in got]
    assert [d.index for d in res.data] == list(range(len(TEXTS)))
    np.testing.assert_allclose(np.array(got, np.float32), want, atol=1e-6)
  # The client's default asks for base64 and decodes it; a single string is one input.
  res = client.embeddings.create(model="tiny", input=TEXTS[1])
  assert res.model == "tiny" and res.object == "list" and len(res.data) == 1
  np.testing.assert_allclose(res.data[0].embedding, want[1], atol=1e-6)
  # A large request is tokenized and encoded on the thread pool rather than the event loop.
  big = TEXTS * 60
  res = client.embeddings.create(model="tiny", input=big)
  np.testing.assert_allclose([d.embedding for d in res.data], np.tile(want, (60, 1)), atol=1e-6)
  tokens = sum(len(r) for r in model.tokenize(TEXTS))
  res = client.embeddings.create(model="tiny", input=TEXTS)
  assert res.usage.prompt_tokens == res.usage.total_tokens == tokens


def test_base64_is_little_endian_float32(server, model):
  r = post(server.url + "/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                 json={"input": ["Hello world"], "encoding_format": "base64", "model": "tiny"})
  raw = base64.b64decode(r.json()["data"][0]["embedding"])
  assert len(raw) == 4 * model.dim
  np.testing.assert_allclose(np.frombuffer(raw, "<f4"), reference(model, ["Hello world"])[0], atol=1e-6)


def test_token_ids_give_the_texts_vectors(client, model):
  ids = [list(map(int, r[1:-1])) for r in model.tokenize(TEXTS[:3])]  # word pieces, no [CLS]/[SEP]
  want = reference(model, TEXTS[:3])
  many = client.embeddings.create(model="tiny", input=ids, encoding_format="float")
  np.testing.assert_allclose([d.embedding for d in many.data], want, atol=1e-6)
  one = client.embeddings.create(model="tiny", input=ids[1], encoding_format="float")
  np.testing.assert_allclose(one.data[0].embedding, want[1], atol=1e-6)


def test_matryoshka_dimensions(client, model):
  res = client.embeddings.create(model="tiny", input=TEXTS, dimensions=8)
  got = np.array([d.embedding for d in res.data])
  assert got.shape == (len(TEXTS), 8)
  np.testing.assert_allclose(got, reference(model, TEXTS, dim=8), atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # re-normalised
  full = client.embeddings.create(model="tiny", input="a", dimensions=model.dim)
  assert len(full.data[0].embedding) == model.dim


def test_concurrent_clients_each_get_their_own_vectors(server, model):
  """16 threads x 3 requests of different inputs, all at once: each answer is its own, in order,
  and requests queued together shared batches."""
  rng = np.random.default_rng(1)
  words = " ".join(TEXTS).split()
  jobs = [[" ".join(rng.choice(words, size=rng.integers(1, 7))) for _ in range(rng.integers(1, 5))]
          for _ in range(48)]
  want = [reference(model, j) for j in jobs]
  metrics = server.app.state.metrics
  batches_before = metrics.batch_size.count()
  got: dict[int, np.ndarray] = {}
  errors = []

  def work(lo):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    try:
      for k in range(lo, len(jobs), 16):
        res = c.embeddings.create(model="tiny", input=jobs[k])
        got[k] = np.array([d.embedding for d in sorted(res.data, key=lambda d: d.index)])
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  # The worker is held in its first batch until all 16 clients have a request in, so the rest
  # are certainly queued together (batching is then deterministic, not a matter of timing).
  batcher = server.app.state.batcher
  run, gate = batcher.run, threading.Event()
  batcher.run = lambda rows, size: (gate.wait(60), run(rows, size))[1]
  threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
  try:
    for t in threads:
      t.start()
    for _ in range(1200):  # bounded: at most 60 s
      if batcher.pending >= 16:
        break
      time.sleep(0.05)
    assert batcher.pending == 16
  finally:
    gate.set()
    for t in threads:
      t.join(120)
    batcher.run = run
  assert not errors, errors[0]
  assert sorted(got) == list(range(len(jobs)))
  for k, j in enumerate(jobs):
    np.testing.assert_allclose(got[k], want[k], atol=1e-6, err_msg=f"request {k}: {j}")
  assert metrics.batch_size.count() - batches_before < len(jobs)  # requests shared batches


# ----------------------------------------------------------------------------- errors


def test_bad_requests_are_400_in_openai_shape(client):
  cases = [
      (dict(input=["x"] * 2049), "at most 2048"),
      (dict(input=LONG), "at most 16"),
      (dict(input=["ok", LONG]), "input[1]"),
      (dict(input="a", dimensions=12), "one of 8, 16, 32"),
      (dict(input="a", dimensions=0), "1..32"),
      (dict(input="a", encoding_format="float16"), "encoding_format"),
      (dict(input=[[1, 2], "mixed"]), "must be a string"),
      (dict(input=[[10 ** 6]]), "outside this model's vocabulary"),
      (dict(input=[[3, 2 ** 70]]), "token id 1180591620717411303424"),
      (dict(input=[]), "empty"),
  ]
  for kwargs, message in cases:
    with pytest.raises(openai.BadRequestError) as e:
      client.embeddings.create(model="tiny", **kwargs)
    assert e.value.status_code == 400
    assert message in e.value.body["message"], (kwargs, e.value.body)
    assert e.value.body["type"] == "invalid_request_error"


def test_dimensions_without_matryoshka_is_400(model_dir, tmp_path):
  """A model whose config.json declares no Matryoshka widths refuses `dimensions`; one that says
  is_matryoshka takes any width."""
  from jembed.embed import matryoshka_dims
  from jembed.serve.protocol import ApiError, check_dimensions
  with pytest.raises(ApiError) as e:
    check_dimensions(8, 32, ())
  assert e.value.status == 400 and "declares no Matryoshka dimensions" in e.value.message
  assert check_dimensions(32, 32, ()) is None and check_dimensions(12, 32, True) == 12
  assert matryoshka_dims(f"{model_dir}/config.json", 32) == (8, 16)
  (tmp_path / "config.json").write_text(json.dumps({"is_matryoshka": True}))
  assert matryoshka_dims(str(tmp_path / "config.json"), 32) is True
  (tmp_path / "config.json").write_text("{}")
  assert matryoshka_dims(str(tmp_path / "config.json"), 32) == ()
  (tmp_path / "config.json").write_text(json.dumps({"matryoshka_dimensions": [8, 64]}))
  with pytest.raises(UserError, match="matryoshka_dimensions must be a list of widths in 1..32"):
    matryoshka_dims(str(tmp_path / "config.json"), 32)


def test_truncate_cuts_long_inputs(small_server, model):
  """--truncate: a long input is cut at the model's maximum, as `embed` cuts it."""
  c = openai.OpenAI(base_url=small_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
  res = c.embeddings.create(model="tiny", input=[LONG, "a"], encoding_format="float")
  np.testing.assert_allclose([d.embedding for d in res.data], reference(model, [LONG, "a"]), atol=1e-6)
  assert res.usage.prompt_tokens == 16 + 3


def test_api_key(server):
  url = server.url + "/v1/embeddings"
  for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
    r = post(url, json={"input": "a"}, headers=headers)
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
        model="tiny", input="a")
  assert get(server.url + "/v1/models").status_code == 401
  # Probes and scrapers need no key.
  assert get(server.url + "/health").json() == {"status": "ok"}
  assert get(server.url + "/metrics").status_code == 200


def test_request_too_large_is_413(server):
  body = {"input": ["word " * 10] * 2000}  # about 100 KB > 64 KiB
  r = post(server.url + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {KEY}"})
  assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
  # A chunked body declares no length: it is measured once read.
  chunks = (json.dumps(body)[i:i + 4096].encode() for i in range(0, len(json.dumps(body)), 4096))
  r = post(server.url + "/v1/embeddings", content=chunks,
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
  assert r.status_code == 413


def test_full_queue_is_429_with_retry_after(small_server):
  """The worker is held inside the model: the one admitted request fills the queue of 1, the next
  is refused at once with Retry-After; released, the first completes."""
  batcher = small_server.app.state.batcher
  run, entered, release = batcher.run, threading.Event(), threading.Event()

  def held(rows, size):
    entered.set()
    assert release.wait(60)
    return run(rows, size)

  batcher.run = held
  first: dict = {}
  t = threading.Thread(target=lambda: first.update(r=post(
      small_server.url + "/v1/embeddings", json={"input": "a"}, timeout=60)))
  try:
    t.start()
    assert entered.wait(60)
    r = post(small_server.url + "/v1/embeddings", json={"input": "b"}, timeout=60)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert error_of(r)["code"] == "rate_limit_exceeded"
    assert get(small_server.url + "/health", timeout=20).status_code == 200  # loop not blocked
  finally:
    release.set()
    t.join(60)
    batcher.run = run
  assert first["r"].status_code == 200
  m = small_server.app.state.metrics
  assert m.rejected.value() == 1 and m.requests.value("/v1/embeddings", "429") == 1


def test_a_failing_model_is_500_and_the_worker_survives(small_server):
  batcher = small_server.app.state.batcher
  run = batcher.run

  def broken(rows, size):
    raise RuntimeError("device lost")

  batcher.run = broken
  try:
    r = post(small_server.url + "/v1/embeddings", json={"input": "a"}, timeout=60)
  finally:
    batcher.run = run
  assert r.status_code == 500 and "device lost" in error_of(r)["message"]
  assert error_of(r)["type"] == "server_error" and batcher.pending == 0
  assert post(small_server.url + "/v1/embeddings", json={"input": "a"}, timeout=60).status_code == 200


# ----------------------------------------------------------------------------- the rest


def test_models_and_unknown_routes(server, model):
  h = {"Authorization": f"Bearer {KEY}"}
  data = get(server.url + "/v1/models", headers=h).json()["data"]
  assert [(d["id"], d["object"], d["dimensions"]) for d in data] == [("tiny", "model", model.dim)]
  r = get(server.url + "/v1/nothing", headers=h)
  assert r.status_code == 404 and error_of(r)["code"] == "not_found"
  r = post(server.url + "/v1/search", json={"query": "a"}, headers=h)
  assert r.status_code == 404 and "--index" in error_of(r)["message"]
  r = post(server.url + "/embeddings", content=b"{not json", headers=h)
  assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
  r = post(server.url + "/embeddings", json={"input": "a"}, headers=h)  # the /v1-less alias
  assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == model.dim


def test_metrics_count_requests_tokens_and_batches(server):
  h = {"Authorization": f"Bearer {KEY}"}
  before = get(server.url + "/metrics").text
  for _ in range(3):
    assert post(server.url + "/v1/embeddings", json={"input": ["a", "b c"]}, headers=h).is_success
  assert post(server.url + "/v1/embeddings", json={"input": 5}, headers=h).status_code == 400
  after = get(server.url + "/metrics").text

  def value(text, prefix):
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0

  ok = 'jembed_requests_total{route="/v1/embeddings",status="200"}'
  assert value(after, ok) - value(before, ok) == 3
  bad = 'jembed_requests_total{route="/v1/embeddings",status="400"}'
  assert value(after, bad) - value(before, bad) == 1
  assert value(after, "jembed_inputs_total") - value(before, "jembed_inputs_total") == 6
  assert value(after, "jembed_prompt_tokens_total") - value(before, "jembed_prompt_tokens_total") == 3 * (3 + 4)
  assert value(after, "jembed_batch_size_count") >= value(before, "jembed_batch_size_count") + 3
  assert value(after, "jembed_queue_depth") == 0
  assert "# TYPE jembed_request_duration_seconds histogram" in after
  assert 'jembed_request_duration_seconds_bucket{route="/v1/embeddings",le="+Inf"}' in after
  try:  # the exposition format as Prometheus' own parser reads it, when it is installed
    from prometheus_client.parser import text_string_to_metric_families
  except ImportError:
    return
  families = {f.name: f for f in text_string_to_metric_families(after)}
  assert families["jembed_request_duration_seconds"].type == "histogram"
  assert families["jembed_requests"].type == "counter" and families["jembed_queue_depth"].type == "gauge"


def test_batcher_plan_respects_token_budget():
  """Batches hold one padded length each and at most max_batch_tokens padded tokens."""
  b = Batcher(lambda rows, size: np.zeros((len(rows), 4), np.float32), width=4, max_len=128,
              max_batch_tokens=256, max_queue=2)
  try:
    lengths = [3, 100, 20, 5, 17, 33, 120, 2] * 4
    batches = b.plan(lengths)
    assert sorted(i for bt in batches for i in bt) == list(range(len(lengths)))
    from jembed.embed import bucket
    for bt in batches:
      pads = {bucket(lengths[i], 128) for i in bt}
      assert len(pads) == 1 and len(bt) * pads.pop() <= 256
    # 12 rows in bucket 16 run as 8 + 4 (not 16): every batch here is a power of two
    assert sorted(len(bt) for bt in batches) == [2, 2, 2, 2, 4, 4, 8, 8]
    assert b.shapes() == [(1, 16), (2, 16), (4, 16), (8, 16), (16, 16), (1, 32), (2, 32), (4, 32),
                          (8, 32), (1, 64), (2, 64), (4, 64), (1, 128), (2, 128)]
    with pytest.raises(UserError, match="max-batch-tokens"):
      Batcher(b.run, width=4, max_len=128, max_batch_tokens=64, max_queue=2)
    held = threading.Event()
    b.run = lambda rows, size: (held.wait(30), np.ones((len(rows), 4), np.float32))[1]
    f1, f2 = b.submit([np.arange(3)]), b.submit([np.arange(5), np.arange(2)])
    with pytest.raises(QueueFull):
      b.submit([np.arange(4)])
    held.set()
    assert f1.result(30).shape == (1, 4) and f2.result(30).shape == (2, 4) and b.pending == 0
  finally:
    b.close()


def test_search_over_an_index(model, model_dir, tmp_path):
  index_mod = pytest.importorskip("jembed.index")
  docs = tmp_path / "docs.jsonl"
  docs.write_text("".join(json.dumps({"id": f"d{i}", "text": t, "n": i}) + "\n"
                          for i, t in enumerate(TEXTS)))
  rc = index_mod.main(["build", "--model", model_dir, "--input", str(docs),
                       "--output", str(tmp_path / "ix")])
  assert rc == 0
  index = index_mod.Index.load(str(tmp_path / "ix"), model=model)
  s = Server(create_app(model, served_model_name="tiny", index=index))
  try:
    r = post(s.url + "/v1/search", json={"query": [TEXTS[1], TEXTS[4]], "k": 2}, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    want = index.search([TEXTS[1], TEXTS[4]], 2)
    assert [[h["id"] for h in d["hits"]] for d in data] == [[h["id"] for h in w] for w in want]
    assert data[0]["hits"][0]["id"] == "d1" and data[1]["hits"][0]["id"] == "d4"
    assert data[0]["hits"][0]["n"] == 1  # stored fields come with the hits
    np.testing.assert_allclose([h["score"] for h in data[0]["hits"]],
                               [h["score"] for h in want[0]], atol=1e-5)
    r = post(s.url + "/v1/search", json={"query": "a", "k": 0}, timeout=60)
    assert r.status_code == 400 and error_of(r)["param"] == "k"
  finally:
    s.stop()
  from jembed.serve import __main__ as cli
  app, desc = cli.build(cli.parser().parse_args(["--model", model_dir, "--index", str(tmp_path / "ix"),
                                                 "--no-warm-up"]))
  app.state.batcher.close()
  assert len(app.state.index) == len(TEXTS) and desc.endswith(f"index of {len(TEXTS)} vectors")


def test_cli_without_fastapi_names_the_extra(monkeypatch, capsys, model_dir):
  import sys
  from jembed.serve import __main__ as cli
  monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` now raises ImportError
  assert cli.main(["--model", model_dir]) == 2
  err = capsys.readouterr().err.strip()
  assert err == "jembed: error: the server needs FastAPI and uvicorn: pip install 'jembed[serve]'"


def test_cli_builds_and_warms_up_every_batch_shape(model_dir):
  """The command's app: named after the directory, every batch shape compiled before serving
  unless --no-warm-up (a budget of 16 tokens allows one shape: 8 rows of 16 here)."""
  from jembed.serve import __main__ as cli
  for flags, compiled in ((["--dtype", "bfloat16"], 1), (["--no-warm-up"], 0)):
    app, desc = cli.build(cli.parser().parse_args(["--model", model_dir, "--max-batch-tokens", "16"] + flags))
    try:
      assert desc.startswith("tiny-bert: 32 dims, at most 16 tokens")
      assert app.state.batcher.shapes() == [(8, 16)]
      fns = app.state.model._fns  # pylint: disable=protected-access
      assert (fns[("bfloat16", "pooled")][0]._cache_size() if fns else 0) == compiled
    finally:
      app.state.batcher.close()
  args = cli.parser().parse_args(["--model", model_dir, "--no-warm-up", "--api-key", "k", "--truncate",
                                  "--max-queue", "3", "--max-request-bytes", "99",
                                  "--served-model-name", "mine"])
  app, _ = cli.build(args)
  app.state.batcher.close()
  assert app.state.settings == dict(served_model_name="mine", api_key="k", truncate=True,
                                    max_batch_tokens=16384, max_queue=3, max_request_bytes=99,
                                    dtype="float32")


def test_cli_refuses_a_budget_below_the_model_maximum(capsys, model_dir):
  from jembed.serve import __main__ as cli
  assert cli.main(["--model", model_dir, "--max-batch-tokens", "8"]) == 2
  err = capsys.readouterr().err.strip()
  assert "--max-batch-tokens 8" in err and len(err.splitlines()) == 1
