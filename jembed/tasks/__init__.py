"""Objectives, looked up by `config.task`. The train loop only knows the `Task` interface."""
from __future__ import annotations

import importlib

from jembed import config as config_lib
from jembed.errors import UserError

# name -> "module:Class"; modules are imported lazily so a text run never imports vision code.
REGISTRY = {
    "mlm": "jembed.tasks.mlm:MlmTask",
    "rotation": "jembed.tasks.rotation:RotationTask",
    "simclr": "jembed.tasks.simclr:SimclrTask",
    "classification": "jembed.tasks.classification:ClassificationTask",
    "contrastive_text": "jembed.tasks.contrastive_text:ContrastiveTextTask",
    "two_tower": "jembed.tasks.two_tower:TwoTowerTask",
}


def task_class(name: str):
  if name not in REGISTRY:
    raise UserError(f"config.task='{name}' is unknown; choose one of {', '.join(sorted(REGISTRY))}")
  module, cls = REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), cls)


def get_task(config, workdir: str):
  return task_class(config.task).create(config_lib.complete(config), workdir)
