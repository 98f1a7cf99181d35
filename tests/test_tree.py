"""jembed.tree: one path convention for nested-dict parameter trees, int and str layer keys alike."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jembed import tree


def _params():
  """An NNX-style pure dict: int layer keys, array leaves."""
  arr = lambda *s: np.arange(np.prod(s), dtype=np.float32).reshape(s)
  return {"encoder": {"layers": {0: {"query": {"kernel": arr(2, 3), "bias": arr(3)}},
                                 1: {"query": {"kernel": arr(2, 3) + 1, "bias": arr(3) + 1}}},
                      "norm": {"scale": arr(3)}},
          "head": {"kernel": arr(3, 2)}}


def _restored(params):
  """The same tree as orbax restores it: layer keys are strings."""
  return {str(k): _restored(v) if isinstance(v, dict) else v for k, v in params.items()}


def _jax_paths(t):
  # An independent reference for the path convention: jax's own key paths.
  return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf
          for p, leaf in jax.tree_util.tree_leaves_with_path(t)}


def test_flatten_matches_jax_key_paths_for_int_and_str_keys():
  params = _params()
  flat = tree.flatten(params)
  ref = _jax_paths(params)
  assert sorted(flat) == sorted(ref)
  assert all(flat[p] is ref[p] for p in ref)
  assert tree.flatten(_restored(params)).keys() == flat.keys()
  # PartitionSpecs (tuples) are leaves, not subtrees.
  assert tree.flatten({"a": {"k": P("fsdp", None)}}) == {"a/k": P("fsdp", None)}
  assert tree.flatten({"a": {}, "b": 1}) == {"b": 1}


def test_unflatten_inverts_flatten_and_takes_key_types_from_like():
  params = _params()
  flat = tree.flatten(params)
  plain = tree.unflatten(flat)
  assert jax.tree.structure(plain) == jax.tree.structure(_restored(params))
  assert list(plain["encoder"]["layers"]) == ["0", "1"]
  like = tree.unflatten(flat, like=params)
  assert jax.tree.structure(like) == jax.tree.structure(params)
  # New paths under an existing spine keep the spine's keys and add string keys below.
  extra = tree.unflatten({"encoder/layers/1/query/kernel/a": 1}, like=params)
  assert extra == {"encoder": {"layers": {1: {"query": {"kernel": {"a": 1}}}}}}


def test_get_addresses_int_keys_by_their_string():
  params = _params()
  for t in (params, _restored(params)):
    assert tree.get(t, "encoder/layers/1/query/bias") is tree.flatten(t)["encoder/layers/1/query/bias"]
    assert tree.get(t, "encoder/layers/0") is tree.get(t, "encoder")["layers"][next(iter(t["encoder"]["layers"]))]
  with pytest.raises(KeyError, match="encoder/layers/2/query"):
    tree.get(params, "encoder/layers/2/query")
  with pytest.raises(KeyError):
    tree.get(params, "head/kernel/deeper")


def test_replace_copies_only_the_touched_spine():
  params = _params()
  new = np.zeros((3,), np.float32)
  for t in (params, _restored(params)):
    out = tree.replace(t, {"encoder/layers/1/query/bias": new})
    assert jax.tree.structure(out) == jax.tree.structure(t)  # key types kept
    assert tree.get(out, "encoder/layers/1/query/bias") is new
    assert tree.get(t, "encoder/layers/1/query/bias") is not new  # the input is not mutated
    layers_out, layers_in = out["encoder"]["layers"], t["encoder"]["layers"]
    first = next(iter(layers_in))
    assert layers_out[first] is layers_in[first] and out["head"] is t["head"]
  with pytest.raises(KeyError, match="encoder/layers/7"):
    tree.replace(params, {"encoder/layers/7/query/bias": new})


def test_select_by_regex_or_predicate():
  params = _params()
  assert tree.flatten(tree.select(params, r"^head/|norm/")).keys() == {"head/kernel", "encoder/norm/scale"}
  assert tree.select(params, r"layers/1/")["encoder"]["layers"].keys() == {1}  # int key kept
  big = tree.select(params, lambda path, leaf: leaf.ndim == 2 and "layers/0" not in path)
  assert set(tree.flatten(big)) == {"encoder/layers/1/query/kernel", "head/kernel"}
  assert tree.select(params, "nothing") == {}


def test_merge_is_a_deep_union_where_later_wins_and_int_str_keys_meet():
  params = _params()
  head_only = tree.select(params, r"^head/")
  rest = tree.select(params, lambda p, _: not p.startswith("head/"))
  union = tree.merge(rest, head_only)
  assert jax.tree.structure(union) == jax.tree.structure(tree.merge(params))
  assert all(x is y for x, y in zip(jax.tree.leaves(tree.merge(params)), jax.tree.leaves(union)))
  new = np.ones((3,), np.float32)
  later = tree.merge(params, {"encoder": {"layers": {"1": {"query": {"bias": new}}}}})
  assert list(later["encoder"]["layers"]) == [0, 1]  # the first tree's key type is kept
  assert later["encoder"]["layers"][1]["query"]["bias"] is new
  assert later["encoder"]["layers"][1]["query"]["kernel"] is params["encoder"]["layers"][1]["query"]["kernel"]
  assert params["encoder"]["layers"][1]["query"]["bias"] is not new  # inputs untouched


def test_labels_and_partition_round_trip():
  params = _params()
  labels = tree.labels(params, lambda p, x: "trained" if p.startswith("head/") or "norm" in p else "frozen")
  assert jax.tree.structure(labels) == jax.tree.structure(params)
  parts = tree.partition(params, labels)
  assert set(parts) == {"trained", "frozen"}
  assert set(tree.flatten(parts["trained"])) == {"head/kernel", "encoder/norm/scale"}
  back = tree.merge(parts["frozen"], parts["trained"])
  assert tree.flatten(back).keys() == tree.flatten(params).keys()
  assert all(tree.flatten(back)[p] is leaf for p, leaf in tree.flatten(params).items())
  # Labels computed on one tree partition another with the same paths (specs by abstract params),
  # also when one of them has string layer keys.
  specs = tree.labels(params, lambda p, x: P(*([None] * x.ndim)))
  spec_parts = tree.partition(_restored(specs), labels)
  assert tree.flatten(spec_parts["trained"]).keys() == tree.flatten(parts["trained"]).keys()
