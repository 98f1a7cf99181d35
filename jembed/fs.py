"""The one home of file I/O: local paths and gs:// URLs alike (etils.epath), atomic writes, atomic
directory swaps, and the rule that only process 0 writes run artifacts.

What "atomic" means where:
- Local POSIX paths: a file is written under a temporary name in the same directory, flushed, fsynced
  and renamed over the target (`os.replace` is atomic within one filesystem), so a reader sees the
  old file or the new one, never a partial one, even after a crash or a full disk.
- gs:// (and other object stores): a single object upload becomes visible only when complete, so
  writing the object directly is already all-or-nothing, and that is what we do (a rename on GCS is
  a copy + delete, which would add nothing).
- Directory swaps (`swap_dir`): locally two renames (old away, new in) with a window in between in
  which the final name is missing but both complete trees exist; `swap_dir` then finishes or undoes
  the swap on the next call. On GCS a directory is a prefix and a rename copies every object, so the
  swap is not atomic there; readers should check for a marker file the builder writes last.
"""
from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import tempfile
import uuid
from typing import Any, Callable

import numpy as np
from etils import epath

from jembed.errors import UserError

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
  """An epath.Path for a local path (user-expanded) or a URL such as gs://bucket/dir."""
  s = os.fspath(p)
  return epath.Path(s if "://" in s else os.path.expanduser(s))


def is_local(p: PathLike) -> bool:
  return "://" not in os.fspath(p)


def absolute(p: PathLike) -> str:
  """A local path made absolute; a URL is returned as it is (never turned into a local path)."""
  s = os.fspath(p)
  return os.path.abspath(os.path.expanduser(s)) if is_local(s) else s


def join(p: PathLike, *parts: str) -> str:
  return os.fspath(path(p).joinpath(*parts))


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def makedirs(p: PathLike) -> None:
  try:
    path(p).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise write_error(p, e) from None


def open(p: PathLike, mode: str = "r"):  # pylint: disable=redefined-builtin
  return path(p).open(mode)


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def is_file(p: PathLike) -> bool:
  target = path(p)
  return target.exists() and not target.is_dir()


def listdir(p: PathLike) -> list[str]:
  """The names in directory `p` (sorted)."""
  return sorted(child.name for child in path(p).iterdir())


@contextlib.contextmanager
def local_dir(p: PathLike):
  """A local directory holding the tree at `p`: `p` itself when it is local; for a URL (gs://...),
  a temporary download of every file under it, deleted on exit. For readers that only take local
  paths (safetensors, tokenizers, tensorboard)."""
  if is_local(p):
    yield os.path.expanduser(os.fspath(p))
    return
  root = path(p)
  with tempfile.TemporaryDirectory(prefix="jembed-download-") as local:
    for f, rel in _files_under(root):
      dest = os.path.join(local, rel)
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      with builtins.open(dest, "wb") as out:
        out.write(f.read_bytes())
    yield local


@contextlib.contextmanager
def local_file(p: PathLike):
  """A local path with the contents of file `p`: `p` itself when local; for a URL, a temporary
  download with the same file name (extension kept), deleted on exit. A path that names no file comes
  back as it is, so the caller's own "does not exist" message names it."""
  if is_local(p):
    yield os.path.expanduser(os.fspath(p))
    return
  source = path(p)
  if not is_file(p):
    yield os.fspath(p)   # no such object: the caller's check names the URL
    return
  with tempfile.TemporaryDirectory(prefix="jembed-download-") as local:
    dest = os.path.join(local, source.name)
    with builtins.open(dest, "wb") as out:
      out.write(source.read_bytes())
    yield dest


def copy_tree(src: PathLike, dst: PathLike) -> None:
  """Copies every file under directory `src` to the same relative path under `dst` (local or URL)."""
  for f, rel in _files_under(path(src)):
    target = path(dst).joinpath(rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(f.read_bytes())


def _files_under(root: epath.Path, rel: str = ""):
  """(file, its path relative to root) for every file under root (epath has no recursive glob on
  GCS: one listing per directory)."""
  for child in sorted(root.iterdir(), key=lambda c: c.name):
    name = f"{rel}/{child.name}" if rel else child.name
    if child.is_dir():
      yield from _files_under(child, name)
    else:
      yield child, name


def is_writer() -> bool:
  """Run artifacts (config.json, metrics.jsonl, TensorBoard, tokenizer, reports, exports) are
  written by process 0 only; every process writes its own shards of a checkpoint through orbax."""
  import jax
  return jax.process_index() == 0


def write_error(p: PathLike, e: OSError) -> UserError:
  reason = e.strerror or type(e).__name__
  fix = ("free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT)
         else "choose a writable --workdir")
  return UserError(f"cannot write {os.fspath(p)} ({reason}); {fix} and run the same command again "
                   "(files written before are intact)")


def _umask() -> int:
  """The process's umask, read without changing it where Linux allows (os.umask can only be read
  by setting it, which would race with files other threads create meanwhile)."""
  try:
    with builtins.open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def file_mode() -> int:
  """The mode a plain `open(path, "w")` would give a new file: 0666 less the umask (0644 under the
  usual 022). Temporary files (mkstemp) and some libraries' own atomic writes (safetensors) make
  0600; what jembed writes gets this mode instead."""
  return 0o666 & ~_umask()


def dir_mode() -> int:
  """The mode `os.makedirs` would give a new directory: 0777 less the umask (mkdtemp makes 0700)."""
  return 0o777 & ~_umask()


def write_with(p: PathLike, write: Callable[[str], None], *, mode: int | None = None) -> None:
  """Atomically creates `p` by calling `write(tmp_path)` on a local temporary file, for libraries
  that only write to a path (tokenizers, matplotlib, safetensors). For a URL, the local file is then
  uploaded. The file gets `mode`, by default what a plain open() would give it (file_mode)."""
  target = path(p)
  if is_local(p):
    directory = os.path.dirname(os.path.abspath(os.fspath(target)))
    try:
      os.makedirs(directory, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.tmp-")
      os.close(fd)
    except OSError as e:
      raise write_error(p, e) from None
    try:
      write(tmp)
      with builtins.open(tmp, "rb+") as f:
        os.fsync(f.fileno())
      os.chmod(tmp, file_mode() if mode is None else mode)  # mkstemp (and safetensors) make 0600
      os.replace(tmp, os.fspath(target))
    except OSError as e:
      raise write_error(p, e) from None
    finally:
      with contextlib.suppress(OSError):
        os.remove(tmp)
    return
  with tempfile.TemporaryDirectory() as local_dir:
    local = os.path.join(local_dir, target.name)
    write(local)
    with builtins.open(local, "rb") as f:
      write_bytes(p, f.read())


def write_bytes(p: PathLike, data: bytes) -> None:
  """Atomically writes `data` to `p` (local: temp file + fsync + rename; gs://: one object)."""
  if is_local(p):
    def write(tmp):
      with builtins.open(tmp, "wb") as f:
        f.write(data)
    write_with(p, write)
    return
  target = path(p)
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    # An object store publishes an upload only once it is complete, so a direct write is already
    # all-or-nothing (a temporary object and a "rename", i.e. copy + delete, would add nothing).
    target.write_bytes(data)
  except OSError as e:
    raise write_error(p, e) from None


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def write_json(p: PathLike, obj: Any, *, indent: int | None = 2) -> None:
  write_text(p, json.dumps(obj, indent=indent, default=str) + "\n")


def remove_tree(p: PathLike) -> None:
  target = path(p)
  if target.exists():
    target.rmtree() if target.is_dir() else target.unlink()


def swap_dir(final: PathLike, build: Callable[[str], None], *, all_processes: bool = False) -> None:
  """Replaces directory `final` by one that `build(tmp_dir)` fills: the new tree is built beside it,
  the old one renamed away, the new one renamed in, then the old one deleted. A crash leaves either
  the old or the new complete tree at `final` (or, locally between the two renames, both complete
  trees beside it, which the next call sorts out). Nothing half built is ever at `final`.

  all_processes=True: every process of a multi-process run calls this with the same `final` and
  `build` runs on each of them into the same temporary directory (for orbax, which writes each
  process's shards itself); process 0 alone prepares and renames, with a barrier on either side of
  the build. The build must not write the same file from several processes (let process 0 write
  plain files, `is_writer`)."""
  from jembed import multihost
  target = path(final)
  parent, name = target.parent, target.name
  token = multihost.shared_token() if all_processes else uuid.uuid4().hex[:8]
  tmp, old = parent / f".{name}.tmp-{token}", parent / f".{name}.old"
  lead = not all_processes or is_writer()
  sync = (lambda what: multihost.barrier(f"swap_dir_{what}")) if all_processes else (lambda what: None)
  try:
    if lead:
      parent.mkdir(parents=True, exist_ok=True)
      if old.exists() and not target.exists():
        old.rename(target)   # an earlier swap died between its two renames: put the old tree back
      remove_tree(old)
      tmp.mkdir()
    sync("ready")
    build(os.fspath(tmp))
    sync("built")
    if lead:
      if is_local(final):
        os.chmod(os.fspath(tmp), dir_mode())
      if target.exists():
        target.rename(old)
      tmp.rename(target)
      remove_tree(old)
    sync("swapped")
  except OSError as e:
    if lead:
      with contextlib.suppress(Exception):
        remove_tree(tmp)
    raise write_error(final, e) from None
  except BaseException:
    if lead:
      with contextlib.suppress(Exception):
        remove_tree(tmp)
    raise


def write_npz(path: str, **arrays) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(path, buf.getvalue())


def read_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(read_bytes(path))) as z:
    return {k: z[k] for k in z.files}
