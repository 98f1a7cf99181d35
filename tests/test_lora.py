"""LoRA as a parameter-tree transform: exactness, targeting, training, sharding, checkpoints."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jembed.errors import UserError
from jembed.peft import lora


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


def test_init_is_exactly_the_base_and_apply_equals_merge():
  for dtype in (jnp.float32, jnp.bfloat16):
    base = _transformer_tree(0, dtype=dtype)
    cfg = lora.LoraConfig(rank=2, targets="all_dense_and_conv", exclude=r"^head/")
    adapters = lora.init_adapters(base, cfg, jax.random.key(1))
    assert adapters["backbone/conv1/kernel"]["a"].shape == (3, 3, 4, 2)
    assert adapters["backbone/conv1/kernel"]["b"].shape == (2, 6)
    assert adapters["layers/0/mlp/wi/kernel"]["a"].shape == (8, 2)
    merged = jax.jit(lambda b, a: lora.apply(b, a, cfg))(base, adapters)
    for path, leaf in lora._flatten(base).items():
      got = lora._get(merged, path)
      assert got.dtype == leaf.dtype
      np.testing.assert_array_equal(_bits(got), _bits(leaf), err_msg=path)
    # Non-adapted leaves are passed through untouched (no copies) outside jit.
    eager = lora.apply(base, adapters, cfg)
    assert eager["head"]["kernel"] is base["head"]["kernel"]
    assert eager["layers"][0]["attention_norm"]["scale"] is base["layers"][0]["attention_norm"]["scale"]
    # With non-zero B, apply and merge give the same numbers and match a NumPy reference.
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)
    applied, merged = lora.apply(base, adapters, cfg), lora.merge(base, adapters, cfg)
    for path in adapters:
      np.testing.assert_array_equal(np.asarray(lora._get(applied, path), np.float32),
                                    np.asarray(lora._get(merged, path), np.float32))
    w = np.asarray(base["backbone"]["conv1"]["kernel"], np.float32)
    a = np.asarray(adapters["backbone/conv1/kernel"]["a"]).reshape(-1, 2)
    b = np.asarray(adapters["backbone/conv1/kernel"]["b"])
    ref = (w + cfg.scale * (a @ b).reshape(w.shape)).astype(dtype)
    np.testing.assert_allclose(np.asarray(merged["backbone"]["conv1"]["kernel"], np.float32),
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
  dense = t(targets="all_dense")
  assert len(dense) == 13 and "head/kernel" in dense
  assert not any("embedding" in p or "conv" in p for p in dense)
  assert t(targets="all_dense_and_conv") == sorted(dense + ["backbone/conv1/kernel"])
  assert t(targets="all_dense", exclude=r"^head/|/mlp/") == t(targets="attention")
  assert t(targets=r"^layers/1/mlp/w[io]/kernel$") == ["layers/1/mlp/wi/kernel",
                                                       "layers/1/mlp/wo/kernel"]
  with pytest.raises(UserError, match="matches no") as e:
    t(targets=r"self_attn/q_proj")
  assert "layers/0/attention/query/kernel" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(UserError, match="both"):
    t(targets="all_dense", trainable=r"^head/")
  with pytest.raises(UserError):
    lora.LoraConfig(targets="(")


def test_split_trainable_is_a_partition():
  base = _transformer_tree(0)
  cfg = lora.LoraConfig(trainable=r"^head/|norm/")
  extra, frozen = lora.split_trainable(base, cfg)
  assert set(lora._flatten(extra)) == {"head/kernel", "head/bias", "layers/0/attention_norm/scale",
                                       "layers/0/attention_norm/bias", "layers/1/attention_norm/scale",
                                       "layers/1/attention_norm/bias"}
  assert not set(lora._flatten(extra)) & set(lora._flatten(frozen))
  union = lora.combine(frozen, extra)
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
  adapters = lora.init_adapters(base, cfg, jax.random.key(3))
  extra, frozen = lora.split_trainable(base, cfg)
  before = jax.tree.map(lambda v: np.array(v), frozen)
  train = {"adapters": adapters, "extra": extra}
  tx = optax.adamw(3e-2, weight_decay=1e-4)
  opt = tx.init(train)

  @jax.jit
  def step(train, opt, frozen, key):
    def loss_fn(t):
      p = lora.apply(frozen, t["adapters"], cfg, extra=t["extra"], dropout_key=key)
      return _mlp_loss(p, x, y)
    loss, g = jax.value_and_grad(loss_fn)(train)
    updates, opt = tx.update(g, opt, train)
    return optax.apply_updates(train, updates), opt, loss

  losses = []
  for i in range(60):
    train, opt, loss = step(train, opt, frozen, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < 0.6 * losses[0], losses[::10]
  for path, v in lora._flatten(before).items():
    np.testing.assert_array_equal(np.asarray(lora._get(frozen, path)), v)
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


def test_unmerged_dense_equals_merged():
  rng = np.random.default_rng(3)
  w, a, b, x = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((8, 5), (8, 2), (2, 5), (4, 8)))
  cfg = lora.LoraConfig(rank=2, targets=r"kernel", unmerged=r"^big/")
  base = {"big": {"kernel": w}}
  adapters = {"big/kernel": {"a": a, "b": b}}
  assert lora.unmerged_targets(adapters, cfg) == ["big/kernel"]
  assert lora.apply(base, adapters, cfg)["big"]["kernel"] is w
  merged = lora.merge(base, adapters, cfg)["big"]["kernel"]
  np.testing.assert_allclose(lora.unmerged_dense(x, w, a, b, cfg.scale), x @ merged,
                             rtol=1e-5, atol=1e-5)


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
    w = lora._get(s_base, p)
    assert lora._get(out, p).sharding.is_equivalent_to(w.sharding, w.ndim), p
    np.testing.assert_allclose(np.asarray(lora._get(out, p)), np.asarray(lora._get(single, p)),
                               rtol=1e-6, atol=1e-6)
  hlo = fn.lower(s_base, s_adapters).compile().as_text()
  for op in ("all-gather", "all-reduce", "collective-permute", "all-to-all"):
    assert op not in hlo, op


def _dir_size(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def test_save_load_round_trip_and_base_check(tmp_path):
  import orbax.checkpoint as ocp
  rng = np.random.default_rng(0)
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  base = {"layers": {i: {"attention": {n: {"kernel": normal(256, 256)} for n in ("query", "value")},
                         "attention_norm": {"scale": jnp.ones(256)}} for i in (0, 1)},
          "head": {"kernel": normal(256, 4), "bias": jnp.zeros(4)}}
  cfg = lora.LoraConfig(rank=4, trainable=r"^head/|norm/")
  adapters = jax.tree.map(lambda x: x + 0.25, lora.init_adapters(base, cfg, jax.random.key(6)))
  extra, _ = lora.split_trainable(base, cfg)
  extra = jax.tree.map(lambda x: x + 1.0, extra)
  fp = lora.fingerprint(base)
  assert fp == lora.fingerprint(jax.tree.map(lambda x: x, base))
  out = tmp_path / "adapter"
  lora.save_adapters(str(out), adapters, extra, cfg, fp)
  assert (out / "lora_config.json").exists()
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
  got_a, got_e, got_cfg = lora.load_adapters(str(out), base)
  assert got_cfg == cfg
  assert set(got_a) == set(adapters)
  for p in adapters:
    for ab in "ab":
      np.testing.assert_array_equal(got_a[p][ab], adapters[p][ab])
  assert jax.tree.structure(got_e) == jax.tree.structure(extra)  # int layer keys restored
  for x, y in zip(jax.tree.leaves(got_e), jax.tree.leaves(extra)):
    np.testing.assert_array_equal(x, y)
  lora.save_adapters(str(out), adapters, extra, cfg, fp)  # overwriting is fine
  # Adapter-only checkpoint vs a full save of the base.
  full = tmp_path / "full"
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(str(full), {str(k): v for k, v in base.items()} | {"layers": {
      str(i): v for i, v in base["layers"].items()}})
  ckpt.wait_until_finished()
  ratio = _dir_size(out) / _dir_size(full)
  print(f"adapter/full checkpoint size ratio: {ratio:.3f}")
  assert ratio < 0.10

  other = jax.tree.map(lambda x: x, base)
  other["layers"] = dict(base["layers"])
  other["layers"][1] = {**base["layers"][1], "attention": {
      **base["layers"][1]["attention"], "query": {"kernel": base["layers"][1]["attention"]["query"][
          "kernel"] * 1.01}}}
  with pytest.raises(UserError, match="different base model"):
    lora.load_adapters(str(out), other)
  with pytest.raises(UserError, match="does not exist"):
    lora.load_adapters(str(tmp_path / "nope"), base)
  (out / "lora_config.json").write_text("{not json")
  with pytest.raises(UserError, match="missing or corrupt"):
    lora.load_adapters(str(out), base)
