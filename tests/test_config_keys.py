"""Every key of every config in configs/ is read by the library: a field that reaches no code would
be a silent no-op (an option accepted and ignored). A key counts as read when its name appears as
an identifier or a string in jembed/ (attribute access, .get("key"), or a dict key passed on)."""
import pathlib
import re

import pytest

from spine_helpers import ROOT, load_config_file

CONFIGS = sorted(p.stem for p in pathlib.Path(ROOT, "configs").glob("*.py")
                 if p.stem not in ("__init__", "common"))
SOURCE = "\n".join(p.read_text() for p in pathlib.Path(ROOT, "jembed").rglob("*.py"))


def _keys(config, prefix=""):
  for key, value in config.items():
    yield prefix + key
    if hasattr(value, "items"):
      yield from _keys(value, prefix + key + ".")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_key_is_read(name):
  unread = [k for k in _keys(load_config_file(name))
            if not re.search(r"\b" + re.escape(k.rsplit(".", 1)[-1]) + r"\b", SOURCE)]
  assert not unread, f"configs/{name}.py sets keys no library code reads: {unread}"


def test_the_check_catches_a_dead_key():
  config = load_config_file("mlm")
  config.model.unlock()
  config.model.frobnicate_level = 3
  unread = [k for k in _keys(config) if not re.search(r"\b" + re.escape(k.rsplit(".", 1)[-1]) + r"\b", SOURCE)]
  assert unread == ["model.frobnicate_level"]
