"""launch/: the TPU VM and SLURM launchers (through their dry runs, and through fake gcloud / srun
that run the worker-side commands for real) and the Colab notebook (its code cells run on CPU)."""
from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from spine_helpers import ROOT, write_corpus

TPU_VM = os.path.join(ROOT, "launch", "tpu_vm.sh")
SLURM = os.path.join(ROOT, "launch", "slurm.sbatch")
NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")
JEMBED_ARGS = ["--config", "configs/mlm.py", "--workdir", "gs://bucket/run",
               "--config.data.train=my corpus/*.txt", "--config.model.size=base"]


def _script(path, text: str) -> str:
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
  return str(path)


@pytest.fixture
def fake_gcloud(tmp_path):
  """A `gcloud` first on PATH that records its arguments; it answers `describe` as FAKE_TPU_EXISTS
  says and runs the run / log-stream ssh commands with bash in a fake worker home, as a worker would."""
  bin_dir, home = tmp_path / "bin", tmp_path / "worker"
  bin_dir.mkdir()
  (home / "jembed").mkdir(parents=True)
  (home / "jembed-venv" / "bin").mkdir(parents=True)
  # The worker's python: records the argv it got, says something, fails with status 3.
  _script(home / "jembed-venv" / "bin" / "python",
          "#!/bin/sh\nprintf '%s\\0' \"$@\" > \"$HOME/argv.bin\"\necho 'fake jembed: step 1 loss 1.5'\nexit 3\n")
  _script(bin_dir / "gcloud", textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, subprocess, sys
      args = sys.argv[1:]
      with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
        f.write(json.dumps(args) + "\\n")
      if "describe" in args:
        sys.exit(0 if os.environ.get("FAKE_TPU_EXISTS") == "1" else 1)
      cmd = next((a[len("--command="):] for a in args if a.startswith("--command=")), "")
      if cmd.startswith("tail ") and os.environ.get("FAKE_SSH_DROP") == "1":
        sys.exit(255)  # what ssh returns when the connection is lost
      if "jembed.main" in cmd or cmd.startswith("tail "):
        sys.exit(subprocess.call(["bash", "-c", cmd], env=dict(os.environ, HOME={str(home)!r})))
      """))
  log = tmp_path / "gcloud.log"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log),
             TMPDIR=str(tmp_path))

  def calls():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  return env, calls, home


def _tpu(env, *args, jembed=JEMBED_ARGS, dry=True):
  cmd = ["bash", TPU_VM, *args, *(["--dry-run"] if dry else []), "--", *jembed]
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def _command_of(line: list[str]) -> str:
  return next(a[len("--command="):] for a in line if a.startswith("--command="))


def _jembed_argv(remote: str) -> list[str]:
  words = shlex.split(remote)
  start = words.index("jembed.main") + 1
  end = words.index(">", start) if ">" in words[start:] else len(words)
  return words[start:end]


def test_scripts_parse():
  for path in (TPU_VM, SLURM):
    subprocess.run(["bash", "-n", path], check=True)


def test_tpu_dry_run_prints_every_step_and_runs_none(fake_gcloud):
  env, calls, _ = fake_gcloud
  r = _tpu(env, "--name", "my-v5e-16", "--zone", "us-west4-a", "--project", "proj")
  assert r.returncode == 0, r.stderr
  assert calls() == []  # a dry run calls no gcloud
  lines = [shlex.split(line) for line in r.stdout.splitlines()]
  gcloud = [w for w in lines if w[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
  # default: create only when `describe` fails, with the v5e runtime for the default v5litepod-16
  first = lines[0]
  assert first[4] == "describe" and "||" in first
  create = first[first.index("||") + 1:]
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-v5e-16"]
  assert {"--zone=us-west4-a", "--project=proj", "--accelerator-type=v5litepod-16",
          "--version=v2-alpha-tpuv5-lite"} <= set(create)
  # the checkout is copied to all workers, installed with the tpu extra on all, run on all
  assert any(w[4] == "scp" and "--worker=all" in w for w in gcloud)
  on_all = [_command_of(w) for w in gcloud if w[4] == "ssh" and "--worker=all" in w]
  install, start = on_all
  assert "pip install" in install and '~/jembed"[tpu]"' in install
  assert _jembed_argv(start) == JEMBED_ARGS + ["--distributed=true"]  # the value with a space intact
  stream = [w for w in gcloud if w[4] == "ssh" and "--worker=0" in w]
  assert len(stream) == 1 and "tail" in _command_of(stream[0])
  assert all("--project=proj" in w for w in gcloud)
  assert not any(w[4] == "delete" for w in gcloud)  # only with --delete-after


def test_tpu_reuse_create_delete_repo_spot(fake_gcloud):
  env, calls, _ = fake_gcloud
  base = ["--name", "n1", "--zone", "z"]
  reuse = _tpu(env, *base, "--reuse", "--delete-after")
  assert reuse.returncode == 0, reuse.stderr
  assert "tpu-vm create" not in reuse.stdout and "tpu-vm describe n1 " in reuse.stdout
  assert shlex.split(reuse.stdout.splitlines()[-1]) == [
      "gcloud", "compute", "tpus", "tpu-vm", "delete", "n1", "--zone=z", "--quiet"]
  # --delete-after with a workdir that is not gs:// warns that the outputs go with the TPU
  local = _tpu(env, *base, "--delete-after", jembed=["--config", "c.py", "--workdir", "/tmp/w"])
  assert "not gs://" in local.stderr
  created = _tpu(env, *base, "--create", "--accelerator-type", "v4-16")
  first = shlex.split(created.stdout.splitlines()[0])
  assert first[4] == "create" and "||" not in first and "--version=tpu-ubuntu2204-base" in first
  version = _tpu(env, *base, "--create", "--version", "my-runtime")
  assert "--version=my-runtime" in shlex.split(version.stdout.splitlines()[0])
  repo = _tpu(env, *base, "--repo", "https://example.com/j.git", "--branch", "v1")
  assert "scp" not in repo.stdout
  assert "git clone -q --depth 1 --branch v1 https://example.com/j.git ~/jembed" in repo.stdout
  spot = _tpu(env, *base, "--spot", "--delete-after")
  words = [shlex.split(line, comments=True) for line in spot.stdout.splitlines()]
  assert words[0][3:5] == ["queued-resources", "describe"]
  create = words[0][words[0].index("||") + 1:]
  assert create[3:6] == ["queued-resources", "create", "n1"] and "--spot" in create
  assert "--node-id=n1" in create and "--runtime-version=v2-alpha-tpuv5-lite" in create
  assert words[1][-1] == "--format=value(state.state)"  # the wait for ACTIVE
  assert words[-1][3:6] == ["queued-resources", "delete", "n1"] and "--force" in words[-1]
  own = _tpu(env, *base, jembed=["--config", "c.py", "--workdir", "w", "--distributed=false"])
  start = [_command_of(shlex.split(l)) for l in own.stdout.splitlines() if "jembed.main" in l][0]
  assert _jembed_argv(start) == ["--config", "c.py", "--workdir", "w", "--distributed=false"]
  assert calls() == []


@pytest.mark.parametrize("args, problem", [
    (["--zone", "z"], "--name is required"),
    (["--name", "n"], "--zone is required"),
    (["--name", "n", "--zone"], "--zone needs a value"),
    (["--name", "n", "--zone", "z", "--bogus"], "unknown option '--bogus'"),
    (["--name", "n", "--zone", "z", "--local", "--repo", "u"], "exclude each other"),
])
def test_tpu_bad_flags_are_one_line(fake_gcloud, args, problem):
  env, calls, _ = fake_gcloud
  r = _tpu(env, *args)
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.count("\n") == 1 and problem in r.stderr and r.stderr.startswith("tpu_vm.sh: error:")
  assert calls() == []


def test_tpu_help_and_equals_form(fake_gcloud):
  env, calls, _ = fake_gcloud
  h = subprocess.run(["bash", TPU_VM, "--help"], env=env, capture_output=True, text=True)
  assert h.returncode == 0 and h.stdout.startswith("usage: bash launch/tpu_vm.sh --name NAME --zone ZONE")
  r = _tpu(env, "--name=n4", "--zone=z", "--accelerator-type=v6e-8", "--create")
  assert shlex.split(r.stdout.splitlines()[0])[4:] == [
      "create", "n4", "--zone=z", "--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e"]
  assert calls() == []


@pytest.mark.parametrize("jembed, problem", [
    ([], "no jembed arguments"), (["--workdir", "w"], "no --config"), (["--config", "c.py"], "no --workdir")])
def test_tpu_jembed_args_are_checked_before_any_gcloud(fake_gcloud, jembed, problem):
  env, calls, _ = fake_gcloud
  r = _tpu(env, "--name", "n", "--zone", "z", jembed=jembed, dry=False)
  assert r.returncode == 2 and problem in r.stderr and r.stderr.count("\n") == 1
  assert calls() == []


def test_tpu_real_mode_runs_on_workers_streams_and_deletes(fake_gcloud):
  """Not a dry run: gcloud is fake, but the worker-side start and log-stream commands run in bash,
  so the arguments that jembed.main receives went through real shell quoting."""
  env, calls, home = fake_gcloud
  r = _tpu(env, "--name", "n2", "--zone", "z", "--delete-after", dry=False)
  assert r.returncode == 3, r.stderr  # worker 0's exit status
  assert "fake jembed: step 1 loss 1.5" in r.stdout  # worker 0's log, streamed
  argv = (home / "argv.bin").read_bytes().decode().split("\0")[:-1]
  assert argv == ["-m", "jembed.main", *JEMBED_ARGS, "--distributed=true"]
  verbs = [c[3] for c in calls()]  # the fake records the words after "gcloud"
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh", "delete"]
  # the copied checkout holds this repository's files
  import tarfile
  with tarfile.open(calls()[2][4]) as tar:
    assert "launch/tpu_vm.sh" in tar.getnames() and "jembed/main.py" in tar.getnames()
  env["FAKE_TPU_EXISTS"] = "1"
  open(env["FAKE_GCLOUD_LOG"], "w").close()
  again = _tpu(env, "--name", "n2", "--zone", "z", dry=False)
  assert again.returncode == 3 and [c[3] for c in calls()] == ["describe", "scp", "ssh", "ssh", "ssh"]


def test_tpu_keeps_the_tpu_when_the_log_stream_is_lost_or_a_run_is_going(fake_gcloud):
  env, calls, home = fake_gcloud
  env.update(FAKE_TPU_EXISTS="1", FAKE_SSH_DROP="1")
  lost = _tpu(env, "--name", "n3", "--zone", "z", "--delete-after", dry=False)
  assert lost.returncode == 255 and "lost the connection" in lost.stderr and "--worker=0" in lost.stderr
  assert "delete" not in [c[3] for c in calls()]  # the run may still be going: no delete
  # a run still going on a worker (its pid alive) refuses a second start, and nothing is deleted
  with subprocess.Popen(["sleep", "30"]) as busy:
    (home / "jembed-run.pid").write_text(str(busy.pid))
    open(env["FAKE_GCLOUD_LOG"], "w").close()
    r = _tpu(env, "--name", "n3", "--zone", "z", "--delete-after", dry=False)
    busy.kill()
  assert r.returncode == 1 and "a run is still going on" in r.stderr and f"pid {busy.pid}" in r.stderr
  assert [c[3] for c in calls()] == ["describe", "scp", "ssh", "ssh"]


# ---- SLURM --------------------------------------------------------------------------------------
def _slurm(env_extra, *args, path=None, dry=True):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JEMBED_", "JAX_"))}
  env.update(env_extra)
  if path is not None:
    env["PATH"] = path
  cmd = ["bash", SLURM, *(["--dry-run"] if dry else []), *args]
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def _dry_env(out: str) -> dict[str, str]:
  return dict(line.split("=", 1) for line in out.splitlines() if line.startswith(("JAX_", "CUDA_")))


def test_slurm_dry_run_without_scontrol_parses_the_nodelist(tmp_path):
  assert subprocess.run(["bash", "-c", "command -v scontrol"], capture_output=True).returncode != 0 \
      or pytest.skip("scontrol is installed here; the fallback parser is tested where it is not")
  fake = {"SLURM_JOB_NODELIST": "gpu[07-08,11],cpu3", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
          "SLURM_JOB_ID": "4321"}
  r = _slurm(fake, "--config", "configs/mlm.py", "--workdir", "/shared/run", "--config.data.train=a b.txt")
  assert r.returncode == 0, r.stderr
  got = _dry_env(r.stdout)
  assert got == {"JAX_COORDINATOR_ADDRESS": f"gpu07:{10000 + 4321 % 50000}", "JAX_NUM_PROCESSES": "2",
                 "JAX_PROCESS_ID": "1"}
  srun = shlex.split(r.stdout.splitlines()[-1])
  assert srun[0] == "srun" and not any(w.startswith("--cpus-per-task") for w in srun)
  assert srun[srun.index("jembed.main") + 1:] == ["--config", "configs/mlm.py", "--workdir", "/shared/run",
                                                  "--config.data.train=a b.txt"]
  # several bracket groups, and DRY_RUN=1 instead of the flag
  r = _slurm(dict(fake, SLURM_JOB_NODELIST="rack1-n[3-4]-x[09-10]", DRY_RUN="1", JEMBED_PORT="999"),
             "--config", "c.py", "--workdir", "w", dry=False)
  assert _dry_env(r.stdout)["JAX_COORDINATOR_ADDRESS"] == "rack1-n3-x09:999"


def test_slurm_uses_scontrol_and_per_gpu_mode(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  # scontrol's answer differs from what the fallback would make of the nodelist: proves it is used
  _script(bin_dir / "scontrol", "#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'alpha\\nbeta\\n'\n")
  path = f"{bin_dir}:{os.environ['PATH']}"
  fake = {"SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NTASKS": "16", "SLURM_PROCID": "13",
          "SLURM_LOCALID": "5", "SLURM_JOB_ID": "7"}
  r = _slurm(dict(fake, SLURM_CPUS_PER_TASK="12"), "--config", "c.py", "--workdir", "w", path=path)
  assert "--cpus-per-task=12" in shlex.split(r.stdout.splitlines()[-1])  # srun does not inherit it
  assert _dry_env(r.stdout) == {"JAX_COORDINATOR_ADDRESS": "alpha:10007", "JAX_NUM_PROCESSES": "16",
                                "JAX_PROCESS_ID": "13"}
  per_gpu = dict(fake, JEMBED_TASK_PER_GPU="1")
  assert _dry_env(_slurm(per_gpu, "--config", "c.py", "--workdir", "w", path=path).stdout)[
      "CUDA_VISIBLE_DEVICES"] == "5"
  bound = dict(per_gpu, CUDA_VISIBLE_DEVICES="0,1,2,3,4,9,6,7")
  assert _dry_env(_slurm(bound, "--config", "c.py", "--workdir", "w", path=path).stdout)[
      "CUDA_VISIBLE_DEVICES"] == "9"  # the SLURM_LOCALID-th of the GPUs this task was given
  no_slurm = _slurm({}, "--config", "c.py", "--workdir", "w", path=path)
  assert no_slurm.returncode == 2 and no_slurm.stderr.count("\n") == 1 and "SLURM_JOB_NODELIST" in no_slurm.stderr


def test_slurm_real_mode_gives_each_task_its_process_id(tmp_path):
  """A fake srun runs the task command once per process, as SLURM would on each node."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _script(bin_dir / "srun", "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nfor ((i = 0; i < SLURM_NTASKS; i++)); do\n"
          "  SLURM_PROCID=$i SLURM_LOCALID=0 \"$@\" || exit $?\ndone\n")
  record = tmp_path / "tasks.txt"
  py = _script(tmp_path / "python", "#!/bin/bash\nprintf '%s|' \"$JAX_COORDINATOR_ADDRESS\" "
               f"\"$JAX_NUM_PROCESSES\" \"$JAX_PROCESS_ID\" \"$@\" >> {record}\necho >> {record}\n")
  fake = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
          "SLURM_JOB_ID": "50001", "JEMBED_PYTHON": py}
  r = _slurm(fake, "--config", "c.py", "--workdir", "/shared/x y", dry=False,
             path=f"{bin_dir}:{os.environ['PATH']}")
  assert r.returncode == 0, r.stderr
  rows = [line.split("|")[:-1] for line in record.read_text().splitlines()]
  assert rows == [["n1:10001", "2", str(i), "-m", "jembed.main", "--config", "c.py", "--workdir",
                   "/shared/x y"] for i in range(2)]


# ---- Colab notebook -----------------------------------------------------------------------------
RUNNER = r"""
import contextlib, io, json, sys
nb_path, overrides, out_path = sys.argv[1:]
nb = json.load(open(nb_path))
ns, outputs = {}, []
for cell in nb["cells"]:
  if cell["cell_type"] != "code":
    continue
  src = "".join(cell["source"])
  if src.startswith("# colab-only"):
    continue
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    exec(compile(src, f"<cell {len(outputs)}>", "exec"), ns)
    if src.startswith("# settings"):
      exec(overrides, ns)
  outputs.append(buf.getvalue())
  sys.stderr.write(buf.getvalue())
# The embedding cell's numbers, recomputed one sentence at a time from a fresh load.
import numpy as np, jembed
model = jembed.load(ns["WORKDIR"])
vecs = np.concatenate([model.embed([s]) for s in ns["sentences"]]).astype(np.float64)
vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
json.dump({"outputs": outputs, "sentences": ns["sentences"], "reference": (vecs @ vecs.T).tolist()},
          open(out_path, "w"))
"""


def test_notebook_is_nbformat4_with_a_marked_install_cell():
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4 and isinstance(nb["metadata"], dict)
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("code", "markdown") and isinstance(cell["source"], list)
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and "execution_count" in cell
  code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  install = [c for c in code if c.startswith("# colab-only")]
  assert len(install) == 1 and "jembed[tpu]" in install[0] and code[0] is install[0]
  try:
    import nbformat
  except ImportError:
    return
  nbformat.validate(nbformat.reads(json.dumps(nb), as_version=4))


def test_notebook_code_cells_run_on_cpu(tmp_path):
  corpus = write_corpus(str(tmp_path))
  workdir = tmp_path / "run"
  overrides = (f"WORKDIR = {str(workdir)!r}\nSTEPS = 4\nBATCH_SIZE = 16\nSEQ_LEN = 32\nLOG_EVERY = 2\n"
               "MODEL_SIZE = 'tiny'\nMODEL_OVERRIDES = dict(num_layers=1, hidden_size=32, num_heads=2, "
               f"mlp_dim=64, max_position=64)\nVOCAB_SIZE = 512\nTRAIN_FILES = {corpus!r}\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a laptop
  env.update(PYTHONPATH=ROOT, MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
  out = tmp_path / "out.json"
  r = subprocess.run([sys.executable, "-c", RUNNER, NOTEBOOK, overrides, str(out)], env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  # it trained for the overridden number of steps and plotted metrics.jsonl
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in rows if r["split"] == "train") == 4
  assert (workdir / "loss_curve.png").stat().st_size > 0
  # the last cell printed one row of cosine similarities per sentence, matching a recomputation
  printed = result["outputs"][-1].splitlines()
  sentences = result["sentences"]
  assert len(printed) == 1 + len(sentences)
  table = np.array([[float(x) for x in line.split()[:len(sentences)]] for line in printed[1:]])
  np.testing.assert_allclose(table, np.array(result["reference"]), atol=2e-3)
  for line, s in zip(printed[1:], sentences):
    assert line.endswith(s)
