"""Supervised classification, `config.task = "classification"`: the task the registry names, which
picks the subclass by modality: text (jembed/tasks/classification_text.py) or images
(jembed/tasks/classification_image.py); what both share is jembed/tasks/classification_base.py.
"""
from __future__ import annotations

from jembed.errors import UserError
from jembed.tasks.classification_base import ClassificationBase
from jembed.tasks.classification_image import ImageClassificationTask
from jembed.tasks.classification_text import TextClassificationTask


class ClassificationTask(ClassificationBase):
  """Looked up by name; `create`, `build_model` and `backbone_of` hand over to the modality's class."""

  @classmethod
  def create(cls, config, workdir):
    return _modality_class(config.data.modality)(config, workdir)

  @classmethod
  def build_model(cls, spec, rngs):
    return _modality_class(spec["modality"]).build_model(spec, rngs)

  @classmethod
  def backbone_of(cls, spec):
    return _modality_class(spec["modality"]).backbone


def _modality_class(modality: str):
  if modality == "text":
    return TextClassificationTask
  if modality == "image":
    return ImageClassificationTask
  raise UserError(f"data.modality='{modality}' is unknown; use text or image")
