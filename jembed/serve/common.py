"""The HTTP plumbing every jembed server shares: OpenAI-shaped errors, the size-limited JSON body,
and the ASGI guard (API key, declared body size, /metrics counts). Used by jembed.serve.app (the
embeddings and search server) and jembed.serve.recommend (recommendations)."""
from __future__ import annotations

import hmac
import json
import time
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse

from jembed.errors import UserError
from jembed.serve.metrics import ServerMetrics
from jembed.serve.protocol import ApiError

PUBLIC = ("/health", "/metrics")   # open even when an API key is set (probes and scrapers)
ROUTES = ("/v1/embeddings", "/embeddings", "/v1/models", "/v1/search", "/health", "/metrics",
          "/v1/recommend", "/v1/similar")

async def answer(handler, request: Request):
  """`handler(request)`'s response, or its error in OpenAI's shape."""
  try:
    return await handler(request)
  except ApiError as e:
    return error_response(e)
  except UserError as e:  # e.g. query vectors the index cannot take: the request's to fix
    return error_response(ApiError(400, str(e)))
  except Exception as e:  # pylint: disable=broad-except
    return error_response(ApiError(500, f"the server failed: {type(e).__name__}: {e}", kind="server_error"))


async def read_json(request: Request, max_request_bytes: int) -> Any:
  """The request's JSON body, refused (413) past `max_request_bytes` even when sent chunked."""
  parts, size = [], 0
  async for chunk in request.stream():  # a chunked body declares no length: count as it comes
    size += len(chunk)
    if size > max_request_bytes:
      raise too_large(max_request_bytes)
    parts.append(chunk)
  body = b"".join(parts)
  try:
    return json.loads(body)
  except ValueError:
    raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


class Guard:
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
        await error_response(ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                     )(scope, receive, send_counted)
      elif _declared_length(headers) > self.max_bytes:
        await error_response(too_large(self.max_bytes))(scope, receive, send_counted)
      else:
        await self.app(scope, receive, send_counted)
    finally:
      route = path if path in ROUTES else "other"
      self.metrics.requests.inc(route, str(status))
      self.metrics.latency.observe(time.perf_counter() - t0, route)


def error_response(e: ApiError) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _authorized(headers: dict, api_key: str) -> bool:
  scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
  return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def _declared_length(headers: dict) -> int:
  try:
    return int(headers.get(b"content-length", b"0"))
  except ValueError:
    return 0


def too_large(limit: int) -> ApiError:
  return ApiError(413, f"the request body is over {limit} bytes (--max-request-bytes); send fewer or "
                  "shorter inputs per request", code="request_too_large")


def plain_json(x):
  """JSON for the NumPy scalars and arrays an index's stored fields may hold."""
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")
