"""jembed: learn embeddings with JAX/Flax.

    import jembed
    model = jembed.load("path/to/model")        # a jembed workdir or export, or a Hugging Face dir
    vectors = model.embed(["first text", "second text"])
    index = jembed.Index.load("docs.index")     # a vector index (python -m jembed.index build)
    jembed.load("runs/ft_img").predict(["cat.jpg"], k=3)   # a fine-tuned classifier's labels

Code map: the modules form layers; each imports only from the layers below it (tests/test_imports.py
fails on an import cycle or a private name used across modules). Lowest first:

  1. base        errors, fs (all file I/O), tree (parameter-tree paths), multihost, config
  2. pieces      sharding, metrics, losses, knn, retrieval, probe (frozen-feature probes), ranking,
                 report, inputs, outputs, index_files (the vector index on disk), transfer,
                 state (TrainState, ModelDef), optimizer, reliability (non-finite steps, preemption)
  3. formats     models/ (Flax modules), data/ (pipelines, sources), hf/ and interop/ (foreign
                 weights in and out), peft/ (tunings: base, adapters, lora -> export), checkpoint
  4. modelspec   model.json: a model's description; build it (the task registry, tasks/__init__.py,
                 names the class by `spec["task"]`) and load a workdir's model (restore + LoRA merge)
  5. init        warm-start sources (a workdir, a Hugging Face directory, a pretrained image model)
  6. tasks/      base (the Task interface), one file per objective; classification picks text/image
  7. train       the loop
  8. commands    main, embed (jembed.load), evaluate, predict, export, index, recommend, plan, mteb,
                 serve/; this package's `load` and `Index`

Loading a model is one path down: jembed.load -> embed.load -> modelspec.load_model ->
checkpoint.restore_params_only + modelspec.dense_params (peft) + modelspec.build (the task's
build_model).
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
