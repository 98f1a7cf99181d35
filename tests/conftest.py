"""Test setup: 8 fake CPU devices, forced before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session (subprocesses inherit it): the tests build
# the same tiny models many times, and a cached step loads in a fraction of its compile time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jembed-test-xla-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

assert jax.device_count() == 8, "tests need 8 fake CPU devices; set XLA_FLAGS before importing jax"


def _torchvision_model_code_only() -> None:
  """PyPI's torchvision wheels are built against CUDA torch. With the CPU torch wheel this project's
  machines install, its compiled detection ops (nms, roi_align) cannot load and `import torchvision`
  raises, which also breaks transformers (it imports torchvision whenever it is installed). The
  model code the parity tests use (torchvision.models.resnet*) is pure Python: stand in an empty
  module for the one that registers the compiled ops' meta kernels. Tests only; jembed never
  imports torch."""
  import importlib.util
  import sys
  import types
  if importlib.util.find_spec("torchvision") is not None:
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))


_torchvision_model_code_only()
