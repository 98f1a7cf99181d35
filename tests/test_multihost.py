"""Multi-process input of the in-memory pipeline: every process walks the same seeded global order
and takes its slice of each global batch, so the processes' local batches, concatenated, are the
one-process global batch.

The real two-process job (`jembed.main` in two JAX processes over loopback, gloo collectives) is
`tests/test_prepared_data.py::test_two_processes_on_a_prepared_corpus_match_one_with_two_streams`:
it checks their losses against one 8-device process."""
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
