"""OpenAI's embeddings schema, read and written without any web framework (so it is testable alone).

Request: `input` a string, a list of strings (at most 2,048), a list of token ids or a list of those;
`model`; `encoding_format` "float" (default) or "base64" (little-endian float32 bytes); `dimensions`
(only for a model that declares Matryoshka widths); `user` (accepted, unused). Token ids are the
tokenizer's word pieces without [CLS]/[SEP]: the server adds those, as it does for text, so a text
and its ids give the same vector. Errors are OpenAI's `{"error": {message, type, param, code}}`.
"""
from __future__ import annotations

import base64
import dataclasses
from typing import Any, Sequence

import numpy as np

MAX_INPUTS = 2048  # items per request, as OpenAI allows
UNCUT = 10 ** 9    # tokenize without cutting, to tell a too-long input from one that fits


class ApiError(Exception):
  """An answer other than 200, in OpenAI's error shape."""

  def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error", headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.kind, self.headers = kind, headers or {}

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class EmbeddingRequest:
  items: list  # each a str or a list[int]
  encoding_format: str
  dimensions: int | None
  model: str | None


def is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_ids(x) -> bool:
  return isinstance(x, list) and all(is_int(t) for t in x)


def parse_inputs(value: Any, param: str = "input") -> list:
  """The items of an `input` (or a search `query`): strings and token-id lists."""
  if value is None:
    raise ApiError(400, f"'{param}' is required", param=param, code="missing_required_parameter")
  if isinstance(value, str):
    return [value]
  shape_hint = (f"'{param}' must be a string, a list of strings, a list of token ids or a list of "
                "token-id lists")
  if not isinstance(value, list):
    raise ApiError(400, shape_hint, param=param, code="invalid_type")
  if not value:
    raise ApiError(400, f"'{param}' is an empty list; send at least one input", param=param)
  if all(is_int(t) for t in value):
    items = [value]
  elif all(isinstance(t, str) for t in value) or all(_is_ids(t) for t in value):
    items = list(value)
  else:
    raise ApiError(400, shape_hint, param=param, code="invalid_type")
  if len(items) > MAX_INPUTS:
    raise ApiError(400, f"'{param}' holds {len(items)} items; at most {MAX_INPUTS} are allowed per "
                   "request: split it", param=param, code="too_many_inputs")
  return items


def parse_embedding_request(body: Any, *, width: int, matryoshka_dims) -> EmbeddingRequest:
  """The request `body` (parsed JSON) checked against a model `width` wide that declares
  `matryoshka_dims` (a tuple of widths, True for any, () for none)."""
  if not isinstance(body, dict):
    raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
  items = parse_inputs(body.get("input"))
  fmt = body.get("encoding_format") or "float"
  if fmt not in ("float", "base64"):
    raise ApiError(400, f"encoding_format '{fmt}' is not supported; use 'float' or 'base64'",
                   param="encoding_format", code="invalid_value")
  model = body.get("model")
  if model is not None and not isinstance(model, str):
    raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
  user = body.get("user")
  if user is not None and not isinstance(user, str):
    raise ApiError(400, "'user' must be a string", param="user", code="invalid_type")
  return EmbeddingRequest(items, fmt, check_dimensions(body.get("dimensions"), width, matryoshka_dims),
                          model)


def check_dimensions(dims: Any, width: int, matryoshka_dims) -> int | None:
  """None when the full width is wanted; else the Matryoshka width to cut the vectors to."""
  if dims is None:
    return None
  if not is_int(dims) or not 0 < dims <= width:
    raise ApiError(400, f"dimensions={dims!r} must be an integer in 1..{width} (this model's width)",
                   param="dimensions", code="invalid_value")
  if dims == width:
    return None
  if not matryoshka_dims:
    raise ApiError(400, f"this model declares no Matryoshka dimensions, so its {width}-wide vectors "
                   "cannot be shortened (config.json would list them in matryoshka_dimensions); "
                   "omit 'dimensions'", param="dimensions", code="invalid_value")
  if matryoshka_dims is not True and dims not in matryoshka_dims:
    allowed = ", ".join(map(str, list(matryoshka_dims) + [width]))
    raise ApiError(400, f"dimensions={dims} is not one this model was trained for; use one of "
                   f"{allowed}", param="dimensions", code="invalid_value")
  return dims


def token_rows(model, items: Sequence, *, truncate: bool, param: str = "input") -> list[np.ndarray]:
  """[CLS] ... [SEP] id rows of the items (texts tokenized as `model.embed` does, token lists
  wrapped); an input over the model's maximum is cut when `truncate`, else refused."""
  texts = [(i, t) for i, t in enumerate(items) if isinstance(t, str)]
  rows: list[np.ndarray] = [None] * len(items)  # type: ignore[list-item]
  if texts:
    for (i, _), row in zip(texts, model.tokenize([t for _, t in texts], max_len=UNCUT)):
      rows[i] = row
  vocab = model.config.vocab_size
  cls, sep = model.ids["cls"], model.ids["sep"]
  for i, t in enumerate(items):
    if isinstance(t, str):
      continue
    bad = next((x for x in t if not 0 <= x < vocab), None)
    if bad is not None:
      raise ApiError(400, f"{param}[{i}] holds token id {bad}, outside this model's vocabulary "
                     f"(0..{vocab - 1})", param=param, code="invalid_value")
    rows[i] = np.asarray([cls, *t, sep], np.int32)
  limit = model.max_seq_length
  for i, row in enumerate(rows):
    if len(row) <= limit:
      continue
    if not truncate:
      raise ApiError(400, f"{param}[{i}] has {len(row)} tokens ([CLS] and [SEP] included) but this "
                     f"model takes at most {limit}; shorten it, or start the server with --truncate to "
                     "cut long inputs", param=param, code="context_length_exceeded")
    rows[i] = np.concatenate([row[:limit - 1], [sep]]).astype(np.int32)
  return rows


def embedding_data(vectors: np.ndarray, encoding_format: str) -> list[dict]:
  """OpenAI's `data` list: float lists, or base64 of the little-endian float32 bytes."""
  if encoding_format == "base64":
    little = np.ascontiguousarray(vectors, dtype="<f4")
    return [{"object": "embedding", "index": i, "embedding": base64.b64encode(v.tobytes()).decode()}
            for i, v in enumerate(little)]
  return [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors.tolist())]
