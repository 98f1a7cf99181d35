"""Defaults shared by every experiment config, and checks run before any compute.

The one home of defaults: `base_config()` (the fields every config has) and `SECTIONS` (the shared
sections, and the optional fields of `data` / `model`, that a config may leave out). configs/*.py
build on both; `complete(config)` gives a config that lacks a field the base's value, so library
code reads `config.x.y` directly and never carries a default of its own (tests/test_config_defaults.py).
"""
from __future__ import annotations

import copy

import ml_collections

from jembed.errors import UserError


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = ""                 # a name registered in jembed/tasks/__init__.py
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 32           # global, in examples, over all devices and hosts
  c.learning_rate = 1e-3
  c.warmup_steps = 100
  c.schedule = "cosine"       # cosine | linear | constant (after warm-up)
  c.end_lr_fraction = 0.0
  c.weight_decay = 0.01       # AdamW; never applied to biases, LayerNorm/BatchNorm parameters
  c.b1 = 0.9
  c.b2 = 0.999
  c.grad_clip = 1.0           # global-norm clipping; 0 turns it off
  c.grad_accum_steps = 1      # micro-batches per optimizer step: the same update in less memory
  c.log_every = 50
  c.eval_every = 500
  c.eval_batches = 8          # held-out batches per evaluation; 0 = the whole eval split
  c.checkpoint_every = 500
  c.checkpoint_every_secs = 0.0  # also save when this many seconds passed since the last save; 0 = off
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.checkpoint_fallback = True  # an unreadable latest checkpoint: resume from the previous one (False: refuse)
  c.skip_nonfinite = False      # a step with a non-finite loss/gradient: skip it (False: stop the run)
  c.max_consecutive_nonfinite = 10  # with skip_nonfinite: stop after this many such steps in a row
  c.stop_after_steps = 0      # stop this invocation early (e.g. a preemptible job); the next resumes
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = ()       # () = jembed.sharding.DEFAULT_RULES; else ((logical, mesh axes), ...)
  c.model = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict()
  return c


# The shared sections (configs/common.py hands them to the configs), and the optional fields of the
# task-specific `data` and `model` sections, with their defaults.
SECTIONS = dict(
    init=dict(                  # where a run's weights start (jembed/init.py); empty = random init
        checkpoint="",          # a jembed --workdir (its latest checkpoint, or `step`)
        step=0,                 # 0 = the latest
        hf="",                  # or a Hugging Face / sentence-transformers directory (text models)
        pretrained="",          # or a pretrained image model (image tasks): a torchvision/timm .pth or
                                # .safetensors, a HF/timm ResNet or ViT directory, a big_vision .npz;
                                # architecture, preprocessing and (same class count) head come from it
    ),
    peft=dict(                  # which parameters train (jembed/peft)
        method="full",          # full | linear_probe | lora | adapter
        rank=8,                 # LoRA
        alpha=16.0,
        rslora=False,           # scale alpha/sqrt(rank) instead of alpha/rank
        dropout=0.0,            # on the LoRA input features (rows of A)
        targets="attention_qv",  # a preset (attention_qv | attention | all_dense | all_dense_and_conv) or a regex over parameter paths
        exclude=r"^head/",      # regex of kernels never LoRA-adapted
        trainable=r"^head/",    # regex of extra leaves trained in full next to LoRA (head, biases, norms)
        adapter_dim=64,         # bottleneck width of the Houlsby adapters
    ),
    frozen_eval=dict(           # linear probe / kNN of frozen backbone features (image tasks, every eval)
        enabled=True,
        probe_steps=300,        # full-batch Adam steps of the logistic regression
        probe_lr=0.05,
        probe_l2=1e-4,
        knn_k=20,
        knn_temperature=0.07,
        n_per_class=10,         # the low-label variant; 0 turns it off
        max_train=10000,        # labelled training images used (0 = all)
        batch=256,              # feature-extraction batch
    ),
    data=dict(
        modality="text",        # classification: text | image
        on_bad_record="error",  # error | skip (counted and reported) for records that fail to read
        tokenizer="",           # text: a tokenizer.json; "" = the warm-start source's, else trained on the corpus
        vocab_size=8192,        # text: the WordPiece vocabulary trained when there is no tokenizer
        prepared="",            # text: a directory written by python -m jembed.data.prepare
        streams=0,              # text: read a prepared corpus in this many streams (0 = in memory)
        cache_dir="",           # mlm: cache of the tokenized corpus
        max_predictions=0,      # mlm: masked tokens per sequence (0 = mask_prob x seq_len)
        item_features="",       # two_tower: item feature file (not supported yet)
    ),
    model=dict(
        pooling="",             # text: mean | cls | max ...; "" = the source's, else the task's
        max_seq_length=0,       # text: tokens per input at embed time; 0 = the source's, else data.seq_len
        pooler=False,           # text: keep BERT's tanh pooler (an imported checkpoint's round-trips)
    ),
)
OPTIONAL_TOP = dict(augment=None)  # image pretraining augmentations; None = the task's own


def section(name: str, **overrides) -> ml_collections.ConfigDict:
  """The shared section `name` (SECTIONS) with its defaults, and `overrides`."""
  c = ml_collections.ConfigDict(copy.deepcopy(SECTIONS[name]))
  c.update(overrides)
  return c


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds to `config`, in place (a locked config too), each base field it lacks: the fields of
  `base_config()`, the shared sections and the optional fields of `data` and `model`. Fields it has
  are never changed. Idempotent; returns `config`."""
  base = base_config()
  with config.unlocked():
    for key in base.keys():
      if key not in config:
        config[key] = base[key]
    for key, value in OPTIONAL_TOP.items():
      if key not in config:
        config[key] = value
    for name, fields in SECTIONS.items():
      if name not in config or config[name] is None:
        config[name] = ml_collections.ConfigDict()
      target = config[name]
      for key, value in fields.items():
        if key not in target:
          target[key] = copy.deepcopy(value)
  return config


def _check(cond: bool, message: str) -> None:
  if not cond:
    raise UserError(message)


def validate(c) -> None:
  """Value checks that config_flags' type checks cannot express."""
  for key in ("total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
              "grad_accum_steps"):
    _check(isinstance(c[key], int) and c[key] > 0, f"config.{key}={c[key]!r} must be a positive integer")
  _check(c.warmup_steps >= 0, f"config.warmup_steps={c.warmup_steps} must be >= 0")
  _check(c.learning_rate > 0, f"config.learning_rate={c.learning_rate} must be > 0")
  _check(c.schedule in ("cosine", "linear", "constant"),
         f"config.schedule='{c.schedule}' is unknown; use cosine, linear or constant")
  _check(c.eval_batches >= 0, f"config.eval_batches={c.eval_batches} must be >= 0")
  _check(c.checkpoint_every_secs >= 0, f"config.checkpoint_every_secs={c.checkpoint_every_secs} must be >= 0")
  _check(isinstance(c.max_consecutive_nonfinite, int) and c.max_consecutive_nonfinite > 0,
         f"config.max_consecutive_nonfinite={c.max_consecutive_nonfinite!r} must be a positive integer")
  on_bad = c.data.on_bad_record
  _check(on_bad in ("error", "skip"),
         f"config.data.on_bad_record='{on_bad}' is unknown; use 'error' or 'skip'")


# ----------------------------------------------------------------------------- the fields of a config


def load_file(path: str) -> ml_collections.ConfigDict:
  """The ConfigDict a configs/*.py file returns (`FILE:arg` passes `arg` to get_config)."""
  import importlib.util
  import os
  file, _, arg = path.partition(":")
  if not os.path.isfile(file):
    raise UserError(f"config file {file} does not exist; pass one of configs/*.py "
                    "(e.g. configs/mlm.py)")
  spec = importlib.util.spec_from_file_location("_jembed_config_file", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def fields(config, prefix: str = "") -> list[tuple[str, object]]:
  """Every leaf of `config` as (dotted name, value), in definition order."""
  out = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.extend(fields(value, name + "."))
    else:
      out.append((name, value))
  return out


def _names(config, prefix: str = "") -> list[str]:
  """Every dotted name, sections included."""
  out = []
  for key, value in config.items():
    out.append(f"{prefix}{key}")
    if isinstance(value, ml_collections.ConfigDict):
      out.extend(_names(value, f"{prefix}{key}."))
  return out


def unknown_key(config, overrides: list[str], path: str = "CONFIG_FILE") -> str | None:
  """The first `--config.a.b=v` override naming a field `config` lacks, as one line with the full
  dotted name and the closest existing one; None when every override names a field."""
  import difflib
  for flag in overrides:
    dotted = flag[len("--config."):].split("=", 1)[0]
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      known = _names(config)
      # Suggest among the names at this depth first (a typo rarely changes the section).
      here = [n for n in known if n.count(".") == i and n.startswith(".".join(parts[:i]))]
      close = (difflib.get_close_matches(dotted, known, n=1, cutoff=0.75)
               or difflib.get_close_matches(".".join(parts[:i + 1]), here, n=1, cutoff=0.7))
      hint = f"did you mean '{close[0]}'? " if close else ""
      return (f"unknown config key '{dotted}' ({flag.split('=', 1)[0]}); {hint}list the fields with "
              f"python -m jembed.config {path}")
  return None


def unknown_key_line(error: BaseException, argv: list[str], path: str) -> str:
  """The one line for config_flags' unknown-key error (whose own message spans lines and names
  only the last part of the key)."""
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  try:
    message = unknown_key(load_file(path), overrides, path)
  except Exception:  # pylint: disable=broad-except
    message = None  # the file itself is broken: fall back to what config_flags said
  if message:
    return message
  key = (str(error).strip().splitlines() or ["?"])[0].strip("\"'")
  return f"unknown config key '{key}'; list the fields with python -m jembed.config {path}"


def comments(path: str) -> dict[tuple[str, str], str]:
  """(section, field name) -> the comment on the line that sets it, from the config file and the
  shared sections it builds on (configs/common.py, jembed/config.py): what `python -m jembed.config`
  shows. The section is the top-level one being built (`c.model = ...`, `def peft_config`), "" for
  top-level fields."""
  import io
  import os
  import re
  import tokenize
  file = path.partition(":")[0]
  files = [file, os.path.join(os.path.dirname(os.path.abspath(file)), "common.py"), __file__]
  setter = re.compile(r"(?:^|[\s(,.])([A-Za-z_]\w*)\s*=[^=]")
  opens = re.compile(r"^\s*c\.(\w+)\s*=\s*(?:ml_collections\.ConfigDict|\w+_config\()")
  top = re.compile(r"^\s*c\.(\w+)\s*=")
  builder = re.compile(r"^def (?:vision_)?(\w+?)_config\(")
  found: dict[tuple[str, str], str] = {}
  for file in files:
    if not os.path.isfile(file):
      continue
    with open(file, encoding="utf-8") as f:
      source = f.read()
    lines = source.splitlines()
    sections, section, in_sections = [], None, False
    for line in lines:
      if line.startswith("SECTIONS = dict("):  # this file's shared sections: `    name=dict(`
        section, in_sections = None, True
      elif in_sections and (m := re.match(r"^    (\w+)=dict\(", line)):
        section = m.group(1)
      elif in_sections and line.startswith(")"):
        section, in_sections = None, False
      elif m := builder.match(line):
        section = "" if m.group(1) == "base" else m.group(1)
      elif line.startswith("def "):
        section = None
      elif m := opens.match(line):
        section = m.group(1)
      elif top.match(line):
        section = ""
      sections.append(section)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
      if tok.type != tokenize.COMMENT:
        continue
      row = tok.start[0] - 1
      names = setter.findall(lines[row][:tok.start[1]])
      if names and sections[row] is not None:
        found.setdefault((sections[row] if not top.match(lines[row]) else "", names[-1]),
                         tok.string.lstrip("#").strip())
  return found


def _comment(notes: dict[tuple[str, str], str], dotted: str) -> str:
  parts = dotted.split(".")
  section = parts[0] if len(parts) > 1 else ""
  return notes.get((section, parts[-1]), "")


def describe(path: str) -> str:
  """Every field of a config file: `dotted.name = value  # comment`, one a line."""
  config = load_file(path)
  notes = comments(path)
  rows = [(name, repr(value), _comment(notes, name)) for name, value in fields(config)]
  width = max(len(n) + len(v) + 3 for n, v, _ in rows)
  return "\n".join(f"{f'{n} = {v}':<{width}}  # {c}" if c else f"{n} = {v}" for n, v, c in rows)


def _main(argv=None) -> int:
  import argparse
  from jembed.errors import run_cli
  parser = argparse.ArgumentParser(
      prog="python -m jembed.config",
      description="List every field of a config file with its value and comment; override any of "
                  "them with --config.NAME=VALUE on python -m jembed.main.")
  parser.add_argument("config", help="a configs/*.py file (FILE:arg passes arg to get_config)")
  parser.add_argument("--grep", default="", help="only fields whose name or comment contains this")
  def action(args):
    text = describe(args.config)
    if args.grep:
      text = "\n".join(l for l in text.splitlines() if args.grep.lower() in l.lower())
    return text
  return run_cli(parser, action)(argv)


if __name__ == "__main__":
  import sys
  sys.exit(_main())
