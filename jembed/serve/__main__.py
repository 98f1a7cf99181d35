"""Serve a jembed text model over OpenAI's embeddings API.

    python -m jembed.serve --model path/to/all-MiniLM-L6-v2 [--index DIR] [--host 127.0.0.1 --port 8000]
        [--api-key KEY] [--max-batch-tokens 16384] [--max-queue 256] [--truncate]
        [--max-request-bytes 2097152] [--dtype float32|bfloat16] [--served-model-name NAME]
        [--no-warm-up]

Then any OpenAI client: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
.embeddings.create(model=NAME, input=["a text"])`.

Recommendations from a two-tower workdir, with or without a text model (jembed/serve/recommend.py):

    python -m jembed.serve --recommender runs/tt [--index runs/tt.items.index] [--port 8000]
    POST /v1/recommend {"user": "196", "k": 10, "exclude_seen": true}; POST /v1/similar {"item": "242"}
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from jembed.embed import DTYPES
from jembed.errors import UserError, run_cli


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m jembed.serve", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="", help="jembed workdir or export, or a Hugging Face dir (the "
                 "text model; optional with --recommender)")
  p.add_argument("--index", default="", help="a jembed index directory to answer /v1/search from (with "
                 "--recommender and no --model: the item index recommendations are ranked from)")
  p.add_argument("--recommender", default="",
                 help="a two-tower workdir to answer /v1/recommend and /v1/similar from")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every one)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--api-key", default=os.environ.get("JEMBED_API_KEY", ""),
                 help="require 'Authorization: Bearer KEY' (default $JEMBED_API_KEY; /health and "
                      "/metrics stay open)")
  p.add_argument("--max-batch-tokens", type=int, default=16384,
                 help="padded tokens per batch run on the model (concurrent requests share batches)")
  p.add_argument("--max-queue", type=int, default=256,
                 help="requests held at once; more are answered 429 with Retry-After")
  p.add_argument("--truncate", action="store_true",
                 help="cut inputs longer than the model's maximum instead of answering 400")
  p.add_argument("--max-request-bytes", type=int, default=2 * 2 ** 20,
                 help="larger request bodies are answered 413")
  p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype of the model")
  p.add_argument("--served-model-name", default="",
                 help="the model id clients send and /v1/models lists (default: the directory name)")
  p.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                 help="start at once; each batch shape then compiles when a request first needs it")
  p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
  return p


def build(args):
  """(app, description) for parsed arguments; every bad option is a UserError before serving."""
  try:
    import fastapi  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import uvicorn  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise UserError("the server needs FastAPI and uvicorn: pip install 'jembed[serve]'") from None
  if not 0 <= args.port <= 65535:
    raise UserError(f"--port {args.port} is not a TCP port; use 0..65535")
  if args.max_request_bytes < 1:
    raise UserError(f"--max-request-bytes {args.max_request_bytes} must be positive")
  if not args.model and not args.recommender:
    raise UserError("nothing to serve; pass --model DIR (a text model), --recommender WORKDIR (a "
                    "two-tower workdir), or both")
  service = None
  if args.recommender:
    if args.model and args.index:
      raise UserError("--index with both --model and --recommender is ambiguous; serve the text index "
                      "and the item index from two servers")
    from jembed.serve.recommend import RecommendService  # pylint: disable=import-outside-toplevel
    service = RecommendService.load(args.recommender, "" if args.model else args.index)
    if not args.model:
      return _recommender_only(args, service)
  from jembed import embed  # pylint: disable=import-outside-toplevel
  from jembed.serve.app import create_app  # pylint: disable=import-outside-toplevel
  model = embed.load(args.model)
  if model.modality != "text":
    raise UserError(f"{args.model} is an image model; the server embeds text (OpenAI's API takes "
                    "strings and token ids)")
  index = None
  if args.index:
    try:
      from jembed.index import Index  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise UserError("--index needs jembed.index, which this jembed does not have; upgrade jembed") from None
    index = Index.load(args.index, model=model)
  name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
  app = create_app(model, served_model_name=name, index=index, api_key=args.api_key or None,
                   max_batch_tokens=args.max_batch_tokens, max_queue=args.max_queue,
                   truncate=args.truncate, max_request_bytes=args.max_request_bytes, dtype=args.dtype,
                   recommender=service)
  if args.warm_up:  # every batch shape compiled before the first client, not in its latency
    t0 = time.perf_counter()
    shapes = app.state.batcher.warm_up()
    if service is not None:
      service.warm_up()
    print(f"jembed.serve: compiled {shapes} batch shapes in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
  desc = (f"{name}: {model.dim} dims, at most {model.max_seq_length} tokens an input, {args.dtype}"
          + (f", index of {len(index)} vectors" if index is not None else "")
          + (f", {_describe(service)}" if service is not None else ""))
  return app, desc


def _recommender_only(args, service):
  """(app, description) of a server of recommendations with no text model."""
  from jembed.serve.recommend import create_app  # pylint: disable=import-outside-toplevel
  name = args.served_model_name or os.path.basename(os.path.normpath(args.recommender))
  app = create_app(service, served_model_name=name, api_key=args.api_key or None,
                   max_request_bytes=args.max_request_bytes)
  if args.warm_up:
    service.warm_up()
  return app, f"{name}: {_describe(service)}"


def _describe(service) -> str:
  rec = service.rec
  where = (f"ranked from index of {len(service.index)} items" if service.index is not None
           else f"{len(rec.items)} items")
  return f"recommendations for {len(rec.users)} users, {rec.dim} dims, {where}"


def run(args) -> str:
  app, desc = build(args)  # says what to install when FastAPI or uvicorn is missing
  import uvicorn  # pylint: disable=import-outside-toplevel
  print(f"jembed.serve: {desc}; OpenAI base_url http://{args.host}:{args.port}/v1", file=sys.stderr)
  uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
  return ""


def main(argv=None) -> int:
  return run_cli(parser(), run)(argv)


if __name__ == "__main__":
  sys.exit(main())
