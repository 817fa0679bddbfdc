"""Gathers images submitted from many request handlers into batches for one model thread."""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Sequence

import numpy as np

from imgcls_jax import inference


class Overloaded(Exception):
  """The request queue has no room for all the images of a request."""


@dataclasses.dataclass
class _Item:
  image: np.ndarray
  future: concurrent.futures.Future


class Batcher:
  """One worker thread takes up to ``max_batch_size`` queued images (waiting at most
  ``timeout_s`` for a batch to fill) and runs them through the model in one call.

  A request's images are admitted all or none (``submit_all``), so a request refused for a full
  queue leaves no work behind."""

  def __init__(self, clf: inference.Classifier, *, max_batch_size: int, timeout_s: float,
               max_queue: int):
    self.clf = clf
    self.max_batch_size = max_batch_size
    self.timeout_s = timeout_s
    self.max_queue = max_queue
    self.batch_sizes: collections.Counter[int] = collections.Counter()  # size -> batches run
    self._queue: collections.deque[_Item] = collections.deque()  # guarded by _cond
    self._cond = threading.Condition()
    self._closed = False
    self._thread = threading.Thread(target=self._loop, name='batcher', daemon=True)
    self._thread.start()

  @property
  def queue_depth(self) -> int:
    """Images waiting for the model now."""
    with self._cond:
      return len(self._queue)

  def submit(self, image_HxWxC: np.ndarray) -> concurrent.futures.Future:
    """A future of ``{'probabilities', 'logits'}`` (K floats each) for one image; raises
    Overloaded when the queue is full."""
    return self.submit_all([image_HxWxC])[0]

  def submit_all(self, images: Sequence[np.ndarray]) -> list[concurrent.futures.Future]:
    """One future per image, as ``submit``; queues all the images at once or, raising
    Overloaded when they do not all fit (or the batcher is closed), none of them."""
    items = [_Item(x, concurrent.futures.Future()) for x in images]
    with self._cond:
      if self._closed or len(self._queue) + len(items) > self.max_queue:
        raise Overloaded()
      self._queue.extend(items)
      self._cond.notify_all()
    return [it.future for it in items]

  def close(self) -> None:
    """Finishes the queued work and stops the worker."""
    with self._cond:
      self._closed = True
      self._cond.notify_all()
    self._thread.join(timeout=30)

  def _next_batch(self) -> list[_Item]:
    """The next batch to run (empty once closed and drained). Images leave the queue as the
    batch takes them, so the queue has room for more while a batch fills."""
    with self._cond:
      while not self._queue and not self._closed:
        self._cond.wait()
      items: list[_Item] = []
      deadline = time.monotonic() + self.timeout_s
      while True:
        while self._queue and len(items) < self.max_batch_size:
          items.append(self._queue.popleft())
        left = deadline - time.monotonic()
        if not items or len(items) >= self.max_batch_size or left <= 0 or self._closed:
          return items
        self._cond.wait(left)

  def _loop(self) -> None:
    while items := self._next_batch():
      self._run(items)

  def _run(self, items: list[_Item]) -> None:
    try:
      out = self.clf.predict_arrays(np.stack([it.image for it in items]))
    except Exception as e:  # one failed batch fails its requests, never the service
      logging.exception('Model call failed for a batch of %d.', len(items))
      for it in items:
        it.future.set_exception(e)
      return
    self.batch_sizes[len(items)] += 1
    for i, it in enumerate(items):
      it.future.set_result({k: v[i] for k, v in out.items()})
