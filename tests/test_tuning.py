"""Tunings as parameter-tree splits: exact start, frozen leaves untouched, no optimizer state for
frozen parameters, merge equal to the LoRA model, adapter checkpoints that refuse a wrong base; the
tuning's own behaviour (backbone mode, model overrides, new parameters) and one set of defaults."""
import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jembed import peft, tree
from jembed.errors import UserError
from jembed.models.transformer import TransformerConfig
from jembed.peft import export, lora
from jembed.tasks.classification_text import TextClassifier
from configs.common import peft_config

CFG = TransformerConfig(num_layers=2, hidden_size=16, num_heads=2, mlp_dim=32, vocab_size=40,
                        max_position=16, dropout=0.0, attention_dropout=0.0)


def _model(adapter_dim=0, seed=0):
  cfg = dataclasses.replace(CFG, adapter_dim=adapter_dim)
  model = TextClassifier(cfg, 3, "mean", rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(5, 40, (4, 8)), jnp.int32)
LABELS = jnp.asarray([0, 1, 2, 1])


def _forward(graphdef, rest, params):
  return nnx.merge(graphdef, params, rest)(TOKENS, TOKENS > 0)


def _tuning(method, **kw):
  return peft.tuning_from_config(peft_config(method=method, **kw))


def _train(tuning, graphdef, rest, params, steps=3):
  trained, frozen = tuning.split(params, jax.random.key(1))
  tx = optax.adam(1e-2)
  opt = tx.init(trained)

  @jax.jit
  def step(trained, opt, key):
    def loss_fn(t):
      p = tuning.combine(t, frozen, rng=key, train=True)
      logits = nnx.merge(graphdef, p, rest)(TOKENS, TOKENS > 0)
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
  assert isinstance(peft.tuning_from_config(None), peft.FullTuning)
  assert isinstance(_tuning("full"), peft.FullTuning)
  assert isinstance(_tuning("lora"), peft.LoraTuning)
  assert isinstance(_tuning("adapter"), peft.AdapterTuning)
  assert isinstance(_tuning("linear_probe"), peft.LinearProbeTuning)
  assert _tuning("lora", rank=3, rslora=True).cfg == lora.LoraConfig(rank=3, rslora=True)
  assert _tuning("adapter", adapter_dim=5).dim == 5
  with pytest.raises(UserError, match="peft.method='prefix'"):
    _tuning("prefix")


def test_library_defaults_are_the_config_sections():
  section = peft_config()
  assert lora.LoraConfig() == lora.LoraConfig.from_peft(section)
  assert peft.AdapterTuning().dim == section.adapter_dim
  # Every key of the section is read: the method, LoRA's fields and the adapter width.
  fields = {f.name for f in dataclasses.fields(lora.LoraConfig)}
  assert set(section) == fields | {"method", "adapter_dim"}


def test_tunings_carry_their_behaviour():
  assert [_tuning(m).backbone_mode for m in peft.METHODS] == ["train", "inference", "train", "train"]
  adapter = _tuning("adapter", adapter_dim=6)
  assert adapter.model_overrides({"size": "tiny"}) == {"size": "tiny", "adapter_dim": 6}
  vit = adapter.model_overrides({"backbone": "vit", "vit": {"size": "Ti"}})
  assert vit["vit"] == {"size": "Ti", "adapter_dim": 6}
  with pytest.raises(UserError, match="transformer backbone"):
    adapter.model_overrides({"backbone": "resnet"})
  for m in ("full", "linear_probe", "lora"):
    assert _tuning(m).model_overrides({"size": "tiny"}) == {"size": "tiny"}
    assert not _tuning(m).new_params
  assert re.search(adapter.new_params, "encoder/layers/0/mlp_adapter/up/kernel")
  assert not re.search(adapter.new_params, "encoder/layers/0/mlp_norm/scale")


def test_labels_give_values_and_specs_the_same_split(base):
  _, params, _ = base
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.split(nnx.eval_shape(
      lambda: TextClassifier(CFG, 3, "mean", rngs=nnx.Rngs(0))), nnx.Param, ...)[1]))
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  for tuning in (_tuning("full"), _tuning("linear_probe"), _tuning("lora", targets="attention")):
    trained, frozen = tuning.split(params, jax.random.key(0))
    t_specs, f_specs = tuning.split_specs(specs, params)
    assert jax.tree.structure(t_specs, is_leaf=is_spec) == jax.tree.structure(trained), tuning.name
    assert jax.tree.structure(f_specs, is_leaf=is_spec) == jax.tree.structure(frozen), tuning.name


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
  """A LoRA tuning trained for 3 steps, and its exports."""
  graphdef, params, rest = base
  tuning = _tuning("lora", rank=2, targets="attention", dropout=0.1)
  trained, frozen = tuning.split(params, jax.random.key(0))
  trained2, frozen2, opt = _train(tuning, graphdef, rest, params)
  workdir = tmp_path_factory.mktemp("lora_export")
  export.export_lora(str(workdir), tuning, trained2, frozen2)
  return dict(tuning=tuning, trained=trained, frozen=frozen, trained2=trained2, frozen2=frozen2,
              opt=opt, workdir=workdir)


def test_lora_starts_exactly_at_the_base(base, lora_run):
  graphdef, params, rest = base
  tuning, trained, frozen = lora_run["tuning"], lora_run["trained"], lora_run["frozen"]
  # B = 0: exactly the base model's outputs.
  np.testing.assert_array_equal(_forward(graphdef, rest, tuning.combine(trained, frozen)),
                                _forward(graphdef, rest, params))


def test_lora_trains_only_adapters_and_head(base, lora_run):
  _, params, _ = base
  trained2, frozen2, opt = lora_run["trained2"], lora_run["frozen2"], lora_run["opt"]
  assert _bits(frozen2) == _bits(lora_run["frozen"])  # the frozen base is bitwise unchanged
  # Optimizer state only for the trained tree: no leaf shaped like a frozen kernel.
  n_trained = sum(x.size for x in jax.tree.leaves(trained2))
  n_opt = sum(x.size for x in jax.tree.leaves(opt) if x.ndim > 0)
  assert n_opt == 2 * n_trained  # Adam: mu and nu, for the trained leaves only
  assert n_trained < 0.2 * sum(x.size for x in jax.tree.leaves(params))
  assert set(trained2) == {"adapters", "extra"} and "head" in trained2["extra"]
  assert "head" not in frozen2
  # Adapters are nested like the base, int layer keys included.
  assert tree.get(trained2, "adapters/encoder/layers/1/attention/out/kernel/b").shape == (2, 16)
  assert list(trained2["adapters"]["encoder"]["layers"]) == [0, 1]


def test_lora_merged_export_is_the_lora_model(base, lora_run):
  graphdef, params, rest = base
  tuning, trained2, frozen2 = lora_run["tuning"], lora_run["trained2"], lora_run["frozen2"]
  lora_out = _forward(graphdef, rest, tuning.combine(trained2, frozen2))
  assert not np.allclose(lora_out, _forward(graphdef, rest, params))  # training moved the model
  restored = export.load_params(str(lora_run["workdir"] / export.MERGED_DIR))
  dense = tree.replace(params, {p: tree.get(restored, p) for p in tree.flatten(params)})
  np.testing.assert_allclose(_forward(graphdef, rest, dense), lora_out, rtol=1e-6, atol=1e-6)


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def test_lora_adapter_checkpoint_is_small_and_round_trips(lora_run):
  tuning, trained2, frozen2 = lora_run["tuning"], lora_run["trained2"], lora_run["frozen2"]
  small = _dir_bytes(lora_run["workdir"] / export.ADAPTER_DIR)
  full = _dir_bytes(lora_run["workdir"] / export.MERGED_DIR)
  assert small < 0.5 * full, (small, full)
  extra_like = jax.tree.map(jnp.zeros_like, trained2["extra"])
  got, cfg = lora.load_adapters(str(lora_run["workdir"] / export.ADAPTER_DIR), frozen2, extra_like)
  assert cfg == tuning.cfg
  assert jax.tree.structure(got) == jax.tree.structure(trained2)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(trained2)):
    np.testing.assert_array_equal(x, y)


def test_lora_adapter_checkpoint_refuses_another_base(lora_run):
  tuning = lora_run["tuning"]
  _, other, _ = _model(seed=5)
  _, other_frozen = tuning.split(other, jax.random.key(0))
  extra_like = jax.tree.map(jnp.zeros_like, lora_run["trained2"]["extra"])
  with pytest.raises(UserError, match="different base"):
    lora.load_adapters(str(lora_run["workdir"] / export.ADAPTER_DIR), other_frozen, extra_like)


def test_linear_probe_trains_only_the_head(base):
  graphdef, params, rest = base
  tuning = peft.LinearProbeTuning()
  trained, frozen = tuning.split(params, jax.random.key(0))
  assert list(trained) == ["head"] and "head" not in frozen
  trained2, frozen2, opt = _train(tuning, graphdef, rest, params)
  assert _bits(frozen2) == _bits(frozen)
  assert sum(x.size for x in jax.tree.leaves(opt) if x.ndim > 0) == 2 * (16 * 3 + 3)


def test_regex_tuning_that_trains_nothing_is_refused(base):
  _, params, _ = base
  with pytest.raises(UserError, match="nothing would train"):
    peft.RegexTuning(r"^no_such_module/").split(params, jax.random.key(0))


def test_adapter_tuning_starts_at_base_and_trains_adapters_norms_head():
  graphdef, params, rest = _model(adapter_dim=4)
  tuning = peft.AdapterTuning()
  trained, frozen = tuning.split(params, jax.random.key(0))
  flat = tree.flatten(trained)
  assert any("attention_adapter" in p for p in flat) and any("mlp_adapter" in p for p in flat)
  assert any(p.endswith("attention_norm/scale") for p in flat) and "head/dense/kernel" in flat
  assert not any(p.endswith("query/kernel") for p in flat)
  # Zero-initialised up projections: the adapter model is the base model at the start.
  g0, p0, r0 = _model(adapter_dim=0)
  no_adapters = {k: v for k, v in tree.flatten(params).items() if "adapter" not in k}
  assert set(no_adapters) == set(tree.flatten(p0))
  base_params = tree.replace(p0, no_adapters)
  np.testing.assert_allclose(_forward(graphdef, rest, tuning.combine(trained, frozen)),
                             _forward(g0, r0, base_params), rtol=1e-6, atol=1e-6)
  _, frozen2, _ = _train(tuning, graphdef, rest, params)
  assert _bits(frozen2) == _bits(frozen)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_a_learnable_temperature_trains_under_every_tuning(method):
  # loss.learn_temperature's log_scale is the objective's, not the backbone's: a tuning that freezes
  # the backbone still trains it (Task.task_params), else the option would do nothing.
  from jembed.tasks.contrastive_text import ContrastiveTextModel, ContrastiveTextTask
  adapter_dim = 4 if method == "adapter" else 0
  model = ContrastiveTextModel(dataclasses.replace(CFG, adapter_dim=adapter_dim), "mean", True, 0.07,
                               rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  kw = {"trainable": ""} if method == "lora" else {}
  with_task = peft.tuning_from_config(peft_config(method=method, **kw),
                                      task_params=ContrastiveTextTask.task_params)
  trained, frozen = with_task.split(params, jax.random.key(0))
  assert [p for p in tree.flatten(trained) if p.endswith("log_scale")]
  assert not [p for p in tree.flatten(frozen) if p.endswith("log_scale")]
  without = _tuning(method, **kw)   # what every tuning but full did before
  assert [p for p in tree.flatten(without.split(params, jax.random.key(0))[1]) if p.endswith("log_scale")]
  # The trained scale reaches the model: combine puts a changed value back where the loss reads it.
  moved = jax.tree.map(lambda x: x + 1.0, trained)
  combined = with_task.combine(moved, frozen)
  assert float(tree.flatten(combined)["log_scale"]) == float(params["log_scale"]) + 1.0
