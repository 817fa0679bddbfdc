"""``--mode=evaluate``: restore a checkpoint, evaluate a split exactly once, write the report.

  python -m imgcls_jax.main --mode=evaluate --workdir=DIR \\
      [--config.evaluate.checkpoint=best|latest|STEP] [--config.evaluate.split=test] \\
      [--config.evaluate.tta=flip]

The model and dataset come from the run in ``--workdir``. Writes to ``config.evaluate.output_dir``
(default: the workdir; ``<fold>/evaluate`` for a fold of a cross-validation, whose own report
stays the cross-validation's) ``report.json``, ``report.md``, ``confusion_matrix.csv``,
``confusion_matrix.png``, ``reliability.png``, ``errors.csv`` (every wrongly predicted example,
the most confident first: likely label mistakes or hard cases; a multi-label run lists every
wrong tag decision, missed or extra, instead) with ``errors.png`` (the first
``config.evaluate.errors`` examples as the model saw them), ``label_issues.csv`` and
``label_issues.png`` (a split the model did not train on: the examples whose label
looks wrong, by cleanlab's confident learning, ``label_issues.py``; for a tagging run, which tags
look missing or extra) and,
from the run's ``metrics.jsonl``, ``training_curves.png``; prints a short table.
``--mode=curves`` draws only the training curves (fine while the run is still going).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from imgcls_jax import (evaluation, inference, intervals, intervals_multilabel, label_issues,
                        metrics, plots, report_files, report_text, run_directory)
from imgcls_jax import outcomes as outcomes_lib
from imgcls_jax.data import folder_layout, images, reader
from imgcls_jax.errors import UserError


MAX_SHOWN = 100   # errors.png tiles (a grid of thousands is a picture nobody can open)


def evaluate(config: ml_collections.ConfigDict | None, workdir: str,
             overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """The ``evaluate`` mode: ``config.evaluate`` picks checkpoint, split, TTA and output dir."""
  workdir = os.path.abspath(workdir)
  if run_directory.kind(workdir) == 'classical':
    return _evaluate_classical(config, workdir, overrides)
  e = inference.mode_settings(workdir, config, overrides, 'evaluate')  # the run's, plus flags
  level, resamples = intervals.settings(e)
  shown = int(e.get('errors', 0) or 0)
  if not 0 <= shown <= MAX_SHOWN:
    raise UserError(f'config.evaluate.errors={shown} must be between 0 and {MAX_SHOWN} (the most '
                    'confident errors shown in errors.png; errors.csv lists them all; 0 = no '
                    'per-example listing).')
  # A tagging run's bootstrap intervals need every example's probabilities (single-label ones
  # come from the confusion matrix): the same per-example pass as the errors listing.
  tagged = bool(((run_directory.read_config(workdir) or {}).get('data') or {}).get('multilabel'))
  per_example = bool(shown or (tagged and resamples > 0))
  issues = bool(e.get('label_issues', True))
  if issues and importlib.util.find_spec('cleanlab') is None:
    logging.warning('No label-issue search (config.evaluate.label_issues): cleanlab is not '
                    'installed; run pip install -e . in the checkout, or set '
                    '--config.evaluate.label_issues=False.')
    issues = False
  ood_files = None
  if e.get('ood_inputs'):   # (several processes: each scores its part, outcomes.ood_pass)
    if tagged:
      raise UserError(outcomes_lib.OOD_MULTILABEL)
    ood_files = images.list_inputs(e.ood_inputs, 'evaluate.ood_inputs')
  if e.output_dir and os.path.exists(e.output_dir) and not os.path.isdir(e.output_dir):
    raise UserError(f'config.evaluate.output_dir={e.output_dir} is a file; give a folder for the '
                    'report (it is made if missing).')
  out_dir = os.path.abspath(e.output_dir or _default_output(workdir))
  saved = run_directory.read_config(workdir)   # (none: restoring says what is missing)
  data = (inference.effective_config(saved, config, overrides).data if saved else
          config.data if config is not None else None)
  report_files.check_output(out_dir, data, _names(tagged, shown, issues, workdir))
  ev = evaluation.evaluate_checkpoint(workdir, config, split=e.split,
                                      checkpoint_spec=e.checkpoint, tta=e.tta or '',
                                      num_bins=int(e.calibration_bins), overrides=overrides,
                                      keep_errors=shown if per_example else None,
                                      ood_files=ood_files, keep_probs=issues,
                                      step_key='evaluate.checkpoint', split_key='evaluate.split',
                                      count_copies=jax.process_index() == 0)
  cfg, info = ev.trained.run, ev.trained.info
  rep = ev.report(int(e.top_confused))
  if ev.seen:
    logging.warning('%s', report_text.trained_on_note(ev.seen, rep['num_examples'], ev.split))
  if ev.copies:
    rep['copies_of_training_images'] = ev.copies
    logging.warning('%s', report_text.copies_note(ev.copies, rep['num_examples'], ev.split))
  if info.multilabel:
    rep['intervals'] = intervals_multilabel.report_intervals(
        int(ev.stats['ml_exact_thr']), int(ev.stats['ml_count']),
        ev.outcomes, level=level, resamples=resamples, seed=cfg.seed)
  else:
    rep['intervals'] = intervals.report_intervals(
        np.asarray(rep['confusion_matrix']), level=level, resamples=resamples, seed=cfg.seed)
  if jax.process_index() == 0:
    title = f"Evaluation of {cfg.model.name} on {ev.dataset or info.name} '{ev.split}'"
    ids = _split_ids(ev) if ev.outcomes is not None and (shown or issues) else []
    errors = _errors(ev, ids) if ev.outcomes is not None and shown else None
    if errors is not None:
      rep['errors'] = {'count': len(errors.rows), 'most_confident': errors.rows[:10]}
    if issues:
      try:
        found = _label_issues(ev, ids, out_dir)
      except Exception as err:   # noqa: BLE001 -- the report must not be lost to this step
        logging.warning('The label-issue search failed (%s: %s); the report is written without '
                        'it.', type(err).__name__, err)
        found = None
      if found is not None:
        rep['label_issues'] = found
    written = report_files.write(rep, out_dir, title, os.path.join(workdir, 'metrics.jsonl'),
                                 errors=errors)
    print('\n'.join(report_files.table_lines(rep, title, out_dir, written)), flush=True)
  return rep


def _evaluate_classical(config: ml_collections.ConfigDict | None, workdir: str,
                        overrides: dict[str, Any] | None) -> dict[str, Any]:
  """A classical fit's folder (``--mode=classical``, or one fold of its cross-validation): its
  scikit-learn model scores ``config.evaluate.split`` (or another labelled folder or manifest:
  ``--config.data.folder`` / ``manifest``), and the report files of its fit, with the confidence
  intervals, go to ``config.evaluate.output_dir`` (default ``<workdir>/evaluate``: the fit's own
  report.md stays its record). No per-image listing or label issues, as in the fit's report."""
  from imgcls_jax import classical_model   # scikit-image and scikit-learn: not for networks
  meta = classical_model.read_meta(workdir)
  e = inference.mode_settings(
      workdir, config if config is not None else ml_collections.ConfigDict(meta['config']),
      overrides, 'evaluate')
  for key, what in (('tta', 'test-time views'), ('ood_inputs', 'out-of-distribution scores')):
    if e.get(key):
      raise UserError(f'config.evaluate.{key} needs a network, and --workdir={workdir} is a '
                      f'classical baseline, which has no {what} here: drop it.')
  if 'evaluate.checkpoint' in (overrides or {}):
    logging.warning('A classical baseline has one fitted model: config.evaluate.checkpoint is '
                    'not read.')
  level, resamples = intervals.settings(e)
  out_dir = os.path.abspath(e.output_dir or os.path.join(workdir, 'evaluate'))
  report_files.check_output(out_dir, classical_model.run_config(meta, overrides, workdir).data,
                            set(report_files.REPORT_FILES))
  scored = classical_model.score_split(workdir, e.split or '', overrides)
  rep, _ = classical_model.report_of(scored.scores, scored.labels, list(scored.info.class_names),
                                     num_bins=int(e.calibration_bins),
                                     top_confused=int(e.top_confused))
  rep['intervals'] = intervals.report_intervals(
      np.asarray(rep['confusion_matrix']), level=level, resamples=resamples,
      seed=int(scored.run.seed))
  dataset = str(scored.run.data.name)
  rep['context'] = {'dataset': dataset, 'split': scored.split, 'checkpoint_step': 0,
                    'checkpoint': f'{classical_model.MODEL_FILE} (fitted once)', 'tta': 'none',
                    'model': scored.model(), 'probabilities': meta.get('probabilities', ''),
                    'train_split': scored.run.data.train_split, 'workdir': workdir}
  seen = scored.seen()
  if seen is not None:
    rep['trained_on_split'] = seen
  if seen:
    logging.warning('%s', report_text.trained_on_note(seen, rep['num_examples'], scored.split))
  if jax.process_index() == 0:
    title = f"Evaluation of the classical baseline on {dataset} '{scored.split}'"
    written = report_files.write(rep, out_dir, title, None)
    print('\n'.join(report_files.table_lines(rep, title, out_dir, written)), flush=True)
  return rep


def _default_output(workdir: str) -> str:
  """The workdir; for a fold of a cross-validation, ``<fold>/evaluate``: its ``report.md`` is the
  cross-validation's record of the fold (``cv_report.md`` links it) and stays as it was."""
  parent = os.path.dirname(workdir)
  if (os.path.basename(workdir).startswith('fold_')
      and run_directory.kind(parent) == 'cross_validation'):
    out = os.path.join(workdir, 'evaluate')
    logging.info('%s is a fold of the cross-validation in %s, whose record is the fold\'s '
                 'report; this evaluation is written to %s (config.evaluate.output_dir sets '
                 'another folder).', os.path.basename(workdir), parent, out)
    return out
  return workdir


def _names(tagged: bool, shown: int, issues: bool, workdir: str) -> set[str]:
  """The file names this evaluation may write (``report_files.write``'s, for its checks)."""
  names = set(report_files.MULTILABEL_REPORT_FILES if tagged else report_files.REPORT_FILES)
  if shown:
    names.update(report_files.ERROR_FILES)
  if issues:
    names.update(report_files.ISSUE_FILES)
  if os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    names.add(report_files.CURVES_FILE)
  return names


def _split_ids(ev: evaluation.Evaluation) -> list[str]:
  """The ids of ``ev``'s split in read order (image paths, tfds ids; an arrays file's: none, so
  its examples are named by position), read once for every per-example listing."""
  o = ev.outcomes
  ids = reader.example_ids(ev.trained.run.data, ev.split, ev.trained.info)
  if ids and len(ids) <= int(o.position.max(initial=-1)):
    logging.warning("The ids of split '%s' (%d) do not cover its %d rows read; the per-example "
                    'lists give positions only.', ev.split, len(ids), int(o.position.max()) + 1)
    return []
  return ids


def _errors(ev: evaluation.Evaluation, ids: list[str]) -> report_files.Errors:
  """The wrongly predicted examples of ``ev`` (multi-label: the wrong tag decisions), the most
  confident first, named by their ``ids`` (``_split_ids``) and class names."""
  o, info = ev.outcomes, ev.trained.info
  if isinstance(o, outcomes_lib.TagOutcomes):
    return _tag_errors(o, ids, info.class_names)
  names = info.class_names
  rows, images = [], []
  for rank, i in enumerate(o.errors(), 1):
    pos = int(o.position[i])
    rows.append({'rank': rank, 'position': pos, 'id': ids[pos] if ids else '',
                 'label': names[o.label[i]], 'predicted': names[o.predicted[i]],
                 'p_predicted': float(o.p_predicted[i]), 'p_label': float(o.p_label[i])})
    if pos in o.images:
      images.append((o.images[pos], f"#{rank} {names[o.label[i]]} -> {names[o.predicted[i]]} "
                                    f"({float(o.p_predicted[i]):.2f})"))
  return report_files.Errors(rows=rows, images=images)


def _label_issues(ev: evaluation.Evaluation, ids: list[str],
                  out_dir: str) -> dict[str, Any] | None:
  """The likely label issues of ``ev``'s split (``label_issues.py``; ``ids``: ``_split_ids``),
  written to ``out_dir``; None, with the reason logged, when the search cannot be trusted."""
  o = ev.outcomes
  if o is None or getattr(o, 'probs', None) is None:
    return None
  if not ev.unseen:
    logging.info("No label-issue search on split '%s': the model %s, and its probabilities of "
                 'examples it learnt flag nothing useful; evaluate a held-out split.', ev.split,
                 'trained on some of its examples' if ev.unseen is False else
                 'may have trained on its examples (their overlap with the training split is '
                 'unknown)')
    return None
  if not isinstance(o, outcomes_lib.TagOutcomes) and len(np.unique(o.label)) < 2:
    logging.info("No label-issue search on split '%s': all its examples are labelled %s, and "
                 'confident learning needs examples of 2 classes or more.', ev.split,
                 ev.trained.info.class_names[int(o.label[0])] if len(o.label) else 'nothing')
    return None
  info, data = ev.trained.info, ev.trained.run.data
  if ids and folder_layout.is_folder(data):   # every flagged image, from its file
    load = label_issues.file_loader(folder_layout.source_of(data).root, info.channels)
  else:   # the flagged ones among the most confident errors the pass kept, as the model saw them
    load = lambda r: o.images.get(r['position'])   # noqa: E731
  labels = o.labels if isinstance(o, outcomes_lib.TagOutcomes) else o.label
  return label_issues.search(labels, o.probs, ids=[ids[p] for p in o.position.tolist()]
                             if ids else [], class_names=info.class_names, out_dir=out_dir,
                             split=ev.split, load=load, positions=o.position,
                             copies=ev.copies or 0)[1]


def _tag_errors(o: outcomes_lib.TagOutcomes, ids: list[str],
                names: tuple[str, ...] | list[str]) -> report_files.Errors:
  """One row per wrong tag decision; one image per example, captioned with its most confident
  wrong decision (and how many more it has)."""
  predicted = o.predicted
  examples, classes = o.errors()
  tag_sets: dict[int, tuple[str, str]] = {}   # example -> its labelled and predicted tags, joined
  rows: list[dict[str, Any]] = []
  first: dict[int, tuple[int, str]] = {}   # example -> (its top error's rank, caption)
  count: dict[int, int] = {}
  for rank, (i, k) in enumerate(zip(examples.tolist(), classes.tolist()), 1):
    pos, p = int(o.position[i]), float(o.probs[i, k])
    error = 'missed' if o.labels[i, k] else 'extra'
    if i not in tag_sets:
      tag_sets[i] = tuple(';'.join(names[j] for j in np.flatnonzero(row))
                          for row in (o.labels[i], predicted[i]))
    rows.append({'rank': rank, 'position': pos, 'id': ids[pos] if ids else '',
                 'tag': names[k], 'error': error, 'p_tag': p,
                 'threshold': float(o.thresholds[k]),
                 'labels': tag_sets[i][0], 'predicted': tag_sets[i][1]})
    count[i] = count.get(i, 0) + 1
    if i not in first and pos in o.images:
      first[i] = (rank, f'#{rank} {error} {names[k]} ({p:.2f})')
  images = []
  for i, (rank, caption) in sorted(first.items(), key=lambda kv: kv[1][0]):
    more = f' +{count[i] - 1}' if count[i] > 1 else ''
    images.append((o.images[int(o.position[i])], caption + more))
  return report_files.Errors(rows=rows, images=images, columns=report_files.TAG_ERROR_COLUMNS)


def curves(config: ml_collections.ConfigDict | None, workdir: str,
           overrides: dict[str, Any] | None = None) -> str:
  """The ``curves`` mode: ``training_curves.png`` from the run's metrics.jsonl (running or not)."""
  del overrides
  workdir = os.path.abspath(workdir)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  records = metrics.read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
  if not records:
    raise UserError(f'No metrics in {metrics_path}; point --workdir at a run that has logged '
                    'training metrics.')
  out_dir = os.path.abspath((config.evaluate.output_dir if config is not None else '') or workdir)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, report_files.CURVES_FILE)
  plots.training_curves(records, path, title=f'Training curves: {os.path.basename(workdir)}')
  print(f'Training curves ({len(records)} records): {path}', flush=True)
  return path
