"""Bad input gets one clear line, a non-zero exit and nothing written."""
import os
import subprocess
import sys

import pytest

from jembed import train
from jembed.errors import UserError
from spine_helpers import ROOT, tiny_mlm_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(str(tmp_path_factory.mktemp("corpus")))


def cli(workdir, *flags):
  cmd = [sys.executable, "-m", "jembed.main", f"--config={ROOT}/configs/mlm.py", f"--workdir={workdir}",
         *flags]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("flag, words", [
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.total_steps=many", "total_steps"),
    ("--config.model.no_such_field=3", "'model.no_such_field'"),
])
def test_cli_refuses_bad_flags_in_one_line(tmp_path, flag, words):
  workdir = tmp_path / "run"
  proc = cli(workdir, flag)
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert words in lines[0]
  assert not workdir.exists()


def test_cli_config_file_errors_are_one_line(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  failing = tmp_path / "failing.py"
  failing.write_text("def get_config():\n  raise RuntimeError('no such dataset')\n")
  cases = [([f"--config={tmp_path}/nope.py"], "nope.py does not exist"),
           ([f"--config={broken}"], f"SyntaxError at {broken}:1"),
           ([f"--config={failing}"], f"RuntimeError at {failing}:2: no such dataset"),
           ([f"--config={ROOT}/configs/mlm.py", "stray"], "unexpected arguments: stray")]
  for flags, words in cases:
    cmd = [sys.executable, "-m", "jembed.main", f"--workdir={tmp_path}/run", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("jembed: error:") and words in lines[0], lines[0]
  assert not (tmp_path / "run").exists()


def test_cli_user_error_is_one_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  proc = cli(workdir, "--config.data.train=/no/such/file.txt")
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("jembed: error:"), proc.stderr
  assert "/no/such/file.txt" in lines[0]
  assert not workdir.exists()


@pytest.mark.parametrize("overrides, words", [
    ({"mesh.data": 3}, "mesh"),                                   # product is not the device count
    ({"mesh.data": -1, "mesh.fsdp": -1}, "-1"),
    ({"batch_size": 12}, "batch_size=12"),                        # does not divide over 8 devices
    ({"data.seq_len": 128}, "max_position"),                      # beyond the position table (64)
    ({"task": "nope"}, "config.task"),
    ({"total_steps": 0}, "total_steps"),
    ({"data.on_bad_record": "ignore"}, "on_bad_record"),
    ({"checkpoint_every_secs": -1}, "checkpoint_every_secs"),
    ({"max_consecutive_nonfinite": 0}, "max_consecutive_nonfinite"),
])
def test_bad_config_is_refused_before_anything_is_written(corpus, tmp_path, overrides, words):
  workdir = tmp_path / "run"
  with pytest.raises(UserError, match=words.replace("+", r"\+")):
    train.train_and_evaluate(tiny_mlm_config(corpus, **overrides), str(workdir))
  assert not workdir.exists()


def test_empty_corpus_is_refused(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  workdir = tmp_path / "run"
  with pytest.raises(UserError, match="empty"):
    train.train_and_evaluate(tiny_mlm_config(str(empty)), str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize("flag, line", [
    ("--config.totl_steps=3", "unknown config key 'totl_steps' (--config.totl_steps); did you mean "
                              "'total_steps'?"),
    ("--config.peft.methd=lora", "unknown config key 'peft.methd' (--config.peft.methd); did you mean "
                                 "'peft.method'?"),
])
def test_mistyped_key_names_the_whole_dotted_key_and_the_closest_field(flag, line):
  from jembed import config as config_lib
  config = config_lib.load_file(f"{ROOT}/configs/finetune_text.py")
  message = config_lib.unknown_key(config, [flag], "configs/finetune_text.py")
  assert message.startswith(line), message
  assert message.endswith("python -m jembed.config configs/finetune_text.py")
  assert "\n" not in message
  assert config_lib.unknown_key(config, ["--config.peft.method=lora", "--config.total_steps=3"]) is None


def test_config_listing_shows_every_field_with_its_section_comment():
  from jembed import config as config_lib
  path = f"{ROOT}/configs/finetune_text.py"
  text = config_lib.describe(path)
  lines = {l.split(" = ", 1)[0]: l for l in text.splitlines()}
  assert set(lines) == {n for n, _ in config_lib.fields(config_lib.load_file(path))}
  assert "full | linear_probe | lora | adapter" in lines["peft.method"]
  assert "global, in examples" in lines["batch_size"]
  # A comment belongs to its section: the LoRA dropout note is not shown for the model's dropout.
  assert "LoRA" in lines["peft.dropout"] and "LoRA" not in lines["model.dropout"]
  proc = subprocess.run([sys.executable, "-m", "jembed.config", path, "--grep", "peft.r"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert [l.split(" = ")[0] for l in proc.stdout.splitlines()] == ["peft.rank", "peft.rslora"]


def test_rerun_with_a_changed_model_names_the_differing_field(corpus, tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_mlm_config(corpus, total_steps=1, checkpoint_every=1), workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(tiny_mlm_config(corpus, total_steps=2, checkpoint_every=1,
                                             **{"model.mlp_dim": 48}), workdir)
  line = str(e.value)
  assert "\n" not in line and "model.mlp_dim: 64 -> 48" in line and "new --workdir" in line, line
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # nothing moved or lost
