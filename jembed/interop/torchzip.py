"""Read torch `.pth` / `.pt` / `pytorch_model.bin` state dicts without torch (and without its risks).

`torch.save` (torch >= 1.6) writes a zip: `<name>/data.pkl` (a pickle of the state dict whose
tensors are references to storages), `<name>/data/<key>` (each storage's raw bytes) and
`<name>/byteorder`. We unpickle `data.pkl` with an Unpickler whose `find_class` only allows the few
callables and types that rebuild tensors (`torch._utils._rebuild_tensor_v2`, the storage types,
`collections.OrderedDict`); any other GLOBAL is refused before anything is called, so reading a
file NEVER executes pickled code. Storages become NumPy arrays over the raw bytes; each tensor is a
(possibly strided) view of one, copied out contiguous.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile

import numpy as np

from jembed import fs
from jembed.errors import UserError


def _bfloat16():
  import ml_dtypes  # a jax dependency: NumPy has no bfloat16 of its own
  return np.dtype(ml_dtypes.bfloat16)


# torch storage type names (as torch pickles them) -> NumPy dtype.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}


def _dtype(name: str) -> np.dtype:
  d = _STORAGE_DTYPES[name]
  return _bfloat16() if d == "bfloat16" else np.dtype(d)


class _StorageType:
  """Stands for a torch storage class in the pickle: only its element type matters."""

  def __init__(self, name: str):
    self.dtype = _dtype(name)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride):
    raise ValueError("tensor size and stride disagree")
  count = int(np.prod(size)) if size else 1
  if count == 0:
    return np.zeros(size, storage.dtype)
  last = int(storage_offset) + sum((n - 1) * s for n, s in zip(size, stride))
  if storage_offset < 0 or last >= storage.size or min(stride, default=0) < 0:
    raise ValueError("a tensor reaches past the end of its storage")
  base = storage[int(storage_offset):]
  view = np.lib.stride_tricks.as_strided(base, shape=size,
                                         strides=tuple(s * storage.itemsize for s in stride))
  return np.array(view, copy=True)  # contiguous, owning its memory


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  return data


# (module, name) -> what it becomes. Nothing else may be named by the pickle.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES if name != "UntypedStorage"},
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage"),
    ("torch", "UntypedStorage"): _StorageType("UntypedStorage"),
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, data: bytes, read_storage):
    super().__init__(io.BytesIO(data))
    self._read_storage = read_storage

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise pickle.UnpicklingError(f"refusing to unpickle GLOBAL {module}.{name}: jembed loads tensors only")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unknown persistent record {str(pid)[:60]}")
    _, storage_type, key, _location, numel = pid[:5]
    return self._read_storage(str(key), storage_type.dtype, int(numel))


def is_torch_zip(data: bytes) -> bool:
  return data[:4] == b"PK\x03\x04"


def load(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a torch-saved state dict (a nested dict under "state_dict"/"model" is taken)."""
  try:
    data = fs.read_bytes(path)
  except OSError as e:
    raise UserError(f"cannot read {path} ({type(e).__name__}); check the path") from None
  if not is_torch_zip(data):
    if data[:1] == b"\x80" or data[:2] == b"\x8a\x0a":
      raise UserError(f"{path} is a legacy (pre-zip) torch pickle, which jembed does not read; re-save "
                      "it with torch.save(state_dict, path) from torch >= 1.6, or convert it to "
                      "safetensors")
    raise UserError(f"{path} is not a torch zip file (no zip header); give a state dict saved with "
                    "torch.save, or a .safetensors file")
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
    names = archive.namelist()
  except (zipfile.BadZipFile, OSError, ValueError) as e:
    raise UserError(f"{path} is truncated or damaged ({type(e).__name__}); download or save it again") from None
  pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
  if not pkl:
    what = "a TorchScript archive" if any(n.endswith("constants.pkl") for n in names) else "not a torch.save file"
    raise UserError(f"{path} is {what}; save the weights with torch.save(model.state_dict(), path)")
  prefix = pkl[0][:-len("data.pkl")]
  big_endian = False
  if prefix + "byteorder" in names:
    big_endian = archive.read(prefix + "byteorder").strip() == b"big"
  storages: dict[str, np.ndarray] = {}

  def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    if key not in storages:
      raw = archive.read(f"{prefix}data/{key}")
      array = np.frombuffer(raw, dtype.newbyteorder(">") if big_endian and dtype.itemsize > 1 else dtype)
      storages[key] = array.astype(dtype) if big_endian else array
    return storages[key]

  try:
    obj = _Unpickler(archive.read(pkl[0]), read_storage).load()
  except pickle.UnpicklingError as e:
    msg = str(e)
    if msg.startswith("refusing"):
      raise UserError(f"{path}: {msg}; save only the weights (torch.save(model.state_dict(), path)) "
                      "or use safetensors") from None
    raise UserError(f"{path} is truncated or damaged ({msg[:80]}); download or save it again") from None
  except (EOFError, KeyError, ValueError, TypeError, zipfile.BadZipFile, OSError, IndexError,
          AttributeError) as e:
    raise UserError(f"{path} is truncated or damaged ({type(e).__name__}); download or save it again") from None
  return _state_dict(obj, path)


def _state_dict(obj, path: str) -> dict[str, np.ndarray]:
  if isinstance(obj, dict):
    for key in ("state_dict", "model", "model_state_dict"):
      if isinstance(obj.get(key), dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
        obj = obj[key]
        break
  if not isinstance(obj, dict) or not obj:
    raise UserError(f"{path} holds no state dict ({type(obj).__name__}); save model.state_dict()")
  out = {}
  for k, v in obj.items():
    if isinstance(v, np.ndarray):
      out[str(k)] = v
    elif not isinstance(v, (int, float, str, type(None), dict)):
      raise UserError(f"{path} entry '{k}' is a {type(v).__name__}, not a tensor; save model.state_dict()")
  return out
