"""Tunings as parameter-tree splits: exact start, frozen leaves untouched, no optimizer state for
frozen parameters, merge equal to the LoRA model, adapter checkpoints that refuse a wrong base."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from jembed import finetune
from jembed.errors import UserError
from jembed.models.transformer import TransformerConfig
from jembed.peft import lora
from jembed.tasks.classification import TextClassifier
from jembed import tuning as tuning_lib

CFG = TransformerConfig(num_layers=2, hidden_size=16, num_heads=2, mlp_dim=32, vocab_size=40,
                        max_position=16, dropout=0.0, attention_dropout=0.0)


def _model(adapter_dim=0, seed=0):
  import dataclasses
  cfg = dataclasses.replace(CFG, adapter_dim=adapter_dim)
  model = TextClassifier(cfg, 3, "mean", rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(5, 40, (4, 8)), jnp.int32)
LABELS = jnp.asarray([0, 1, 2, 1])


def _forward(graphdef, rest, params):
  return nnx.merge(graphdef, params, rest)(TOKENS, TOKENS > 0, train=False)


def _peft(**kw):
  return tuning_lib.peft_config(**kw)


def _cfg(method, **kw):
  return ml_collections.ConfigDict({"peft": _peft(method=method, **kw).to_dict()})


def _train(tuning, graphdef, rest, params, steps=3):
  trained, frozen = tuning.split(params, jax.random.key(1))
  tx = optax.adam(1e-2)
  opt = tx.init(trained)

  @jax.jit
  def step(trained, opt, key):
    def loss_fn(t):
      p = tuning.combine(t, frozen, rng=key, train=True)
      logits = nnx.merge(graphdef, p, rest)(TOKENS, TOKENS > 0, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()
    g = jax.grad(loss_fn)(trained)
    u, opt = tx.update(g, opt, trained)
    return optax.apply_updates(trained, u), opt

  for i in range(steps):
    trained, opt = step(trained, opt, jax.random.key(i))
  return trained, frozen, opt


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def base():
  return _model()


def test_from_config_and_unknown_method():
  assert isinstance(tuning_lib.tuning_from_config(ml_collections.ConfigDict()), tuning_lib.FullTuning)
  assert isinstance(tuning_lib.tuning_from_config(_cfg("lora")), tuning_lib.LoraTuning)
  assert isinstance(tuning_lib.tuning_from_config(_cfg("adapter")), tuning_lib.AdapterTuning)
  assert isinstance(tuning_lib.tuning_from_config(_cfg("linear_probe")), tuning_lib.LinearProbeTuning)
  with pytest.raises(UserError, match="peft.method='prefix'"):
    tuning_lib.tuning_from_config(_cfg("prefix"))


def test_lora_starts_at_base_trains_only_adapters_and_merges(base, tmp_path):
  graphdef, params, rest = base
  tuning = tuning_lib.tuning_from_config(_cfg("lora", rank=2, targets="attention", dropout=0.1))
  trained, frozen = tuning.split(params, jax.random.key(0))
  # B = 0: exactly the base model's outputs.
  np.testing.assert_array_equal(_forward(graphdef, rest, tuning.combine(trained, frozen)),
                                _forward(graphdef, rest, params))
  frozen_before = _bits(frozen)
  trained2, frozen2, opt = _train(tuning, graphdef, rest, params)
  assert _bits(frozen2) == frozen_before  # the frozen base is bitwise unchanged
  # Optimizer state only for the trained tree: no leaf shaped like a frozen kernel.
  n_trained = sum(x.size for x in jax.tree.leaves(trained2))
  n_opt = sum(x.size for x in jax.tree.leaves(opt) if x.ndim > 0)
  assert n_opt == 2 * n_trained  # Adam: mu and nu, for the trained leaves only
  assert n_trained < 0.2 * sum(x.size for x in jax.tree.leaves(params))
  assert set(trained2) == {"adapters", "extra"} and "head" in trained2["extra"]
  assert "head" not in frozen2
  # Training moved the model, and the merged dense tree gives the LoRA model's outputs.
  lora_out = _forward(graphdef, rest, tuning.combine(trained2, frozen2))
  assert not np.allclose(lora_out, _forward(graphdef, rest, params))
  merged = tuning.merged(trained2, frozen2)
  np.testing.assert_allclose(_forward(graphdef, rest, merged), lora_out, rtol=1e-6, atol=1e-6)

  # Adapter-only checkpoint: a small fraction of the full one, refuses another base.
  finetune.export_lora(str(tmp_path), tuning, trained2, frozen2)
  small = finetune.directory_bytes(str(tmp_path / "lora_adapter"))
  full = finetune.directory_bytes(str(tmp_path / "merged"))
  assert small < 0.5 * full, (small, full)
  extra_like = jax.tree.map(jnp.zeros_like, trained2["extra"])
  adapters, extra, cfg = finetune.load_lora(str(tmp_path / "lora_adapter"), frozen2, extra_like)
  assert cfg == tuning.cfg
  np.testing.assert_array_equal(extra["head"]["dense"]["kernel"], trained2["extra"]["head"]["dense"]["kernel"])
  flat = tuning_lib.flat_adapters(trained2["adapters"])
  for path in flat:
    np.testing.assert_array_equal(adapters[path]["b"], flat[path]["b"])
  _, other, _ = _model(seed=5)
  _, other_frozen = tuning.split(other, jax.random.key(0))
  with pytest.raises(UserError, match="different base"):
    finetune.load_lora(str(tmp_path / "lora_adapter"), other_frozen, extra_like)
  # Merged export restores to the same outputs.
  restored = finetune.load_params(str(tmp_path / "merged"))
  np.testing.assert_allclose(np.asarray(restored["head"]["dense"]["kernel"]),
                             merged["head"]["dense"]["kernel"])


def test_linear_probe_trains_only_the_head(base):
  graphdef, params, rest = base
  tuning = tuning_lib.LinearProbeTuning()
  trained, frozen = tuning.split(params, jax.random.key(0))
  assert list(trained) == ["head"] and "head" not in frozen
  trained2, frozen2, opt = _train(tuning, graphdef, rest, params)
  assert _bits(frozen2) == _bits(frozen)
  assert sum(x.size for x in jax.tree.leaves(opt) if x.ndim > 0) == 2 * (16 * 3 + 3)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.split(nnx.eval_shape(
      lambda: TextClassifier(CFG, 3, "mean", rngs=nnx.Rngs(0))), nnx.Param, ...)[1]))
  t_specs, f_specs = tuning.split_specs(specs, params)
  assert jax.tree.structure(t_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) \
      == jax.tree.structure(trained)


def test_adapter_tuning_starts_at_base_and_trains_adapters_norms_head():
  graphdef, params, rest = _model(adapter_dim=4)
  tuning = tuning_lib.AdapterTuning()
  trained, frozen = tuning.split(params, jax.random.key(0))
  flat = lora._flatten(trained)
  assert any("attention_adapter" in p for p in flat) and any("mlp_adapter" in p for p in flat)
  assert any(p.endswith("attention_norm/scale") for p in flat) and "head/dense/kernel" in flat
  assert not any(p.endswith("query/kernel") for p in flat)
  # Zero-initialised up projections: the adapter model is the base model at the start.
  g0, p0, r0 = _model(adapter_dim=0)
  no_adapters = {k: v for k, v in lora._flatten(params).items() if "adapter" not in k}
  assert set(no_adapters) == set(lora._flatten(p0))
  base_params = lora._replace(p0, no_adapters)
  np.testing.assert_allclose(_forward(graphdef, rest, tuning.combine(trained, frozen)),
                             _forward(g0, r0, base_params), rtol=1e-6, atol=1e-6)
  _, frozen2, _ = _train(tuning, graphdef, rest, params)
  assert _bits(frozen2) == _bits(frozen)
