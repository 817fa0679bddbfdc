"""Evaluation of a trained run's checkpoint (the run layer under ``--mode=evaluate``,
``--mode=compare`` and k-fold cross-validation): choose the step, restore it on the mesh with the
run's parameter placement, then sum the report's statistics over a split
(``evaluate_checkpoint``) and / or gather its per-example predictions (``outcomes_pass``).
No TensorFlow at import.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from imgcls_jax import (checkpoint, eval_steps, held_out, inference, label_issues, metrics, ood,
                        report, run, sharding)
from imgcls_jax.data import images, reader
from imgcls_jax.data.info import check_flips
from imgcls_jax.errors import UserError


def choose_step(ckpt: checkpoint.Checkpointer, spec: str, metrics_path: str) -> tuple[int, str]:
  """(step, how it was chosen) for ``config.evaluate.checkpoint``: 'best', 'latest' or a step.

  'best' is the checkpoint the Checkpointer ranks best (``config.checkpoint.best_metric``); for a
  run saved without evaluation metrics, the kept checkpoint with the highest eval ``accuracy``
  (top-1; a tagging run's exact match) in ``metrics.jsonl`` (ties: the later step); failing both,
  the latest.
  """
  available = sorted(ckpt.all_steps())
  spec = str(spec).strip().lower()
  if spec == 'latest':
    return available[-1], 'latest'
  if spec == 'best':
    best = ckpt.best_step()
    if best is not None:
      return best, f'best by eval {ckpt.best_metric} ({ckpt.best_mode})'
    records = metrics.read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
    acc = {int(r['step']): float(r['accuracy']) for r in records
           if r.get('split') == 'eval' and r.get('accuracy') is not None}
    scored = [(acc[s], s) for s in available if s in acc]
    if scored:
      best_acc, best = max(scored)
      return best, f'best (eval accuracy {best_acc:.4f} in metrics.jsonl)'
    logging.warning('No kept checkpoint has an eval record in %s; using the latest.', metrics_path)
    return available[-1], 'latest (no evaluated checkpoint to pick the best from)'
  if spec.isdigit():
    step = int(spec)
    if step not in available:
      raise UserError(f"Checkpoint step {step} is not in {ckpt.directory}; kept steps: "
                      f"{', '.join(map(str, available))}.")
    return step, f'step {step}'
  raise UserError(f"config.evaluate.checkpoint='{spec}' must be 'best', 'latest' or a step "
                  'number.')


@dataclasses.dataclass
class Evaluation:
  """Summed statistics of one checkpoint on one split, and what was evaluated."""
  stats: dict[str, np.ndarray]
  trained: inference.Trained
  split: str
  step: int
  chosen: str
  tta: str
  workdir: str
  dataset: str = ''   # what was evaluated ('' = the run's own dataset)
  outcomes: Outcomes | TagOutcomes | None = None   # per example (evaluate_checkpoint's keep_errors)
  ood: dict[str, Any] | None = None   # ood_pass of evaluate_checkpoint's ood_files
  # With keep_probs: True when the model trained on none of these examples (other images, or a
  # split sharing none with the training split), False when it trained on some, None: unknown.
  unseen: bool | None = None

  def report(self, top_confused: int = 10) -> dict[str, Any]:
    """The full report (``report.summarize``) with what was evaluated as its ``context``."""
    info, cfg = self.trained.info, self.trained.run
    rep = report.summarize(self.stats, info.class_names, top_confused=top_confused,
                           thresholds=self.trained.thresholds,
                           min_confidence=self.trained.min_confidence or None)
    rep['context'] = {'dataset': self.dataset or info.name, 'split': self.split,
                      'checkpoint_step': self.step, 'checkpoint': self.chosen,
                      'tta': self.tta or 'none',
                      'model': cfg.model.name, 'workdir': self.workdir,
                      'temperature': self.trained.temperature}
    if self.ood is not None:
      split_scores = None
      if isinstance(self.outcomes, Outcomes) and self.outcomes.scores is not None:
        split_scores = {'msp': self.outcomes.p_predicted, **self.outcomes.scores}
      rep['out_of_distribution'] = {
          **ood.summary(self.stats['sel_right'], self.stats['sel_wrong'], self.ood['histogram'],
                        self.trained.min_confidence or None, split_scores, self.ood['scores'],
                        gate_record=self.trained.unknown, tta=self.tta),
          'inputs': self.ood['inputs'], 'skipped': self.ood['skipped']}
    return rep


def _new_image_location(saved: dict[str, Any], overrides: dict[str, Any]) -> bool:
  """True when the command line points an image-folder run at another folder or manifest."""
  def where(v: Any) -> str:
    return os.path.abspath(os.path.expanduser(v)) if v else ''
  return any(where(overrides[f'data.{k}']) != where(saved.get('data', {}).get(k))
             for k in ('folder', 'manifest') if f'data.{k}' in overrides)


@dataclasses.dataclass
class Restored:
  """One checkpoint of a run placed on the mesh, ready to read ``split`` (``restore_for_split``)."""
  trained: inference.Trained
  setup: run.Setup
  variables: Any
  shardings: Any
  data: Any              # reader.eval_data of the split
  split: str
  step: int
  chosen: str            # how the step was chosen
  fitted_on: dict[str, str] = dataclasses.field(default_factory=dict)  # 'temperature' -> split
  new_images: bool = False   # the command line points the run at another folder / manifest


def restore_for_split(workdir: str, config: ml_collections.ConfigDict | None, *, split: str = '',
                      checkpoint_spec: str = 'latest', tta: str = '',
                      overrides: dict[str, Any] | None = None,
                      warn_redrawn: bool = True) -> Restored:
  """The checkpoint ``checkpoint_spec`` of ``workdir`` on the mesh with the run's parameter
  placement, and the eval data of ``split`` ('' = the run's eval split); ``warn_redrawn``: warn
  when an image folder's held-out ``split`` is drawn otherwise than at training
  (``held_out.folder_changed``)."""
  workdir = os.path.abspath(workdir)
  checkpoint.require_checkpoint(workdir)
  keep = (config if config is not None
          else ml_collections.ConfigDict(checkpoint.read_config(workdir)))
  with checkpoint.Checkpointer.from_config(workdir, keep, read_only=True) as ckpt:
    step, chosen = choose_step(ckpt, checkpoint_spec, os.path.join(workdir, 'metrics.jsonl'))
    latest = ckpt.latest_step()
    meta = ckpt.read_meta(step)
    try:   # what the final weights were fitted with (a damaged newest checkpoint: nothing)
      latest_meta = ckpt.read_meta(latest) if step != latest else meta
    except UserError:
      latest_meta = {}
    fitted = [k for k in ('temperature', 'thresholds') if k in latest_meta and k not in meta]
  fitted_on = {k: str(meta[k]['split']) for k in ('temperature', 'thresholds')
               if isinstance(meta.get(k), dict) and meta[k].get('split')}
  if fitted:  # chosen at the end of training, for the final weights only
    logging.warning('Checkpoint %d (%s) has no %s: the run fitted %s on its final weights '
                    '(step %d) only; --config.evaluate.checkpoint=latest evaluates with %s.',
                    step, chosen, ' or '.join(fitted), 'them' if len(fitted) > 1 else 'it',
                    latest, 'them' if len(fitted) > 1 else 'it')
  trained = inference.load(workdir, config, step=step, overrides=overrides)
  cfg = trained.run
  held_out.check_location_keys(cfg.data)   # e.g. a folder named for a run that read tfds
  saved = checkpoint.read_config(workdir) or {}
  new_images = _new_image_location(saved, overrides or {})
  split = split or (reader.default_eval_split(cfg.data) if new_images else cfg.data.eval_split)
  check_flips(cfg.data, tta, mirror_safe=trained.info.mirror_safe)
  changed = ('' if new_images or not warn_redrawn else
             held_out.folder_changed(cfg, trained.info, split, saved.get('data', {})))
  if changed:
    logging.warning("%s, so the held-out split '%s' drawn from it may hold images the model "
                    'trained on and its figures may be optimistic; restore the folder as it was, '
                    'or train again.', changed, split)
  s = run.setup(cfg, trained.info, training=False, thresholds=trained.thresholds,
                temperature=trained.temperature)
  variables, shardings = run.place_variables(s, trained.variables)
  data = reader.eval_data(cfg.data, split, local_batch_size=s.local_eval_batch_size,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          split_size=reader.split_size(cfg.data, split, trained.info),
                          info=trained.info)
  return Restored(trained=trained, setup=s, variables=variables, shardings=shardings, data=data,
                  split=split, step=step, chosen=chosen, fitted_on=fitted_on,
                  new_images=new_images)


# A tagging split's N x K probabilities kept on the host for the listing and the intervals
# (~22 bytes a cell with the bootstrap's 0/1 matrices and sort orders: ~1.1 GB at the cap).
MAX_TAG_CELLS = 50_000_000


def evaluate_checkpoint(workdir: str, config: ml_collections.ConfigDict | None, *, split: str = '',
                        checkpoint_spec: str = 'latest', tta: str = '',
                        num_bins: int = report.DEFAULT_CALIBRATION_BINS,
                        overrides: dict[str, Any] | None = None,
                        keep_errors: int | None = None,
                        ood_files: list[str] | None = None,
                        keep_probs: bool = False) -> Evaluation:
  """Evaluates one checkpoint of ``workdir`` on ``split`` ('' = the run's eval split), every
  example exactly once, on the mesh with the run's parameter placement. With ``keep_errors``
  (one process) the same pass also gathers every example's ``Outcomes``, with the
  images of that many of the most confident errors (``keep_probs``: with every class's
  probability, e.g. for k-fold's label-issue search; a tagging run's outcomes always have them);
  with ``ood_files`` (one process, single-label), those images are scored too (``ood_pass``),
  and the split's per-example scores kept to compare with theirs."""
  if num_bins < 1:
    raise UserError(f'config.evaluate.calibration_bins={num_bins} must be at least 1.')
  r = restore_for_split(workdir, config, split=split, checkpoint_spec=checkpoint_spec, tta=tta,
                        overrides=overrides)
  for what, fit_split in r.fitted_on.items():
    if fit_split == r.split:
      logging.warning("Split '%s' is the one this run's %s %s fitted on: its %s figures here are "
                      'optimistic; evaluate another split for what new images get.', r.split,
                      what, 'was' if what == 'temperature' else 'were',
                      'calibration' if what == 'temperature' else 'F1 / exact-match')
  outcomes = None
  cells = (r.data.num_batches or 0) * r.setup.local_eval_batch_size * r.trained.info.num_classes
  smaller = (f"evaluate a smaller split for {{}}: a tfds slice such as '{r.split.split('[')[0]}"
             "[:10%]', or an image folder or manifest split with fewer images")
  if ((keep_errors is not None or keep_probs) and r.trained.info.multilabel
      and cells > MAX_TAG_CELLS):
    logging.warning("Split '%s' has ~%d (example, tag) probabilities, more than the %d kept on "
                    'the host for the wrong-tag listing, the label-issue search and the '
                    'bootstrap intervals: they are skipped (%s).', r.split, cells,
                    MAX_TAG_CELLS, smaller.format('them'))
    keep_errors, keep_probs = None, False
  cap = label_issues.cell_cap(r.trained.info.multilabel)
  if keep_probs:   # (size unknown: an id-listed fold, capped by its caller)
    if cells > cap:
      logging.warning("Split '%s' has ~%d (example, class) probabilities, more than the %d the "
                      'label-issue search holds on the host: it is skipped (%s).', r.split,
                      cells, cap, smaller.format('it'))
      keep_probs = False
    elif keep_errors is None:
      keep_errors = 0
  if ood_files and keep_errors is None:
    keep_errors = 0
  if keep_errors is not None:
    outcomes, stats = outcomes_pass(r, tta, keep_images=keep_errors, num_bins=num_bins,
                                    keep_probs=keep_probs, keep_scores=bool(ood_files))
  else:
    eval_step = run.jit_eval_step(r.setup, r.shardings, tta=tta, num_bins=num_bins)
    stats = report.stats_to_numpy(run.eval_sums(eval_step, r.variables, r.data.batches(),
                                                r.setup.mesh, r.split))
  ood_result = ood_pass(r, ood_files, tta, num_bins) if ood_files else None
  unseen = None
  if keep_probs:
    shared = (0 if r.new_images else
              reader.shared_examples(r.trained.run.data, r.split, r.trained.run.data.train_split,
                                     r.trained.info))
    unseen = None if shared is None else shared == 0
  return Evaluation(stats=stats, trained=r.trained, split=r.split, step=r.step, chosen=r.chosen,
                    tta=tta, workdir=os.path.abspath(workdir),
                    dataset=reader.dataset_name(r.trained.run.data), outcomes=outcomes,
                    ood=ood_result, unseen=unseen)


OOD_MULTILABEL = ('config.evaluate.ood_inputs scores the top-1 probability of a single-label '
                  "run; a multi-label run's tags are decided per class: unset it.")


def ood_pass(r: Restored, files: list[str], tta: str, num_bins: int) -> dict[str, Any]:
  """Images of none of the run's classes through the split's forward pass (the same checkpoint,
  test-time augmentation and temperature; read as predict reads files): the histogram of their
  top-1 probabilities (``selective.sums``' bins), per image the scores of ``ood.SCORES`` and the
  run's gate's (``gate``: ``ood.energy``, no TTA), and the files that could not be read."""
  if r.trained.info.multilabel:
    raise UserError(OOD_MULTILABEL)
  b = r.setup.local_eval_batch_size
  skipped: list[tuple[str, str]] = []
  step = jax.jit(functools.partial(eval_steps.example_outcomes, model_def=r.setup.model_def,
                                   cfg=r.setup.step_cfg, tta=tta, num_bins=num_bins,
                                   with_scores=True),
                 in_shardings=(r.shardings, sharding.batch_sharding(r.setup.mesh)),
                 out_shardings=sharding.replicated(r.setup.mesh))
  keys = {'msp': 'p_predicted', 'logsumexp': 'logsumexp', 'max_logit': 'max_logit',
          'gate': 'logits'}
  scores: dict[str, list[np.ndarray]] = {k: [] for k in keys}
  totals = None
  read = functools.partial(inference.prepare, r.trained)
  for _, arrays in images.image_batches(files, read, b, skipped):
    batch = {'image': np.zeros((b, *arrays.shape[1:]), np.uint8),
             'label': np.zeros((b,), np.int32), 'mask': np.arange(b) < len(arrays)}
    batch['image'][:len(arrays)] = arrays
    out, sums = jax.device_get(step(r.variables, sharding.put_batch(
        batch, sharding.batch_sharding(r.setup.mesh))))
    totals = report.add(totals, sums)
    for k, v in keys.items():
      got = np.asarray(out[v])[:len(arrays)]
      scores[k].append(ood.energy(got) if k == 'gate' else got)
  if totals is None:   # every file unreadable
    raise UserError(f'None of the {len(files)} files of config.evaluate.ood_inputs could be read '
                    f'as an image ({skipped[0][0]}: {skipped[0][1]}); give image files.')
  stats = report.stats_to_numpy(totals)
  return {'histogram': stats['sel_right'] + stats['sel_wrong'], 'inputs': len(files),
          'skipped': len(skipped), 'scores': {k: np.concatenate(v) for k, v in scores.items()}}


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
    """bool N x K: the tags prediction gives (``inference.tags``' rule, float32 p >= t)."""
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
  """The ``Outcomes`` (multi-label: ``TagOutcomes``) of every example of ``r.split`` (one
  process: every row comes back to the host), keeping the images of the ``keep_images`` examples
  with the most confident errors (single-label, ``keep_probs``: and every class's probability);
  with ``num_bins``, also the eval step's summed statistics, from the same pass."""
  if jax.process_count() > 1:
    raise UserError('Per-example predictions are gathered on one host; run this mode with a '
                    'single process.')
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
    out = jax.device_get(out)
    rows = np.flatnonzero(np.asarray(batch['mask'], bool))
    label = np.asarray(batch['label'])[rows]
    cols['position'].append(offset + rows)
    cols['label'].append(label)
    for k in keys[2:]:
      cols[k].append(ood.energy(np.asarray(out['logits'])[rows]) if k == 'gate'
                     else np.asarray(out[k])[rows])
    if not keep_images:
      return
    if tagged:   # an example's most confident wrong tag decision (-1: none)
      probs = np.asarray(out['probs'])[rows]
      labelled = label > 0.5
      sure = np.where(_decide(probs, thresholds) != labelled, _sureness(probs, labelled),
                      -1.0).max(axis=-1, initial=-1.0)
    else:
      sure = np.where(np.asarray(out['predicted'])[rows] != label,
                      np.asarray(out['p_predicted'])[rows], -1.0)
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
  if not cols['label'] or not sum(map(len, cols['label'])):
    raise UserError(f"The split '{r.split}' is empty; evaluate a split with examples.")
  c = {k: np.concatenate(v) for k, v in cols.items()}
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
