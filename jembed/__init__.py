"""jembed: learn embeddings with JAX/Flax."""
from flax import nnx as _nnx

# Model code is mesh-agnostic: variables are created unsharded and placed by a jitted
# initialiser with explicit out_shardings (see jembed/sharding.py), so Flax's eager
# sharding (which needs a mesh context at construction time) is switched off.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
