"""jembed.index and jembed.knn: exact search equal to NumPy brute force on 8 devices and on 1, the
index directory (build / add / search, CLI and Python; .jsonl, .txt, .parquet, image folders),
stored fields in hits, the model fingerprint, similar/recommend exclusions, atomic writes, and
one-line errors for bad input."""
import json
import os

import jax
import numpy as np
import pytest

import jembed
from jembed import index as index_lib
from jembed import knn
from jembed.embed import load
from jembed.errors import UserError
from spine_helpers import tiny_text_workdir

DOCS = [{"id": f"d{i}", "text": t, "lang": "en", "n": i} for i, t in enumerate([
    "open a file and return a stream", "the quick brown fox", "return the absolute value",
    "sort a list in place", "read a line from standard input", "a short one", "",
    "join two paths", "split a string on whitespace", "the lazy dog sleeps"])]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tiny_text_workdir(str(tmp_path_factory.mktemp("index_model")))


@pytest.fixture(scope="module")
def model(workdir):
  return load(workdir)


@pytest.fixture(scope="module")
def built(workdir, model, tmp_path_factory):
  """An index built by the CLI from a .jsonl with extra fields."""
  root = tmp_path_factory.mktemp("built")
  src = root / "docs.jsonl"
  src.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
  out = str(root / "docs.index")
  assert index_lib.main(["build", "--model", workdir, "--input", str(src), "--output", out,
                         "--batch-size", "4"]) == 0
  return out


def _reference(rows, queries, k, exclude=None):
  """NumPy brute force: row indices of the k best, ties to the lower row, `exclude` left out."""
  scores = np.asarray(queries, np.float64) @ np.asarray(rows, np.float64).T
  if exclude is not None:
    for q, rows_out in enumerate(exclude):
      scores[q, list(rows_out)] = -np.inf
  return np.argsort(-scores, axis=1, kind="stable")[:, :k]


# --- the search kernel -----------------------------------------------------------------------------
# Many chunks per device; and k past both the rows a device holds and the rows there are.
@pytest.mark.parametrize("n, dim, k, chunk", [(1000, 16, 10, 64), (20, 8, 25, 8192)])
def test_sharded_search_equals_numpy_and_single_device(n, dim, k, chunk):
  rng = np.random.default_rng(n)
  rows = rng.standard_normal((n, dim)).astype(np.float32)
  queries = rng.standard_normal((70, dim)).astype(np.float32)
  want = _reference(rows, queries, k)
  sharded = knn.Searcher(rows, chunk_rows=chunk)
  single = knn.Searcher(rows, devices=jax.devices()[:1], chunk_rows=chunk)
  assert sharded.mesh.size == 8 and single.mesh.size == 1
  for searcher in (sharded, single):
    scores, ids = searcher.search(queries, k)
    assert ids.shape == (70, min(k, n))   # k past the row count gives every row
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ rows.T, want, 1), atol=1e-5)
    # approx_max_k's code path: on CPU JAX falls back to the exact top-k, so results are equal.
    _, approx = searcher.search(queries, k, recall_target=0.9)
    np.testing.assert_array_equal(approx, want)


def test_compiled_search_is_reused():
  rows = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
  s = knn.Searcher(rows, chunk_rows=16)
  before = knn.TRACES
  s.search(rows[:5], 3)
  s.search(rows[:7], 3)              # same padded batch (8), same k: no new trace
  knn.Searcher(rows, chunk_rows=16).search(rows[:2], 3)   # the same rows loaded again: neither
  assert knn.TRACES == before + 1
  s.search(rows[:5], 4)
  assert knn.TRACES == before + 2


# --- indexes of vectors (no model) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def vec_index(tmp_path_factory):
  rng = np.random.default_rng(1)
  vecs = rng.standard_normal((200, 12)).astype(np.float32)
  vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
  out = str(tmp_path_factory.mktemp("vec") / "v.index")
  index_lib.write(out, vecs, ids=[f"i{j}" for j in range(200)],
                  fields=[{"j": j} for j in range(200)], normalized=True)
  return out, vecs


def test_vector_index_search_cosine_f16_and_one_device(vec_index, tmp_path):
  out, vecs = vec_index
  idx = jembed.Index.load(out)                      # the lazy export
  assert (len(idx), idx.dim, idx.metric, idx.model_fingerprint) == (200, 12, "cosine", None)
  queries = np.random.default_rng(2).standard_normal((9, 12)).astype(np.float32)
  hits = idx.search(queries * 3.0, k=5)             # cosine: query norms do not matter
  unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  want = _reference(vecs, unit, 5)
  assert [[h["id"] for h in q] for q in hits] == [[f"i{j}" for j in row] for row in want]
  assert hits[0][0]["j"] == want[0][0]
  np.testing.assert_allclose(hits[0][0]["score"], unit[0] @ vecs[want[0][0]], atol=1e-5)
  one = index_lib.Index.load(out, devices=jax.devices()[:1]).search(queries, k=5)
  assert [[h["id"] for h in q] for q in one] == [[h["id"] for h in q] for q in hits]
  np.testing.assert_allclose([[h["score"] for h in q] for q in one],
                             [[h["score"] for h in q] for q in hits], atol=1e-6)
  # float16 storage: the exact search of the stored (rounded) rows.
  half = str(tmp_path / "h.index")
  index_lib.write(half, vecs, normalized=True, dtype="float16")
  stored = np.asarray(index_lib.Index.load(half).vectors, np.float32)
  assert os.path.getsize(os.path.join(half, "vectors.f16")) == 200 * 12 * 2
  got = [[h["id"] for h in q] for q in index_lib.Index.load(half).search(unit, k=5)]
  assert got == _reference(stored, unit, 5).tolist()


def test_similar_and_recommend_exclude_themselves(vec_index):
  out, vecs = vec_index
  idx = index_lib.Index.load(out)
  sim = idx.similar(["i3", "i50"], k=4)
  want = _reference(vecs, vecs[[3, 50]], 4, exclude=[{3}, {50}])
  assert [[h["id"] for h in q] for q in sim] == [[f"i{j}" for j in row] for row in want]
  history = ["i1", "i7", "i9"]
  rec = idx.recommend(history, k=6)
  pooled = vecs[[1, 7, 9]].mean(0, keepdims=True)
  want = _reference(vecs, pooled, 6, exclude=[{1, 7, 9}])[0]
  assert [h["id"] for h in rec] == [f"i{j}" for j in want]
  assert not set(history) & {h["id"] for h in rec}
  both = idx.recommend([history, ["i2"]], k=6)     # a list of histories: one hit list each
  assert both[0] == rec and len(both[1]) == 6 and "i2" not in [h["id"] for h in both[1]]
  with pytest.raises(UserError, match="'nope' is not in the index"):
    idx.similar(["nope"], k=3)
  with pytest.raises(UserError, match="k=0"):
    idx.recommend(history, k=0)
  with pytest.raises(UserError, match="do not fit the index"):
    idx.search(np.zeros((2, 5), np.float32), k=3)
  with pytest.raises(UserError, match="without a model"):
    idx.search(["a text"], k=3)
  assert idx.recall(vecs[:20], k=5, recall_target=0.9) == 1.0   # CPU: exact fallback


# --- indexes of a model's embeddings ---------------------------------------------------------------
def test_build_cli_search_cli_and_python(built, model, tmp_path, capsys):
  meta = json.load(open(os.path.join(built, "index.json")))
  assert meta["count"] == len(DOCS) and meta["metric"] == "dot"   # this MLM model does not normalise
  assert meta["model"]["fingerprint"] == index_lib.model_fingerprint(model)
  vecs = model.embed([d["text"] for d in DOCS])
  np.testing.assert_allclose(np.asarray(index_lib.Index.load(built).vectors), vecs, atol=1e-5)
  queries = tmp_path / "q.jsonl"
  qs = [{"id": "qa", "text": "open a stream"}, {"id": 7, "text": "a lazy fox"}]
  queries.write_text("".join(json.dumps(q) + "\n" for q in qs))
  out = tmp_path / "hits.jsonl"
  assert index_lib.main(["search", "--index", built, "--queries", str(queries), "--k", "3",
                         "--output", str(out), "--recall-target", "0.9"]) == 0
  assert "recall@3 vs exact 1.0000 on 2 queries" in capsys.readouterr().out  # CPU: exact fallback
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [line["id"] for line in lines] == ["qa", 7]
  want = _reference(vecs, model.embed([q["text"] for q in qs]), 3)
  for line, row in zip(lines, want):
    assert [h["id"] for h in line["hits"]] == [DOCS[j]["id"] for j in row]
    h = line["hits"][0]
    assert (h["text"], h["lang"], h["n"]) == (DOCS[row[0]]["text"], "en", row[0])
  assert index_lib.main(["search", "--index", built, "--query", "a lazy fox", "--k", "2"]) == 0
  one = json.loads(capsys.readouterr().out)        # no --output: JSONL on stdout
  assert one["id"] is None and one["hits"] == lines[1]["hits"][:2]
  # Python, with the model passed in (as the server does): the same hits.
  idx = index_lib.Index.load(built, model=model)
  assert idx.search([q["text"] for q in qs], k=3) == [line["hits"] for line in lines]


def test_add_appends_and_refuses_duplicates(built, model, tmp_path, capsys):
  import shutil
  copy = str(tmp_path / "copy.index")
  shutil.copytree(built, copy)
  more = tmp_path / "more.txt"
  more.write_text("a brand new line\nanother one\n")
  assert index_lib.main(["add", "--index", copy, "--input", str(more)]) == 0
  idx = index_lib.Index.load(copy)
  assert len(idx) == len(DOCS) + 2 and idx.ids[-2:] == [1, 2]   # .txt: line numbers are ids
  hit = idx.search(model.embed(["another one"]), k=len(idx))[0]
  assert idx.fields(len(DOCS) + 1) == {"text": "another one"}
  assert {h["id"] for h in hit} == set(idx.ids)
  # One writer at a time.
  holder = index_lib.Writer(copy, index_lib.read_meta(copy))
  (tmp_path / "fresh.jsonl").write_text(json.dumps({"id": "fresh", "text": "x"}) + "\n")
  with pytest.raises(UserError, match="another process is adding"):
    index_lib.add(copy, str(tmp_path / "fresh.jsonl"), model=model, progress=False)
  holder.close()
  # Adding the same lines again: their ids are taken. Refused before anything is written.
  assert index_lib.main(["add", "--index", copy, "--input", str(more)]) == 2
  err = capsys.readouterr().err.strip()
  assert "already in the index" in err and len(err.splitlines()) == 1
  assert len(index_lib.Index.load(copy)) == len(DOCS) + 2


def test_txt_and_parquet_inputs(workdir, model, tmp_path):
  pq = pytest.importorskip("pyarrow.parquet")
  import pyarrow as pa
  table = pa.table({"key": [10, 20, 30], "body": ["red apples", "green pears", "blue sky"],
                    "tag": ["a", "b", "c"]})
  pq.write_table(table, tmp_path / "docs.parquet")
  meta = index_lib.build(workdir, str(tmp_path / "docs.parquet"), str(tmp_path / "p.index"),
                         id_field="key", text_field="body", model=model, progress=False)
  assert meta["count"] == 3
  idx = index_lib.Index.load(str(tmp_path / "p.index"), model=model)
  hits = idx.search(["green pears"], k=3)[0]
  want = _reference(model.embed(table.column("body").to_pylist()), model.embed(["green pears"]), 3)[0]
  assert [h["id"] for h in hits] == [[10, 20, 30][j] for j in want]
  assert {h["id"]: h["tag"] for h in hits} == {10: "a", 20: "b", 30: "c"}
  (tmp_path / "docs.txt").write_text("first\nsecond\n")
  out = str(tmp_path / "t.index")
  index_lib.build(workdir, str(tmp_path / "docs.txt"), out, model=model, progress=False)
  idx = index_lib.Index.load(out)
  assert idx.ids == [1, 2] and idx.fields(1) == {"text": "second"}
  # --overwrite replaces an index (here with the parquet's rows, stored as float16).
  (tmp_path / "docs.txt").write_text("only\n")
  index_lib.build(workdir, str(tmp_path / "docs.txt"), out, model=model, progress=False,
                  overwrite=True, dtype="float16")
  assert sorted(os.listdir(out)) == [".lock", "fields.jsonl", "fields.offsets", "ids.jsonl",
                                     "index.json", "vectors.f16"]
  idx = index_lib.Index.load(out)
  assert idx.ids == [1] and idx.vectors.dtype == np.float16
  np.testing.assert_allclose(np.asarray(idx.vectors, np.float32), model.embed(["only"]), rtol=1e-3,
                             atol=1e-3)


def test_image_folder_index(tmp_path):
  from PIL import Image
  from flax import nnx
  import ml_collections
  from jembed.embed import ImageEmbedder
  from jembed.models import vit
  cfg = ml_collections.ConfigDict(dict(size="Ti", hidden_size=16, num_layers=1, num_heads=2, patch_size=4))
  backbone = vit.vit_from_config(cfg, image_shape=(8, 8, 1), rngs=nnx.Rngs(0, dropout=0))
  backbone.eval()
  model = ImageEmbedder(backbone, (8, 8, 1), normalize=True)
  rng = np.random.default_rng(0)
  os.makedirs(tmp_path / "imgs" / "sub")
  for name in ["a.png", "b.png", "sub/c.png"]:
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / name)
  index_lib.build("", str(tmp_path / "imgs"), str(tmp_path / "i.index"), model=model, progress=False)
  idx = index_lib.Index.load(str(tmp_path / "i.index"), model=model)
  assert idx.ids == ["a.png", "b.png", os.path.join("sub", "c.png")] and idx.metric == "cosine"
  hits = idx.similar(["a.png"], k=2)[0]
  assert [h["id"] for h in hits] != [] and "a.png" not in [h["id"] for h in hits]
  assert hits[0]["path"] == hits[0]["id"]
  with pytest.raises(UserError, match="image embeddings"):
    idx.search(["a text"], k=1)


def test_fingerprint_refuses_another_model(built, workdir, model, tmp_path, capsys):
  import shutil
  other = load(workdir)
  other.set_params(jax.tree.map(lambda x: x * 1.01, other._params))
  assert index_lib.model_fingerprint(other) != index_lib.model_fingerprint(model)
  assert index_lib.model_fingerprint(load(workdir)) == index_lib.model_fingerprint(model)  # stable
  with pytest.raises(UserError, match="is not the model index"):
    index_lib.Index.load(built, model=other)
  (tmp_path / "new.txt").write_text("new\n")
  with pytest.raises(UserError, match="is not the model index"):   # nor may it add rows
    index_lib.add(built, str(tmp_path / "new.txt"), model=other, progress=False)
  # The CLI: an index whose recorded fingerprint is another model's refuses this model's queries.
  copy = str(tmp_path / "copy.index")
  shutil.copytree(built, copy)
  meta = json.load(open(os.path.join(copy, "index.json")))
  meta["model"]["fingerprint"] = "0" * 32
  json.dump(meta, open(os.path.join(copy, "index.json"), "w"))
  assert index_lib.main(["search", "--index", copy, "--query", "fox", "--model", workdir]) == 2
  err = capsys.readouterr().err.strip()
  assert "is not the model index" in err and len(err.splitlines()) == 1


def test_failing_build_and_add_leave_nothing_half_written(workdir, model, built, tmp_path, monkeypatch):
  import shutil
  src = tmp_path / "docs.txt"
  src.write_text("".join(f"line {i}\n" for i in range(10)))
  calls = []
  real = index_lib._embed_chunk

  def failing(*args):
    calls.append(1)
    if len(calls) == 2:
      raise RuntimeError("disk gone")
    return real(*args)

  monkeypatch.setattr(index_lib, "CHUNK", 4)
  monkeypatch.setattr(index_lib, "_embed_chunk", failing)
  with pytest.raises(RuntimeError):
    index_lib.build(workdir, str(src), str(tmp_path / "x.index"), model=model, progress=False)
  assert sorted(os.listdir(tmp_path)) == ["docs.txt"]   # no index, no temporary directory
  # An add that dies midway: the index is as before, and the next add cuts the stray bytes.
  copy = str(tmp_path / "copy.index")
  shutil.copytree(built, copy)
  before = {f: open(os.path.join(copy, f), "rb").read() for f in os.listdir(copy)}
  calls.clear()
  with pytest.raises(RuntimeError):
    index_lib.add(copy, str(src), model=model, progress=False)
  assert {f: open(os.path.join(copy, f), "rb").read() for f in os.listdir(copy)} == before
  monkeypatch.setattr(index_lib, "_embed_chunk", real)
  index_lib.add(copy, str(src), model=model, progress=False)
  idx = index_lib.Index.load(copy)
  assert len(idx) == len(DOCS) + 10 and idx.fields(len(idx) - 1) == {"text": "line 9"}
  np.testing.assert_allclose(np.asarray(idx.vectors[-10:]), model.embed([f"line {i}" for i in range(10)]),
                             atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["build", "--input", "/no/such.jsonl"], "does not exist"),
    (["build", "--input", "EMPTY"], "holds no records"),
    (["build", "--input", "BADJSON"], "is not valid JSON"),
    (["build", "--input", "DUP"], "id 1 appears twice"),
    (["build", "--input", "NOID"], "has no field 'id'"),
    (["build", "--input", "SCORE"], "field 'score'"),
    (["build", "--input", "OK", "--output", "INDEX"], "already exists"),
    (["search", "--query", "x", "--k", "0"], "k=0"),
    (["search", "--queries", "/no/q.jsonl"], "does not exist"),
    (["search", "--query", "x", "--queries", "OK"], "exactly one of"),
    (["search", "--index", "/no/index", "--query", "x"], "is not an index"),
])
def test_bad_input_is_one_line(workdir, built, tmp_path, capsys, argv, message):
  files = {"EMPTY": "", "BADJSON": "{\"id\": 1, \"text\": \"a\"}\n{oops\n",
           "DUP": "{\"id\": 1, \"text\": \"a\"}\n{\"id\": 1, \"text\": \"b\"}\n",
           "NOID": "{\"text\": \"a\"}\n", "SCORE": "{\"id\": 1, \"text\": \"a\", \"score\": 3}\n",
           "OK": "{\"id\": 1, \"text\": \"a\"}\n"}
  subst = {"INDEX": built}
  for name, text in files.items():
    (tmp_path / f"{name}.jsonl").write_text(text)
    subst[name] = str(tmp_path / f"{name}.jsonl")
  argv = [subst.get(a, a) for a in argv]
  if argv[0] == "build":
    argv += ["--model", workdir] + ([] if "--output" in argv else ["--output", str(tmp_path / "o.index")])
  elif "--index" not in argv:
    argv += ["--index", built]
  assert index_lib.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "o.index").exists()
