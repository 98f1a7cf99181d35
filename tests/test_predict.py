"""Using a fine-tuned classifier: `jembed.load(M)` predicts and gives logits that agree with the
model's own forward, image inputs of any size get the model's declared preprocessing, the
`jembed.predict` and image `jembed.embed` command lines, and one-line errors for bad input."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jembed import classifier, embed, modelspec, predict
from jembed.data import encode, image_transforms as T
from jembed.data import labeled_text
from jembed.errors import UserError
from spine_helpers import load_config_file, write_workdir

TEXTS = ["Return the absolute value of the argument.", "open a file and return a stream",
         "Create a new socket connection to the host", "format a date and time as a string",
         "x " * 80]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
  """An image classification workdir on the embedded digits (8x8 gray, 10 classes), as a run leaves
  it at step 0 (no train step compiles); tiny ResNet."""
  root = tmp_path_factory.mktemp("img")
  c = load_config_file("finetune_image")
  c.async_checkpointing = False
  c.model.resnet.width = 4
  c.model.resnet.num_stages = 1
  wd = str(root / "run")
  write_workdir(c, wd)
  return wd


@pytest.fixture(scope="module")
def image_model(image_run):
  return embed.load(image_run)


@pytest.fixture(scope="module")
def image_forward(image_run):
  """The classifier's own forward on model-ready float images (already normalised)."""
  _, model, _ = modelspec.load_model(image_run)
  fn = jax.jit(lambda x: model.head(model.backbone(x)))
  return lambda x: np.asarray(fn(np.asarray(x, np.float32)))


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  """A text classification workdir (tiny encoder, tokenizer trained on the train texts)."""
  root = tmp_path_factory.mktemp("txt")
  texts, labels = labeled_text.embedded_examples()
  paths = []
  for name, offset, n in (("train.jsonl", 0, 120), ("test.jsonl", 3, 30)):
    with open(root / name, "w") as f:
      for i in range(n):
        j = (offset + i * 7) % len(texts)
        f.write(json.dumps({"text": texts[j], "label": labels[j]}) + "\n")
    paths.append(str(root / name))
  c = load_config_file("finetune_text")
  c.async_checkpointing = False
  c.model.update(num_layers=1, hidden_size=16, num_heads=2, mlp_dim=32, max_position=64,
                 pooling="mean")
  c.data.train, c.data.eval = paths
  c.data.update(vocab_size=300, seq_len=32)
  wd = str(root / "run")
  write_workdir(c, wd)
  return wd


@pytest.fixture(scope="module")
def text_model(text_run):
  return embed.load(text_run)


def _digits(n=6, size=8, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (n, size, size, 1)).astype(np.uint8)


# ----------------------------------------------------------------------------- images


def test_image_predict_agrees_with_the_forward(image_model, image_forward):
  # Batches of 8 split over the 8 devices, two of them, the last padded: equal to one device.
  x = _digits(10)
  logits = image_model.logits(x, batch_size=4)
  assert logits.shape == (10, 10) and logits.dtype == np.float32
  np.testing.assert_allclose(logits, image_forward(x / 255.0), atol=1e-5)
  probs = image_model.predict_proba(x)
  np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
  np.testing.assert_allclose(probs, classifier.softmax(logits), atol=1e-6)
  preds = image_model.predict(x, k=3)
  assert image_model.classes == [str(i) for i in range(10)]
  for p, row, lg in zip(preds, probs, logits):
    assert p["label"] == image_model.classes[int(lg.argmax())]
    assert p["score"] == pytest.approx(row.max(), abs=1e-6)
    scores = [t["score"] for t in p["top_k"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
  assert len(image_model.predict(x[:1], k=None)[0]["top_k"]) == 10
  with pytest.raises(UserError, match="k=0"):
    image_model.predict(x, k=0)


def test_images_of_any_size_get_the_declared_preprocessing(image_model, image_forward, tmp_path):
  pp = image_model.preprocess
  assert pp == T.plain(8, 1)  # a model.json without "preprocess": squash to the size, / 255
  rng = np.random.RandomState(1)
  images = [rng.randint(0, 256, (20, 12), np.uint8), rng.randint(0, 256, (16, 16, 3), np.uint8),
            rng.randint(0, 256, (8, 8, 1), np.uint8)]
  ready = np.stack([T.eval_transform(im if im.ndim == 3 else im[..., None], pp) for im in images])
  want = image_forward(ready / 255.0)
  np.testing.assert_allclose(image_model.logits(images), want, atol=1e-5)
  # File paths, decoded as the model's channels.
  paths = []
  for i, im in enumerate(images):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(im if im.ndim == 2 else im.squeeze(-1) if im.shape[-1] == 1 else im).save(paths[-1])
  np.testing.assert_allclose(image_model.logits(paths), want, atol=1e-5)
  # A declared preprocess (center crop, mean / std) is what runs: here on a fresh embedder.
  declared = T.Preprocess(size=8, crop_pct=0.5, resize="shorter", mean=(0.5,), std=(0.25,), channels=1)
  m = embed.ImageEmbedder(image_model.backbone, (8, 8, 1), head=nnx.merge(*image_model._head),
                          class_names=image_model.classes, preprocess=declared.to_dict())
  ready = np.stack([T.eval_transform(im if im.ndim == 3 else im[..., None], declared) for im in images])
  np.testing.assert_allclose(m.logits(images), image_forward((ready / 255.0 - 0.5) / 0.25), atol=1e-5)
  assert not np.allclose(m.logits(images), want, atol=1e-3)


def test_preprocess_false_takes_normalised_floats(image_model, image_forward):
  x = _digits()
  floats = (x / 255.0).astype(np.float32)
  np.testing.assert_allclose(image_model.logits(floats, preprocess=False), image_model.logits(x),
                             atol=1e-5)
  np.testing.assert_allclose(image_model.embed(floats, preprocess=False), image_model.embed(x), atol=1e-5)
  with pytest.raises(UserError, match="preprocess=False"):
    image_model.logits(x, preprocess=False)          # uint8 pixels are not normalised floats
  with pytest.raises(UserError, match="uint8"):
    image_model.logits(floats)                       # floats need preprocess=False


def test_image_bfloat16_and_normalize_embeddings(image_model):
  x = _digits()
  full = image_model.embed(x)
  half = image_model.embed(x, dtype="bfloat16")
  cos = (full * half).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(half, axis=1)
  assert cos.min() > 0.99 and not np.array_equal(full, half)
  unit = image_model.encode(x, normalize_embeddings=True)
  np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(unit, full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (None, "got NoneType"), ([1, 2], "image 0 is a int"), (np.zeros((2, 2, 2, 2, 2), np.uint8), "shape"),
    (["/no/such.png"], "/no/such.png"),
])
def test_bad_image_inputs_are_one_line(image_model, bad, message):
  with pytest.raises(UserError, match=message):
    image_model.embed(bad)


def test_headless_model_refuses_predictions(image_model, text_model):
  headless = embed.ImageEmbedder(image_model.backbone, (8, 8, 1), source="runs/rotation step 9")
  assert headless.embed(_digits()).shape == (6, image_model.dim)  # it still embeds
  for call in (lambda: headless.predict(_digits()), lambda: headless.logits(_digits()),
               lambda: headless.classes):
    with pytest.raises(UserError, match=r"^runs/rotation step 9 has no classifier head.*finetune_image"):
      call()
  assert image_model.has_head and not headless.has_head


# ----------------------------------------------------------------------------- texts


def test_text_predict_agrees_with_the_forward(text_run, text_model):
  spec, model, _ = modelspec.load_model(text_run)
  ids = spec["special_ids"]
  tokens = encode.encode_texts(text_model.tokenizer, TEXTS, spec["max_seq_length"], ids)
  want = np.asarray(model(tokens, tokens != ids["pad"]))
  logits = text_model.logits(TEXTS, batch_size=2)
  np.testing.assert_allclose(logits, want, atol=1e-5)
  preds = text_model.predict(TEXTS, k=2)
  assert [p["label"] for p in preds] == [spec["class_names"][i] for i in want.argmax(1)]
  assert text_model.classes == spec["class_names"]
  np.testing.assert_allclose(text_model.predict_proba(TEXTS).sum(1), 1.0, atol=1e-5)
  # One text alone predicts as in a batch (length buckets and padding change nothing).
  np.testing.assert_allclose(text_model.logits(TEXTS[1]), logits[1:2], atol=1e-5)


def test_sentence_transformers_options_change_the_output(text_model):
  m = text_model
  base = m.embed(TEXTS)
  np.testing.assert_allclose(m.encode(TEXTS), base, atol=1e-6)
  assert not np.allclose(np.linalg.norm(base, axis=1), 1.0, atol=1e-3)  # this model does not normalise
  unit = m.embed(TEXTS, normalize_embeddings=True)
  np.testing.assert_allclose(unit, base / np.linalg.norm(base, axis=1, keepdims=True), atol=1e-5)
  np.testing.assert_allclose(m.encode(TEXTS, truncate_dim=4), base[:, :4], atol=1e-6)
  # prompt= puts text before each input; prompt_name= takes it from the model's prompts.
  prompted = m.embed(TEXTS, prompt="query: ")
  np.testing.assert_allclose(prompted, m.embed(["query: " + t for t in TEXTS]), atol=1e-5)
  assert not np.allclose(prompted, base, atol=1e-4)
  m.prompts = {"query": "query: "}
  try:
    np.testing.assert_allclose(m.embed(TEXTS, prompt_name="query"), prompted, atol=1e-6)
    m.default_prompt_name = "query"
    np.testing.assert_allclose(m.embed(TEXTS), prompted, atol=1e-6)
  finally:
    m.prompts, m.default_prompt_name = {}, None
  with pytest.raises(UserError, match="prompt_name 'doc' is not one of"):
    m.embed(TEXTS, prompt_name="doc")
  # max_seq_length is settable and truncates.
  long_text = TEXTS[-1]
  before, original = m.embed([long_text]), m.max_seq_length
  m.max_seq_length = 8
  try:
    assert len(m.tokenize([long_text])[0]) == 8
    assert not np.allclose(m.embed([long_text]), before, atol=1e-4)
  finally:
    m.max_seq_length = original
  with pytest.raises(UserError, match="max_seq_length"):
    m.max_seq_length = 1
  # similarity: cosine by default, the model's function when it names another.
  sim = m.similarity(base[:2], base)
  np.testing.assert_allclose(sim, unit[:2] @ unit.T, atol=1e-5)
  m.similarity_fn_name = "dot"
  try:
    np.testing.assert_allclose(m.similarity(base[:2], base), base[:2] @ base.T, rtol=1e-5)
  finally:
    m.similarity_fn_name = "cosine"


@pytest.mark.parametrize("bad, message", [
    (None, "got NoneType"), ([1, 2], "text 0 is a int"), ({"a": 1}, "got dict")])
def test_bad_texts_are_one_line(text_model, bad, message):
  with pytest.raises(UserError, match=message):
    text_model.embed(bad)


def test_prompts_come_from_the_sentence_transformers_config(tmp_path):
  (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(
      {"prompts": {"query": "query: ", "document": ""}, "default_prompt_name": None,
       "similarity_fn_name": "dot"}))
  assert embed.st_options(str(tmp_path)) == {
      "prompts": {"query": "query: ", "document": ""}, "default_prompt_name": None,
      "similarity_fn_name": "dot"}
  assert embed.st_options(str(tmp_path / "none")) == {}


def test_progress_bar_uses_tqdm_in_a_notebook(monkeypatch):
  tqdm = pytest.importorskip("tqdm")
  monkeypatch.setitem(__import__("sys").modules, "ipykernel", object())
  bar = embed.Progress(10, True)
  assert isinstance(bar._bar, tqdm.tqdm)
  bar.update(4)
  assert bar._bar.n == 4
  bar.close()
  assert embed.Progress(10, False)._bar is None


# ----------------------------------------------------------------------------- command lines


def _image_folder(root, n=5):
  x = _digits(n, seed=3)
  names = []
  for i, im in enumerate(x):
    sub = root / ("b" if i % 2 else "a") / ("deep" if i == 4 else "")
    sub.mkdir(parents=True, exist_ok=True)
    path = sub / f"{i}.png"
    Image.fromarray(np.kron(im.squeeze(-1), np.ones((3, 3), np.uint8))).save(path)  # 24x24
    names.append(str(path.relative_to(root)))
  (root / "notes.md").write_text("not an image")
  return sorted(names)


def test_predict_cli_images_and_texts(image_run, image_model, text_run, text_model, tmp_path):
  folder = tmp_path / "imgs"
  names = _image_folder(folder)
  out = tmp_path / "preds.jsonl"
  assert predict.main(["--model", image_run, "--input", str(folder), "--output", str(out),
                       "--k", "3", "--batch-size", "2"]) == 0
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert [l["path"] for l in lines] == names
  want = image_model.predict([str(folder / n) for n in names], k=3)
  for line, w in zip(lines, want):
    assert line["label"] == w["label"] and len(line["top_k"]) == 3
    assert line["score"] == pytest.approx(w["score"], abs=1e-5)
  # A list file of paths, relative to it, in its own order.
  (folder / "list.txt").write_text("\n".join(reversed(names)) + "\n")
  assert predict.main(["--model", image_run, "--input", str(folder / "list.txt"), "--output",
                       str(out)]) == 0
  assert [json.loads(l)["path"] for l in out.read_text().splitlines()] == names[::-1]
  # Texts: ids when the records have them, else the line index.
  src = tmp_path / "in.jsonl"
  src.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
  assert predict.main(["--model", text_run, "--input", str(src), "--output", str(out)]) == 0
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert [l["id"] for l in lines] == [f"t{i}" for i in range(len(TEXTS))]
  assert [l["label"] for l in lines] == [p["label"] for p in text_model.predict(TEXTS)]
  (tmp_path / "in.txt").write_text("\n".join(TEXTS[:3]) + "\n")
  assert predict.main(["--model", text_run, "--input", str(tmp_path / "in.txt"), "--output",
                       str(out)]) == 0
  assert [json.loads(l)["index"] for l in out.read_text().splitlines()] == [0, 1, 2]


def test_embed_cli_images_in_every_format(image_run, image_model, tmp_path):
  pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  folder = tmp_path / "imgs"
  names = _image_folder(folder)
  want = image_model.embed([str(folder / n) for n in names])
  out = tmp_path / "v.npy"
  assert embed.main(["--model", image_run, "--input", str(folder), "--output", str(out),
                     "--batch-size", "2"]) == 0
  np.testing.assert_allclose(np.load(out), want, atol=1e-5)
  assert (tmp_path / "v.paths.txt").read_text().split() == names
  assert embed.main(["--model", image_run, "--input", str(folder), "--output",
                     str(tmp_path / "v.jsonl"), "--normalize", "yes"]) == 0
  rows = [json.loads(l) for l in (tmp_path / "v.jsonl").read_text().splitlines()]
  assert [r["path"] for r in rows] == names
  unit = want / np.linalg.norm(want, axis=1, keepdims=True)
  np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), unit, atol=1e-5)
  assert embed.main(["--model", image_run, "--input", str(folder), "--output",
                     str(tmp_path / "v.parquet"), "--dim", "4", "--projector", str(tmp_path / "proj")]) == 0
  assert "tensor_path" in (tmp_path / "proj" / "projector_config.pbtxt").read_text()
  table = pq.read_table(tmp_path / "v.parquet")
  assert table.column("path").to_pylist() == names
  np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()), want[:, :4], atol=1e-5)


@pytest.mark.parametrize("cli, args, message", [
    ("predict", ["--model", "/no/model", "--input", "/no/such/dir"], "input '/no/such/dir' does not exist"),
    ("embed", ["--model", "/no/model", "--input", "/no/such/dir"], "input '/no/such/dir' does not exist"),
    ("predict", ["--input", "BADPNG"], "cannot decode image"),
    ("embed", ["--input", "BADPNG"], "cannot decode image"),
    ("predict", ["--model", "TEXT", "--input", "LATIN1"], "bad.txt:2 holds bytes that are not UTF-8"),
    ("embed", ["--model", "TEXT", "--input", "LATIN1"], "bad.txt:2 holds bytes that are not UTF-8"),
    ("predict", ["--input", "EMPTYDIR"], "no images under"),
    ("embed", ["--input", "IMGS", "--prompt", "q: "], "are for text models"),
    ("predict", ["--input", "IMGS", "--k", "0"], "--k 0 must be >= 1"),
    ("predict", ["--model", "TEXT", "--input", "IMGS"], "is a folder; a text model takes"),
])
def test_cli_bad_input_is_one_line(image_run, text_run, tmp_path, capsys, cli, args, message):
  bad = tmp_path / "imgs" / "broken.png"
  bad.parent.mkdir()
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / "ok.png")
  bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  (tmp_path / "empty").mkdir()
  (tmp_path / "bad.txt").write_bytes(b"fine\ncaf\xe9\n")
  subst = {"BADPNG": str(tmp_path / "imgs"), "LATIN1": str(tmp_path / "bad.txt"), "TEXT": text_run,
           "EMPTYDIR": str(tmp_path / "empty"), "IMGS": str(tmp_path / "imgs")}
  out = tmp_path / ("o.jsonl" if cli == "predict" else "o.npy")
  argv = ["--model", image_run, "--output", str(out)] + [subst.get(a, a) for a in args]
  assert {"predict": predict, "embed": embed}[cli].main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err
  if "cannot decode" in message:
    assert "broken.png" in err
  assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".o.")]


def test_embed_cli_text_options(text_run, text_model, tmp_path, capsys):
  src = tmp_path / "in.jsonl"
  src.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
  out = tmp_path / "v.jsonl"
  assert embed.main(["--model", text_run, "--input", str(src), "--output", str(out),
                     "--prompt", "query: ", "--normalize", "yes"]) == 0
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["id"] for r in rows] == [f"t{i}" for i in range(len(TEXTS))]
  want = text_model.embed(TEXTS, prompt="query: ", normalize_embeddings=True)
  np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), want, atol=1e-5)
  assert embed.main(["--model", text_run, "--input", str(src), "--output", str(out),
                     "--prompt-name", "query"]) == 2
  assert "prompt_name 'query' is not one of" in capsys.readouterr().err


def test_output_formats_and_parquet_without_pyarrow(monkeypatch):
  from jembed import outputs
  assert [outputs.format_of(f"v{e}") for e in (".npy", ".jsonl", ".parquet")] == [".npy", ".jsonl", ".parquet"]
  with pytest.raises(UserError, match="must end in .npy, .jsonl, .parquet"):
    outputs.format_of("v.csv")
  monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)  # as if it were not installed
  with pytest.raises(UserError, match=r"needs pyarrow \(pip install pyarrow\)"):
    outputs.format_of("v.parquet")
