"""Tests for the MLM text pipeline: corpus loading, WordPiece tokenizer and packing."""
import hashlib
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tokenizers

from jembed.data import corpus_embedded, documents, packing, wordpiece
from jembed.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**overrides):
  base = dict(source="embedded", train="", eval="", eval_fraction=0.05, tfds_name="",
              tfds_split="train", tfds_eval_split="", tfds_text_key="text", data_dir="")
  base.update(overrides)
  return ml_collections.ConfigDict(base)


def _one_line_error(excinfo, *fragments):
  message = str(excinfo.value)
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, message


@pytest.fixture(scope="module")
def small_docs():
  return corpus_embedded.embedded_documents()[:400]


@pytest.fixture(scope="module")
def tok(small_docs):
  return wordpiece.build_tokenizer(small_docs, vocab_size=700)


def _words(tokenizer, s):
  """The tokenizer's view of the words of `s`: lowercased, no accents, punctuation split."""
  normalized = tokenizer.normalizer.normalize_str(s)
  return [w for w, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized)]


# ----------------------------------------------------------------------------- corpus


def test_embedded_corpus_is_prose_and_deterministic():
  docs = corpus_embedded.embedded_documents()
  assert len(docs) > 3000
  assert sum(map(len, docs)) > 600_000
  assert len(set(docs)) == len(docs)
  assert all(len(d.split()) >= 8 for d in docs)
  assert all("\n" not in d and ">>>" not in d and "::=" not in d for d in docs)
  assert docs == corpus_embedded.embedded_documents()
  # Comes from both sources: the language reference and stdlib docstrings.
  assert any("assert" in d and "debugging" in d for d in docs)
  assert any("regular expression" in d for d in docs)


def test_embedded_source_splits_off_eval(tmp_path):
  train, held = documents.load_documents(_cfg())
  assert 0.02 * len(train) < len(held) < 0.1 * len(train)
  assert not set(train) & set(held)
  assert sorted(train + held) == sorted(corpus_embedded.embedded_documents())


def test_txt_and_jsonl_files_globs_and_comma_lists(tmp_path):
  (tmp_path / "a.txt").write_text("first doc here\n\n  second doc  \n")
  (tmp_path / "b.jsonl").write_text(
      json.dumps({"text": "third doc", "id": 1}) + "\n\n" + json.dumps({"text": " "}) + "\n")
  sub = tmp_path / "sub"
  sub.mkdir()
  (sub / "c.txt").write_text("fourth doc\n")
  cfg = _cfg(train=f"{tmp_path}/*.txt, {tmp_path}/*.jsonl,{sub}", eval=str(sub / "c.txt"))
  train, held = documents.load_documents(cfg)
  assert train == ["first doc here", "second doc", "third doc", "fourth doc"]
  assert held == ["fourth doc"]
  # A non-empty `train` selects the files source even though source says "embedded".
  train, _ = documents.load_documents(_cfg(train=str(tmp_path / "**" / "*.txt"), eval_fraction=0.0))
  assert train == ["first doc here", "second doc", "fourth doc"]


def test_held_out_split_is_disjoint_stable_and_order_free(tmp_path):
  docs = [f"document number {i} about topic {i % 7}" for i in range(400)]
  path = tmp_path / "d.txt"
  path.write_text("\n".join(docs))
  train, held = documents.load_documents(_cfg(source="files", train=str(path), eval_fraction=0.1))
  assert not set(train) & set(held)
  assert sorted(train + held) == sorted(docs)
  assert 20 <= len(held) <= 60
  # Assignment depends on each text only: the same after reordering, and duplicates stay
  # on one side.
  train2, held2 = documents.split_train_eval(docs[::-1] + docs[:50], 0.1)
  assert set(held2) == set(held) and set(train2) == set(train)
  assert (held, train) == documents.split_train_eval(docs, 0.1)[::-1]


def test_tiny_corpus_still_holds_out_one_document():
  train, held = documents.split_train_eval(["a b c", "d e f", "g h i"], 0.05)
  assert len(held) == 1 and len(train) == 2
  assert documents.split_train_eval(["a b c", "d e f"], 0.0) == (["a b c", "d e f"], [])


@pytest.mark.parametrize("name, content, fragments", [
    ("x.csv", "a,b\n", ["unsupported file type", ".txt", ".jsonl"]),
    ("x.jsonl", '{"body": "no text"}\n', ["x.jsonl:1", "'text'"]),
    ("x.jsonl", '{"text": "ok"}\nnot json\n', ["x.jsonl:2", "not valid JSON"]),
    ("x.txt", "\n   \n\n", ["no non-blank documents"]),
])
def test_bad_files_raise_user_error(tmp_path, name, content, fragments):
  (tmp_path / name).write_text(content)
  with pytest.raises(UserError) as excinfo:
    documents.load_documents(_cfg(source="files", train=str(tmp_path / name)))
  _one_line_error(excinfo, *fragments)


@pytest.mark.parametrize("overrides, fragments", [
    (dict(source="files", train="/nonexistent/dir/*.txt"), ["matches no files"]),
    (dict(source="files", train=""), ["needs data.train"]),
    (dict(source="parquet"), ["unknown data.source", "'files'"]),
    (dict(train="a.txt", tfds_name="imdb_reviews"), ["both set"]),
    (dict(eval_fraction=1.5), ["eval_fraction", "[0, 1)"]),
    (dict(source="tfds"), ["needs data.tfds_name"]),
    (dict(tfds_name="imdb_reviews"), ["data.data_dir is not set", "tfds build imdb_reviews"]),
    (dict(tfds_name="imdb_reviews", data_dir="/nonexistent/tfds"), ["does not exist"]),
])
def test_bad_config_raises_user_error(overrides, fragments):
  with pytest.raises(UserError) as excinfo:
    documents.load_documents(_cfg(**overrides))
  _one_line_error(excinfo, *fragments)


def test_directory_without_text_files_raises(tmp_path):
  (tmp_path / "x.csv").write_text("a\n")
  with pytest.raises(UserError) as excinfo:
    documents.load_documents(_cfg(source="files", train=str(tmp_path)))
  _one_line_error(excinfo, "no .txt or .jsonl files")


def test_tfds_unknown_name_and_unprepared_dataset(tmp_path):
  with pytest.raises(UserError) as excinfo:
    documents.load_documents(_cfg(tfds_name="imdb_reviewz", data_dir=str(tmp_path)))
  _one_line_error(excinfo, "unknown TFDS dataset", "imdb_reviews", "data.tfds_name")
  with pytest.raises(UserError) as excinfo:
    documents.load_documents(_cfg(tfds_name="imdb_reviews", data_dir=str(tmp_path)))
  _one_line_error(excinfo, "not prepared", "tfds build imdb_reviews")
  assert not any(tmp_path.rglob("*.tfrecord*")) and not any(tmp_path.rglob("*.array_record*"))


def test_tfds_reads_through_data_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    train, held = documents.load_documents(_cfg(
        tfds_name="imdb_reviews", data_dir=str(tmp_path), tfds_eval_split="test"))
    assert len(train) == 6 and len(held) == 6
    assert all(isinstance(d, str) and d for d in train + held)
    with pytest.raises(UserError) as excinfo:
      documents.load_documents(_cfg(tfds_name="imdb_reviews", data_dir=str(tmp_path),
                               tfds_text_key="body"))
    _one_line_error(excinfo, "no feature 'body'", "label", "text")


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids_vocab_size_and_coverage(tok, small_docs):
  assert [tok.id_to_token(i) for i in range(5)] == list(wordpiece.SPECIAL_TOKENS)
  assert wordpiece.special_ids(tok) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
  assert tok.get_vocab_size() == 700
  # Every training word is covered without [UNK], and common words are single tokens.
  encs = tok.encode_batch(small_docs, add_special_tokens=False)
  assert all(1 not in e.ids for e in encs)
  for word in ("the", "is", "of"):
    assert tok.encode(word, add_special_tokens=False).tokens == [word]
  assert tok.encode("Zebra", add_special_tokens=False).tokens[0] == "z"


def test_small_corpus_gives_smaller_vocab():
  t = wordpiece.build_tokenizer(["hello world, hello there"] * 3, vocab_size=8192)
  assert len(wordpiece.SPECIAL_TOKENS) < t.get_vocab_size() < 100
  assert t.encode("hello there", add_special_tokens=False).tokens == ["hello", "there"]


def test_tokenizer_save_load_round_trip(tok, small_docs, tmp_path):
  path = str(tmp_path / "deep" / "tokenizer.json")
  again = wordpiece.build_tokenizer(small_docs, vocab_size=700, save_to=path)
  assert again.to_str() == tok.to_str()
  assert os.listdir(tmp_path / "deep") == ["tokenizer.json"]  # no temp file left behind
  loaded = wordpiece.build_tokenizer([], vocab_size=0, path=path)
  sample = small_docs[::37]
  assert [e.ids for e in loaded.encode_batch(sample)] == [e.ids for e in tok.encode_batch(sample)]
  assert loaded.decode(tok.encode(sample[0]).ids) == tok.decode(tok.encode(sample[0]).ids)


def test_tokenizer_training_is_deterministic_across_processes(tok, small_docs):
  script = (
      "import hashlib; from jembed.data import corpus_embedded, wordpiece; "
      "d = corpus_embedded.embedded_documents(); "
      "t = wordpiece.build_tokenizer(d[:400], vocab_size=700); "
      "print(hashlib.sha256('\\x00'.join(d).encode()).hexdigest(), "
      "hashlib.sha256(t.to_str().encode()).hexdigest())")
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True,
                       capture_output=True, text=True).stdout.split()
  assert out[0] == hashlib.sha256("\x00".join(corpus_embedded.embedded_documents()).encode()).hexdigest()
  assert out[1] == hashlib.sha256(tok.to_str().encode()).hexdigest()


def test_load_tokenizer_errors(tok, tmp_path):
  with pytest.raises(UserError) as excinfo:
    wordpiece.build_tokenizer([], 100, path=str(tmp_path / "missing.json"))
  _one_line_error(excinfo, "does not exist")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(UserError) as excinfo:
    wordpiece.build_tokenizer([], 100, path=str(bad))
  _one_line_error(excinfo, "cannot read tokenizer", "tokenizer.json")
  spec = json.loads(tok.to_str())
  spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "[MASK]"]
  del spec["model"]["vocab"]["[MASK]"]
  no_mask = tmp_path / "no_mask.json"
  no_mask.write_text(json.dumps(spec))
  with pytest.raises(UserError) as excinfo:
    wordpiece.build_tokenizer([], 100, path=str(no_mask))
  _one_line_error(excinfo, "[MASK]")
  with pytest.raises(UserError):
    wordpiece.build_tokenizer(["   "], 100)
  with pytest.raises(UserError):
    wordpiece.build_tokenizer(["some words"], 5)


# ----------------------------------------------------------------------------- packing


def _unpack(rows, ids):
  """The token stream that was packed: row bodies concatenated, padding removed."""
  stream = []
  for i, row in enumerate(rows):
    body = list(row[1:-1])
    if i == len(rows) - 1 and ids["pad"] in row:
      body = list(row[1:list(row).index(ids["pad"]) - 1])
    stream.extend(body)
  return stream


def test_packing_layout_and_exact_reconstruction(tok, small_docs):
  docs = small_docs[:120]
  rows = packing.pack_documents(docs, tok, seq_len=64)
  ids = wordpiece.special_ids(tok)
  assert rows.dtype == np.int32 and rows.shape[1] == 64
  assert (rows[:, 0] == ids["cls"]).all()
  assert (rows[:-1, -1] == ids["sep"]).all() and (rows[:-1] != ids["pad"]).all()
  last = rows[-1]
  if last[-1] == ids["pad"]:
    n_real = int((last != ids["pad"]).sum())
    assert (last[n_real:] == ids["pad"]).all() and last[n_real - 1] == ids["sep"]
    assert n_real - 2 >= packing.MIN_LAST_ROW_TOKENS
  # The stream is doc1 [SEP] doc2 [SEP] ... : splitting it on [SEP] gives each document's
  # own encoding back, in order (only a dropped short tail can be missing).
  stream = _unpack(rows, ids)
  pieces, current = [], []
  for t in stream:
    if t == ids["sep"]:
      pieces.append(current)
      current = []
    else:
      current.append(t)
  pieces.append(current)
  expected = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
  assert pieces[:-1] == expected[:len(pieces) - 1]
  assert expected[len(pieces) - 1][:len(pieces[-1])] == pieces[-1]
  dropped = sum(len(e) + 1 for e in expected) - 1 - len(stream)
  assert 0 <= dropped < packing.MIN_LAST_ROW_TOKENS


def test_packed_rows_decode_to_original_words(tok, small_docs):
  docs = small_docs[:10]
  rows = packing.pack_documents(docs, tok, seq_len=48)
  original = [w for d in docs for w in _words(tok, d)]
  # Joined, the rows give back every word in order (words may straddle two rows).
  stream = _unpack(rows, wordpiece.special_ids(tok))
  recovered = _words(tok, tok.decode(stream, skip_special_tokens=True))
  n = len(recovered)
  assert n > 0.8 * len(original)
  # The last word may be cut where a dropped short tail began.
  assert recovered[:-1] == original[:n - 1] and original[n - 1].startswith(recovered[-1])
  # Each row alone: apart from words cut at either edge, a contiguous run of the text.
  joined = " ".join(original)
  for row in rows:
    pieces = [tok.id_to_token(int(t)) for t in row]
    start = next(i for i in range(1, len(pieces)) if not pieces[i].startswith("##"))
    inner = _words(tok, tok.decode(row[start:].tolist(), skip_special_tokens=True))[:-1]
    assert len(inner) > 10 and " ".join(inner) in joined


def test_last_row_padding_and_dropping(tok):
  ids = wordpiece.special_ids(tok)
  word = tok.encode("the", add_special_tokens=False).ids[0]
  # 40 tokens with seq_len 32 (30 per row): a 10-token tail is dropped, a 20-token one kept.
  rows = packing.pack_documents(["the " * 40], tok, seq_len=32)
  assert rows.shape == (1, 32) and (rows[0, 1:-1] == word).all()
  rows = packing.pack_documents(["the " * 50], tok, seq_len=32)
  assert rows.shape == (2, 32)
  np.testing.assert_array_equal(rows[1, :22], [ids["cls"]] + [word] * 20 + [ids["sep"]])
  assert (rows[1, 22:] == ids["pad"]).all()
  # Two documents, separated by one [SEP], fit in a single padded row.
  rows = packing.pack_documents(["the " * 10, "the " * 10], tok, seq_len=64)
  assert rows.shape == (1, 64)
  assert rows[0, 11] == ids["sep"] and rows[0, 22] == ids["sep"] and rows[0, 23] == ids["pad"]
  assert packing.pack_documents(["the"], tok, seq_len=32).shape == (0, 32)
  with pytest.raises(UserError):
    packing.pack_documents(["the"], tok, seq_len=2)


def test_packing_ignores_tokenizer_padding_and_keeps_it(tok, small_docs):
  expected = packing.pack_documents(small_docs[:20], tok, seq_len=32)
  t = tokenizers.Tokenizer.from_str(tok.to_str())
  t.enable_padding(length=8)
  t.enable_truncation(max_length=8)
  np.testing.assert_array_equal(packing.pack_documents(small_docs[:20], t, seq_len=32), expected)
  assert t.padding is not None and t.truncation is not None


def test_token_frequencies_matches_bincount(tok, small_docs):
  rows = packing.pack_documents(small_docs[:50], tok, seq_len=32)
  vocab = tok.get_vocab_size()
  counts = packing.token_frequencies(rows, vocab)
  reference = np.bincount(rows.ravel(), minlength=vocab)
  reference[:5] = 0
  np.testing.assert_array_equal(counts, reference)
  assert counts.shape == (vocab,) and counts.sum() > 0
  custom = packing.token_frequencies(rows, vocab, special=[7])
  assert custom[7] == 0 and custom[2] == (rows == 2).sum()
