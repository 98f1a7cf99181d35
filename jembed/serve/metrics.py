"""The server's Prometheus metrics, written in the text exposition format (version 0.0.4).

A few counters, gauges and histograms are all the server needs, so they are kept here (thread-safe,
no dependency) rather than pulling in prometheus_client.
"""
from __future__ import annotations

import math
import threading
from typing import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
  parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
  if extra:
    parts.append(extra)
  return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value) -> str:
  return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
  if math.isinf(x):
    return "+Inf" if x > 0 else "-Inf"
  return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
  kind = ""

  def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
    self.name, self.help, self.label_names = name, help_text, tuple(labels)
    self._lock = threading.Lock()

  def header(self) -> list[str]:
    return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
  kind = "counter"

  def __init__(self, *args, **kw):
    super().__init__(*args, **kw)
    self._values: dict[tuple, float] = {}

  def inc(self, *labels, amount: float = 1.0) -> None:
    with self._lock:
      self._values[labels] = self._values.get(labels, 0.0) + amount

  def value(self, *labels) -> float:
    return self._values.get(tuple(labels), 0.0)

  def render(self) -> list[str]:
    with self._lock:
      items = sorted(self._values.items())
    lines = self.header()
    if not items and not self.label_names:
      items = [((), 0.0)]
    for labels, v in items:
      lines.append(f"{self.name}{_labels(self.label_names, labels)} {_number(v)}")
    return lines


class Gauge(_Metric):
  kind = "gauge"

  def __init__(self, *args, **kw):
    super().__init__(*args, **kw)
    self._value = 0.0

  def set(self, v: float) -> None:
    self._value = float(v)

  def value(self) -> float:
    return self._value

  def render(self) -> list[str]:
    return self.header() + [f"{self.name} {_number(self._value)}"]


class Histogram(_Metric):
  kind = "histogram"

  def __init__(self, name: str, help_text: str, buckets: Sequence[float], labels: Sequence[str] = ()):
    super().__init__(name, help_text, labels)
    self.bounds = tuple(sorted(buckets)) + (math.inf,)
    self._series: dict[tuple, list] = {}  # labels -> [bucket counts..., sum, count]

  def observe(self, x: float, *labels) -> None:
    with self._lock:
      s = self._series.setdefault(labels, [0] * len(self.bounds) + [0.0, 0])
      for i, bound in enumerate(self.bounds):
        if x <= bound:
          s[i] += 1
      s[-2] += x
      s[-1] += 1

  def count(self, *labels) -> int:
    s = self._series.get(tuple(labels))
    return s[-1] if s else 0

  def render(self) -> list[str]:
    with self._lock:
      series = sorted((k, list(v)) for k, v in self._series.items())
    lines = self.header()
    for labels, s in series:
      for bound, n in zip(self.bounds, s):
        le = 'le="' + _number(bound) + '"'
        lines.append(f"{self.name}_bucket{_labels(self.label_names, labels, le)} {n}")
      lines.append(f"{self.name}_sum{_labels(self.label_names, labels)} {_number(s[-2])}")
      lines.append(f"{self.name}_count{_labels(self.label_names, labels)} {s[-1]}")
    return lines


class ServerMetrics:
  """Everything /metrics shows: requests by route and status, latency, tokens, batches, queue depth."""

  def __init__(self):
    self.requests = Counter("jembed_requests_total", "HTTP requests answered, by route and status.",
                            ("route", "status"))
    self.latency = Histogram("jembed_request_duration_seconds", "Time to answer a request, by route.",
                             LATENCY_BUCKETS, ("route",))
    self.inputs = Counter("jembed_inputs_total", "Inputs (texts or token lists) embedded.")
    self.tokens = Counter("jembed_prompt_tokens_total", "Tokens embedded ([CLS] and [SEP] included).")
    self.batch_size = Histogram("jembed_batch_size", "Inputs in each batch run on the model.",
                                BATCH_BUCKETS)
    self.batch_tokens = Histogram("jembed_batch_padded_tokens",
                                  "Padded tokens (rows x padded length) in each batch run on the model.",
                                  tuple(2 ** i for i in range(4, 18)))
    self.queue_depth = Gauge("jembed_queue_depth", "Requests admitted and not yet answered by the model.")
    self.rejected = Counter("jembed_rejected_total", "Requests refused because the queue was full.")

  def render(self) -> str:
    lines: list[str] = []
    for m in (self.requests, self.latency, self.inputs, self.tokens, self.batch_size,
              self.batch_tokens, self.queue_depth, self.rejected):
      lines += m.render()
    return "\n".join(lines) + "\n"
