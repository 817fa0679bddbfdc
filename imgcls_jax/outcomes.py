"""Per-example passes over a restored split (``restored_split.Restored``): every example's
prediction in read order (``outcomes_pass``: ``Outcomes``, or a tagging run's ``TagOutcomes``),
with the images of the most confident errors, every class's probability and the
out-of-distribution scores on request; and images of none of the classes scored by the same
forward pass (``ood_pass``). ``evaluation.evaluate_checkpoint`` runs them; ``--mode=compare``,
the label-issue search and the bootstrap intervals read their outcomes. No TensorFlow at import.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
import zlib
from typing import Any

import jax
import numpy as np

from imgcls_jax import eval_steps, inference, ood, report, sharding
from imgcls_jax.data import images
from imgcls_jax.errors import UserError
from imgcls_jax.restored_split import Restored


OOD_MULTILABEL = ('config.evaluate.ood_inputs scores the top-1 probability of a single-label '
                  "run; a multi-label run's tags are decided per class: unset it.")


def ood_pass(r: Restored, files: list[str], tta: str, num_bins: int) -> dict[str, Any]:
  """Images of none of the run's classes through the split's forward pass (the same checkpoint,
  test-time augmentation and temperature; read as predict reads files): the histogram of their
  top-1 probabilities (``selective.sums``' bins), per image the scores of ``ood.SCORES`` and the
  run's gate's (``gate``: ``ood.energy``, no TTA), and the files that could not be read. Several
  processes: each reads a contiguous part of ``files`` (``_file_share``; every process must list
  the same files), the histogram is summed over the global batches and the per-image scores are
  gathered in process order, so every process returns what one process would."""
  if r.trained.info.multilabel:
    raise UserError(OOD_MULTILABEL)
  b, mesh = r.setup.local_eval_batch_size, r.setup.mesh
  share, num_batches = _file_share(files, b)
  skipped: list[tuple[str, str]] = []
  step = jax.jit(functools.partial(eval_steps.example_outcomes, model_def=r.setup.model_def,
                                   cfg=r.setup.step_cfg, tta=tta, num_bins=num_bins,
                                   with_scores=True),
                 in_shardings=(r.shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
  keys = {'msp': 'p_predicted', 'logsumexp': 'logsumexp', 'max_logit': 'max_logit',
          'gate': 'logits'}
  scores: dict[str, list[np.ndarray]] = {k: [np.zeros((0,), np.float32)] for k in keys}
  totals = None
  first = jax.process_index() * b   # this process's rows of each global batch
  read = functools.partial(inference.prepare, r.trained)
  batches = images.image_batches(share, read, b, skipped)
  for _ in range(num_batches):   # as many on every process (a part read out: masked batches)
    _, arrays = next(batches, (None, np.zeros((0, *r.trained.image_shape), np.uint8)))
    batch = {'image': np.zeros((b, *r.trained.image_shape), np.uint8),
             'label': np.zeros((b,), np.int32), 'mask': np.arange(b) < len(arrays)}
    batch['image'][:len(arrays)] = arrays
    out, sums = jax.device_get(step(r.variables, sharding.put_batch(
        batch, sharding.batch_sharding(mesh))))
    totals = report.add(totals, sums)
    for k, v in keys.items():
      got = np.asarray(out[v])[first:first + len(arrays)]
      scores[k].append(ood.energy(got) if k == 'gate' else got)
  every = sharding.gather_rows({k: np.concatenate(v) for k, v in scores.items()})
  unread = int(sharding.gather_rows({'n': np.asarray([len(skipped)], np.int64)})['n'].sum())
  if totals is None or not len(every['msp']):   # every file unreadable
    raise UserError(f'None of the {len(files)} files of config.evaluate.ood_inputs could be read '
                    f'as an image ({images.unreadable_summary(skipped)}); give image files.')
  stats = report.stats_to_numpy(totals)
  return {'histogram': stats['sel_right'] + stats['sel_wrong'], 'inputs': len(files),
          'skipped': unread, 'scores': every}


def _file_share(files: list[str], batch_size: int) -> tuple[list[str], int]:
  """(this process's contiguous part of ``files``, in process order; how many batches of
  ``batch_size`` every process runs: the largest part's). A UserError when the processes list
  other files (each reads its part of its own list: the count and a CRC-32 of the list compared)."""
  mine = np.asarray([len(files), zlib.crc32('\n'.join(files).encode())], np.int64)
  lists = sharding.gather_rows({'n': mine[None]})['n']
  if (lists != lists[0]).any():
    p = int(np.flatnonzero((lists != lists[0]).any(axis=1))[0])
    raise UserError(f'config.evaluate.ood_inputs lists {lists[0][0]} files on process 0 but '
                    f'{"other" if lists[p][0] == lists[0][0] else lists[p][0]} files on process '
                    f'{p}; put them where every process reads the same files (shared storage).')
  per = -(-len(files) // jax.process_count())
  start = jax.process_index() * per
  return files[start:start + per], -(-per // batch_size)


@dataclasses.dataclass
class Outcomes:
  """Every example of a split in its read order (``position``: 0-based in that order; rows of
  image files that failed to decode are left out), as the eval step scores it."""
  position: np.ndarray      # int64 N
  label: np.ndarray         # int64 N
  predicted: np.ndarray     # int64 N: the top-1 class
  p_predicted: np.ndarray   # float32 N: its probability
  p_label: np.ndarray       # float32 N: the labelled class's
  images: dict[int, np.ndarray]   # position -> eval-preprocessed image of the kept errors
  probs: np.ndarray | None = None   # float32 N x K: every class's (outcomes_pass's keep_probs)
  # eval_steps.logit_scores' (outcomes_pass's keep_scores)
  scores: dict[str, np.ndarray] | None = None

  def errors(self) -> np.ndarray:
    """Indices of the wrongly predicted examples, the most confident first (ties: position)."""
    wrong = np.flatnonzero(self.predicted != self.label)
    return wrong[np.lexsort((self.position[wrong], -self.p_predicted[wrong]))]


@dataclasses.dataclass
class TagOutcomes:
  """Every example of a multi-label split in its read order (as ``Outcomes``), as the eval step
  scores it, with the tag decisions of prediction (``probs >= thresholds``)."""
  position: np.ndarray      # int64 N
  labels: np.ndarray        # bool N x K: the labelled tags
  probs: np.ndarray         # float32 N x K
  thresholds: np.ndarray    # float32 K: the run's (0.5 where it fitted none)
  images: dict[int, np.ndarray]   # position -> eval-preprocessed image of the kept errors

  @property
  def predicted(self) -> np.ndarray:
    """bool N x K: the tags prediction gives (``answers.tags``' rule, float32 p >= t)."""
    return _decide(self.probs, self.thresholds)

  def errors(self) -> tuple[np.ndarray, np.ndarray]:
    """(example index, class) of every wrong tag decision: a labelled tag scored below its
    threshold ('missed') or another one at or above it ('extra'), the most confident first by
    the probability of the wrong decision (p for extra, 1 - p for missed; ties: position,
    class)."""
    i, k = np.nonzero(self.predicted != self.labels)
    sure = _sureness(self.probs[i, k], self.labels[i, k])
    order = np.lexsort((k, self.position[i], -sure))
    return i[order], k[order]


def _decide(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  return np.asarray(probs, np.float32) >= np.asarray(thresholds, np.float32)


def _sureness(p: np.ndarray, labelled: np.ndarray) -> np.ndarray:
  """The probability of a wrong tag decision: 1 - p for a missed tag, p for an extra one."""
  return np.where(labelled, 1 - p, p).astype(np.float32)


def outcomes_pass(r: Restored, tta: str = '', *, keep_images: int = 0,
                  num_bins: int | None = None, keep_probs: bool = False,
                  keep_scores: bool = False
                  ) -> tuple[Outcomes | TagOutcomes, dict[str, np.ndarray] | None]:
  """The ``Outcomes`` (multi-label: ``TagOutcomes``) of every example of ``r.split``, keeping the
  images of the ``keep_images`` examples with the most confident errors (single-label,
  ``keep_probs``: and every class's probability); with ``num_bins``, also the eval step's summed
  statistics, from the same pass. Several processes: each reads a contiguous part of the split
  and records its own rows (positions from its part's start); the records and kept images are
  then gathered in process order (``sharding.gather_rows``), so every process returns the whole
  split's, as one process would."""
  mesh, batch_sh = r.setup.mesh, sharding.batch_sharding(r.setup.mesh)
  tagged = r.trained.info.multilabel
  thresholds = np.asarray(r.trained.decision_thresholds, np.float32)
  extra: dict[str, Any] = {}
  if tagged:
    fn, keys = eval_steps.multilabel_outcomes, ('position', 'label', 'probs')
  else:
    fn = eval_steps.example_outcomes
    keys = ('position', 'label', 'predicted', 'p_predicted', 'p_label')
    if keep_probs:
      keys, extra = keys + ('probs',), {'with_probs': True}
    if keep_scores:   # 'gate': ood.energy of the logits prediction returns (no TTA)
      keys, extra = keys + ('logsumexp', 'max_logit', 'gate'), {**extra, 'with_scores': True}
  step = jax.jit(functools.partial(fn, model_def=r.setup.model_def, cfg=r.setup.step_cfg,
                                   tta=tta, num_bins=num_bins, **extra),
                 in_shardings=(r.shardings, batch_sh), out_shardings=sharding.replicated(mesh))
  cols: dict[str, list[np.ndarray]] = {k: [] for k in keys}
  kept: list[tuple[float, int, np.ndarray]] = []   # a min-heap of (sureness, -position, image)

  def take(out: dict[str, Any], batch: dict[str, np.ndarray], offset: int) -> None:
    out = jax.device_get(out)   # the global batch's rows: this process's from ``first`` on
    rows = np.flatnonzero(np.asarray(batch['mask'], bool))
    first = jax.process_index() * len(batch['mask'])
    label = np.asarray(batch['label'])[rows]
    cols['position'].append(offset + rows)
    cols['label'].append(label)
    for k in keys[2:]:
      cols[k].append(ood.energy(np.asarray(out['logits'])[first + rows]) if k == 'gate'
                     else np.asarray(out[k])[first + rows])
    if not keep_images:
      return
    if tagged:   # an example's most confident wrong tag decision (-1: none)
      probs = np.asarray(out['probs'])[first + rows]
      labelled = label > 0.5
      sure = np.where(_decide(probs, thresholds) != labelled, _sureness(probs, labelled),
                      -1.0).max(axis=-1, initial=-1.0)
    else:
      sure = np.where(np.asarray(out['predicted'])[first + rows] != label,
                      np.asarray(out['p_predicted'])[first + rows], -1.0)
    for j in np.flatnonzero(sure >= 0):
      i = rows[j]
      item = (float(sure[j]), -(offset + int(i)), np.array(batch['image'][i]))
      (heapq.heappush if len(kept) < keep_images else heapq.heappushpop)(kept, item)

  totals, offset, pending = None, 0, None
  guard = sharding.InFlightGuard(mesh, strict=True)   # several CPU devices: one batch at a time
  for batch in r.data.batches():
    out = step(r.variables, sharding.put_batch(batch, batch_sh))
    if num_bins is not None:
      out, sums = out
      totals = report.add(totals, sums)
    guard.after_dispatch((out, totals))
    if pending is not None:   # read batch i - 1 while batch i computes
      take(*pending)
    pending = (out, batch, offset)
    offset += len(batch['mask'])
  if pending is not None:
    take(*pending)
  c = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in cols.items()}
  if jax.process_count() > 1:
    c, kept = _gathered(c, kept, int(r.data.examples_read), keep_images,
                        None if pending is None else pending[1]['image'][0])
  if not len(c['label']):
    raise UserError(f"The split '{r.split}' is empty; evaluate a split with examples.")
  images = {-neg: img for _, neg, img in kept}
  position = c['position'].astype(np.int64)
  if tagged:
    outcomes: Outcomes | TagOutcomes = TagOutcomes(
        position=position, labels=c['label'] > 0.5, probs=c['probs'].astype(np.float32),
        thresholds=thresholds, images=images)
  else:
    outcomes = Outcomes(position=position, label=c['label'].astype(np.int64),
                        predicted=c['predicted'].astype(np.int64), p_predicted=c['p_predicted'],
                        p_label=c['p_label'], images=images,
                        probs=c['probs'].astype(np.float32, copy=False) if keep_probs else None,
                        scores=({k: c[k] for k in ('logsumexp', 'max_logit', 'gate')}
                                if keep_scores else None))
  return outcomes, (report.stats_to_numpy(totals) if totals is not None else None)


def _gathered(c: dict[str, np.ndarray], kept: list[tuple[float, int, np.ndarray]],
              examples_read: int, keep_images: int, image: np.ndarray | None
              ) -> tuple[dict[str, np.ndarray], list[tuple[float, int, np.ndarray]]]:
  """Every process's records ``c`` and kept images, in process order, positions made the
  split's: a process's part starts where the parts before it end (``examples_read`` each).
  ``image``: an image of the batches (its shape and dtype, for a process that kept none)."""
  counts = sharding.gather_rows({'n': np.asarray([examples_read], np.int64)})['n']
  start = int(counts[:jax.process_index()].sum())
  c = sharding.gather_rows({**c, 'position': c['position'].astype(np.int64) + start})
  if not keep_images or image is None:
    return c, kept
  every = sharding.gather_rows({
      'sure': np.asarray([s for s, _, _ in kept], np.float32),
      'position': np.asarray([start - neg for _, neg, _ in kept], np.int64),
      'image': (np.stack([img for _, _, img in kept]) if kept else
                np.zeros((0, *image.shape), image.dtype))})
  return c, heapq.nlargest(keep_images, ((float(s), -int(p), img) for s, p, img in zip(
      every['sure'], every['position'], every['image'])), key=lambda t: t[:2])
