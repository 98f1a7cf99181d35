"""Gradient accumulation gives the full batch's update; bfloat16 compute stays close to float32;
rematerialisation changes memory, not results."""
import jax
import numpy as np
import pytest

from jembed import train, tree
from jembed.data import pipeline
from jembed.errors import UserError
from spine_helpers import apply_overrides, load_config_file, tiny_mlm_config, write_corpus


def _classification(**overrides):
  c = load_config_file("finetune_text")
  c.batch_size = 32
  c.warmup_steps = 0
  c.model.update(dict(num_layers=1, hidden_size=32, num_heads=2, mlp_dim=64, max_position=64,
                      dropout=0.0, attention_dropout=0.0))
  c.data.update(dict(seq_len=32, vocab_size=512))
  return apply_overrides(c, overrides)


def _steps(config, devices, n=2, edit=lambda setup, batch: batch):
  setup = train.Setup(config, "/nonexistent-workdir", devices=devices)
  state = setup.init_state()
  it = pipeline.train_iterator(setup.data.train, config.batch_size, config.seed)
  batches = [setup.to_global(edit(setup, next(it))) for _ in range(n)]
  step = setup.compile(state, batches[0])
  losses = []
  for b in batches:
    state, m = step(state, b)
    losses.append(float(m["loss"]))
  return losses, {p: np.asarray(v) for p, v in tree.flatten(jax.device_get(state.params)).items()}


def test_accumulated_update_equals_full_batch():
  full_losses, full = _steps(_classification(), jax.devices())
  acc_losses, acc = _steps(_classification(grad_accum_steps=4), jax.devices())
  np.testing.assert_allclose(acc_losses, full_losses, rtol=1e-5)
  for p in full:
    np.testing.assert_allclose(acc[p], full[p], rtol=1e-4, atol=1e-6, err_msg=p)
  with pytest.raises(UserError, match="grad_accum_steps"):
    train.Setup(_classification(grad_accum_steps=3), "/nonexistent-workdir", devices=jax.devices())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def f32_step(corpus):
  return _steps(tiny_mlm_config(corpus, **{"model.dtype": "float32"}), jax.devices()[:1], n=1)


def test_bfloat16_step_close_to_float32_and_params_stay_float32(corpus, f32_step):
  f32, _ = f32_step
  bf16, p16 = _steps(tiny_mlm_config(corpus, **{"model.dtype": "bfloat16"}), jax.devices()[:1], n=1)
  # bfloat16 keeps 8 bits of mantissa: a relative error of a few 1e-3 per op; the loss of a tiny
  # BERT agrees to 1%.
  np.testing.assert_allclose(bf16, f32, rtol=1e-2)
  assert bf16 != f32
  assert all(v.dtype == np.float32 for v in p16.values())


def test_remat_gives_the_same_step(corpus, f32_step):
  base, params = f32_step
  losses, remat_params = _steps(tiny_mlm_config(corpus, **{"model.dtype": "float32", "model.remat": "dots"}),
                                jax.devices()[:1], n=1)
  np.testing.assert_allclose(losses, base, rtol=1e-6)
  for p in params:
    np.testing.assert_allclose(remat_params[p], params[p], rtol=1e-5, atol=1e-7, err_msg=p)
  with pytest.raises(UserError, match="model.remat"):
    train.Setup(tiny_mlm_config(corpus, **{"model.remat": "some"}), "/x", devices=jax.devices()[:1])


def test_mlm_accumulated_update_equals_full_batch(corpus):
  # MLM's loss is a mean over the masked tokens, whose count differs between micro-batches (here:
  # sequences padded to different lengths): each micro-batch is weighted by it, and the masks are
  # drawn once for the whole batch.
  def pad_tails(setup, batch):
    tokens = np.array(batch["tokens"])
    for i, keep in enumerate(np.random.default_rng(0).integers(3, tokens.shape[1], len(tokens))):
      tokens[i, keep:] = setup.task.ids["pad"]
    return dict(batch, tokens=tokens)

  mlm = lambda **kw: tiny_mlm_config(corpus, **dict({"batch_size": 32, "warmup_steps": 0,
                                                     "model.dropout": 0.0,
                                                     "model.attention_dropout": 0.0}, **kw))
  full_losses, full = _steps(mlm(), jax.devices(), edit=pad_tails)
  acc_losses, acc = _steps(mlm(grad_accum_steps=4), jax.devices(), edit=pad_tails)
  np.testing.assert_allclose(acc_losses, full_losses, rtol=1e-5)   # micro-batch means: ~4e-4 off
  for p in full:
    # Adam's first steps move each parameter by about the learning rate whatever the gradient's
    # size, so a float-rounding difference in a tiny gradient shows at ~1e-6 here: 1% of the lr.
    np.testing.assert_allclose(acc[p], full[p], rtol=1e-4, atol=1e-5, err_msg=p)


def test_contrastive_accumulation_is_refused_with_a_pointer_to_chunk_size():
  c = load_config_file("contrastive_text")
  c.grad_accum_steps = 2
  with pytest.raises(UserError, match="grad_accum_steps=2.*negatives.*loss.chunk_size") as e:
    train.Setup(c, "/nonexistent-workdir", devices=jax.devices())
  assert "\n" not in str(e.value)
