"""jembed.embed: vectors out of a workdir, in input order, the same however texts are batched;
bfloat16, Matryoshka truncation, the projector files, and one-line errors for bad input."""
import json
import os

import numpy as np
import pytest

from jembed import embed
from spine_helpers import tiny_text_workdir

TEXTS = ["a short one", "", "x " * 200, "the quick brown fox jumps over the lazy dog " * 3,
         "Return the absolute value of the argument.", "open a file and return a stream"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tiny_text_workdir(str(tmp_path_factory.mktemp("embed")))


@pytest.fixture(scope="module")
def model(workdir):
  return embed.load(workdir)


def test_order_and_batching_do_not_change_vectors(model):
  together = model.embed(TEXTS, batch_size=4)
  assert together.shape == (len(TEXTS), model.dim) and together.dtype == np.float32
  alone = np.stack([model.embed([t])[0] for t in TEXTS])
  np.testing.assert_allclose(together, alone, atol=1e-5)
  assert not np.allclose(together[0], together[3])
  # Texts longer than the model's length are truncated, not refused. A model trained from scratch
  # keeps its position table's length (64), not the training truncation data.seq_len (32).
  assert model.max_seq_length == 64


def test_bfloat16_and_truncated_dims(model):
  full = model.embed(TEXTS)
  half = model.embed(TEXTS, dtype="bfloat16")
  cos = (full * half).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(half, axis=1)
  assert cos.min() > 0.999 and not np.array_equal(full, half)
  short = model.embed(TEXTS, dim=8)
  np.testing.assert_allclose(short, full[:, :8], atol=1e-6)  # this MLM model does not normalise


def test_cli_jsonl_with_ids_and_projector(workdir, model, tmp_path):
  src = tmp_path / "docs.jsonl"
  with open(src, "w") as f:
    for i, t in enumerate(TEXTS):
      f.write(json.dumps({"id": f"doc{i}", "body": t}) + "\n")
  out = tmp_path / "vecs.npy"
  rc = embed.main(["--model", workdir, "--input", str(src), "--field", "body", "--output", str(out),
                   "--batch-size", "2", "--projector", str(tmp_path / "proj")])
  assert rc == 0
  np.testing.assert_allclose(np.load(out), model.embed(TEXTS), atol=1e-5)
  assert (tmp_path / "vecs.ids.txt").read_text().split() == [f"doc{i}" for i in range(len(TEXTS))]
  config = open(tmp_path / "proj" / "projector_config.pbtxt").read()
  assert "metadata_path" in config and "tensor_path" in config


@pytest.mark.parametrize("args, message", [
    (["--input", "/no/such.txt"], "does not exist"),
    (["--input", "EMPTY"], "holds no texts"),
    (["--input", "JSONL", "--field", "missing"], "has no field 'missing'"),
    (["--model", "/tmp", "--input", "JSONL"], "not a model directory"),
    (["--input", "JSONL", "--dim", "0"], "dim=0"),
])
def test_bad_input_is_one_line(workdir, tmp_path, capsys, args, message):
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "in.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
  subst = {"EMPTY": str(tmp_path / "empty.txt"), "JSONL": str(tmp_path / "in.jsonl")}
  argv = ["--model", workdir, "--output", str(tmp_path / "o.npy")] + [subst.get(a, a) for a in args]
  assert embed.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1
  assert not (tmp_path / "o.npy").exists()


def test_evaluate_retrieval_and_spearman(workdir, model, tmp_path, capsys):
  from scipy.stats import spearmanr
  from jembed import evaluate, retrieval
  pairs = [("open a file", "return a stream"), ("absolute value", "of the argument"),
           ("a fox", "jumps over the dog"), ("short", "one")]
  path = tmp_path / "held.jsonl"
  path.write_text("".join(json.dumps({"anchor": a, "positive": p, "negative": "unrelated text"}) + "\n"
                          for a, p in pairs))
  assert evaluate.main(["--model", workdir, "--retrieval", str(path), "--output",
                        str(tmp_path / "r.json")]) == 0
  got = json.load(open(tmp_path / "r.json"))
  corpus = [p for _, p in pairs] + ["unrelated text"]
  ref = retrieval.retrieval_metrics(model.embed([a for a, _ in pairs]), model.embed(corpus),
                                    [{i} for i in range(len(pairs))])
  for k in ("recall@1", "recall@10", "mrr@10", "ndcg@10"):
    assert got[k] == pytest.approx(ref[k])
  assert got["corpus"] == 5 and "recall@1" in capsys.readouterr().out

  scored = tmp_path / "sts.jsonl"
  rows = [(a, p, float(i)) for i, (a, p) in enumerate(pairs)]
  scored.write_text("".join(json.dumps({"text1": a, "text2": b, "score": s}) + "\n" for a, b, s in rows))
  assert evaluate.main(["--model", workdir, "--retrieval", str(scored)]) == 0
  got = json.load(open(os.path.join(workdir, "retrieval.json")))
  a, b = model.embed([r[0] for r in rows]), model.embed([r[1] for r in rows])
  cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
  assert got["spearman"] == pytest.approx(spearmanr(cos, [r[2] for r in rows]).statistic)
