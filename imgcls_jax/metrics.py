"""Metric accumulation, ``metrics.jsonl`` and TensorBoard summaries (written by process 0 only)."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any, Mapping

import numpy as np

from imgcls_jax import atomic


def mean_train(history: list[Mapping[str, Any]]) -> dict[str, float]:
  """Means of per-step train metrics fetched from the device."""
  keys = history[0].keys()
  return {k: float(np.mean([float(h[k]) for h in history])) for k in keys}


def values_finite(values: Mapping[str, float]) -> bool:
  """True when every host-side scalar in ``values`` is finite."""
  return all(math.isfinite(float(v)) for v in values.values())


def summary_writer_class() -> type:
  """tensorboardX's ``SummaryWriter``, imported without PyTorch when PyTorch is not loaded yet.

  tensorboardX imports ``torch`` at module level, only to accept its tensors (``import torch``
  inside ``try / except ImportError``); we write Python floats. With PyTorch installed that
  import costs ~1.5 s of every run's start-up on a quiet 2-core CPU (~10 s on a busy one;
  benchmarks/NOTES.md, session 13), so it is made to fail for the
  duration of the tensorboardX import (``sys.modules['torch'] = None``) and PyTorch imports
  normally afterwards.
  """
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


def json_safe(tree: Any) -> Any:
  """``tree`` with NaN and infinities (numpy's too) as None: strict JSON for any reader (jq,
  JSON.parse, Go, Java refuse Python's NaN), for every metrics / report file this project writes."""
  if isinstance(tree, dict):
    return {k: json_safe(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [json_safe(v) for v in tree]
  if isinstance(tree, (float, np.floating)):
    return float(tree) if math.isfinite(tree) else None
  return tree


class MetricWriter:
  """Appends ``{"step": s, "split": ..., **metrics}`` lines to ``metrics.jsonl`` and TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        self._tb = summary_writer_class()(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    """Appends one record; a write that fails (a full disk) leaves the file as it was."""
    if not self.enabled:
      return
    record = json_safe({'step': int(step), 'split': split, **values})   # NaN as null
    atomic.append_whole(self.path, (json.dumps(record) + '\n').encode())
    if self._tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float, np.number)):
          self._tb.add_scalar(f'{split}/{k}', float(v), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl`` (a run still writing it is fine)."""
  records = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          pass  # a line being written right now
  return records


def rewind_jsonl(path: str, step: int) -> None:
  """Drops ``metrics.jsonl`` records after ``step`` (a resumed run writes them again) and any line
  that does not parse: the last one cut short when a run was killed, or the disk filled, while
  writing it, onto which the next record would be appended, and lost. The file is rewritten
  whole (``atomic.write_atomic``) when anything is dropped or its last line has no newline."""
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      text = f.read()
  except FileNotFoundError:
    return
  kept, later, broken = [], 0, 0
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      broken += 1
      continue
    if not isinstance(record, dict):
      broken += 1
    elif record.get('step', 0) <= step:
      kept.append(line + '\n')
    else:
      later += 1
  if not (later or broken or (text and not text.endswith('\n'))):
    return
  atomic.write_atomic(path, ''.join(kept))
  if broken:
    logging.warning('Dropped %d line(s) of %s that did not parse (cut short: the run stopped, or '
                    'the disk filled, while writing it).', broken, path)
  if later:
    logging.info('Dropped %d metrics.jsonl records after step %d (they are redone on resume).',
                 later, step)
