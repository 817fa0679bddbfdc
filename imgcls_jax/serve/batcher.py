"""Gathers images submitted from many request handlers into batches for one model thread."""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time

import numpy as np

from imgcls_jax import inference


class Overloaded(Exception):
  """The request queue is full."""


@dataclasses.dataclass
class _Item:
  image: np.ndarray
  future: concurrent.futures.Future


class Batcher:
  """One worker thread takes up to ``max_batch_size`` queued images (waiting at most
  ``timeout_s`` for a batch to fill) and runs them through the model in one call."""

  def __init__(self, clf: inference.Classifier, *, max_batch_size: int, timeout_s: float,
               max_queue: int):
    self.clf = clf
    self.max_batch_size = max_batch_size
    self.timeout_s = timeout_s
    self.batch_sizes: collections.Counter[int] = collections.Counter()  # size -> batches run
    self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=max_queue)
    self._thread = threading.Thread(target=self._loop, name='batcher', daemon=True)
    self._thread.start()

  @property
  def queue_depth(self) -> int:
    """Images waiting for the model now."""
    return self._queue.qsize()

  def submit(self, image_HxWxC: np.ndarray) -> concurrent.futures.Future:
    """A future of ``{'probabilities', 'logits'}`` (K floats each) for one image; raises
    Overloaded when the queue is full."""
    item = _Item(image_HxWxC, concurrent.futures.Future())
    try:
      self._queue.put_nowait(item)
    except queue.Full:
      raise Overloaded() from None
    return item.future

  def close(self) -> None:
    """Finishes the queued work and stops the worker."""
    self._queue.put(None)
    self._thread.join(timeout=30)

  def _loop(self) -> None:
    while True:
      first = self._queue.get()
      if first is None:
        return
      items, stop = [first], False
      deadline = time.monotonic() + self.timeout_s
      while len(items) < self.max_batch_size:
        try:
          item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
          break
        if item is None:
          stop = True
          break
        items.append(item)
      self._run(items)
      if stop:
        return

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
