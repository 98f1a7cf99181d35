"""jembed: learn embeddings with JAX/Flax.

    import jembed
    model = jembed.load("path/to/model")        # a jembed workdir or export, or a Hugging Face dir
    vectors = model.embed(["first text", "second text"])
    jembed.load("runs/ft_img").predict(["cat.jpg"], k=3)   # a fine-tuned classifier's labels
"""
__version__ = "0.1.0"


def load(path: str, **kwargs):
  """A model ready to embed, and to predict when it is a classifier (see jembed.embed.load);
  imported lazily so `import jembed` is cheap and changes no process-wide setting."""
  from jembed.embed import load as _load
  return _load(path, **kwargs)
