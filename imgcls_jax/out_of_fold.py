"""Out-of-fold predictions gathered fold by fold for the label-issue search (``label_issues.py``):
every held-out example's probabilities, id, label and fold, from k-fold cross-validation (the
CNN's, ``cross_validation.py``; the classical baseline's, ``classical.py``)."""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Sequence

import numpy as np

from imgcls_jax import label_issues
from imgcls_jax.errors import UserError


class OutOfFold:
  """Every held-out example's probabilities, id, label and fold, gathered fold by fold for
  ``label_issues.search``. ``wanted``: config.cross_validation.label_issues, and at most
  ``label_issues.cell_cap`` probabilities (decided before the first fold, so none is gathered
  that would be dropped)."""

  def __init__(self, config: Any, total: int):
    from imgcls_jax.data import reader
    self.data, self.split = config.data, config.data.train_split
    self.wanted = bool(config.cross_validation.get('label_issues', True))
    self.ids: list[str] = []
    self.folds: list[np.ndarray] = []
    self.labels: list[np.ndarray] = []
    self.probs: list[np.ndarray] = []
    self.channels = 3
    self._split_ids: list[str] | None = None
    if not self.wanted:
      return
    if importlib.util.find_spec('cleanlab') is None:
      raise UserError('The label-issue search (config.cross_validation.label_issues) needs '
                      'cleanlab, which is not installed: run pip install -e . in the checkout, '
                      'or set --config.cross_validation.label_issues=False.')
    data = config.data.copy_and_resolve_references()
    data.eval_split = data.train_split   # the folds split the train split; the eval split unread
    info = reader.describe(data)
    cap = label_issues.cell_cap(info.multilabel)
    if total * info.num_classes > cap:
      logging.warning('The label-issue search holds every example\'s %d class probabilities on '
                      'the host: %d examples are more than its %d cells; skipped (set '
                      'config.cross_validation.label_issues=False to silence this).',
                      info.num_classes, total, cap)
      self.wanted = False

  def add(self, fold: int, held_out: Sequence[str], position: np.ndarray, labels: np.ndarray,
          probs: np.ndarray, info: Any) -> None:
    """Fold ``fold``'s held-out examples (``held_out``: their ids), as its evaluation read them:
    ``position`` in the fold's read order, ``labels`` (int N; tagging: bool N x K), ``probs``
    (N x K); ``info``: the dataset's ``DatasetInfo``."""
    from imgcls_jax.data import reader
    if not self.wanted:
      return
    if self._split_ids is None:   # read once: the ids of the whole split, in read order
      self._split_ids = reader.example_ids(self.data, self.split, info)
    # A fold's split 'SPLIT@ids' reads the listed examples in the split's own order
    # (sources.example_ids), so its rows are these ids, in this order.
    listed = set(held_out)
    ids = [i for i in self._split_ids if i in listed]
    if len(ids) <= int(np.max(position, initial=-1)):
      logging.warning('The ids of fold %d (%d) do not cover its %d rows read; the label-issue '
                      'search is skipped.', fold, len(ids), int(np.max(position)) + 1)
      self.wanted = False
      return
    self.ids += [ids[p] for p in np.asarray(position).tolist()]
    self.folds.append(np.full(len(position), fold, np.int64))
    self.labels.append(np.asarray(labels))
    self.probs.append(np.asarray(probs, np.float32))
    self.channels = int(info.channels)

  def finish(self, class_names: Sequence[str], workdir: str) -> dict[str, Any] | None:
    """Finds, writes (``label_issues.FILE``, ``KEPT``; image folders: ``PICTURE`` too) and
    summarises the likely label issues; None when not wanted, or when the search failed (a
    warning: the cross-validation report is written all the same)."""
    from imgcls_jax.data import folder_layout
    if not self.wanted or not self.labels:
      return None
    try:
      load = (label_issues.file_loader(folder_layout.source_of(self.data).root, self.channels)
              if folder_layout.is_folder(self.data) else None)
      found, s = label_issues.search(
          np.concatenate(self.labels), np.concatenate(self.probs), ids=self.ids,
          class_names=class_names, out_dir=workdir, split=self.split, load=load,
          folds=np.concatenate(self.folds))
      label_issues.write_kept(self.ids, found, os.path.join(workdir, label_issues.KEPT))
    except Exception as e:   # noqa: BLE001 -- the folds' report must not be lost to this step
      logging.warning('The label-issue search failed (%s: %s); the cross-validation report is '
                      'written without it.', type(e).__name__, e)
      label_issues.remove_stale(workdir)
      return None
    return s
