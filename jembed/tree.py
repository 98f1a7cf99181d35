"""(placeholder until the tree module lands) Parameter-tree paths."""
from __future__ import annotations

from typing import Any


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, path + "/"))
    else:
      out[path] = v
  return out


def _key(node: dict, part: str):
  if part in node:
    return part
  if part.lstrip("-").isdigit() and int(part) in node:
    return int(part)
  raise KeyError(part)


def replace(tree: dict, new_leaves: dict[str, Any]) -> dict:
  if not new_leaves:
    return tree
  out = dict(tree)
  groups: dict[Any, dict[str, Any]] = {}
  for path, leaf in new_leaves.items():
    head, _, rest = path.partition("/")
    key = _key(tree, head)
    if rest:
      groups.setdefault(key, {})[rest] = leaf
    else:
      out[key] = leaf
  for key, sub in groups.items():
    out[key] = replace(tree[key], sub)
  return out
