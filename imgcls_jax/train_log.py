"""The training loop's train metrics (``train.py``): dispatched steps' metrics, fetched lazily one
dispatch behind, checked for NaN / Inf and written with the throughput."""
from __future__ import annotations

import time
from typing import Any

import jax
import tqdm

from imgcls_jax import dispatch, metrics


class TrainLog:
  """Train metrics of dispatched steps, fetched lazily, checked for NaN and written. An entry is
  one dispatch: the metrics of one step, or of ``n`` steps stacked
  (``config.steps_per_dispatch``)."""

  def __init__(self, writer: metrics.MetricWriter, bar: tqdm.tqdm, batch_size: int,
               diverged: Any):
    self.writer, self.bar, self.batch_size, self.diverged = writer, bar, batch_size, diverged
    self.pending: list[tuple[Any, int]] = []
    # Steps fetched but not written yet: those up to a stop, saved with its checkpoint and put
    # back at resume, so that the next record averages the same steps as an uninterrupted run's.
    self.carried: list[dict[str, float]] = []
    self.t0, self.steps_timed = time.perf_counter(), 0

  def add(self, step_metrics: Any, n: int = 1) -> None:
    self.pending.append((step_metrics, n))
    self.steps_timed += n

  def flush(self, step: int, keep_last: bool, write: bool = True) -> None:
    """Fetches pending metrics (all but the newest dispatch when ``keep_last``), checks them,
    and logs their mean with the steps carried; without ``write`` (a stop) carries them too."""
    fetch, self.pending = ((self.pending[:-1], self.pending[-1:]) if keep_last
                           else (self.pending, []))
    if not fetch and not (write and self.carried):   # (a resumed run's first record: the
      return                                         # carried steps alone)
    later = sum(n for _, n in self.pending)  # steps still pending after the fetched ones
    values = [v for fetched, (_, n) in zip(jax.device_get([m for m, _ in fetch]), fetch)
              for v in dispatch.unstack(fetched, n)]
    for i, v in enumerate(values):
      if not metrics.values_finite({'loss': v['loss'], 'grad_norm': v['grad_norm']}):
        bad = step - later - len(values) + i + 1
        raise self.diverged(f'the loss is {float(v["loss"])} (gradient norm '
                            f'{float(v["grad_norm"])})', bad)
    if not write:
      self.carried += [{k: float(x) for k, x in v.items()} for v in values]
      return
    values, self.carried = self.carried + values, []
    elapsed = time.perf_counter() - self.t0
    summary = metrics.mean_train(values)
    summary['images_per_sec'] = self.steps_timed * self.batch_size / max(elapsed, 1e-9)
    self.writer.write(step - later, 'train', summary)
    self.bar.set_postfix(loss=f"{summary['loss']:.4f}", img_s=f"{summary['images_per_sec']:.0f}")
    self.t0, self.steps_timed = time.perf_counter(), later
