"""Parameter-tree paths: the one convention for naming a leaf of a nested-dict tree.

Trees here are pure nested dicts (`nnx.to_pure_dict` output, orbax restores, PartitionSpec trees);
anything that is not a dict is a leaf. A leaf's path joins its keys with "/" ("encoder/layers/0/
attention/query/kernel"). Keys are compared as strings: NNX numbers layers with int keys, orbax
restores them as "0", and both trees address the same leaves. Functions that build a tree from
another keep that tree's own key types; only `unflatten` invents keys, and it takes them from `like`
where it can.
"""
from __future__ import annotations

import re
from typing import Any, Callable

SEP = "/"
Tree = dict


def flatten(tree: Tree) -> dict[str, Any]:
  """{path: leaf} in the tree's insertion order; empty dicts hold no leaves and vanish."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update({f"{k}{SEP}{p}": leaf for p, leaf in flatten(v).items()})
    else:
      out[str(k)] = v
  return out


def _key(node: dict, part: str):
  """The key of `node` spelled `part` (an int key matches its decimal string)."""
  if part in node:
    return part
  for k in node:
    if str(k) == part:
      return k
  raise KeyError(part)


def unflatten(flat: dict[str, Any], like: Tree | None = None) -> Tree:
  """The nested tree of {path: leaf}. Keys are strings, except where `like` has the same key
  (compared as strings): then `like`'s key (e.g. int 0) is used, so the result lines up with it."""
  out: Tree = {}
  for path, leaf in flat.items():
    node, ref = out, like
    *parents, last = path.split(SEP)
    for part in parents:
      key = _like_key(ref, part)
      node = node.setdefault(key, {})
      ref = ref.get(key) if isinstance(ref, dict) else None
    node[_like_key(ref, last)] = leaf
  return out


def _like_key(ref, part: str):
  if isinstance(ref, dict):
    try:
      return _key(ref, part)
    except KeyError:
      pass
  return part


def get(tree: Tree, path: str) -> Any:
  """The leaf (or subtree) at `path`; KeyError naming the path when it is absent."""
  node = tree
  try:
    for part in path.split(SEP):
      node = node[_key(node, part)]
  except (KeyError, TypeError, AttributeError):
    raise KeyError(path) from None
  return node


def replace(tree: Tree, new_leaves: dict[str, Any]) -> Tree:
  """A copy of `tree` with the leaves at the given paths replaced. Only the dicts on those paths
  are copied; every other subtree and leaf is the same object. Every path must exist (KeyError)."""
  if not new_leaves:
    return tree
  out = dict(tree)
  groups: dict[Any, dict[str, Any]] = {}
  for path, leaf in new_leaves.items():
    head, _, rest = path.partition(SEP)
    key = _key(tree, head)
    if rest:
      groups.setdefault(key, {})[rest] = leaf
    else:
      out[key] = leaf
  for key, sub in groups.items():
    try:
      out[key] = replace(tree[key], sub)
    except KeyError as e:
      raise KeyError(f"{key}{SEP}{e.args[0]}") from None
  return out


def _matcher(where) -> Callable[[str, Any], bool]:
  if callable(where):
    return where
  pattern = re.compile(where)
  return lambda path, _: pattern.search(path) is not None


def select(tree: Tree, where) -> Tree:
  """The subtree of leaves whose path matches `where`: a regex (re.search on the path) or a
  predicate fn(path, leaf) -> bool. Empty dicts are pruned; key types are kept."""
  keep = _matcher(where)

  def walk(node, prefix):
    out = {}
    for k, v in node.items():
      path = f"{prefix}{k}"
      if isinstance(v, dict):
        sub = walk(v, path + SEP)
        if sub:
          out[k] = sub
      elif keep(path, v):
        out[k] = v
    return out
  return walk(tree, "")


def labels(tree: Tree, fn: Callable[[str, Any], Any]) -> Tree:
  """A label tree of the same structure and keys: fn(path, leaf) at every leaf (e.g. "trained" /
  "frozen", the form optax.partition takes)."""
  def walk(node, prefix):
    return {k: walk(v, f"{prefix}{k}{SEP}") if isinstance(v, dict) else fn(f"{prefix}{k}", v)
            for k, v in node.items()}
  return walk(tree, "")


def partition(tree: Tree, label_tree: Tree) -> dict[Any, Tree]:
  """{label: the subtree of the leaves carrying that label}; `merge` of the parts gives `tree` back.
  `label_tree` may be any tree with the same paths (e.g. labels computed on abstract shapes)."""
  parts: dict[Any, Tree] = {}

  def walk(node, lab, path):
    for k, v in node.items():
      sub_path = path + (k,)
      sub_lab = lab[_key(lab, str(k))]
      if isinstance(v, dict):
        walk(v, sub_lab, sub_path)
      else:
        target = parts.setdefault(sub_lab, {})
        for key in sub_path[:-1]:
          target = target.setdefault(key, {})
        target[k] = v
  walk(tree, label_tree, ())
  return parts


def merge(*trees: Tree) -> Tree:
  """Deep union; on equal paths the later tree wins. Keys match as strings, and the key type of
  the first tree that has a key is kept."""
  out: Tree = {}
  for tree in trees:
    for k, v in tree.items():
      try:
        key = _key(out, str(k))
      except KeyError:
        key = k
      if isinstance(v, dict) and isinstance(out.get(key), dict):
        out[key] = merge(out[key], v)
      else:
        out[key] = v
  return out
