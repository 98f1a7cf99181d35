"""The FastAPI application: OpenAI's /v1/embeddings, /v1/models, /v1/search, /health and /metrics.

    app = create_app(jembed.load("all-MiniLM-L6-v2/"), served_model_name="all-MiniLM-L6-v2")

Requests are checked and tokenized on a thread of the pool (the event loop stays free), handed to
the `Batcher`'s worker thread for the model, and answered in OpenAI's shapes. Every answer, errors
included, is counted in /metrics by route and status.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from jembed.embed import truncate as truncate_dims
from jembed.serve import protocol
from jembed.serve.batcher import Batcher, QueueFull
from jembed.serve.common import Guard, answer, error_response, plain_json, read_json
from jembed.serve.metrics import CONTENT_TYPE, ServerMetrics
from jembed.serve.protocol import ApiError

RETRY_AFTER_S = 1
INLINE_SIZE = 4096  # characters (or token ids, or output floats) a request may have to be handled
                    # on the event loop; larger ones go to the thread pool


def create_app(model, *, served_model_name: str, index=None, api_key: str | None = None,
               max_batch_tokens: int = 16384, max_queue: int = 256, truncate: bool = False,
               max_request_bytes: int = 2 * 2 ** 20, dtype: str = "float32",
               recommender=None) -> FastAPI:
  """The server around a loaded TextEmbedder `model` (and an optional jembed Index over it); with a
  `recommender` (a jembed.serve.recommend.RecommendService) also /v1/recommend and /v1/similar."""
  metrics = ServerMetrics()
  n_dev = model.mesh.size
  batcher = Batcher(lambda rows, size: model.embed_token_rows(rows, batch_size=size, dtype=dtype),
                    width=model.dim, max_len=model.max_seq_length, max_batch_tokens=max_batch_tokens,
                    max_queue=max_queue, min_rows=n_dev, metrics=metrics)

  @contextlib.asynccontextmanager
  async def lifespan(_app):
    yield
    batcher.close()

  app = FastAPI(title="jembed embeddings server", lifespan=lifespan, docs_url=None, redoc_url=None,
                openapi_url=None)
  app.state.model, app.state.batcher, app.state.metrics, app.state.index = model, batcher, metrics, index
  app.state.settings = dict(served_model_name=served_model_name, api_key=api_key, truncate=truncate,
                            max_batch_tokens=max_batch_tokens, max_queue=max_queue,
                            max_request_bytes=max_request_bytes, dtype=dtype)
  created = int(time.time())

  app.add_middleware(Guard, api_key=api_key, max_request_bytes=max_request_bytes, metrics=metrics)

  @app.exception_handler(StarletteHTTPException)
  async def httperror_response(_request, exc: StarletteHTTPException):
    code = "not_found" if exc.status_code == 404 else None
    return error_response(ApiError(exc.status_code, str(exc.detail), code=code))

  async def json_body(request: Request) -> Any:
    return await read_json(request, max_request_bytes)

  async def embed_rows(rows: list[np.ndarray]) -> np.ndarray:
    try:
      future = batcher.submit(rows)
    except QueueFull:
      metrics.rejected.inc()
      raise ApiError(429, f"the server is busy ({max_queue} requests queued, --max-queue); retry in "
                     f"{RETRY_AFTER_S} s", kind="rate_limit_error", code="rate_limit_exceeded",
                     headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    vectors = await asyncio.wrap_future(future)
    metrics.inputs.inc(amount=len(rows))
    metrics.tokens.inc(amount=sum(len(r) for r in rows))
    return vectors

  async def off_loop_if_large(size: int, fn, *args, **kw):
    # Tokenizing or encoding a small request takes microseconds: less than the hop to a thread.
    if size <= INLINE_SIZE:
      return fn(*args, **kw)
    return await run_in_threadpool(fn, *args, **kw)

  def usage(rows) -> dict:
    n = int(sum(len(r) for r in rows))
    return {"prompt_tokens": n, "total_tokens": n}

  async def embeddings(request: Request):
    req = protocol.parse_embedding_request(await json_body(request), width=model.dim,
                                           matryoshka_dims=model.matryoshka_dims)
    rows = await off_loop_if_large(_size(req.items), protocol.token_rows, model, req.items,
                                   truncate=truncate)
    vectors = truncate_dims(await embed_rows(rows), req.dimensions, model.normalize)
    data = await off_loop_if_large(vectors.size, protocol.embedding_data, vectors, req.encoding_format)
    return JSONResponse({"object": "list", "data": data, "model": served_model_name,
                         "usage": usage(rows)})

  async def search(request: Request):
    if index is None:
      raise ApiError(404, "this server has no index; start it with --index DIR (a directory "
                     "written by python -m jembed.index build)", code="no_index")
    body = await json_body(request)
    if not isinstance(body, dict):
      raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    queries = protocol.parse_inputs(body.get("query"), "query")
    k = body.get("k", 10)
    if not protocol.is_int(k) or k < 1:
      raise ApiError(400, f"k={k!r} must be a positive integer", param="k", code="invalid_value")
    rows = await off_loop_if_large(_size(queries), protocol.token_rows, model, queries,
                                   truncate=truncate, param="query")
    vectors = await embed_rows(rows)
    if index.dim < vectors.shape[1]:  # an index of Matryoshka-shortened vectors
      vectors = truncate_dims(vectors, index.dim, model.normalize)
    hits = await run_in_threadpool(locked_search, vectors, min(k, len(index)))
    data = [{"object": "search_result", "index": i, "hits": h} for i, h in enumerate(hits)]
    payload = {"object": "list", "data": data, "model": served_model_name, "usage": usage(rows)}
    return Response(json.dumps(payload, default=plain_json), media_type="application/json")

  search_lock = threading.Lock()  # one search at a time: the index's searcher caches as it goes

  def locked_search(vectors, k):
    with search_lock:
      return index.search(vectors, k)

  async def models(_request: Request):
    return JSONResponse({"object": "list", "data": [
        {"id": served_model_name, "object": "model", "created": created, "owned_by": "jembed",
         "dimensions": model.dim, "max_input_tokens": model.max_seq_length}]})

  @app.post("/v1/embeddings")
  @app.post("/embeddings")
  async def embeddings_route(request: Request):
    return await answer(embeddings, request)

  @app.post("/v1/search")
  async def search_route(request: Request):
    return await answer(search, request)

  @app.get("/v1/models")
  async def models_route(request: Request):
    return await answer(models, request)

  if recommender is not None:
    from jembed.serve import recommend  # pylint: disable=import-outside-toplevel
    app.state.recommender = recommender
    recommend.add_routes(app, recommender, served_model_name=served_model_name, answer=answer,
                         json_body=json_body)

  @app.get("/health")
  async def health():
    if not batcher.alive:
      return JSONResponse({"status": "error", "detail": "the model worker stopped"}, status_code=503)
    return {"status": "ok"}

  @app.get("/metrics")
  async def metrics_route():
    return Response(metrics.render(), media_type=CONTENT_TYPE)

  return app


def _size(items) -> int:
  return sum(len(t) for t in items)
