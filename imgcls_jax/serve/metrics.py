"""Prometheus-style counters and histograms of the service, rendered in the text format."""
from __future__ import annotations

import bisect
import collections
import threading
from typing import Iterable, Mapping

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
  """Request counts by (endpoint, status) and request latency by endpoint; thread-safe."""

  def __init__(self, buckets_s: Iterable[float] = LATENCY_BUCKETS_S):
    self.buckets_s = tuple(buckets_s)
    self._lock = threading.Lock()
    self._requests: collections.Counter[tuple[str, int]] = collections.Counter()
    self._latency: dict[str, list[int]] = {}     # endpoint -> per-bucket counts (+inf last)
    self._latency_sum: collections.Counter[str] = collections.Counter()

  def observe(self, endpoint: str, status: int, seconds: float) -> None:
    """Records one finished request."""
    with self._lock:
      self._requests[(endpoint, status)] += 1
      counts = self._latency.setdefault(endpoint, [0] * (len(self.buckets_s) + 1))
      counts[bisect.bisect_left(self.buckets_s, seconds)] += 1
      self._latency_sum[endpoint] += seconds

  def render(self, batch_sizes: Mapping[int, int], max_batch_size: int, queue_depth: int,
             checkpoint_step: int) -> str:
    """The text exposition format (``text/plain; version=0.0.4``)."""
    lines = ['# HELP imgcls_requests_total HTTP requests answered, by endpoint and status code.',
             '# TYPE imgcls_requests_total counter']
    with self._lock:
      requests = sorted(self._requests.items())
      latency = {k: list(v) for k, v in sorted(self._latency.items())}
      sums = dict(self._latency_sum)
    for (endpoint, status), n in requests:
      lines.append(f'imgcls_requests_total{{endpoint="{endpoint}",code="{status}"}} {n}')
    lines += ['# HELP imgcls_request_duration_seconds Time from request start to response start.',
              '# TYPE imgcls_request_duration_seconds histogram']
    for endpoint, counts in latency.items():
      lines += _histogram('imgcls_request_duration_seconds', f'endpoint="{endpoint}",',
                          self.buckets_s, counts, sums[endpoint])
    sizes = sorted(batch_sizes.items())
    bounds = [1]
    while bounds[-1] < max_batch_size:
      bounds.append(min(2 * bounds[-1], max_batch_size))
    counts = [0] * (len(bounds) + 1)
    for size, n in sizes:
      counts[bisect.bisect_left(bounds, size)] += n
    lines += ['# HELP imgcls_batch_size Images per model call.',
              '# TYPE imgcls_batch_size histogram']
    lines += _histogram('imgcls_batch_size', '', bounds, counts, sum(s * n for s, n in sizes))
    lines += ['# HELP imgcls_images_total Images classified.', '# TYPE imgcls_images_total counter',
              f'imgcls_images_total {sum(s * n for s, n in sizes)}',
              '# HELP imgcls_queue_depth Images waiting for the model.',
              '# TYPE imgcls_queue_depth gauge', f'imgcls_queue_depth {queue_depth}',
              '# HELP imgcls_checkpoint_step Training step of the served checkpoint.',
              '# TYPE imgcls_checkpoint_step gauge', f'imgcls_checkpoint_step {checkpoint_step}']
    return '\n'.join(lines) + '\n'


def _histogram(name: str, labels: str, bounds: Iterable[float], counts: list[int],
               total: float) -> list[str]:
  out, running = [], 0
  for bound, n in zip(list(bounds) + ['+Inf'], counts):
    running += n
    out.append(f'{name}_bucket{{{labels}le="{bound}"}} {running}')
  label_set = f'{{{labels.rstrip(",")}}}' if labels else ''
  out += [f'{name}_sum{label_set} {total:g}', f'{name}_count{label_set} {running}']
  return out
