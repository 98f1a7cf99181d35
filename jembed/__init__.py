"""jembed: learn embeddings with JAX/Flax.

    import jembed
    model = jembed.load("path/to/model")        # a jembed workdir or export, or a Hugging Face dir
    vectors = model.embed(["first text", "second text"])
    index = jembed.Index.load("docs.index")     # a vector index (python -m jembed.index build)
    jembed.load("runs/ft_img").predict(["cat.jpg"], k=3)   # a fine-tuned classifier's labels
"""
__version__ = "0.1.0"


def load(path: str, **kwargs):
  """A model ready to embed, and to predict when it is a classifier (see jembed.embed.load);
  imported lazily so `import jembed` is cheap and changes no process-wide setting."""
  from jembed.embed import load as _load
  return _load(path, **kwargs)


def __getattr__(name: str):
  # `jembed.Index` (a vector index, jembed.index.Index), imported on first use like `load`.
  if name == "Index":
    from jembed.index import Index
    return Index
  raise AttributeError(f"module 'jembed' has no attribute '{name}'")
