"""Pair files (JSONL/CSV, bad records), retrieval sets, the embedded docstring pairs, config splits."""
import json
import math

import ml_collections
import numpy as np
import pytest

from jembed.data import pairs as P
from jembed.data import pipeline
from jembed.errors import UserError
from jembed.retrieval import retrieval_metrics


def _jsonl(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(r if isinstance(r, str) else json.dumps(r))
      f.write("\n")
  return str(path)


def _csv(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


GOOD = [{"anchor": "how to sort a list", "positive": "sorted() returns a new list", "negative": "open a file"},
        {"anchor": "read a file", "positive": "open() then read()", "negative": ["sort things", "sleep a while"]},
        {"anchor": "wait", "positive": "time.sleep pauses"}]


def test_jsonl_pairs_with_optional_negatives(tmp_path):
  pairs, skipped = P.load_pairs(_jsonl(tmp_path / "a.jsonl", GOOD + [""]))  # a blank line is not a record
  assert skipped == 0
  assert pairs == [P.TextPair("how to sort a list", "sorted() returns a new list", ("open a file",)),
                   P.TextPair("read a file", "open() then read()", ("sort things", "sleep a while")),
                   P.TextPair("wait", "time.sleep pauses", ())]


def test_field_names_are_configurable(tmp_path):
  path = _jsonl(tmp_path / "a.jsonl", [{"q": "x query", "d": "x doc", "hard": ["y doc"], "anchor": "not me"}])
  pairs, _ = P.load_pairs(path, anchor_key="q", positive_key="d", negative_key="hard")
  assert pairs == [P.TextPair("x query", "x doc", ("y doc",))]
  with pytest.raises(UserError, match="missing field 'positive'"):
    P.load_pairs(path)


def test_csv_pairs_and_scored_pairs(tmp_path):
  path = _csv(tmp_path / "p.csv", 'anchor,positive,negative\n"a, with comma",pos one,neg one\nb,pos two,\n')
  pairs, skipped = P.load_pairs(path)
  assert skipped == 0
  assert pairs == [P.TextPair("a, with comma", "pos one", ("neg one",)), P.TextPair("b", "pos two", ())]
  sts = _csv(tmp_path / "s.csv", "text1,text2,score\nx,y,4.5\nz,w,0\n")
  scored, _ = P.load_scored_pairs(sts)
  assert scored == [P.ScoredPair("x", "y", 4.5), P.ScoredPair("z", "w", 0.0)]
  sj = _jsonl(tmp_path / "s.jsonl", [{"s1": "x", "s2": "y", "gold": 3}])
  assert P.load_scored_pairs(sj, text1_key="s1", text2_key="s2", score_key="gold")[0] == [P.ScoredPair("x", "y", 3.0)]
  with pytest.raises(UserError, match=r"lacks \['score'\]"):
    P.load_scored_pairs(_csv(tmp_path / "bad.csv", "text1,text2,gold\nx,y,1\n"))


@pytest.mark.parametrize("line,problem", [
    ("{not json", "not valid JSON"),
    ('["a", "b"]', "not a JSON object"),
    ('{"anchor": "a"}', "missing field 'positive'"),
    ('{"anchor": "  ", "positive": "b"}', "field 'anchor' is an empty text"),
    ('{"anchor": 3, "positive": "b"}', "not a string"),
    ('{"anchor": "a", "positive": "b", "negative": ["c", ""]}', "empty or non-string"),
    ('{"anchor": "a", "positive": "b", "negative": 7}', "string or a list"),
])
def test_bad_jsonl_record_raises_or_is_skipped(tmp_path, line, problem):
  path = _jsonl(tmp_path / "bad.jsonl", GOOD[:2] + [line] + GOOD[2:])
  with pytest.raises(UserError) as e:
    P.load_pairs(path)
  message = str(e.value)
  assert message.startswith(f"{path}:3: ") and problem in message and "\n" not in message
  pairs, skipped = P.load_pairs(path, on_bad_record="skip")
  assert skipped == 1 and [p.anchor for p in pairs] == [g["anchor"] for g in GOOD]


def test_bad_csv_rows_and_scores(tmp_path):
  path = _csv(tmp_path / "p.csv", "anchor,positive\na,b\nshort row\nc,\nd,e\n")
  with pytest.raises(UserError, match=r"p\.csv:3: missing field 'positive'"):
    P.load_pairs(path)
  pairs, skipped = P.load_pairs(path, on_bad_record="skip")
  assert skipped == 2 and [p.anchor for p in pairs] == ["a", "d"]
  sts = _jsonl(tmp_path / "s.jsonl", [{"text1": "a", "text2": "b", "score": 1},
                                      {"text1": "a", "text2": "b", "score": "high"},
                                      {"text1": "a", "text2": "b", "score": True},
                                      {"text1": "a", "text2": "b", "score": float("nan")}])
  with pytest.raises(UserError, match=r"s\.jsonl:2: field 'score'='high' is not a number"):
    P.load_scored_pairs(sts)
  assert P.load_scored_pairs(sts, on_bad_record="skip")[1] == 3


def test_file_level_errors(tmp_path):
  with pytest.raises(UserError, match="matches no files"):
    P.load_pairs(str(tmp_path / "none*.jsonl"))
  (tmp_path / "x.parquet").write_text("a")
  with pytest.raises(UserError, match="unsupported file"):
    P.load_pairs(str(tmp_path / "x.parquet"))
  bad = _jsonl(tmp_path / "allbad.jsonl", ["{", "{"])
  with pytest.raises(UserError, match=r"no valid pairs \(2 bad records skipped\)"):
    P.load_pairs(bad, on_bad_record="skip")
  with pytest.raises(UserError, match="on_bad_record"):
    P.load_pairs(bad, on_bad_record="ignore")
  (tmp_path / "latin.jsonl").write_bytes('{"anchor": "caf\xe9"}\n'.encode("latin-1"))
  with pytest.raises(UserError, match="not UTF-8"):
    P.load_pairs(str(tmp_path / "latin.jsonl"))
  # Globs and comma-separated specs read every file.
  _jsonl(tmp_path / "g1.jsonl", GOOD[:1])
  _jsonl(tmp_path / "g2.jsonl", GOOD[1:])
  assert len(P.load_pairs(str(tmp_path / "g*.jsonl"))[0]) == 3
  assert len(P.load_pairs(f"{tmp_path / 'g1.jsonl'}, {tmp_path / 'g2.jsonl'}")[0]) == 3


def test_retrieval_set():
  pairs = [P.TextPair("q1", "d1", ("d2", "d3")),
           P.TextPair("q2", "d2", ("d1",)),
           P.TextPair("q1", "d4"),  # a repeated anchor: both positives are relevant
           P.TextPair("q3", "d3")]
  queries, corpus, qrels = P.retrieval_set(pairs)
  assert queries == ["q1", "q2", "q3"]
  assert corpus == ["d1", "d2", "d3", "d4"]
  assert qrels == [{0, 3}, {1}, {2}]
  # Embeddings that put each query on its first relevant document: perfect top-1.
  corpus_emb = np.eye(4, dtype=np.float32)
  query_emb = corpus_emb[[0, 1, 2]]
  m = retrieval_metrics(query_emb, corpus_emb, qrels)
  assert m["mrr@10"] == 1.0 and m["recall@10"] == 1.0
  np.testing.assert_allclose(m["recall@1"], (0.5 + 1 + 1) / 3)


def test_embedded_pairs_are_a_deterministic_split():
  train, held = P.embedded_pairs()
  assert len(train) > 1000 and len(held) > 150
  everything = train + held
  anchors = [p.anchor for p in everything]
  assert len(set(anchors)) == len(anchors)  # one right answer per query
  assert len({p.positive for p in everything}) == len(everything)
  assert not {p.anchor for p in train} & {p.anchor for p in held}
  for p in everything:
    assert len(p.anchor) >= 15 and len(p.positive) >= 40 and not p.negatives
    assert not (p.anchor.endswith(")") and "(" in p.anchor.split()[0])  # no bare signatures
  # A pair read off a real docstring: math.atan2's summary and the rest of it.
  doc = math.atan2.__doc__.split("\n\n")
  assert P.TextPair(" ".join(doc[0].split()), " ".join(" ".join(doc[1:]).split())) in everything
  # Recomputed from scratch: the same pairs on the same side; a larger fraction holds out more.
  P._embedded_all.cache_clear()
  assert P.embedded_pairs() == (train, held)
  train_30, held_30 = P.embedded_pairs(0.3)
  assert set(p.anchor for p in held) < set(p.anchor for p in held_30)
  assert abs(len(held_30) / len(everything) - 0.3) < 0.05


def test_load_pair_splits_from_config(tmp_path):
  cfg = lambda **kw: ml_collections.ConfigDict(kw)
  train, held, skipped = P.load_pair_splits(cfg())
  assert (train, held) == P.embedded_pairs(0.15) and skipped == 0
  records = [{"q": f"query {i}", "d": f"document {i}"} for i in range(200)] + ["{oops"]
  path = _jsonl(tmp_path / "t.jsonl", records)
  pipeline.reset_bad_records()
  train, held, skipped = P.load_pair_splits(cfg(train=path, anchor_key="q", positive_key="d",
                                                on_bad_record="skip", eval_fraction=0.25))
  assert skipped == 1 and len(train) + len(held) == 200
  # The loop's one counter (its header, log line and metrics row) says the same.
  assert pipeline.bad_records()["skipped"] == 1
  assert pipeline.bad_records()["examples"][0].startswith(f"{path}:201:")
  assert 25 < len(held) < 75 and not {p.anchor for p in train} & {p.anchor for p in held}
  with pytest.raises(UserError, match=r"t\.jsonl:201"):
    P.load_pair_splits(cfg(train=path, anchor_key="q", positive_key="d"))
  ev = _jsonl(tmp_path / "e.jsonl", [{"q": "eq", "d": "ed"}])
  train, held, _ = P.load_pair_splits(cfg(train=path, eval=ev, anchor_key="q", positive_key="d",
                                          on_bad_record="skip"))
  assert len(train) == 200 and held == [P.TextPair("eq", "ed")]
  with pytest.raises(UserError, match="without data.train"):
    P.load_pair_splits(cfg(eval=ev))


def test_txt_gives_unsupervised_pairs(tmp_path):
  path = tmp_path / "plain.txt"
  path.write_text("first line\n\nsecond line\n")
  pairs, skipped = P.load_pairs(str(path))
  assert [(p.anchor, p.positive, p.negatives) for p in pairs] == [
      ("first line", "first line", ()), ("second line", "second line", ())]
  assert skipped == 0
