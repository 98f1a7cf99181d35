"""LoRA as a parameter-tree transform: exactness, targeting, training, sharding, checkpoints."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jembed import tree
from jembed.errors import UserError
from jembed.peft import export, lora


def _transformer_tree(seed, d=8, layers=2, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  dense = lambda i, o: {"kernel": arr(i, o), "bias": arr(o)}
  tree = {"embed": {"embedding": arr(11, d)}, "layers": {}}
  for i in range(layers):
    tree["layers"][i] = {
        "attention": {n: dense(d, d) for n in ("query", "key", "value", "out")},
        "mlp": {"wi": dense(d, 2 * d), "wo": dense(2 * d, d)},
        "attention_norm": {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)},
    }
  tree["backbone"] = {"conv1": {"kernel": arr(3, 3, 4, 6)}}
  tree["head"] = dense(d, 3)
  return tree


def _bits(x):
  return np.asarray(x).view(np.uint8)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_init_is_exactly_the_base(dtype):
  base = _transformer_tree(0, dtype=dtype)
  cfg = lora.LoraConfig(rank=2, targets="all_dense_and_conv", exclude=r"^head/")
  adapters = lora.init_adapters(base, cfg, jax.random.key(1))
  assert adapters["backbone/conv1/kernel"]["a"].shape == (3, 3, 4, 2)
  assert adapters["backbone/conv1/kernel"]["b"].shape == (2, 6)
  assert adapters["layers/0/mlp/wi/kernel"]["a"].shape == (8, 2)
  merged = jax.jit(lambda b, a: lora.apply(b, a, cfg))(base, adapters)
  for path, leaf in tree.flatten(base).items():
    got = tree.get(merged, path)
    assert got.dtype == leaf.dtype
    np.testing.assert_array_equal(_bits(got), _bits(leaf), err_msg=path)
  # Non-adapted leaves are passed through untouched (no copies) outside jit.
  eager = lora.apply(base, adapters, cfg)
  assert eager["head"]["kernel"] is base["head"]["kernel"]
  assert eager["layers"][0]["attention_norm"]["scale"] is base["layers"][0]["attention_norm"]["scale"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_apply_matches_numpy_reference(dtype):
  base = _transformer_tree(0, dtype=dtype)
  cfg = lora.LoraConfig(rank=2, targets="all_dense_and_conv", exclude=r"^head/")
  adapters = jax.tree.map(lambda x: x + 0.1, lora.init_adapters(base, cfg, jax.random.key(1)))
  merged = lora.apply(base, adapters, cfg)
  for path in ("backbone/conv1/kernel", "layers/1/attention/query/kernel"):
    w = np.asarray(tree.get(base, path), np.float32)
    a = np.asarray(adapters[path]["a"]).reshape(-1, 2)
    b = np.asarray(adapters[path]["b"])
    ref = (w + cfg.scale * (a @ b).reshape(w.shape)).astype(dtype)
    np.testing.assert_allclose(np.asarray(tree.get(merged, path), np.float32),
                               np.asarray(ref, np.float32), rtol=1e-6, atol=1e-6)


def test_scaling_rslora():
  assert lora.LoraConfig(rank=4, alpha=16.0).scale == 4.0
  assert lora.LoraConfig(rank=4, alpha=16.0, rslora=True).scale == 8.0
  assert math.isclose(lora.LoraConfig(rank=8, alpha=2.0, rslora=True).scale, 2 / math.sqrt(8))
  w = jnp.zeros((3, 5))
  a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
  base = {"attention": {"query": {"kernel": w}, "value": {"kernel": w}}}
  for rs, expect in ((False, 0.5 * 4), (True, 1.0 * 4)):
    cfg = lora.LoraConfig(rank=4, alpha=2.0, rslora=rs)
    out = lora.apply(base, {"attention/query/kernel": {"a": a, "b": b}}, cfg)
    np.testing.assert_allclose(out["attention"]["query"]["kernel"], np.full((3, 5), expect))


def test_targets_presets_regex_exclude_and_errors():
  base = _transformer_tree(0)
  t = lambda **kw: lora.lora_targets(base, lora.LoraConfig(**kw))
  assert t() == [f"layers/{i}/attention/{n}/kernel" for i in (0, 1) for n in ("query", "value")]
  assert len(t(targets="attention")) == 8
  dense = t(targets="all_dense", exclude="", trainable="")
  assert len(dense) == 13 and "head/kernel" in dense
  assert not any("embedding" in p or "conv" in p for p in dense)
  assert t(targets="all_dense") == [p for p in dense if p != "head/kernel"]  # excluded by default
  assert t(targets="all_dense_and_conv", exclude="", trainable="") == sorted(dense + ["backbone/conv1/kernel"])
  assert t(targets="all_dense", exclude=r"^head/|/mlp/") == t(targets="attention")
  assert t(targets=r"^layers/1/mlp/w[io]/kernel$") == ["layers/1/mlp/wi/kernel",
                                                       "layers/1/mlp/wo/kernel"]
  with pytest.raises(UserError, match="matches no") as e:
    t(targets=r"self_attn/q_proj")
  assert "layers/0/attention/query/kernel" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(UserError, match="both"):
    t(targets="all_dense", exclude="")
  with pytest.raises(UserError):
    lora.LoraConfig(targets="(")


def test_split_is_a_partition_of_the_base():
  base = _transformer_tree(0)
  tuning = lora.LoraTuning(lora.LoraConfig(trainable=r"^head/|norm/"))
  trained, frozen = tuning.split(base, jax.random.key(0))
  extra = trained["extra"]
  assert set(tree.flatten(extra)) == {"head/kernel", "head/bias", "layers/0/attention_norm/scale",
                                       "layers/0/attention_norm/bias", "layers/1/attention_norm/scale",
                                       "layers/1/attention_norm/bias"}
  assert not set(tree.flatten(extra)) & set(tree.flatten(frozen))
  union = tree.merge(frozen, extra)
  assert jax.tree.structure(union) == jax.tree.structure(base)
  assert all(x is y for x, y in zip(jax.tree.leaves(union), jax.tree.leaves(base)))


def _mlp_loss(params, x, y):
  h = jax.nn.relu(x @ params["l1"]["kernel"] + params["l1"]["bias"])
  pred = h @ params["l2"]["kernel"] + params["l2"]["bias"]
  return jnp.mean((pred - y) ** 2)


def test_training_moves_only_adapters_and_extra():
  rng = np.random.default_rng(0)
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  base = {"l1": {"kernel": normal(6, 16) * 0.4, "bias": jnp.zeros(16)},
          "l2": {"kernel": normal(16, 2) * 0.4, "bias": jnp.zeros(2)}}
  x = normal(64, 6)
  y = jnp.sin(x[:, :2] * 2.0) + x[:, 2:4]
  cfg = lora.LoraConfig(rank=2, alpha=4.0, targets=r"kernel$", trainable=r"bias$", dropout=0.1)
  tuning = lora.LoraTuning(cfg)
  train, frozen = tuning.split(base, jax.random.key(3))
  before = jax.tree.map(lambda v: np.array(v), frozen)
  tx = optax.adamw(3e-2, weight_decay=1e-4)
  opt = tx.init(train)

  @jax.jit
  def step(train, opt, frozen, key):
    def loss_fn(t):
      p = tuning.combine(t, frozen, rng=key, train=True)
      return _mlp_loss(p, x, y)
    loss, g = jax.value_and_grad(loss_fn)(train)
    updates, opt = tx.update(g, opt, train)
    return optax.apply_updates(train, updates), opt, loss

  losses = []
  for i in range(60):
    train, opt, loss = step(train, opt, frozen, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < 0.6 * losses[0], losses[::10]
  for path, v in tree.flatten(before).items():
    np.testing.assert_array_equal(np.asarray(tree.get(frozen, path)), v)
  # Adam keeps mu and nu for each trained leaf only: 2 adapters x (a, b) + 2 biases.
  n_trained = len(jax.tree.leaves(train))
  assert n_trained == 6
  moments = [x for x in jax.tree.leaves(opt) if np.ndim(x) > 0]
  assert len(moments) == 2 * n_trained
  assert sum(np.size(m) for m in moments) == 2 * sum(np.size(t) for t in jax.tree.leaves(train))


def test_dropout_drops_rows_of_a_with_rescale():
  a = jnp.ones((1000, 2))
  out = lora._drop_rows(a, 0.25, jax.random.key(0))
  rows = np.asarray(out)
  assert set(np.unique(rows).tolist()) <= {0.0, float(np.float32(1 / 0.75))}
  assert np.all(rows[:, 0] == rows[:, 1])  # a whole input feature is dropped
  assert 0.2 < np.mean(rows[:, 0] == 0) < 0.3


def test_sharded_merge_is_communication_free():
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
  rng = np.random.default_rng(0)
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  base = {"layers": {0: {"attention": {"query": {"kernel": normal(16, 8)}}}},
          "conv": {"kernel": normal(3, 3, 8, 4)}}
  cfg = lora.LoraConfig(rank=4, targets="all_dense_and_conv")
  adapters = jax.tree.map(lambda x: x + 0.5, lora.init_adapters(base, cfg, jax.random.key(1)))
  base_specs = {"layers": {0: {"attention": {"query": {"kernel": P("fsdp", "tensor")}}}},
                "conv": {"kernel": P(None, None, "fsdp", "tensor")}}
  specs = lora.adapter_partition_specs(base_specs, adapters)
  path = "layers/0/attention/query/kernel"
  assert specs[path] == {"a": P("fsdp", None), "b": P(None, "tensor")}
  assert specs["conv/kernel"] == {"a": P(None, None, "fsdp", None), "b": P(None, "tensor")}
  logical = lora.adapter_partition_specs(
      {"layers": {0: {"attention": {"query": {"kernel": ("embed", "heads")}}}},
       "conv": {"kernel": (None, None, "conv_in", "conv_out")}}, adapters)
  assert logical[path] == {"a": ("embed", None), "b": (None, "heads")}
  assert logical["conv/kernel"] == {"a": (None, None, "conv_in", None), "b": (None, "conv_out")}

  shard = lambda tree, spec_tree: jax.tree.map(
      lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, spec_tree)
  s_base, s_adapters = shard(base, base_specs), shard(adapters, specs)
  fn = jax.jit(lambda b, a: lora.apply(b, a, cfg))
  out = fn(s_base, s_adapters)
  single = lora.apply(base, adapters, cfg)
  for p in (path, "conv/kernel"):
    w = tree.get(s_base, p)
    assert tree.get(out, p).sharding.is_equivalent_to(w.sharding, w.ndim), p
    np.testing.assert_allclose(np.asarray(tree.get(out, p)), np.asarray(tree.get(single, p)),
                               rtol=1e-6, atol=1e-6)
  hlo = fn.lower(s_base, s_adapters).compile().as_text()
  for op in ("all-gather", "all-reduce", "collective-permute", "all-to-all"):
    assert op not in hlo, op


def _dir_size(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _ckpt_base():
  rng = np.random.default_rng(0)
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {"layers": {i: {"attention": {n: {"kernel": normal(256, 256)} for n in ("query", "value")},
                         "attention_norm": {"scale": jnp.ones(256)}} for i in (0, 1)},
          "head": {"kernel": normal(256, 4), "bias": jnp.zeros(4)}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """An adapter-only checkpoint of trained (non-zero) adapters and extras on a 2-layer base."""
  base = _ckpt_base()
  tuning = lora.LoraTuning(lora.LoraConfig(rank=4, trainable=r"^head/|norm/"))
  trained, frozen = tuning.split(base, jax.random.key(6))
  trained = {"adapters": jax.tree.map(lambda x: x + 0.25, trained["adapters"]),
             "extra": jax.tree.map(lambda x: x + 1.0, trained["extra"])}
  out = tmp_path_factory.mktemp("lora_ckpt") / "adapter"
  export.save_adapters(str(out), tuning, trained, frozen)
  return out, base, tuning, trained, frozen


def test_adapter_checkpoint_round_trips(saved):
  out, _, tuning, trained, frozen = saved
  assert (out / "lora_config.json").exists()
  assert not [p for p in os.listdir(out.parent) if ".tmp-" in p]
  got, got_cfg = lora.load_adapters(str(out), frozen, jax.tree.map(jnp.zeros_like, trained["extra"]))
  assert got_cfg == tuning.cfg
  assert jax.tree.structure(got) == jax.tree.structure(trained)  # int layer keys as in memory
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(x, y)
  assert export.fingerprint(frozen) == export.fingerprint(jax.tree.map(lambda x: x, frozen))


def test_adapter_checkpoint_overwrites_and_is_small(saved, tmp_path):
  import orbax.checkpoint as ocp
  out, base, tuning, trained, frozen = saved
  export.save_adapters(str(out), tuning, trained, frozen)  # overwriting is fine
  assert sorted(os.listdir(out.parent)) == ["adapter"]
  full = tmp_path / "full"
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(str(full), base)
  ckpt.wait_until_finished()
  ratio = _dir_size(out) / _dir_size(full)
  print(f"adapter/full checkpoint size ratio: {ratio:.3f}")
  assert ratio < 0.10


def test_adapter_checkpoint_refuses_another_base(saved):
  out, _, _, trained, frozen = saved
  other = tree.replace(frozen, {"layers/1/attention/query/kernel":
                                tree.get(frozen, "layers/1/attention/query/kernel") * 1.01})
  with pytest.raises(UserError, match="different base model"):
    lora.load_adapters(str(out), other, trained["extra"])


def test_adapter_checkpoint_missing_or_corrupt(saved, tmp_path):
  import shutil
  out, _, _, trained, frozen = saved
  with pytest.raises(UserError, match="does not exist"):
    lora.load_adapters(str(tmp_path / "nope"), frozen, trained["extra"])
  broken = tmp_path / "broken"
  shutil.copytree(out, broken)
  (broken / "lora_config.json").write_text("{not json")
  with pytest.raises(UserError, match="missing or corrupt"):
    lora.load_adapters(str(broken), frozen, trained["extra"])
