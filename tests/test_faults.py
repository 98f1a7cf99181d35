"""Fault injection: every fault a long run meets is survived, and where the promise is exactness the
resumed run ends with the same parameters, bit for bit, as one uninterrupted reference run.

Faults: SIGTERM mid-step (a real signal to a `python -m jembed.main` process), SIGKILL mid-step and
in the middle of an asynchronous checkpoint write, a truncated and a deleted checkpoint file, a NaN
at a step that is not a log step (stop, or skip and count), bad records of every kind (see
test_bad_records_*), a read-only workdir and a full disk (a small tmpfs, when the test may mount one).

A persistent XLA compilation cache shared by this module's runs (and its subprocesses) keeps the
many short runs cheap: each compiles the same programs.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jembed import checkpoint, reliability, train
from jembed.errors import UserError
from spine_helpers import ROOT, tiny_mlm_config, write_corpus

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 8
# log_every=1: every step's loss is compared with the reference; checkpoints every 2 steps, all kept.
BASE = dict(total_steps=STEPS, log_every=1, eval_every=100, checkpoint_every=2, keep_checkpoints=10,
            async_checkpointing=True, learning_rate=0.01, warmup_steps=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("xla_cache"))
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield path
  for n, v in old.items():
    jax.config.update(n, v)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(str(tmp_path_factory.mktemp("corpus")))


def config(corpus, **overrides):
  return tiny_mlm_config(corpus, **dict(BASE, **overrides))


@pytest.fixture(scope="module")
def reference(cache, corpus, tmp_path_factory):
  """One uninterrupted run: its workdir (checkpoints 2, 4, 6, 8), losses and final state."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  train.train_and_evaluate(config(corpus), workdir)
  return workdir, losses(workdir), final_state(workdir)


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def final_state(workdir, step=None):
  state, got = checkpoint.restore_params_only(workdir, step)
  return got, {jax.tree_util.keystr(k): np.asarray(v)
               for k, v in jax.tree_util.tree_leaves_with_path(state)}


def assert_same_run(workdir, reference):
  """Same losses at every step (each logged once) and the same final state, bit for bit."""
  _, ref_losses, (ref_step, ref_state) = reference
  assert losses(workdir) == ref_losses
  step, state = final_state(workdir)
  assert step == ref_step == STEPS
  assert state.keys() == ref_state.keys()
  for key in ref_state:
    assert ref_state[key].dtype == state[key].dtype and np.array_equal(ref_state[key], state[key]), key


def copy_of(reference, tmp_path, drop=()):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  for step in drop:
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  return workdir


def state_files(workdir, step):
  root = os.path.join(workdir, "checkpoints", str(step), "state")
  files = [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs]
  return sorted(files, key=os.path.getsize)


# ------------------------------------------------------------------------------ signals


def run_cli(corpus, workdir, fault, cache, tmp_path):
  """`python -m jembed.main` (through tests/fault_runner.py) on a config file equal to `config()`."""
  cfg = tmp_path / "fault_config.py"
  cfg.write_text(f"import sys\nsys.path.insert(0, {HERE!r})\nfrom spine_helpers import tiny_mlm_config\n"
                 f"def get_config():\n  return tiny_mlm_config({corpus!r}, **{BASE!r})\n")
  env = dict(os.environ, JEMBED_FAULT=fault, JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, os.path.join(HERE, "fault_runner.py"), f"--config={cfg}", f"--workdir={workdir}"]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_sigterm_finishes_the_step_commits_and_exits_3(cache, corpus, reference, tmp_path):
  workdir = str(tmp_path / "run")
  proc = run_cli(corpus, workdir, "term_at_batch:3", cache, tmp_path)
  assert proc.returncode == 3, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert "SIGTERM" in last and "after step 3" in last and "run the same command again" in last, last
  # Step 3 was finished and its checkpoint committed (it is not a checkpoint_every step).
  assert checkpoint.all_steps(workdir) == [2, 3]
  train.train_and_evaluate(config(corpus), workdir)
  assert_same_run(workdir, reference)


class SlowDevice:
  """A simulated asynchronous device for the compiled train step, counted in steps, not in time:
  a dispatch returns at once (as JAX's does); a clock thread "runs" the dispatched steps one after
  another (`seconds` each) and step j's loss is ready only once the clock has finished step j.
  When the clock starts step `signal_at` it sends the process SIGTERM. (A host callback inside the
  real step cannot stand in for this: XLA:CPU runs a program with host callbacks synchronously.)"""

  def __init__(self, signal_at, seconds=0.05):
    import threading
    self.signal_at, self.seconds = signal_at, seconds
    self.done = 0            # steps the clock has finished
    self.dispatched = 0
    self.started_when_signalled = None
    self._cond = threading.Condition()
    threading.Thread(target=self._run, daemon=True).start()

  def _run(self):
    while True:
      with self._cond:
        self._cond.wait_for(lambda: self.dispatched > self.done)
        running = self.done + 1
      if running == self.signal_at and self.started_when_signalled is None:
        self.started_when_signalled = self.dispatched
        os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(self.seconds)
      with self._cond:
        self.done = running
        self._cond.notify_all()

  def wrap(self, compiled):
    device = self

    class Loss:
      def __init__(self, step, value):
        self.step, self.value = step, value

      def block_until_ready(self):
        with device._cond:
          device._cond.wait_for(lambda: device.done >= self.step)
        return self

      def __array__(self, dtype=None, copy=None):
        self.block_until_ready()
        return np.asarray(self.value)

    def step(state, batch):
      state, metrics = compiled(state, batch)
      with self._cond:
        self.dispatched += 1
        self._cond.notify_all()
        return state, dict(metrics, loss=Loss(self.dispatched, metrics["loss"]))
    return step


def test_sigterm_is_honoured_within_two_steps_at_any_log_every(cache, corpus, tmp_path, monkeypatch):
  # log_every=100: without a bound on the steps in flight the host would dispatch to the end of the
  # run before reading the stop flag. The signal comes while the device runs step K.
  K, total = 3, 12
  device = SlowDevice(signal_at=K)
  compile_step = train.Setup.compile

  def compile_on_slow_device(self, state, batch):
    compiled = compile_step(self, state, batch)
    self.compiled_train = device.wrap(compiled)
    return self.compiled_train
  monkeypatch.setattr(train.Setup, "compile", compile_on_slow_device)
  workdir = str(tmp_path / "run")
  with pytest.raises(train.Preempted, match="SIGTERM"):
    train.train_and_evaluate(config(corpus, total_steps=total, log_every=100, checkpoint_every=100),
                             workdir)
  steps = checkpoint.all_steps(workdir)
  assert len(steps) == 1 and K <= steps[0] <= K + 2, (steps, device.started_when_signalled)
  assert device.started_when_signalled <= K + 1   # the host was at most one step ahead


def test_steps_in_flight_waits_for_the_step_before():
  waited = []

  class Result:
    def __init__(self, i):
      self.i = i

    def block_until_ready(self):
      waited.append(self.i)
      return self
  flight = train.StepsInFlight(2)
  for i in range(1, 5):
    flight.dispatched(Result(i))
    assert waited == list(range(1, i))   # after dispatching step i, step i - 1 is done
  unbounded = train.StepsInFlight(None)
  unbounded.dispatched(Result(9))
  assert 9 not in waited


def test_sigkill_during_an_async_save_resumes_from_the_last_committed(cache, corpus, reference, tmp_path):
  workdir = str(tmp_path / "run")
  proc = run_cli(corpus, workdir, "kill_in_save:6", cache, tmp_path)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert "SIGKILL during the save of step 6" in proc.stdout
  ckpts = os.path.join(workdir, "checkpoints")
  left = [d for d in os.listdir(ckpts) if d.startswith("6.orbax-checkpoint-tmp")]
  assert left, os.listdir(ckpts)   # the half-committed save is still there...
  assert checkpoint.all_steps(workdir) == [2, 4]   # ...but is not a checkpoint
  train.train_and_evaluate(config(corpus), workdir)
  assert_same_run(workdir, reference)
  assert not [d for d in os.listdir(ckpts) if "tmp" in d]   # and it was cleaned up


@pytest.mark.slow
def test_sigkill_mid_step_resumes_exactly(cache, corpus, reference, tmp_path):
  workdir = str(tmp_path / "run")
  proc = run_cli(corpus, workdir, "kill_at_batch:5", cache, tmp_path)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  # Step 4's asynchronous save may or may not have been committed when step 5 was killed.
  assert checkpoint.all_steps(workdir) in ([2], [2, 4])
  assert [s for s, _ in losses(workdir)] == [1, 2, 3, 4]
  train.train_and_evaluate(config(corpus), workdir)
  assert_same_run(workdir, reference)


# ------------------------------------------------------------------------------ damaged checkpoints


def test_truncated_checkpoint_file_falls_back_to_the_previous(corpus, reference, tmp_path, capsys):
  workdir = copy_of(reference, tmp_path)
  # The arrays are read from state/d/* (the per-process ocdbt.process_*/ copies were merged there).
  data = [p for p in state_files(workdir, 8) if os.path.basename(os.path.dirname(p)) == "d"
          and "ocdbt.process" not in p]
  assert data
  for path in data:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  train.train_and_evaluate(config(corpus), workdir)
  out = capsys.readouterr().out
  assert f"checkpoints/8 cannot be read" in out and "previous good checkpoint" in out and \
      "checkpoints/6" in out, out
  # The unreadable checkpoint was kept aside, not deleted; the run redid steps 7 and 8 exactly.
  assert os.path.isdir(os.path.join(workdir, "unreadable_checkpoints", "8"))
  assert_same_run(workdir, reference)


def test_deleted_checkpoint_file_is_refused_or_falls_back(corpus, reference, tmp_path):
  workdir = copy_of(reference, tmp_path)
  for path in state_files(workdir, 8):
    if os.path.basename(path) == "_METADATA" or "manifest" in path:
      os.remove(path)
  with pytest.raises(UserError, match="checkpoints/8 cannot be restored.*checkpoint_fallback"):
    train.train_and_evaluate(config(corpus, checkpoint_fallback=False), workdir)
  assert checkpoint.all_steps(workdir) == [2, 4, 6, 8]   # refused: nothing moved or deleted
  train.train_and_evaluate(config(corpus), workdir)
  assert_same_run(workdir, reference)


def test_no_readable_checkpoint_is_one_error_and_every_one_is_kept(corpus, reference, tmp_path):
  # Every checkpoint damaged: there is nothing to fall back to, so the run refuses in one line rather
  # than starting again from scratch over the user's checkpoints, and deletes none of them.
  workdir = copy_of(reference, tmp_path)
  for step in (2, 4, 6, 8):
    for path in state_files(workdir, step):
      if "manifest" in path or os.path.basename(os.path.dirname(path)) == "d":
        with open(path, "wb") as f:
          f.write(b"garbage")
  with pytest.raises(UserError, match="cannot be restored"):
    train.train_and_evaluate(config(corpus), workdir)
  kept = set(checkpoint.all_steps(workdir))
  aside = os.path.join(workdir, "unreadable_checkpoints")
  kept |= {int(d) for d in os.listdir(aside)} if os.path.isdir(aside) else set()
  assert kept == {2, 4, 6, 8}


def test_keep_checkpoints_never_removes_the_only_good_one(corpus, reference, tmp_path):
  # keep_checkpoints=1 and the latest unreadable: the run resumes from 6 and keeps it until the new
  # step-8 checkpoint is committed.
  workdir = copy_of(reference, tmp_path, drop=(2, 4))
  for path in state_files(workdir, 8):
    if os.path.basename(os.path.dirname(path)) == "d" and "ocdbt.process" not in path:
      with open(path, "wb"):
        pass   # emptied
  train.train_and_evaluate(config(corpus, keep_checkpoints=1), workdir)
  assert checkpoint.all_steps(workdir) == [8]
  assert_same_run(workdir, reference)


# ------------------------------------------------------------------------------ non-finite steps


def inject_nonfinite(monkeypatch, steps):
  """Makes steps `steps` (1-based) non-finite in the compiled step, as a NaN loss would."""
  original = reliability.step_is_finite

  def step_is_finite(loss, grads, step):
    bad = jax.numpy.isin(step + 1, jax.numpy.asarray(steps))
    return original(loss, grads, step) & ~bad
  monkeypatch.setattr(reliability, "step_is_finite", step_is_finite)


def test_nan_between_log_steps_stops_before_it_is_saved(corpus, tmp_path, monkeypatch, cache):
  inject_nonfinite(monkeypatch, [3])
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match="not finite at step 3.*last good checkpoint is step 2"):
    train.train_and_evaluate(config(corpus, log_every=4), workdir)   # 3 is not a log step
  assert checkpoint.all_steps(workdir) == [2]


def test_nan_skipped_counted_and_a_streak_stops_the_run(corpus, tmp_path, monkeypatch, cache):
  inject_nonfinite(monkeypatch, [3, 6, 7])
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match="2 steps in a row.*first bad step was 3.*last good "
                     "checkpoint is step 6"):
    train.train_and_evaluate(config(corpus, log_every=4, skip_nonfinite=True,
                                    max_consecutive_nonfinite=2), workdir)
  rows = {r[0]: r for r in losses(workdir)}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    train_rows = [json.loads(l) for l in f if '"train"' in l]
  assert [(r["step"], r["skipped_steps"]) for r in train_rows] == [(4, 1)]
  assert checkpoint.all_steps(workdir) == [2, 4, 6]   # step 8 (after the streak) was never saved
  _, state = final_state(workdir, 6)
  assert all(np.all(np.isfinite(v)) for v in state.values() if v.dtype.kind == "f")
  skipped = [v for k, v in state.items() if "nonfinite" in k and "skipped" in k]
  assert [int(v) for v in skipped] == [2] and rows   # steps 3 and 6 by the step-6 checkpoint


# ------------------------------------------------------------------------------ disk


@contextlib.contextmanager
def small_tmpfs(path, size_kb):
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                                          path], capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", path], capture_output=True)


def fill(directory, leave_bytes):
  st = os.statvfs(directory)
  free = st.f_bavail * st.f_frsize
  with open(os.path.join(directory, "filler"), "wb") as f:
    with contextlib.suppress(OSError):
      f.write(b"\0" * max(free - leave_bytes, 0))


@pytest.mark.slow
def test_full_disk_is_one_error_and_the_previous_checkpoint_survives(corpus, reference, tmp_path):
  ref_workdir = reference[0]
  size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ref_workdir) for f in fs)
  with small_tmpfs(str(tmp_path / "disk"), size_kb=2 * size // 1024 + 512) as disk:
    workdir = os.path.join(disk, "run")
    shutil.copytree(ref_workdir, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
    fill(disk, leave_bytes=16 * 1024)   # room for metrics rows, not for a checkpoint
    with pytest.raises(UserError, match="No space left on device.*(checkpoint 6 is intact|files written)"):
      train.train_and_evaluate(config(corpus), workdir)
    assert checkpoint.all_steps(workdir) == [2, 4, 6]
    os.remove(os.path.join(disk, "filler"))
    train.train_and_evaluate(config(corpus), workdir)   # room again: the same command finishes
    assert_same_run(workdir, reference)


def test_read_only_workdir_is_one_error_and_nothing_changes(corpus, reference, tmp_path):
  with small_tmpfs(str(tmp_path / "disk"), size_kb=8192) as disk:
    workdir = os.path.join(disk, "run")
    shutil.copytree(reference[0], workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
    before = {os.path.join(r, f): os.path.getsize(os.path.join(r, f))
              for r, _, fs in os.walk(workdir) for f in fs}
    subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
    with pytest.raises(UserError, match="Read-only file system"):
      train.train_and_evaluate(config(corpus), workdir)
    after = {os.path.join(r, f): os.path.getsize(os.path.join(r, f))
             for r, _, fs in os.walk(workdir) for f in fs}
    assert before == after
    assert checkpoint.all_steps(workdir) == [2, 4, 6]


def test_metrics_write_error_is_one_line(tmp_path, monkeypatch):
  """ENOSPC injected at the file layer (runs without root too): the partial row is dropped."""
  from jembed import metrics
  workdir = tmp_path / "run"
  logger = metrics.Logger(str(workdir), 10, 0)
  logger.write(1, "train", {"loss": 1.0})

  class Full:
    def write(self, text):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    flush = close = lambda self: None
  real = logger._jsonl
  real.write('{"step": 2, "split": "train", "lo')   # what a full disk leaves: half a row
  real.flush()
  logger._jsonl = Full()
  with pytest.raises(UserError, match="metrics.jsonl.*No space left on device"):
    logger.write(2, "train", {"loss": 2.0})
  real.close()
  logger.close()
  again = metrics.Logger(str(workdir), 10, 1)   # a resumed run: the half row is gone
  again.write(2, "train", {"loss": 2.0})
  again.close()
  with open(workdir / "metrics.jsonl") as f:
    assert [json.loads(l)["step"] for l in f] == [1, 2]


# ------------------------------------------------------------------------------ bad records


def text_cfg(path, policy, **kw):
  import ml_collections
  fields = dict(source="files", train=str(path), eval="", eval_fraction=0.0, tfds_name="",
                tfds_split="train", tfds_eval_split="", tfds_text_key="text", data_dir="",
                on_bad_record=policy)
  return ml_collections.ConfigDict(dict(fields, **kw))


GOOD_JSONL = '{"text": "one good document"}\n{"text": "another good document"}\n'
TEXT_FAULTS = [  # (file name, contents, where the bad record is, words of the message)
    ("bytes.txt", b"good line\n\xff\xfe bad bytes\nanother good line\n", ":2", "bytes that are not UTF-8"),
    ("json.jsonl", (GOOD_JSONL + '{"text": "broken\n').encode(), ":3", "not valid JSON"),
    ("field.jsonl", (GOOD_JSONL + '{"body": "no text field"}\n').encode(), ":3", "no string 'text'"),
]


@pytest.mark.parametrize("name, data, where, words", TEXT_FAULTS, ids=[f[0] for f in TEXT_FAULTS])
def test_bad_records_in_text_files(tmp_path, name, data, where, words):
  from jembed.data import documents, pipeline
  path = tmp_path / name
  path.write_bytes(data)
  with pytest.raises(UserError, match=f"{name}{where}: {words}.*on_bad_record=skip") as e:
    documents.load_documents(text_cfg(path, "error"))
  assert "\n" not in str(e.value)
  pipeline.reset_bad_records()
  docs, _ = documents.load_documents(text_cfg(path, "skip"))
  assert len(docs) == 2 and pipeline.bad_records()["skipped"] == 1
  assert f"{name}{where}" in pipeline.bad_records()["examples"][0]


LABELED_FAULTS = [
    ("bytes.jsonl", b'{"text": "a", "label": "x"}\n\xff\n{"text": "b", "label": "y"}\n', ":2",
     "bytes that are not UTF-8"),
    ("json.jsonl", b'{"text": "a", "label": "x"}\n{"text": \n{"text": "b", "label": "y"}\n', ":2",
     "not valid JSON"),
    ("field.jsonl", b'{"text": "a", "label": "x"}\n{"text": "c"}\n{"text": "b", "label": "y"}\n', ":2",
     "needs a string 'text' and a 'label'"),
    ("row.csv", b'text,label\na,x\n"c",y,extra\nb,y\n', ":3", "2 columns expected"),
]


@pytest.mark.parametrize("name, data, where, words", LABELED_FAULTS, ids=[f[0] for f in LABELED_FAULTS])
def test_bad_records_in_labelled_text(tmp_path, name, data, where, words):
  from jembed.data import labeled_text, pipeline
  path = tmp_path / name
  path.write_bytes(data)
  evalf = tmp_path / "eval.jsonl"
  evalf.write_text('{"text": "e", "label": "x"}\n{"text": "f", "label": "y"}\n')
  cfg = lambda policy: text_cfg(path, policy, eval=str(evalf))
  with pytest.raises(UserError, match=f"{name}{where}: {words}"):
    labeled_text.load_labeled_text(cfg("error"))
  pipeline.reset_bad_records()
  data = labeled_text.load_labeled_text(cfg("skip"))
  assert data.train_texts == ["a", "b"] and pipeline.bad_records()["skipped"] == 1


def test_eval_label_outside_the_label_set(tmp_path):
  from jembed.data import labeled_text, pipeline
  train_f, eval_f = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
  train_f.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
  eval_f.write_text('{"text": "e", "label": "x"}\n{"text": "f", "label": "z"}\n')
  cfg = lambda policy: text_cfg(train_f, policy, eval=str(eval_f))
  with pytest.raises(UserError, match=r"eval labels \['z'\] never occur.*on_bad_record=skip"):
    labeled_text.load_labeled_text(cfg("error"))
  pipeline.reset_bad_records()
  data = labeled_text.load_labeled_text(cfg("skip"))
  assert data.eval_texts == ["e"] and pipeline.bad_records()["skipped"] == 1


def test_bad_records_in_image_folders(tmp_path):
  import ml_collections
  from PIL import Image
  from jembed.data import images, pipeline
  root = tmp_path / "imgs"
  for cls in ("a", "b"):
    (root / cls).mkdir(parents=True)
    for i in range(2):
      Image.fromarray(np.full((4, 4), 10 * i, np.uint8)).save(root / cls / f"{i}.png")
  (root / "a" / "broken.png").write_bytes(b"not a png")
  Image.fromarray(np.zeros((5, 4), np.uint8)).save(root / "b" / "odd.png")
  cfg = lambda policy: ml_collections.ConfigDict(dict(
      source="", train=str(root), eval="", eval_fraction=0.0, tfds_name="", tfds_split="train",
      tfds_eval_split="test", data_dir="", image_size=0, channels=0, on_bad_record=policy))
  with pytest.raises(UserError, match=r"cannot read image .*broken\.png"):
    images.load_image_folder(str(root), cfg("error"))
  (root / "a" / "broken.png").rename(root / "a" / "broken.bak")
  with pytest.raises(UserError, match=r"mixed sizes"):
    images.load_image_folder(str(root), cfg("error"))
  (root / "a" / "broken.bak").rename(root / "a" / "broken.png")
  pipeline.reset_bad_records()
  ds = images.load_image_folder(str(root), cfg("skip"))
  assert ds.images.shape == (4, 4, 4, 1) and list(ds.labels) == [0, 0, 1, 1]
  bad = pipeline.bad_records()
  assert bad["skipped"] == 2 and any("broken.png" in x for x in bad["examples"]) and \
      any("odd.png" in x and "(5, 4, 1)" in x for x in bad["examples"])


def test_skipped_records_are_reported_in_metrics(corpus, tmp_path, cache, capsys):
  dirty = tmp_path / "dirty.txt"
  dirty.write_bytes(open(corpus, "rb").read() + b"\xff\xfe\n" + b"\xc3\x28 twice\n")
  workdir = str(tmp_path / "run")
  cfg = config(str(dirty), total_steps=2, checkpoint_every=2)
  cfg.data.on_bad_record = "skip"
  train.train_and_evaluate(cfg, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  assert [r["skipped_records"] for r in rows if r["split"] == "data"] == [2]
  assert "skipped 2 bad record(s)" in capsys.readouterr().out


def test_checkpoint_every_secs_saves_on_time(corpus, tmp_path, cache):
  # checkpoint_every=100 would save only at the end; a tiny time interval saves after every step.
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config(corpus, total_steps=3, checkpoint_every=100,
                                  checkpoint_every_secs=1e-9), workdir)
  assert checkpoint.all_steps(workdir) == [1, 2, 3]
