"""``--mode=compare``: is run B better than run A on the same examples, beyond chance?

  python -m imgcls_jax.main --mode=compare --workdir=runs/a --config.compare.workdir=runs/b \\
      [--config.evaluate.split=test] [--config.evaluate.checkpoint=latest] \\
      [--config.evaluate.tta=flip]

Each run's checkpoint (``config.evaluate.checkpoint``, chosen in each run) predicts every example
of the split once, read with its own preprocessing; the examples are paired by position and must
carry the same labels. The comparison: each run's top-1, macro F1 and balanced accuracy; the
differences B - A with paired percentile-bootstrap intervals over the examples
(``intervals.paired_differences``); the 2 x 2 table of right / wrong; and McNemar's exact test of
equal top-1 accuracy (the two-sided binomial test of the examples exactly one run gets right,
``scipy.stats.binomtest``). Two runs that differ only in their seed show what "noise" looks like.
Two tagging runs are compared by mAP, macro F1 at each run's own thresholds and exact match
(``intervals_multilabel``), with the table and McNemar's test on exact match.
Writes ``compare.json`` and ``compare.md`` to ``config.evaluate.output_dir`` (default: the
workdir of A) and prints the table.

Either run may be a classical baseline's folder (``--mode=classical``, or one ``fold_<i>`` of its
cross-validation): its scikit-learn model predicts the split again from the pixels its fit read
(``classical_model``), so "are the learned features better than the classical ones on these
images, beyond chance?" has the same paired answer. It has no checkpoint to choose and no
test-time views (``config.evaluate.tta`` applies to a network only).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import scipy.stats

from imgcls_jax import (atomic, checkpoint_files, classical_model, inference, intervals,
                        intervals_multilabel, metrics, restored_split, run_directory)
from imgcls_jax import outcomes as outcomes_lib
from imgcls_jax.data.info import DatasetInfo
from imgcls_jax.errors import UserError


_TUNED = {'checkpoint': "'best' checkpoint was", 'thresholds': 'tag thresholds were'}
_UNTUNED = {'checkpoint': '--config.evaluate.checkpoint=latest does not pick one',
            'thresholds': 'compare on a split they were not chosen on'}


@dataclasses.dataclass
class Side:
  """One run of the comparison, as the comparison reads it."""
  kind: str                 # 'network', or 'classical' (a --mode=classical fit)
  split: str
  step: int
  chosen: str               # how its checkpoint was chosen (a classical fit: its model file)
  model: str
  tta: str
  info: DatasetInfo
  seed: int
  source: str               # config.data.name it read the split from
  seen: int | None          # examples of the split it trained on (None: not known)
  # chosen on this split: 'checkpoint' (a 'best' one), 'thresholds' (tags): its figures favoured
  tuned: list[str]
  outcomes: outcomes_lib.Outcomes | outcomes_lib.TagOutcomes


def _network(workdir: str, config: Any, e: ml_collections.ConfigDict, split: str,
             overrides: dict[str, Any] | None) -> Side:
  try:
    r = restored_split.restore_for_split(workdir, config, split=split, checkpoint_spec=e.checkpoint,
                                         tta=e.tta or '', overrides=overrides,
                                         step_key='evaluate.checkpoint', split_key='evaluate.split')
    outcomes, _ = outcomes_lib.outcomes_pass(r, e.tta or '')
  except UserError as err:   # which of the two runs
    raise UserError(f'{workdir}: {err}') from None
  return Side(kind='network', split=r.split, step=r.step, chosen=r.chosen,
              model=r.trained.run.model.name,
              tta=e.tta or 'none', info=r.trained.info, seed=int(r.trained.run.seed),
              source=str(r.trained.run.data.name),
              seen=restored_split.seen_examples(r, workdir), outcomes=outcomes,
              tuned=[k for k, v in r.fitted_on.items() if v == r.split and k != 'temperature'])


def _classical(workdir: str, split: str, overrides: dict[str, Any] | None) -> Side:
  """A classical fit's model on ``split`` (``classical_model.score_split``)."""
  try:
    scored = classical_model.score_split(workdir, split, overrides)
  except UserError as err:
    raise UserError(f'{workdir}: {err}') from None
  probs, labels = scored.probabilities().astype(np.float32), scored.labels
  rows, predicted = np.arange(len(labels)), probs.argmax(1)
  outcomes = outcomes_lib.Outcomes(
      position=scored.position, label=labels, predicted=predicted,
      p_predicted=probs[rows, predicted], p_label=probs[rows, labels], images={}, probs=probs)
  return Side(kind='classical', split=scored.split, step=0,
              chosen=f'{classical_model.MODEL_FILE} (fitted once)',
              model=scored.model(), tta='none', info=scored.info,
              seed=int(scored.run.seed), source=str(scored.run.data.name), seen=scored.seen(),
              outcomes=outcomes, tuned=[])


def _labels(o: outcomes_lib.Outcomes | outcomes_lib.TagOutcomes) -> np.ndarray:
  return o.labels if isinstance(o, outcomes_lib.TagOutcomes) else o.label


def _check_pairs(a: Side, b: Side, labels_a: np.ndarray, labels_b: np.ndarray) -> None:
  kinds = ['multi-label' if r.info.multilabel else 'single-label' for r in (a, b)]
  if kinds[0] != kinds[1]:
    raise UserError(f'Run A is a {kinds[0]} run and run B a {kinds[1]} one; compare two runs of '
                    'the same task.')
  names_a, names_b = a.info.class_names, b.info.class_names
  if tuple(names_a) != tuple(names_b):
    raise UserError(f'The two runs have different classes ({len(names_a)}: {list(names_a)[:5]}... '
                    f'vs {len(names_b)}: {list(names_b)[:5]}...); compare runs of one dataset.')
  if len(labels_a) != len(labels_b) or not np.array_equal(labels_a, labels_b) or not (
      np.array_equal(a.outcomes.position, b.outcomes.position)):
    differs = ((labels_a != labels_b).reshape(len(labels_a), -1).any(1)
               | (a.outcomes.position != b.outcomes.position)) if len(
        labels_a) == len(labels_b) else None
    where = (f'{len(labels_a)} vs {len(labels_b)} examples' if differs is None
             else f'they differ from example {int(np.argmax(differs))} on')
    if a.source != b.source:
      raise UserError(f"The two runs do not read the same examples of split '{a.split}' ({where}): "
                      f"A reads config.data.name='{a.source}' and B '{b.source}', and the same "
                      'images from two sources come in other orders; train (or fit) one of them '
                      "again on the other's config.data.name.")
    raise UserError(f"The two runs do not read the same examples of split '{a.split}' ({where}); "
                    'compare runs of the same dataset and split (config.data.* of each run).')


def compare(config: ml_collections.ConfigDict | None, workdir: str,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """The ``compare`` mode: run ``workdir`` (A) against ``config.compare.workdir`` (B)."""
  workdir = os.path.abspath(workdir)
  kinds = {workdir: run_directory.kind(workdir)}
  if kinds[workdir] == 'classical' and config is None:   # its settings: the fit's config
    config = ml_collections.ConfigDict(classical_model.read_meta(workdir)['config'])
  c = inference.mode_settings(workdir, config, overrides, 'compare')
  other = c.get('workdir', '') or ''
  if not other:
    raise UserError('--mode=compare needs the second run: --config.compare.workdir=DIR (the run '
                    'to compare with the one in --workdir).')
  other = os.path.abspath(os.path.expanduser(other))
  if other == workdir:
    raise UserError(f'--config.compare.workdir is --workdir itself ({workdir}); give another run.')
  kinds[other] = run_directory.kind(other)
  for flag, path in (('--workdir', workdir), ('--config.compare.workdir', other)):
    if kinds[path] == 'classical_cv':
      raise UserError(f'{flag}={path} is a cross-validation of the classical baseline, with a '
                      'model per fold; give one of its fold_<i> folders to compare on that '
                      "fold's split, or a classical fit on a hold-out (--mode=classical).")
  if kinds[other] != 'classical':
    try:   # what the folder is, if not a run (a cross-validation, a sweep, an export, ...)
      run_directory.require_checkpoint(other)
      if not checkpoint_files.finished_steps(os.path.join(other, 'checkpoints')):
        raise UserError(f"No finished checkpoint in {os.path.join(other, 'checkpoints')}; point "
                        'it at the run directory of a trained run (or a classical fit).')
    except UserError as err:
      raise UserError(f'--config.compare.workdir={other} holds no checkpoint to compare: '
                      + str(err).replace('--workdir', '--config.compare.workdir')) from None
  e = inference.mode_settings(workdir, config, overrides, 'evaluate')
  level, resamples = intervals.settings(e, 1, '--mode=compare bootstraps the differences: ')
  # B's data may have moved with A's: the location flags given for A apply to B too.
  b_overrides = {k: v for k, v in (overrides or {}).items()
                 if not k.startswith(('compare.', 'evaluate.'))}
  ra = (_classical(workdir, e.split or '', overrides) if kinds[workdir] == 'classical'
        else _network(workdir, config, e, e.split or '', overrides))
  rb = (_classical(other, ra.split, b_overrides) if kinds[other] == 'classical'
        else _network(other, None, e, ra.split, b_overrides))
  oa, ob = ra.outcomes, rb.outcomes
  labels = _labels(oa)
  _check_pairs(ra, rb, labels, _labels(ob))
  for tag, r in (('A', ra), ('B', rb)):
    if r.seen:
      logging.warning("Run %s trained on %d examples of split '%s': its score there is on images "
                      'it learnt, so the comparison favours it; compare on a split neither run '
                      'trained on (--config.evaluate.split=...).', tag, r.seen, ra.split)
    for what in r.tuned:
      logging.warning("Run %s's %s chosen on split '%s': its figures there are favoured; %s.",
                      tag, _TUNED[what], ra.split, _UNTUNED[what])
  if len(labels) < 2:
    raise UserError(f"The split '{ra.split}' has {len(labels)} example; compare the runs on a "
                    'split of at least 2.')
  if isinstance(oa, outcomes_lib.TagOutcomes):
    too_much = intervals_multilabel.too_much_work(len(labels), labels.shape[1], resamples, 2)
    if too_much:
      raise UserError(too_much.replace('are skipped', 'would take too long'))
    point = [intervals_multilabel.point_metrics(o.labels, o.probs, o.thresholds) for o in (oa, ob)]
    names = intervals_multilabel.METRICS
    diffs = intervals_multilabel.paired_differences(
        labels, oa.probs, oa.thresholds, ob.probs, ob.thresholds, level=level,
        resamples=resamples, seed=ra.seed)
    hit_a, hit_b = (np.all(o.predicted == o.labels, axis=1) for o in (oa, ob))
    task, judged = 'multilabel', 'exact match'   # the whole tag set right
  else:
    k = ra.info.num_classes
    m = intervals.confusion_metrics(np.stack([
        np.bincount(labels * k + o.predicted, minlength=k * k).reshape(k, k) for o in (oa, ob)]))
    names = ('accuracy', 'f1_macro', 'balanced_accuracy')
    point = [{n: float(m[j, i]) for j, n in enumerate(names)} for i in range(2)]
    diffs = intervals.paired_differences(labels, oa.predicted, ob.predicted, k, level=level,
                                         resamples=resamples, seed=ra.seed)
    hit_a, hit_b = oa.predicted == labels, ob.predicted == labels
    task, judged = 'single-label', 'top-1'
  only_a, only_b = int(np.sum(hit_a & ~hit_b)), int(np.sum(~hit_a & hit_b))
  result = {
      'task': task, 'split': ra.split, 'examples': int(len(labels)),
      'tta': (e.tta or 'none') if 'network' in (ra.kind, rb.kind) else 'none',
      'level': level,
      'runs': {tag: {'workdir': path, 'checkpoint_step': r.step, 'checkpoint': r.chosen,
                     'kind': r.kind, 'model': r.model, 'tta': r.tta,
                     # examples of the split it trained on (None: not known)
                     'trained_on_split': r.seen, 'tuned_on_split': r.tuned, **point[i]}
               for i, (tag, r, path) in enumerate((('A', ra, workdir), ('B', rb, other)))},
      'difference_b_minus_a': {n: {'value': point[1][n] - point[0][n], 'interval': diffs[n]}
                               for n in names},
      'right_or_wrong': judged,
      'table': {'both_right': int(np.sum(hit_a & hit_b)), 'only_a_right': only_a,
                'only_b_right': only_b, 'both_wrong': int(np.sum(~hit_a & ~hit_b))},
      'mcnemar_exact_p': (float(scipy.stats.binomtest(only_a, only_a + only_b).pvalue)
                          if only_a + only_b else 1.0),
      'method': f'paired percentile bootstrap over the examples, {resamples} resamples; McNemar: '
                'two-sided exact binomial test of the examples exactly one run gets right '
                + ('(its whole tag set)' if task == 'multilabel' else '(top-1)'),
  }
  if jax.process_index() == 0:
    out_dir = os.path.abspath(e.output_dir or workdir)
    os.makedirs(out_dir, exist_ok=True)
    atomic.write_atomic(os.path.join(out_dir, 'compare.json'),
                        json.dumps(metrics.json_safe(result), indent=2))
    lines = summary_lines(result)
    atomic.write_atomic(os.path.join(out_dir, 'compare.md'),
                        '# Comparison\n\n' + '\n'.join(f'    {line}' for line in lines) + '\n')
    print('\n'.join(lines + [f"Written: {os.path.join(out_dir, 'compare.json')} (+ compare.md)"]),
          flush=True)
  return result


def summary_lines(result: dict[str, Any]) -> list[str]:
  """The printed table (also the body of compare.md)."""
  a, b = result['runs']['A'], result['runs']['B']
  pct = 100 * result['level']
  mixed = a.get('tta', result['tta']) != b.get('tta', result['tta'])   # a classical run: none

  def which(r: dict[str, Any]) -> str:
    if r.get('kind') == 'classical':
      return f"{r['model']}, {r['checkpoint']}"
    return f"step {r['checkpoint_step']}, {r['checkpoint']}" + (f", TTA {r['tta']}" if mixed
                                                                 else '')
  tta = 'per run' if mixed else result['tta']
  out = [f"Split '{result['split']}', {result['examples']} examples, TTA {tta}",
         f"A: {a['workdir']} ({which(a)})", f"B: {b['workdir']} ({which(b)})",
         f"{'metric':<18} {'A':>8} {'B':>8} {'B - A':>8}  {pct:g}% interval of B - A"]
  shown = ((('map', 'mAP'), ('f1_macro', 'macro F1'), ('exact_match', 'exact match'))
           if result.get('task') == 'multilabel' else
           (('accuracy', 'top-1'), ('f1_macro', 'macro F1'),
            ('balanced_accuracy', 'balanced accuracy')))
  for name, label in shown:
    d = result['difference_b_minus_a'][name]
    out.append(f"{label:<18} {100 * a[name]:7.2f}% {100 * b[name]:7.2f}% {100 * d['value']:+7.2f}"
               f"  [{100 * d['interval'][0]:+.2f}, {100 * d['interval'][1]:+.2f}]")
  for tag in ('A', 'B'):
    n = result['runs'][tag].get('trained_on_split')
    if n:
      out.append(f'Note: {tag} trained on {n} of these examples: its score here is not on new '
                 'images.')
    for what in result['runs'][tag].get('tuned_on_split') or ():
      out.append(f"Note: {tag}'s {_TUNED[what]} chosen on this split: its score here is favoured "
                 f'({_UNTUNED[what]}).')
  t, judged = result['table'], result.get('right_or_wrong', 'top-1')
  out += [f"right / wrong ({judged}): both right {t['both_right']}, only A {t['only_a_right']}, "
          f"only B {t['only_b_right']}, both wrong {t['both_wrong']}",
          f"McNemar's exact test of equal {judged}: "
          f"p = {result['mcnemar_exact_p']:.4g}"]
  return out
