"""Dynamic batching: concurrent requests' inputs run on the model together, bounded by a token budget.

Requests hand their token rows to `Batcher.submit` and get a future of their vectors. One worker
thread (so the event loop never waits on the model) takes everything queued while the previous batch
ran, sorts the rows longest first, cuts them into batches of one padded length each (the buckets
`jembed.embed` uses, so the compiled shapes are few and shared with it) holding at most
`max_batch_tokens` padded tokens, runs them, and gives every request exactly its own rows back in
order. At most `max_queue` requests are admitted at a time; beyond that `submit` refuses at once
(the server answers 429), so a burst cannot grow an unbounded backlog.
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Callable, Sequence

import numpy as np

from jembed.embed import bucket
from jembed.errors import UserError


class QueueFull(Exception):
  """The batcher already holds `max_queue` requests."""


class _Job:
  __slots__ = ("rows", "out", "left", "future")

  def __init__(self, rows: Sequence[np.ndarray], width: int):
    self.rows = list(rows)
    self.out = np.empty((len(self.rows), width), np.float32)
    self.left = len(self.rows)
    self.future: concurrent.futures.Future = concurrent.futures.Future()


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _pow2_at_most(n: int) -> int:
  return 1 << (max(1, n).bit_length() - 1)


class Batcher:
  """`run(rows, batch_size) -> (len(rows), width) float32` is the model (TextEmbedder.embed_token_rows
  with its dtype); it is an attribute so a test can slow or block it."""

  def __init__(self, run: Callable[[list, int], np.ndarray], *, width: int, max_len: int,
               max_batch_tokens: int, max_queue: int, min_rows: int = 1, metrics=None):
    if max_batch_tokens < max_len:
      raise UserError(f"--max-batch-tokens {max_batch_tokens} is below the model's maximum input of "
                      f"{max_len} tokens, so a long input could never run; raise it to at least {max_len}")
    if max_queue < 1:
      raise UserError(f"--max-queue {max_queue} must be at least 1")
    self.run = run
    self.width, self.max_len = width, max_len
    self.max_batch_tokens, self.max_queue = max_batch_tokens, max_queue
    self.min_rows = _pow2_at_least(min_rows)
    self.metrics = metrics
    self._queue: list[_Job] = []
    self._pending = 0  # admitted and not yet answered (queued or running)
    self._cond = threading.Condition()
    self._closing = False
    self._thread = threading.Thread(target=self._loop, name="jembed-batcher", daemon=True)
    self._thread.start()

  # -- the request side (any thread) --
  def submit(self, rows: Sequence[np.ndarray]) -> concurrent.futures.Future:
    """A future of the (len(rows), width) vectors of `rows`; QueueFull when max_queue are held."""
    job = _Job(rows, self.width)
    if not job.rows:
      job.future.set_result(job.out)
      return job.future
    with self._cond:
      if self._closing:
        raise RuntimeError("the batcher is closed")
      if self._pending >= self.max_queue:
        raise QueueFull()
      self._pending += 1
      self._queue.append(job)
      self._gauge()
      self._cond.notify()
    return job.future

  @property
  def pending(self) -> int:
    return self._pending

  @property
  def alive(self) -> bool:
    return self._thread.is_alive()

  def close(self, timeout: float = 10.0) -> None:
    """Stops taking requests; the worker finishes what it holds, then exits."""
    with self._cond:
      self._closing = True
      self._cond.notify_all()
    self._thread.join(timeout)

  # -- the worker thread --
  def _loop(self) -> None:
    while True:
      with self._cond:
        while not self._queue and not self._closing:
          self._cond.wait()
        if not self._queue:
          return
        jobs, self._queue = self._queue, []
      # A request whose client went away (its future cancelled) is dropped before it costs anything.
      live = []
      for job in jobs:
        if job.future.set_running_or_notify_cancel():
          live.append(job)
        else:
          self._release()
      try:
        self._run_jobs(live)
      except Exception as e:  # pylint: disable=broad-except
        for job in live:  # never leave a request waiting forever; the worker carries on
          if not job.future.done():
            job.future.set_exception(e)
            self._release()

  def plan(self, lengths: Sequence[int]) -> list[list[int]]:
    """Indices of `lengths` grouped into batches: longest first, one padded length per batch, at
    most max_batch_tokens padded tokens (rows rounded up to a power of two) each. A group of n rows
    that is not a power of two runs as the largest power of two below n plus the rest, so padding
    rows stay under a third of the work (17 rows: 16 + 1, not 32) with no more shapes to compile."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties in input order
    batches, lo = [], 0
    while lo < len(order):
      length = bucket(lengths[order[lo]], self.max_len)
      cap = _pow2_at_most(self.max_batch_tokens // length)
      hi = lo + 1
      while hi < len(order) and hi - lo < cap and bucket(lengths[order[hi]], self.max_len) == length:
        hi += 1
      head = _pow2_at_most(hi - lo)
      if head < hi - lo and hi - lo > self.min_rows:
        batches.append(order[lo:lo + head])
        lo += head
      batches.append(order[lo:hi])
      lo = hi
    return batches

  def shapes(self) -> list[tuple[int, int]]:
    """Every (rows, padded length) a batch can have: what `warm_up` compiles."""
    out = []
    for length in sorted({bucket(n, self.max_len) for n in range(1, self.max_len + 1)}):
      cap = _pow2_at_most(self.max_batch_tokens // length)
      out += [(size, length) for size in sorted({max(self.min_rows, 1 << i)
                                                 for i in range(cap.bit_length())})]
    return out

  def warm_up(self) -> int:
    """Runs one batch of every shape (on this thread, before serving), so no client waits for a
    compile; returns how many shapes there were."""
    shapes = self.shapes()
    for size, length in shapes:
      self.run([np.zeros(length, np.int32)], size)
    return len(shapes)

  def _run_jobs(self, jobs: list[_Job]) -> None:
    items = [(job, i) for job in jobs if job.left for i in range(len(job.rows))]
    for batch in self.plan([len(job.rows[i]) for job, i in items]):
      chosen = [items[k] for k in batch]
      rows = [job.rows[i] for job, i in chosen]
      size = max(self.min_rows, _pow2_at_least(len(rows)))
      try:
        vectors = self.run(rows, size)
      except Exception as e:  # pylint: disable=broad-except
        for job, _ in chosen:  # every request with a row here fails, once
          if not job.future.done():
            job.future.set_exception(e)
            job.left = 0
            self._release()
        continue
      if self.metrics is not None:
        self.metrics.batch_size.observe(len(rows))
        self.metrics.batch_tokens.observe(size * bucket(max(len(r) for r in rows), self.max_len))
      for k, (job, i) in enumerate(chosen):
        if job.future.done():
          continue
        job.out[i] = vectors[k]
        job.left -= 1
        if job.left == 0:
          self._finish(job)

  def _finish(self, job: _Job) -> None:
    job.future.set_result(job.out)
    self._release()

  def _release(self) -> None:
    with self._cond:
      self._pending -= 1
      self._gauge()

  def _gauge(self) -> None:
    if self.metrics is not None:
      self.metrics.queue_depth.set(self._pending)
