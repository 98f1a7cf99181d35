"""Two-tower retrieval: interaction files, splits, bad rows, the sampled-softmax masks, sharded
tables, full-catalogue metrics, and the trained model's recommend / similar_items / index export.
One short training run (a module fixture) serves every test that needs a trained model."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jembed import losses, recommend
from jembed.data import interactions as inter
from jembed.data import pipeline
from jembed.errors import UserError
from spine_helpers import apply_overrides, load_config_file


def data_config(**kw):
  c = load_config_file("two_tower").data
  c.update(kw)
  return c


def synthetic(n_users=48, per_user=10, n_groups=4, group_items=16, seed=0):
  """(user, item, rating, ts) rows where each user draws items from its group: learnable."""
  rng = np.random.default_rng(seed)
  rows = []
  for u in range(n_users):
    g = u % n_groups
    items = rng.choice(group_items, per_user, replace=False) + g * group_items
    for t, it in enumerate(items):
      rows.append((f"u{u}", f"i{it}", int(rng.integers(1, 6)), 1000 + t))
  return rows


def write_udata(path, rows):
  with open(path, "w") as f:
    f.writelines(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)
  return str(path)


# ----------------------------------------------------------------------------- file formats


ROWS = [("7", "a", 4, 30), ("7", "b", 5, 10), ("8", "a", 3, 20), ("7", "c", 2, 20), ("8", "c", 5, 25)]


def _write_all(tmp_path):
  p = {}
  p["u.data"] = write_udata(tmp_path / "u.data", ROWS)
  (tmp_path / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ROWS))
  p["ratings.dat"] = str(tmp_path / "ratings.dat")
  (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n"
                                        + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ROWS))
  p["ratings.csv"] = str(tmp_path / "ratings.csv")
  (tmp_path / "x.jsonl").write_text("".join(json.dumps({"who": u, "what": i, "stars": r, "when": t}) + "\n"
                                            for u, i, r, t in ROWS))
  p["x.jsonl"] = str(tmp_path / "x.jsonl")
  return p


@pytest.mark.parametrize("name", ["u.data", "ratings.dat", "ratings.csv", "x.jsonl"])
def test_each_format_reads_the_same_rows(tmp_path, name):
  path = _write_all(tmp_path)[name]
  keys = dict(user_key="who", item_key="what", rating_key="stars", timestamp_key="when") \
      if name.endswith(".jsonl") else {}
  rows = inter.read_file(path, data_config(**keys))
  assert list(zip(rows.user, rows.item, rows.rating, rows.time)) == [
      (u, i, float(r), float(t)) for u, i, r, t in ROWS]


def test_leave_last_out_by_timestamp_and_min_rating(tmp_path):
  path = _write_all(tmp_path)["u.data"]
  x = inter.load(data_config(train=path))
  held = {(x.users[u], x.items[i]) for u, i in zip(x.eval_user, x.eval_item)}
  assert held == {("7", "a"), ("8", "c")}           # each user's latest (ts 30, ts 25)
  assert len(x.train_user) == 3
  x = inter.load(data_config(train=path, min_rating=4.0))   # keeps 7a(4) 7b(5) 8c(5)
  assert sorted(zip(np.asarray(x.users)[x.train_user], np.asarray(x.items)[x.train_item])) == [
      ("7", "b"), ("8", "c")]


def test_random_split_holds_out_a_fraction_and_counts_unseen(tmp_path):
  path = write_udata(tmp_path / "u.data", synthetic())
  pipeline.reset_bad_records()
  x = inter.load(data_config(train=path, split="random", eval_fraction=0.25), seed=3)
  total = len(x.train_user) + len(x.eval_user) + x.skipped_eval
  assert total == 480 and abs(len(x.eval_user) + x.skipped_eval - 120) <= 1
  assert pipeline.bad_records()["skipped"] == x.skipped_eval


def test_eval_user_unseen_in_training_is_skipped_and_counted(tmp_path):
  train = write_udata(tmp_path / "train.tsv", [("1", "a", 5, 1), ("1", "b", 5, 2)])
  held = write_udata(tmp_path / "held.tsv", [("1", "b", 5, 3), ("2", "a", 5, 3), ("1", "zz", 5, 4)])
  pipeline.reset_bad_records()
  x = inter.load(data_config(train=train, eval=held))
  assert x.skipped_eval == 2 and len(x.eval_user) == 1
  assert pipeline.bad_records()["skipped"] == 2


def test_bad_rows_name_file_and_line_or_are_counted(tmp_path):
  path = tmp_path / "u.data"
  path.write_text("1\ta\t5\t1\n2\tb\tfive\t2\n3\n")
  with pytest.raises(UserError, match=r"u.data:2: rating 'five' is not a number"):
    inter.read_file(str(path), data_config())
  pipeline.reset_bad_records()
  rows = inter.read_file(str(path), data_config(on_bad_record="skip"))
  assert rows.user == ["1"] and pipeline.bad_records()["skipped"] == 2


def test_default_data_is_modules_and_their_imports(tmp_path):
  # The same reader the default runs on CPython's standard library, on a small tree of the same shape.
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "__init__.py").write_text("import os\nfrom . import sub\n")
  (tmp_path / "pkg" / "sub.py").write_text("import re, json.decoder\n\ndef f():\n  from collections import abc\n")
  (tmp_path / "test").mkdir()
  (tmp_path / "test" / "t.py").write_text("import unittest\n")   # tests are left out
  (tmp_path / "broken.py").write_text("def (:\n")                # unparseable: no rows
  rows = inter.stdlib_interactions(str(tmp_path))
  assert list(zip(rows.user, rows.item, rows.time)) == [
      ("pkg", "os", 1.0), ("pkg.sub", "re", 1.0), ("pkg.sub", "json.decoder", 1.0),
      ("pkg.sub", "collections", 4.0)]


def test_item_features_are_refused_not_ignored(tmp_path):
  from jembed.tasks.two_tower import TwoTowerTask
  c = load_config_file("two_tower")
  c.data.item_features = "movies.csv"
  with pytest.raises(UserError, match="item_features"):
    TwoTowerTask(c, str(tmp_path))


# ----------------------------------------------------------------------------- the loss


def _numpy_loss(q, c, items, temperature, logq, remove):
  logits = q @ c.T / temperature
  if logq is not None:
    logits = logits - logq[None, :]
  b = len(q)
  if remove:
    same = (items[:, None] == items[None, :]) & ~np.eye(b, dtype=bool)
    logits = np.where(same, -np.inf, logits)
  m = logits.max(1, keepdims=True)
  lse = np.log(np.exp(logits - m).sum(1)) + m[:, 0]
  return float(np.mean(lse - np.diag(logits)))


@pytest.mark.parametrize("use_logq,remove", [(False, False), (True, False), (False, True), (True, True)])
def test_sampled_softmax_matches_numpy(use_logq, remove):
  rng = np.random.default_rng(0)
  q, c = rng.normal(size=(8, 4)), rng.normal(size=(8, 4))
  items = np.asarray([0, 1, 2, 1, 3, 0, 4, 1])
  logq = np.log(np.asarray([2, 3, 1, 3, 1, 2, 1, 3]) / 16.0)
  got, _ = losses.sampled_softmax(jnp.asarray(q), jnp.asarray(c), jnp.asarray(items), temperature=0.5,
                                  log_q=jnp.asarray(logq) if use_logq else None,
                                  remove_accidental_hits=remove)
  want = _numpy_loss(q, c, items, 0.5, logq if use_logq else None, remove)
  assert float(got) == pytest.approx(want, rel=1e-5)
  # Each option changes the loss (so neither can be silently dropped).
  plain = _numpy_loss(q, c, items, 0.5, None, False)
  assert (want != pytest.approx(plain)) == (use_logq or remove)


# ----------------------------------------------------------------------------- metrics


def test_metrics_and_seen_exclusion_match_brute_force():
  from jembed import knn
  rng = np.random.default_rng(1)
  n_items, n_users = 150, 20
  items, users = rng.normal(size=(n_items, 8)).astype(np.float32), rng.normal(size=(n_users, 8)).astype(np.float32)
  seen = [np.sort(rng.choice(n_items, rng.integers(0, 30), replace=False)) for _ in range(n_users)]
  relevant = [set(rng.choice(np.setdiff1d(np.arange(n_items), s), 2, replace=False).tolist()) for s in seen]
  _, top = recommend.top_k_unseen(knn.Searcher(items), users, seen, 100)
  scores = users.astype(np.float64) @ items.T.astype(np.float64)
  for u in range(n_users):
    scores[u, seen[u]] = -np.inf
  want_top = np.argsort(-scores, axis=1, kind="stable")[:, :100]
  np.testing.assert_array_equal(top, want_top)
  got = recommend.ranking_metrics(top, relevant)
  hits = np.asarray([[i in r for i in row] for row, r in zip(want_top, relevant)])
  assert got["recall@10"] == pytest.approx(np.mean(hits[:, :10].sum(1) / 2))
  assert got["recall@100"] == pytest.approx(np.mean(hits.sum(1) / 2))
  assert got["hit_rate@10"] == pytest.approx(np.mean(hits[:, :10].any(1)))
  dcg = (hits[:, :10] / np.log2(np.arange(2, 12))).sum(1)
  assert got["ndcg@10"] == pytest.approx(np.mean(dcg / (1 + 1 / np.log2(3))))


# ----------------------------------------------------------------------------- training


def tiny_config(train_path, **overrides):
  c = load_config_file("two_tower")
  c.total_steps = 30
  c.batch_size = 32
  c.warmup_steps = 3
  c.log_every = 10
  c.eval_every = 15
  c.checkpoint_every = 30
  c.async_checkpointing = False
  c.learning_rate = 0.05
  c.model.dim = 16
  c.data.train = train_path
  return apply_overrides(c, overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  from jembed import train
  d = tmp_path_factory.mktemp("tt")
  path = write_udata(d / "u.data", synthetic())
  workdir = str(d / "run")
  final = train.train_and_evaluate(tiny_config(path), workdir)
  return workdir, final, path


def test_training_beats_popularity_and_logs_eval_rows(trained):
  workdir, final, _ = trained
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [r for r in rows if r.get("split") == "eval" or "popularity_recall@100" in r]
  assert len(evals) >= 2 and all("popularity_recall@100" in r and "ndcg@10" in r for r in evals)
  # Users draw items from 4 groups of 16: a learned model finds the group, popularity cannot.
  assert final["recall@10"] > final["popularity_recall@10"] + 0.1


def test_recommend_excludes_seen_and_uses_original_ids(trained):
  import jembed
  workdir, _, path = trained
  rec = jembed.load(workdir)
  rows = inter.read_file(path, data_config())
  x = inter.load(data_config(train=path))
  seen = {(x.users[u], x.items[i]) for u, i in zip(x.train_user, x.train_item)}
  out = rec.recommend(["u0", "u5"], k=20)
  for user, hits in zip(["u0", "u5"], out):
    assert len(hits) == 20 and all(h["id"].startswith("i") for h in hits)
    assert not any((user, h["id"]) in seen for h in hits)
  scores = [h["score"] for h in out[0]]
  assert scores == sorted(scores, reverse=True)
  # Without the exclusion the seen items come back: the exclusion is what removed them.
  assert any(("u0", h["id"]) in seen for h in rec.recommend(["u0"], k=20, exclude_seen=False)[0])
  del rows
  with pytest.raises(UserError, match="user 'nobody'"):
    rec.recommend(["nobody"], k=5)


def test_similar_items_and_index_export_round_trip(trained, tmp_path):
  import jembed
  from jembed.index import Index
  workdir, _, _ = trained
  rec = jembed.load(workdir)
  sim = rec.similar_items(["i3"], k=5)[0]
  assert len(sim) == 5 and all(h["id"] != "i3" for h in sim)
  out = str(tmp_path / "items.index")
  assert recommend.main(["--model", workdir, "--export-index", out]) == 0
  index = Index.load(out)
  assert len(index) == len(rec.items) and index.ids == rec.items
  # A user's vector as the query ranks items as recommend(exclude_seen=False) does.
  user_vec = rec.user_vectors[rec.users.index("u0")][None]
  hits = index.search(user_vec, k=10)[0]
  assert [h["id"] for h in hits] == [h["id"] for h in rec.recommend(["u0"], 10, exclude_seen=False)[0]]
  assert all(h["id"] != "i3" for h in index.similar(["i3"], k=5)[0])


def test_sharded_tables_equal_one_device(tmp_path):
  """Tables sharded by rows over 8 devices: the same loss and parameters after two steps as on one."""
  from jembed import train
  path = write_udata(tmp_path / "u.data", synthetic())
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    setup = train.Setup(tiny_config(path, total_steps=2), str(tmp_path / f"w{len(devices)}"), devices=devices)
    table_spec = setup.param_shardings["item_tower"]["table"].spec
    state = setup.init_state()
    it = pipeline.make_train_iterator(setup.data.train, 32, 0)
    setup.compile(state, setup.to_global(next(iter([next(it)]))))
    it = pipeline.make_train_iterator(setup.data.train, 32, 0)
    losses_ = []
    for _ in range(2):
      state, m = setup.compiled_train(state, setup.to_global(next(it)))
      losses_.append(float(m["loss"]))
    results.append((table_spec, losses_, np.asarray(jax.device_get(state.params["item_tower"]["table"]))))
  (spec1, l1, t1), (spec8, l8, t8) = results
  assert spec8[0] == ("data", "fsdp", "tensor")   # rows over the whole mesh
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  np.testing.assert_allclose(t1, t8, rtol=1e-4, atol=1e-6)


def test_format_override_reads_an_unnamed_file(tmp_path):
  path = tmp_path / "plays.txt"
  path.write_text("1\ta\t5\t1\n")
  with pytest.raises(UserError, match="data.format"):
    inter.read_file(str(path), data_config())
  assert inter.read_file(str(path), data_config(format="tsv")).item == ["a"]


@pytest.mark.parametrize("override", [{"loss.logq": False}, {"loss.remove_accidental_hits": False},
                                      {"loss.temperature": 0.5}, {"model.normalize": False},
                                      {"model.mlp_dims": (8,)}])
def test_every_model_and_loss_field_changes_the_loss(tmp_path, override):
  from flax import nnx
  from jembed.tasks.two_tower import TwoTowerTask
  path = write_udata(tmp_path / "u.data", synthetic(n_groups=1, group_items=12))

  def loss_with(**kw):
    c = tiny_config(path, **kw)
    task = TwoTowerTask(c, str(tmp_path))
    data = task.load_data()
    model = task.build_model(task.model_spec(), nnx.Rngs(params=0, dropout=0))
    batch = {k: jnp.asarray(v[:32]) for k, v in data.train.items()}
    assert len(np.unique(data.train["item"][:32])) < 32   # the batch holds accidental hits
    return float(task.loss(model, batch, None, True)[0])

  assert loss_with(**override) != pytest.approx(loss_with())


def test_recommend_command_line(trained):
  import subprocess
  import sys
  workdir, _, _ = trained
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  run = lambda *a: subprocess.run([sys.executable, "-m", "jembed.recommend", "--model", workdir, *a],
                                  capture_output=True, text=True, env=env)
  ok = run("--users", "u0,u1", "--k", "3")
  assert ok.returncode == 0, ok.stderr
  lines = [json.loads(l) for l in ok.stdout.splitlines()]
  assert [l["user"] for l in lines] == ["u0", "u1"] and all(len(l["items"]) == 3 for l in lines)
  bad = run("--users", "nobody")
  assert bad.returncode == 2 and "user 'nobody'" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_bad_settings_are_one_line_errors(tmp_path):
  path = write_udata(tmp_path / "u.data", synthetic())
  for kw, words in [(dict(train=str(tmp_path / "missing.csv")), "does not exist"),
                    (dict(train=path, split="temporal"), "data.split='temporal'"),
                    (dict(train=path, split="random", eval_fraction=1.5), "eval_fraction=1.5"),
                    (dict(train=path, min_rating=9.0), "no interactions left")]:
    with pytest.raises(UserError, match=words) as e:
      inter.load(data_config(**kw))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- serving


def test_server_recommends_from_the_workdir_and_from_its_item_index(trained, tmp_path):
  """python -m jembed.serve --recommender W [--index I]: no text model; /v1/recommend equals
  Recommender.recommend (seen items excluded unless asked), /v1/similar its similar_items, hits from
  the index carry its ids; unknown users and bad k are OpenAI-shaped errors; text routes 404."""
  pytest.importorskip("fastapi")
  from fastapi.testclient import TestClient
  import jembed
  from jembed.serve import __main__ as cli
  workdir, _, _ = trained
  rec = jembed.load(workdir)
  out = str(tmp_path / "items.index")
  assert recommend.main(["--model", workdir, "--export-index", out]) == 0
  want = rec.recommend(["u0", "u5"], k=7)
  want_all = rec.recommend(["u0"], k=7, exclude_seen=False)[0]
  for flags in ([], ["--index", out]):
    app, desc = cli.build(cli.parser().parse_args(["--recommender", workdir, *flags]))
    assert desc.startswith("run: recommendations for 48 users")
    with TestClient(app) as client:
      r = client.post("/v1/recommend", json={"user": ["u0", "u5"], "k": 7})
      assert r.status_code == 200, r.text
      data = r.json()["data"]
      assert [d["user"] for d in data] == ["u0", "u5"] and r.json()["model"] == "run"
      for d, w in zip(data, want):
        assert [h["id"] for h in d["hits"]] == [h["id"] for h in w]
        np.testing.assert_allclose([h["score"] for h in d["hits"]], [h["score"] for h in w], rtol=1e-4)
      r = client.post("/v1/recommend", json={"user": "u0", "k": 7, "exclude_seen": False})
      assert [h["id"] for h in r.json()["data"][0]["hits"]] == [h["id"] for h in want_all]
      r = client.post("/v1/similar", json={"item": "i3", "k": 4})
      hits = r.json()["data"][0]["hits"]
      assert r.status_code == 200 and len(hits) == 4 and all(h["id"] != "i3" for h in hits)
      if not flags:
        assert [h["id"] for h in hits] == [h["id"] for h in rec.similar_items(["i3"], 4)[0]]
      for body, status, param in [({"user": "nobody"}, 404, "user"), ({"user": "u0", "k": 0}, 400, "k"),
                                  ({"user": []}, 400, "user"), ({"k": 3}, 400, "user"),
                                  ({"user": "u0", "exclude_seen": "no"}, 400, "exclude_seen")]:
        r = client.post("/v1/recommend", json=body)
        err = r.json()["error"]
        assert r.status_code == status and err["param"] == param and set(err) == {
            "message", "type", "param", "code"}, (body, r.text)
      assert "user 'nobody'" in client.post("/v1/recommend", json={"user": "nobody"}).json()["error"]["message"]
      r = client.post("/v1/similar", json={"item": "nope"})
      assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_item"
      for route in ("/v1/embeddings", "/v1/search"):
        r = client.post(route, json={"input": "a"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_text_model"
      assert client.get("/v1/models").json()["data"][0]["items"] == len(rec.items)
      assert 'route="/v1/recommend"' in client.get("/metrics").text


def test_server_refuses_a_foreign_index_and_nothing_to_serve(trained, tmp_path, capsys):
  from jembed import index as index_lib
  from jembed.serve import __main__ as cli
  workdir, _, _ = trained
  rng = np.random.default_rng(0)
  index_lib.write(str(tmp_path / "other"), rng.normal(size=(3, 16)).astype(np.float32), ids=["i0", "i1", "i2"])
  assert cli.main(["--recommender", workdir, "--index", str(tmp_path / "other")]) == 2
  assert "other vectors for the recommender's items" in capsys.readouterr().err
  assert cli.main([]) == 2
  assert "nothing to serve" in capsys.readouterr().err


# ----------------------------------------------------------------------------- row-wise table updates


def _table_loss(table, ids):
  rows = jnp.take(table, ids, axis=0)
  return jnp.sum(jnp.sin(rows) * jnp.arange(1, rows.shape[1] + 1))


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_row_updates_equal_dense_optax(kind):
  """Row-wise sgd and adagrad equal optax's dense ones on a table whose batches repeat ids and skip
  rows; row-wise adam equals dense adam when every row is touched, and leaves untouched rows alone."""
  import optax
  from jembed import row_optimizer
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(10, 3)), jnp.float32)
  dense = {"sgd": optax.sgd(0.1), "adagrad": optax.adagrad(0.1), "adam": optax.adam(0.1)}[kind]
  batches = ([np.array([1, 3, 3, 7, 1, 0]), np.array([2, 2, 9, 3, 5, 5])] if kind != "adam" else
             [rng.permutation(np.r_[np.arange(10), [4, 4]]) for _ in range(3)])
  d_table, d_state = table, dense.init(table)
  s_table, slots = table, row_optimizer.init_slots(kind, table)
  for step, ids in enumerate(batches):
    ids = jnp.asarray(ids, jnp.int32)
    g = jax.grad(_table_loss)(d_table, ids)
    upd, d_state = dense.update(g, d_state, d_table)
    d_table = optax.apply_updates(d_table, upd)
    rows = jnp.take(s_table, ids, axis=0)
    row_g = jax.grad(lambda r: jnp.sum(jnp.sin(r) * jnp.arange(1, 4)))(rows)
    uniq, summed = row_optimizer.unique_rows(ids, row_g, 10)
    s_table, slots = row_optimizer.update(kind, s_table, slots, uniq, summed, learning_rate=0.1,
                                          step=jnp.asarray(step))
  np.testing.assert_allclose(s_table, d_table, rtol=1e-5, atol=1e-6)
  if kind == "adam":   # lazy: a row no batch touches keeps its value and zero moments
    t, slots = row_optimizer.update("adam", table, row_optimizer.init_slots("adam", table),
                                    *row_optimizer.unique_rows(jnp.asarray([2, 2]), jnp.ones((2, 3)), 10),
                                    learning_rate=0.1, step=jnp.asarray(0))
    changed = np.any(np.asarray(t) != np.asarray(table), axis=1)
    assert changed.tolist() == [i == 2 for i in range(10)] and float(slots["m"][2, 0]) == pytest.approx(0.2)


def test_sparse_tables_train_sharded_equal_one_device_and_keep_untouched_rows(tmp_path):
  """model.table_updates=adam: the tables live outside the optimizer's parameters, only the batch's
  rows change, 8 devices (rows sharded) equal one, and the run learns like the dense one."""
  from jembed import train
  path = write_udata(tmp_path / "u.data", synthetic())
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    setup = train.Setup(tiny_config(path, total_steps=2, **{"model.table_updates": "adam"}),
                        str(tmp_path / f"s{len(devices)}"), devices=devices)
    assert "item_tower" not in setup.abs_params or "table" not in setup.abs_params["item_tower"]
    spec = setup.rest_shardings["item_tower"]["table_m"].spec
    state = setup.init_state()
    before = np.asarray(jax.device_get(state.model_state["item_tower"]["table"]))
    it = pipeline.make_train_iterator(setup.data.train, 32, 0)
    first = next(it)
    setup.compile(state, setup.to_global(first))
    state, m = setup.compiled_train(state, setup.to_global(first))
    after = np.asarray(jax.device_get(state.model_state["item_tower"]["table"]))
    changed = set(np.flatnonzero(np.any(after != before, axis=1)))
    assert changed == set(np.unique(first["item"]).tolist())   # exactly the batch's items moved
    state, m2 = setup.compiled_train(state, setup.to_global(next(it)))
    assert int(state.model_state["row_step"]) == 2 and float(m2["table_grad_norm"]) > 0
    # A non-finite step leaves the rows, their optimizer state and the row step as they were.
    kept = jax.device_get(state.model_state)
    bad = dict(first, logq=np.full_like(first["logq"], np.nan))
    state, m3 = setup.compiled_train(state, setup.to_global(bad))
    assert not np.isfinite(float(m3["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.model_state), kept)
    results.append((spec, [float(m["loss"]), float(m2["loss"])],
                    np.asarray(jax.device_get(state.model_state["item_tower"]["table"]))))
  (_, l1, t1), (spec8, l8, t8) = results
  assert spec8[0] == ("data", "fsdp", "tensor")
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  np.testing.assert_allclose(t1, t8, rtol=1e-4, atol=1e-6)


def test_sparse_adam_run_learns_and_loads(tmp_path):
  import jembed
  from jembed import train
  path = write_udata(tmp_path / "u.data", synthetic())
  # Each row moves only when a batch holds it (about 2 epochs here): lazy Adam wants a larger rate.
  final = train.train_and_evaluate(tiny_config(path, learning_rate=0.2, **{"model.table_updates": "adam"}),
                                   str(tmp_path / "w"))
  assert final["recall@10"] > final["popularity_recall@10"] + 0.1
  assert len(jembed.load(str(tmp_path / "w")).recommend(["u0"], k=5)[0]) == 5
  for kw, words in [({"model.table_updates": "lazy"}, "table_updates='lazy'"),
                    ({"model.table_updates": "sgd", "weight_decay": 0.1}, "weight_decay=0.1")]:
    with pytest.raises(UserError, match=words):
      train.Setup(tiny_config(path, **kw), str(tmp_path / "x"))
