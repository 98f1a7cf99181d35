"""The BERT masking recipe: 15% of candidate tokens, 80/10/10, never special or padding tokens."""
import jax
import jax.numpy as jnp
import numpy as np

from jembed.tasks.mlm import mask_tokens

PAD, MASK, SPECIAL_MAX = 0, 4, 4
VOCAB = 1000


def make_tokens(rng, batch=512, seq=128):
  tokens = rng.integers(SPECIAL_MAX + 1, VOCAB, (batch, seq))
  tokens[:, 0] = 2          # [CLS]
  tokens[:, -1] = 3         # [SEP]
  tokens[:, 50] = 3         # a document boundary
  lengths = rng.integers(40, seq, batch)
  for i, n in enumerate(lengths):   # padded tails of different lengths
    if i % 4 == 0:
      tokens[i, n:] = PAD
  tokens[:, 70] = 1         # [UNK] is special too
  return jnp.asarray(tokens, jnp.int32)


def run(tokens, key=0, k=20):
  fn = jax.jit(lambda key, t: mask_tokens(key, t, special_ids=range(SPECIAL_MAX + 1), mask_id=MASK,
                                          vocab_size=VOCAB, num_predictions=k))
  return [np.asarray(x) for x in fn(jax.random.key(key), tokens)]


def test_masking_statistics():
  tokens = make_tokens(np.random.default_rng(0))
  inputs, positions, targets, weights = run(tokens)
  tokens = np.asarray(tokens)
  chosen = weights > 0
  rows = np.repeat(np.arange(tokens.shape[0])[:, None], positions.shape[1], 1)

  # Never a special or padding token; never the same position twice in a sequence.
  assert (tokens[rows[chosen], positions[chosen]] > SPECIAL_MAX).all()
  for r in range(tokens.shape[0]):
    p = positions[r][chosen[r]]
    assert len(set(p.tolist())) == len(p)
  # Targets are the original tokens.
  np.testing.assert_array_equal(targets, tokens[rows, positions])

  # 15% of each sequence's candidates (rounded), capped at K.
  n_cand = (tokens > SPECIAL_MAX).sum(1)
  np.testing.assert_array_equal(chosen.sum(1), np.minimum(np.round(n_cand * 0.15), 20))

  # 80% [MASK], 10% random, 10% unchanged, among chosen positions.
  new = inputs[rows[chosen], positions[chosen]]
  orig = targets[chosen]
  frac_mask = (new == MASK).mean()
  frac_same = (new == orig).mean()
  frac_random = 1 - frac_mask - frac_same
  n = chosen.sum()
  assert n > 8000
  tol = 4 * np.sqrt(0.1 * 0.9 / n)
  assert abs(frac_mask - 0.8) < tol and abs(frac_same - 0.1) < tol + 1 / VOCAB
  assert abs(frac_random - 0.1) < tol
  # Random replacements are ordinary tokens, never special ones.
  assert (new[(new != MASK) & (new != orig)] > SPECIAL_MAX).all()

  # Nothing outside the chosen positions changes.
  untouched = inputs.copy()
  untouched[rows[chosen], positions[chosen]] = tokens[rows[chosen], positions[chosen]]
  np.testing.assert_array_equal(untouched, tokens)


def test_masking_is_reproducible_and_varies_with_key():
  tokens = make_tokens(np.random.default_rng(1), batch=8)
  a = run(tokens, key=3)
  b = run(tokens, key=3)
  c = run(tokens, key=4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[1], c[1])


def test_all_special_sequence_masks_nothing():
  tokens = jnp.zeros((2, 16), jnp.int32).at[:, 0].set(2).at[:, 1].set(3)
  inputs, _, _, weights = run(tokens, k=3)
  assert weights.sum() == 0
  np.testing.assert_array_equal(inputs, np.asarray(tokens))
