"""Evaluation of a trained run's checkpoint (the run layer under ``--mode=evaluate``, k-fold
cross-validation and sweeps): the step chosen and restored on the mesh
(``restored_split.py``), then the report's statistics summed over a split
(``evaluate_checkpoint``) and / or its per-example predictions gathered (``outcomes.py``).
No TensorFlow at import.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import ml_collections
import numpy as np

from imgcls_jax import configlib, inference, label_issues, ood, report, restored_split, run
from imgcls_jax import outcomes as outcomes_lib
from imgcls_jax.data import reader


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
  # per example (evaluate_checkpoint's keep_errors)
  outcomes: outcomes_lib.Outcomes | outcomes_lib.TagOutcomes | None = None
  ood: dict[str, Any] | None = None   # outcomes.ood_pass of evaluate_checkpoint's ood_files
  # With keep_probs: True when the model trained on none of these examples (other images, or a
  # split sharing none with the training split), False when it trained on some, None: unknown.
  unseen: bool | None = None
  # With count_copies: files of the split holding a training file's bytes (None: not known).
  copies: int | None = None
  # With keep_probs or count_copies: examples of the split the run trained on (None: not known).
  seen: int | None = None
  # (file, why) of the split's files an image folder's index passed over (unreadable, ...).
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  # What was chosen or fitted on this very split: 'checkpoint' ('best'), 'temperature', ...
  tuned_here: list[str] = dataclasses.field(default_factory=list)
  # What was fitted where: 'thresholds' / 'temperature' / 'checkpoint' -> split (Restored's)
  fitted_on: dict[str, str] = dataclasses.field(default_factory=dict)

  def report(self, top_confused: int = 10) -> dict[str, Any]:
    """The full report (``report.summarize``) with what was evaluated as its ``context``."""
    info, cfg = self.trained.info, self.trained.run
    rep = report.summarize(self.stats, info.class_names, top_confused=top_confused,
                           thresholds=self.trained.thresholds,
                           min_confidence=self.trained.min_confidence or None)
    chosen = self.chosen
    if info.multilabel:   # a tagging run's eval 'accuracy' is the exact match at its thresholds
      chosen = chosen.replace('eval accuracy', 'eval exact match (accuracy)')
    rep['context'] = {'dataset': self.dataset or info.name, 'split': self.split,
                      'checkpoint_step': self.step, 'checkpoint': chosen,
                      'tta': self.tta or 'none',
                      'model': cfg.model.name, 'workdir': self.workdir}
    if not info.multilabel:   # (tags are independent sigmoids: no temperature)
      rep['context']['temperature'] = self.trained.temperature
    elif self.trained.thresholds is not None:
      where = self.fitted_on.get('thresholds')
      rep['thresholds_source'] = (f"fitted per tag (best F1) on split '{where}'" if where else
                                  "the run's own, saved with its checkpoint")
    if self.seen is not None:   # how many of num_examples it learnt (compare's trained_on_split)
      rep['trained_on_split'] = self.seen
    if self.tuned_here:
      rep['tuned_on_split'] = list(self.tuned_here)
    if self.skipped:
      rep['skipped_files'] = {'count': len(self.skipped),
                              'first': [{'file': f, 'why': why}
                                        for f, why in self.skipped[:SKIPPED_LISTED]]}
    if self.ood is not None:
      split_scores = None
      if isinstance(self.outcomes, outcomes_lib.Outcomes) and self.outcomes.scores is not None:
        split_scores = {'msp': self.outcomes.p_predicted, **self.outcomes.scores}
      rep['out_of_distribution'] = {
          **ood.summary(self.stats['sel_right'], self.stats['sel_wrong'], self.ood['histogram'],
                        self.trained.min_confidence or None, split_scores, self.ood['scores'],
                        gate_record=self.trained.unknown, tta=self.tta),
          'inputs': self.ood['inputs'], 'skipped': self.ood['skipped']}
    return rep


SKIPPED_LISTED = 10   # skipped files named in report.json (report.md: the first 3)
# A tagging split's N x K probabilities kept on the host for the listing and the intervals
# (~22 bytes a cell with the bootstrap's 0/1 matrices and sort orders: ~1.1 GB at the cap).
MAX_TAG_CELLS = 50_000_000


def evaluate_checkpoint(workdir: str, config: ml_collections.ConfigDict | None, *, split: str = '',
                        checkpoint_spec: str = 'latest', tta: str = '',
                        num_bins: int = report.DEFAULT_CALIBRATION_BINS,
                        overrides: dict[str, Any] | None = None,
                        keep_errors: int | None = None,
                        ood_files: list[str] | None = None,
                        keep_probs: bool = False, step_key: str = '',
                        split_key: str = '', count_copies: bool = False) -> Evaluation:
  """Evaluates one checkpoint of ``workdir`` on ``split`` ('' = the run's eval split), every
  example exactly once, on the mesh with the run's parameter placement. With ``keep_errors`` the
  same pass also gathers every example's ``outcomes.Outcomes`` (several processes: in process
  order), with the images of that many of the most confident errors (``keep_probs``: with every
  class's probability, e.g. for k-fold's label-issue search; a tagging run's outcomes always have
  them); with ``ood_files`` (single-label; several processes: each scores its part), those images
  are scored too (``outcomes.ood_pass``), and the split's per-example scores kept to compare with
  theirs.
  ``step_key`` / ``split_key``: as ``restored_split.restore_for_split``; ``count_copies``: count the
  split's files that hold a training file's bytes (``restored_split.training_copies``) and its
  examples the run trained on (``restored_split.seen_examples``; also with ``keep_probs``)."""
  num_bins = configlib.calibration_bins(num_bins)
  r = restored_split.restore_for_split(workdir, config, split=split,
                                       checkpoint_spec=checkpoint_spec, tta=tta,
                                       overrides=overrides, step_key=step_key,
                                       split_key=split_key)
  tuned_here = [what for what, fit_split in r.fitted_on.items() if fit_split == r.split]
  for what in tuned_here:
    if what == 'checkpoint':
      logging.warning("Split '%s' is the one the 'best' checkpoint (%s) was picked on among the "
                      "run's evaluations: its figures here are optimistic; evaluate another "
                      'split, or set --config.evaluate.checkpoint=latest, for what new images '
                      'get.', r.split, r.chosen)
      continue
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
    outcomes, stats = outcomes_lib.outcomes_pass(r, tta, keep_images=keep_errors,
                                                 num_bins=num_bins, keep_probs=keep_probs,
                                                 keep_scores=bool(ood_files))
  else:
    eval_step = run.jit_eval_step(r.setup, r.shardings, tta=tta, num_bins=num_bins)
    stats = report.stats_to_numpy(run.eval_sums(eval_step, r.variables, r.data.batches(),
                                                r.setup.mesh, r.split))
  ood_result = outcomes_lib.ood_pass(r, ood_files, tta, num_bins) if ood_files else None
  unseen = shared = None
  if keep_probs or count_copies:   # other images: compared by path with a folder run's files
    shared = restored_split.seen_examples(r, workdir)
    unseen = None if shared is None else shared == 0
  copies = restored_split.training_copies(r, workdir) if count_copies else None
  return Evaluation(stats=stats, trained=r.trained, split=r.split, step=r.step, chosen=r.chosen,
                    tta=tta, workdir=os.path.abspath(workdir),
                    dataset=reader.dataset_name(r.trained.run.data), outcomes=outcomes,
                    ood=ood_result, unseen=unseen, copies=copies, seen=shared,
                    skipped=restored_split.skipped_files(r), tuned_here=tuned_here,
                    fitted_on=dict(r.fitted_on))
