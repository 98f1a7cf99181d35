"""Recommendations over HTTP: /v1/recommend and /v1/similar from a trained two-tower workdir.

    python -m jembed.serve --recommender runs/tt [--index runs/tt.items.index] [--port 8000]

    POST /v1/recommend {"user": "196" | ["196", "186"], "k": 10, "exclude_seen": true}
    POST /v1/similar   {"item": "242" | ["242", "50"], "k": 10}
    -> {"object": "list", "data": [{"object": "recommendation", "index": 0, "user": "196",
        "hits": [{"id": "50", "score": 3.1, ...}, ...]}, ...], "model": NAME}

User vectors come from the workdir (jembed.recommend.Recommender); items are ranked from the item
index when one is given (a directory written by `python -m jembed.recommend --export-index`: its hits
carry the index's stored fields, and it may hold a subset of the catalogue), else from the workdir's
own item vectors. Items a user met in training are left out unless "exclude_seen" is false. Errors
(an unknown user or item, a bad k) are OpenAI's error shape, as everywhere in the server.

`add_routes` adds the two routes to the embeddings server (jembed.serve.app) when it also serves a
text model; `create_app` is a server with no text model, whose /v1/embeddings and /v1/search answer
404 in that shape.
"""
from __future__ import annotations

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

from jembed.errors import UserError
from jembed.serve import common
from jembed.serve import protocol
from jembed.serve.metrics import CONTENT_TYPE, ServerMetrics
from jembed.serve.protocol import ApiError

MAX_IDS = protocol.MAX_INPUTS   # users or items per request
SAMPLE_ROWS = 64                # index rows compared with the workdir's vectors at start-up


class RecommendService:
  """A Recommender and, optionally, an item Index of its items; thread-safe (one query at a time:
  the searchers cache compiled shapes as they go)."""

  def __init__(self, recommender, index=None):
    self.rec, self.index = recommender, index
    self._lock = threading.Lock()
    if index is not None:
      self._check_index()
      row = {t: i for i, t in enumerate(recommender.items)}
      # recommender item row -> index row (-1: not in the index), to drop a user's seen items.
      self._index_row = np.full(len(recommender.items), -1, np.int64)
      self._index_row[[row[t] for t in index.ids]] = np.arange(len(index))

  @classmethod
  def load(cls, workdir: str, index_dir: str = "") -> "RecommendService":
    from jembed import recommend  # pylint: disable=import-outside-toplevel
    rec = recommend.load(workdir)
    index = None
    if index_dir:
      from jembed.index import Index  # pylint: disable=import-outside-toplevel
      index = Index.load(index_dir)
    return cls(rec, index)

  def _check_index(self) -> None:
    rec, index = self.rec, self.index
    fix = ("export this model's items with python -m jembed.recommend --model WORKDIR "
           "--export-index DIR")
    if index.dim != rec.dim:
      raise UserError(f"index '{index.directory}' holds {index.dim}-d vectors but the recommender's "
                      f"are {rec.dim}-d; {fix}")
    known = set(rec.items)
    stray = next((i for i in index.ids if not isinstance(i, str) or i not in known), None)
    if stray is not None:
      raise UserError(f"index '{index.directory}' holds id {stray!r}, not an item of the recommender; {fix}")
    # The same ids from another training would rank by vectors the user vectors were not trained with.
    rows = np.linspace(0, len(index) - 1, min(SAMPLE_ROWS, len(index))).astype(np.int64)
    want = rec.item_vectors[[rec.items.index(index.ids[r]) for r in rows]]
    if not np.allclose(np.asarray(index.vectors[rows], np.float32), want, rtol=1e-2, atol=1e-3):
      raise UserError(f"index '{index.directory}' holds other vectors for the recommender's items "
                      f"(exported from another training?); {fix}")

  @property
  def item_count(self) -> int:
    return len(self.index) if self.index is not None else len(self.rec.items)

  def recommend(self, users: list[str], k: int, exclude_seen: bool) -> list[list[dict]]:
    rows = self._rows(users, self.rec._user_row, "user")  # pylint: disable=protected-access
    with self._lock:
      if self.index is None:
        return self.rec.recommend(users, k, exclude_seen=exclude_seen)
      from jembed.recommend import top_k_unseen  # pylint: disable=import-outside-toplevel
      seen = [self._index_row[self.rec.seen[r]] if exclude_seen else np.zeros(0, np.int64)
              for r in rows]
      seen = [s[s >= 0] for s in seen]
      vectors = self.index.query_vectors(self.rec.user_vectors[rows])
      scores, found = top_k_unseen(self.index.searcher, vectors, seen, min(k, len(self.index)))
      return [self.index._hits(s, f) for s, f in zip(scores, found)]  # pylint: disable=protected-access

  def similar(self, items: list[str], k: int) -> list[list[dict]]:
    if self.index is None:
      self._rows(items, self.rec._item_row, "item")  # pylint: disable=protected-access
      with self._lock:
        return self.rec.similar_items(items, k)
    rows = {t: i for i, t in enumerate(self.index.ids)}
    missing = next((t for t in items if t not in rows), None)
    if missing is not None:
      raise ApiError(404, f"item {missing!r} is not in the item index; give an id it holds",
                     param="item", code="unknown_item")
    with self._lock:
      return self.index.similar(items, min(k, len(self.index) - 1) or 1)

  @staticmethod
  def _rows(ids: list[str], table: dict, kind: str) -> list[int]:
    missing = next((i for i in ids if i not in table), None)
    if missing is not None:
      raise ApiError(404, f"{kind} {missing!r} does not occur in the recommender's training "
                     f"interactions; give a known {kind} id", param=kind, code=f"unknown_{kind}")
    return [table[i] for i in ids]

  def warm_up(self) -> None:
    """Compiles the first search shapes (k = 10) before the first client."""
    if self.rec.users:
      self.recommend([self.rec.users[0]], 10, True)


# ----------------------------------------------------------------------------- requests


def _ids(body: dict, param: str) -> list[str]:
  value = body.get(param)
  if value is None:
    raise ApiError(400, f"'{param}' is required", param=param, code="missing_required_parameter")
  items = value if isinstance(value, list) else [value]
  ok = lambda v: isinstance(v, str) or protocol.is_int(v)
  if not items or not all(ok(v) for v in items):
    raise ApiError(400, f"'{param}' must be an id (a string or an integer) or a non-empty list of ids",
                   param=param, code="invalid_type")
  if len(items) > MAX_IDS:
    raise ApiError(400, f"'{param}' holds {len(items)} ids; at most {MAX_IDS} are allowed per request: "
                   "split it", param=param, code="too_many_inputs")
  return [str(v) for v in items]   # ids are kept as strings, as read from the interactions file


def _k(body: dict) -> int:
  k = body.get("k", 10)
  if not protocol.is_int(k) or k < 1:
    raise ApiError(400, f"k={k!r} must be a positive integer", param="k", code="invalid_value")
  return k


def parse_recommend(body: Any) -> tuple[list[str], int, bool]:
  """(users, k, exclude_seen) of a /v1/recommend body."""
  if not isinstance(body, dict):
    raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
  exclude = body.get("exclude_seen", True)
  if not isinstance(exclude, bool):
    raise ApiError(400, "'exclude_seen' must be true or false", param="exclude_seen", code="invalid_type")
  return _ids(body, "user"), _k(body), exclude


def parse_similar(body: Any) -> tuple[list[str], int]:
  """(items, k) of a /v1/similar body."""
  if not isinstance(body, dict):
    raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
  return _ids(body, "item"), _k(body)


# ----------------------------------------------------------------------------- routes


def add_routes(app: FastAPI, service: RecommendService, *, served_model_name: str, answer, json_body
               ) -> None:
  """POST /v1/recommend and /v1/similar on `app`; `answer(handler, request)` turns errors into
  OpenAI's shape and `json_body(request)` reads a size-limited JSON body (jembed.serve.app's)."""

  def reply(key: str, ids: list[str], hits: list[list[dict]], kind: str) -> Response:
    data = [{"object": kind, "index": i, key: ident, "hits": h}
            for i, (ident, h) in enumerate(zip(ids, hits))]
    payload = {"object": "list", "data": data, "model": served_model_name}
    return Response(json.dumps(payload, default=common.plain_json), media_type="application/json")

  async def recommend(request: Request):
    users, k, exclude = parse_recommend(await json_body(request))
    hits = await run_in_threadpool(service.recommend, users, k, exclude)
    return reply("user", users, hits, "recommendation")

  async def similar(request: Request):
    items, k = parse_similar(await json_body(request))
    hits = await run_in_threadpool(service.similar, items, k)
    return reply("item", items, hits, "similar_items")

  @app.post("/v1/recommend")
  async def recommend_route(request: Request):
    return await answer(recommend, request)

  @app.post("/v1/similar")
  async def similar_route(request: Request):
    return await answer(similar, request)


def create_app(service: RecommendService, *, served_model_name: str, api_key: str | None = None,
               max_request_bytes: int = 2 * 2 ** 20) -> FastAPI:
  """A server of recommendations alone (no text model): /v1/recommend, /v1/similar, /v1/models,
  /health, /metrics; /v1/embeddings and /v1/search answer 404 saying how to serve text."""
  metrics = ServerMetrics()

  @contextlib.asynccontextmanager
  async def lifespan(_app):
    yield

  app = FastAPI(title="jembed recommendations server", lifespan=lifespan, docs_url=None,
                redoc_url=None, openapi_url=None)
  app.state.model, app.state.batcher, app.state.index = None, None, service.index
  app.state.recommender, app.state.metrics = service, metrics
  app.state.settings = dict(served_model_name=served_model_name, api_key=api_key,
                            max_request_bytes=max_request_bytes)
  created = int(time.time())
  app.add_middleware(common.Guard, api_key=api_key,
                     max_request_bytes=max_request_bytes, metrics=metrics)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(_request, exc: StarletteHTTPException):
    code = "not_found" if exc.status_code == 404 else None
    return common.error_response(ApiError(exc.status_code, str(exc.detail), code=code))

  json_body = lambda request: common.read_json(request, max_request_bytes)
  add_routes(app, service, served_model_name=served_model_name, answer=common.answer,
             json_body=json_body)

  async def no_text_model(_request: Request):
    raise ApiError(404, "this server serves recommendations and has no text model; start it with "
                   "--model DIR to embed or search text", code="no_text_model")

  @app.post("/v1/embeddings")
  @app.post("/embeddings")
  @app.post("/v1/search")
  async def text_route(request: Request):
    return await common.answer(no_text_model, request)

  @app.get("/v1/models")
  async def models_route():
    return JSONResponse({"object": "list", "data": [
        {"id": served_model_name, "object": "model", "created": created, "owned_by": "jembed",
         "dimensions": service.rec.dim, "users": len(service.rec.users), "items": service.item_count}]})

  @app.get("/health")
  async def health():
    return {"status": "ok"}

  @app.get("/metrics")
  async def metrics_route():
    return Response(metrics.render(), media_type=CONTENT_TYPE)

  return app
