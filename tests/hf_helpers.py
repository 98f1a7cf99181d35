"""Importing transformers / sentence-transformers in tests.

transformers imports torchvision when it is installed, and PyPI's torchvision is built against CUDA
torch: its compiled ops fail to register with the CPU torch here ("operator torchvision::nms does not
exist"), which makes every `from transformers import XModel` fail. Its model code is pure Python, so
an empty stand-in for the module that registers those ops lets the import go through.
"""
import sys
import types

import pytest


def importorskip(name: str):
  """pytest.importorskip(name), with torchvision's op registration stubbed out first."""
  sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
  return pytest.importorskip(name)
