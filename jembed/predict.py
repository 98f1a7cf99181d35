"""Predictions of a fine-tuned classifier for a folder of images or a file of texts.

    python -m jembed.predict --model runs/ft_img --input photos/ --output preds.jsonl --k 5
    python -m jembed.predict --model runs/ft_text --input reviews.jsonl --output preds.jsonl

--input: for an image classifier a folder (every image under it, recursively, in sorted path order)
or a list file (.txt one path a line, .jsonl / .csv with a `path` field); for a text classifier a
.txt (a text a line), .jsonl or .csv (`text` field), read as `python -m jembed.embed` reads them.
--output: one JSON object a line, in input order:

    {"path": "cats/1.jpg", "label": "cat", "score": 0.93, "top_k": [{"label": "cat", "score": 0.93}, ...]}

("id" instead of "path" for texts that have one; texts without ids carry their line "index"). The
input is read a chunk at a time and the output replaces OUTPUT only once complete (gs:// works).
The same from Python: `jembed.load(M).predict(inputs, k=5)` (jembed/classifier.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from jembed import classifier, fs
from jembed import embed as embed_lib
from jembed.errors import UserError, run_cli


def run(args) -> str:
  if not args.output.endswith(".jsonl"):
    raise UserError(f"--output '{args.output}' must end in .jsonl (one prediction a line)")
  if args.k < 1:
    raise UserError(f"--k {args.k} must be >= 1")
  data = embed_lib.read_input(args, args.model)   # the input is checked before the model loads
  model = embed_lib.load(args.model, max_seq_length=args.max_seq_length)
  model._require_head("predictions")
  if model.modality != data.modality:
    data = embed_lib.Inputs(args.input, model.modality, args.field, args.id_field)
  embed_lib.check_options(batch_size=args.batch_size, dtype=args.dtype, dim=None, width=model.dim)
  bar = embed_lib.Progress(data.n, True, unit=data.modality + "s")
  t0 = time.perf_counter()
  classes = model.classes
  k = min(args.k, len(classes))

  def rows():
    """(key, value) naming each input, and its logits, a chunk at a time."""
    if model.modality == "image":
      for names, images in data.image_chunks(model.preprocess):
        logits = model.run_array(images, batch_size=args.batch_size, dtype=args.dtype,
                                 what="logits", bar=bar)
        yield [("path", n) for n in names], logits
    else:
      lo = 0
      for ids, texts in data.text_chunks():
        logits = model._rows(model.tokenize(texts), args.batch_size, args.dtype, bar, "logits")
        yield [("id", i) if i else ("index", lo + j) for j, i in enumerate(ids)], logits
        lo += len(texts)

  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      for names, logits in rows():
        for (key, value), pred in zip(names, classifier.top_k(classifier.softmax(logits), classes, k)):
          f.write(json.dumps({key: value, **pred}) + "\n")

  fs.write_with(args.output, write)
  bar.close()
  dt = time.perf_counter() - t0
  return (f"{data.n} {data.modality}s -> {args.output} (top {k} of {len(classes)} classes, "
          f"{data.n / dt:.3g} {data.modality}s/s)")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jembed.predict", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="the workdir of a classification fine-tuning run")
  p.add_argument("--input", required=True,
                 help="images: a folder (recursive) or a list file; texts: .txt, .jsonl or .csv")
  p.add_argument("--output", required=True, help="predictions, one JSON object a line (.jsonl)")
  p.add_argument("--k", type=int, default=1, help="how many of the best classes each line lists")
  p.add_argument("--field", default=None,
                 help="the .jsonl field / .csv column holding the text (default text) or image path "
                      "(default path)")
  p.add_argument("--id-field", default="id", help="the field holding an id (copied to each line)")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--dtype", default="float32", choices=embed_lib.DTYPES)
  p.add_argument("--max-seq-length", type=int, default=None, help="truncate texts to this many tokens")
  return run_cli(p, run)(argv)


if __name__ == "__main__":
  sys.exit(main())
