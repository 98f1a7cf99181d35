"""The FastAPI application: OpenAI's /v1/embeddings, /v1/models, /v1/search, /health and /metrics.

    app = create_app(jembed.load("all-MiniLM-L6-v2/"), served_model_name="all-MiniLM-L6-v2")

Requests are checked and tokenized on a thread of the pool (the event loop stays free), handed to
the `Batcher`'s worker thread for the model, and answered in OpenAI's shapes. Every answer, errors
included, is counted in /metrics by route and status.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
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
from jembed.errors import UserError
from jembed.serve import protocol
from jembed.serve.batcher import Batcher, QueueFull
from jembed.serve.metrics import CONTENT_TYPE, ServerMetrics
from jembed.serve.protocol import ApiError

PUBLIC = ("/health", "/metrics")   # open even when an API key is set (probes and scrapers)
ROUTES = ("/v1/embeddings", "/embeddings", "/v1/models", "/v1/search", "/health", "/metrics",
          "/v1/recommend", "/v1/similar")
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

  app.add_middleware(_Guard, api_key=api_key, max_request_bytes=max_request_bytes, metrics=metrics)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(_request, exc: StarletteHTTPException):
    code = "not_found" if exc.status_code == 404 else None
    return _error(ApiError(exc.status_code, str(exc.detail), code=code))

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
    return Response(json.dumps(payload, default=_plain), media_type="application/json")

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


async def answer(handler, request: Request):
  """`handler(request)`'s response, or its error in OpenAI's shape."""
  try:
    return await handler(request)
  except ApiError as e:
    return _error(e)
  except UserError as e:  # e.g. query vectors the index cannot take: the request's to fix
    return _error(ApiError(400, str(e)))
  except Exception as e:  # pylint: disable=broad-except
    return _error(ApiError(500, f"the server failed: {type(e).__name__}: {e}", kind="server_error"))


async def read_json(request: Request, max_request_bytes: int) -> Any:
  """The request's JSON body, refused (413) past `max_request_bytes` even when sent chunked."""
  parts, size = [], 0
  async for chunk in request.stream():  # a chunked body declares no length: count as it comes
    size += len(chunk)
    if size > max_request_bytes:
      raise _too_large(max_request_bytes)
    parts.append(chunk)
  body = b"".join(parts)
  try:
    return json.loads(body)
  except ValueError:
    raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


class _Guard:
  """ASGI middleware (plain, not Starlette's BaseHTTPMiddleware, which costs a task group and two
  memory streams per request): the Bearer key (401), the declared body size (413), and every
  answer counted in /metrics by route and status, with its latency."""

  def __init__(self, app, *, api_key: str | None, max_request_bytes: int, metrics: ServerMetrics):
    self.app, self.api_key, self.max_bytes, self.metrics = app, api_key, max_request_bytes, metrics

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    t0 = time.perf_counter()
    path = scope["path"]
    status = 500  # what an exception escaping the app becomes

    async def send_counted(message):
      nonlocal status
      if message["type"] == "http.response.start":
        status = message["status"]
      await send(message)

    headers = dict(scope["headers"])
    try:
      if self.api_key and path not in PUBLIC and not _authorized(headers, self.api_key):
        await _error(ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                     )(scope, receive, send_counted)
      elif _declared_length(headers) > self.max_bytes:
        await _error(_too_large(self.max_bytes))(scope, receive, send_counted)
      else:
        await self.app(scope, receive, send_counted)
    finally:
      route = path if path in ROUTES else "other"
      self.metrics.requests.inc(route, str(status))
      self.metrics.latency.observe(time.perf_counter() - t0, route)


def _error(e: ApiError) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _authorized(headers: dict, api_key: str) -> bool:
  scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
  return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def _declared_length(headers: dict) -> int:
  try:
    return int(headers.get(b"content-length", b"0"))
  except ValueError:
    return 0


def _too_large(limit: int) -> ApiError:
  return ApiError(413, f"the request body is over {limit} bytes (--max-request-bytes); send fewer or "
                  "shorter inputs per request", code="request_too_large")


def _size(items) -> int:
  return sum(len(t) for t in items)


def _plain(x):
  """JSON for the NumPy scalars and arrays an index's stored fields may hold."""
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")
