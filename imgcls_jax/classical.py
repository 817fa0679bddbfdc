"""``--mode=classical``: the traditional-features baseline through the same harness as the CNN.

  python -m imgcls_jax.main --mode=classical --config=configs/digits_classical.py --workdir=DIR

Extracts scikit-image features (``features.py``: HOG, LBP texture histograms, intensity / colour
histograms, Canny edge density; ``config.classical``) from ``config.data.train_split``,
standardises them and fits a scikit-learn linear classifier (multinomial logistic regression, or a
linear SVM), then evaluates ``config.data.eval_split`` and writes the report files of
``--mode=evaluate`` (report.json / .md with the confidence intervals, confusion_matrix.csv / .png,
reliability.png; there are no training curves), computed by the same ``report`` and ``intervals``
code from the classifier's log-probabilities. A linear SVM's margins are no probabilities: its
probabilities are Platt-scaled (``sklearn.calibration.CalibratedClassifierCV``, sigmoid,
``ensemble=False``: the SVM fitted on all the training data, its margins mapped by sigmoids fitted
on cross-validated margins of the training split), so the loss, ECE, reliability and selective
thresholds of its report mean what they mean for the network's. Works on tfds datasets and image
folders alike (the eval stream of ``data/pipeline.py`` reads them, after ``data.eval_preprocess``).

With ``config.cross_validation.folds = K > 0`` it runs K-fold cross-validation on the very folds
the CNN's cross-validation uses (``data/folds.py``: folds of ``data.train_split``, with
``data.eval_split`` unread as in the CNN's; same split, K and seed give the same ids, written to
``fold_<i>/{train,eval}_ids.txt``), writes each fold's report in ``fold_<i>/`` and the
summary ``cv_report.json`` / ``cv_report.md`` (same keys as the CNN's) plus the pooled out-of-fold
plots and, from the pooled out-of-fold probabilities, the likely label issues
(``label_issues.py``: ``cv_label_issues.csv``, as the CNN's cross-validation writes it).

A mode rather than ``model.name = 'classical'``: the model table holds ``nnx.Module`` families
trained by the jitted step; this baseline has no parameters for the optimizer, checkpoints or the
step, so it is a different thing to do with a config, not a different model.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any

import ml_collections
import numpy as np

from imgcls_jax import (atomic, classical_model, configlib, features, intervals, label_issues,
                        metrics, out_of_fold, plots, report, report_files, report_text)
from imgcls_jax.errors import UserError

CLASSIFIERS = ('logistic', 'linear_svm')
CALIBRATION_FOLDS = 5   # linear_svm: the folds whose held-out margins fit its Platt sigmoids


def make_classifier(classical: ml_collections.ConfigDict, labels_N: np.ndarray | None = None
                    ) -> Any:
  """StandardScaler -> LogisticRegression, or StandardScaler -> LinearSVC Platt-scaled by
  ``CalibratedClassifierCV`` on ``CALIBRATION_FOLDS`` folds of the training ``labels_N`` (without
  them, the bare SVM pipeline: only the settings are checked)."""
  from sklearn.calibration import CalibratedClassifierCV
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  from sklearn.svm import LinearSVC
  name, c = classical.classifier, float(classical.C)
  if name not in CLASSIFIERS:
    raise UserError(f"config.classical.classifier='{name}' must be one of "
                    f"{', '.join(CLASSIFIERS)}.")
  if c <= 0:
    raise UserError(f'config.classical.C={c} must be positive.')
  if name == 'logistic':
    return make_pipeline(StandardScaler(),
                         LogisticRegression(C=c, max_iter=int(classical.max_iter)))
  svm = make_pipeline(StandardScaler(), LinearSVC(C=c, max_iter=int(classical.max_iter)))
  if labels_N is None:
    return svm
  counts = np.bincount(np.asarray(labels_N, np.int64))
  fewest = int(counts[counts > 0].min()) if len(labels_N) else 0
  if fewest < 2:
    raise UserError("config.classical.classifier='linear_svm' calibrates its margins on "
                    f'cross-validation folds, and a class has {fewest} training image; give every '
                    "class 2 or more, or use config.classical.classifier='logistic'.")
  return CalibratedClassifierCV(svm, method='sigmoid', cv=min(CALIBRATION_FOLDS, fewest),
                                ensemble=False)


def probabilities_note(classical: ml_collections.ConfigDict) -> str:
  """Where the report's probabilities come from (``report.json``'s ``context.probabilities``)."""
  if classical.classifier == 'logistic':
    return "the logistic regression's own (multinomial)"
  return ('Platt scaling of the linear SVM margins (sigmoid per class, normalised), fitted on '
          'cross-validated margins of the training split (sklearn CalibratedClassifierCV, '
          f'ensemble=False, up to {CALIBRATION_FOLDS} folds)')


def fit_and_evaluate(config: ml_collections.ConfigDict, out_dir: str, title: str
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Fits on ``data.train_split``, evaluates ``data.eval_split``, writes the report files and the
  fitted model to ``out_dir``; returns (report, summed statistics, the evaluated examples:
  ``position`` in the split's read order, ``label``, ``probs``, the softmax of the class scores
  as the report reads them)."""
  from imgcls_jax import inference
  from imgcls_jax.data import reader
  import joblib
  make_classifier(config.classical)  # bad settings fail before any work
  level, resamples = intervals.settings(config.evaluate)
  info = reader.describe(config.data)
  spec = features.spec_from_config(config.classical)
  workers = int(config.classical.workers)
  t0 = time.perf_counter()
  x_train, y_train, _ = features.split_arrays(config.data, config.data.train_split)
  t_read = time.perf_counter()
  f_train = features.extract(x_train, spec, workers=workers)
  t_feat = time.perf_counter()
  fitted = make_classifier(config.classical, y_train)
  fitted.fit(f_train, y_train)
  t_fit = time.perf_counter()
  x_eval, y_eval, position = features.split_arrays(config.data, config.data.eval_split)
  scores = classical_model.class_scores(fitted, features.extract(x_eval, spec, workers=workers),
                                        info.num_classes)
  t_eval = time.perf_counter()
  rep, stats = classical_model.report_of(scores, y_eval, list(info.class_names),
                                         num_bins=int(config.evaluate.calibration_bins),
                                         top_confused=int(config.evaluate.top_confused))
  rep['intervals'] = intervals.report_intervals(  # as --mode=evaluate's
      np.asarray(rep['confusion_matrix']), level=level, resamples=resamples, seed=int(config.seed))
  timing = {'read_train_s': t_read - t0, 'features_train_s': t_feat - t_read,
            'fit_s': t_fit - t_feat, 'train_s': t_fit - t0, 'evaluate_s': t_eval - t_fit}
  rep['context'] = {'dataset': info.name, 'split': config.data.eval_split,
                    'checkpoint_step': 0,
                    'checkpoint': f'{classical_model.MODEL_FILE} (fitted once)',
                    'tta': 'none', 'model': classical_model.describe(config, f_train.shape[1]),
                    'probabilities': probabilities_note(config.classical),
                    'train_split': config.data.train_split, 'train_examples': len(y_train),
                    'workdir': out_dir, **{k: round(v, 3) for k, v in timing.items()}}
  report_files.write(rep, out_dir, title, None)
  joblib.dump(fitted, os.path.join(out_dir, classical_model.MODEL_FILE))
  atomic.write_atomic(os.path.join(out_dir, classical_model.META_FILE), json.dumps(
      {'config': config.to_dict(), 'class_names': list(info.class_names),
       # how raw files become the fit's pixels, for --mode=predict (classical_predict.py)
       classical_model.RECORD_KEY: inference.inference_meta(config.data, info),
       'feature_blocks': features.block_sizes(x_train.shape[1:], spec),
       'probabilities': rep['context']['probabilities'],
       'timing': timing}, indent=1, default=str))
  logging.info('Classical baseline: %d training images, %d features; features %.1f s, fit %.1f s; '
               'top-1 %.2f%% on %d examples.', len(y_train), f_train.shape[1],
               timing['features_train_s'], timing['fit_s'], 100 * rep['accuracy'],
               rep['num_examples'])
  shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
  scored = {'position': position, 'label': y_eval, 'probs': shifted / shifted.sum(1, keepdims=True)}
  return rep, stats, scored


def classical(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The ``classical`` mode: hold-out evaluation, or K-fold cross-validation when
  ``config.cross_validation.folds > 0``; returns the report (or the CV summary)."""
  workdir = os.path.abspath(workdir)
  if config.data.get('multilabel'):
    raise UserError('The classical baseline fits one class per image and has no tagging '
                    'version, and config.data.multilabel is set; train the network for tags '
                    '(--mode=train).')
  if config.data.get('train_preprocess'):   # the fit reads its images unaugmented
    config = copy.deepcopy(config)
    config.data = classical_model.unaugmented(config.data)
  os.makedirs(workdir, exist_ok=True)
  if int(config.cross_validation.folds) > 0:
    return cross_validate(config, workdir)
  title = f'Classical baseline on {config.data.name} \'{config.data.eval_split}\''
  rep, *_ = fit_and_evaluate(config, workdir, title)
  print('\n'.join(report_files.table_lines(rep, title, workdir)), flush=True)
  return rep


def cross_validate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """K-fold CV on the CNN's folds (``data/folds.py``); writes fold reports and the summary."""
  from imgcls_jax.data import folds as folds_lib
  from imgcls_jax.data import reader
  k, split = int(config.cross_validation.folds), config.data.train_split
  if '@' in split:
    raise UserError(f"config.data.train_split='{split}' is already a subset; cross-validate a "
                    "plain split, e.g. 'train' or 'train+test'.")
  # The held-out folds are the evaluation, as in the CNN's: data.eval_split is not read (an image
  # folder without split directories has no 'test' to describe).
  config = copy.deepcopy(config)
  config.data.eval_split = split
  t0 = time.perf_counter()
  assignment = folds_lib.assign(config.data, split, k, config.seed)
  rows, per_fold, pooled, names = [], [], None, []
  oof = out_of_fold.OutOfFold(config, len(assignment.ids))
  info = reader.describe(config.data) if oof.wanted else None
  for i in range(k):
    fold_dir = os.path.join(workdir, f'fold_{i}')
    train_file, eval_file = (os.path.join(fold_dir, f) for f in configlib.FOLD_ID_FILES)
    folds_lib.write_ids(train_file, assignment.training(i))
    folds_lib.write_ids(eval_file, assignment.held_out(i))
    fc = copy.deepcopy(config)
    fc.data.train_split = folds_lib.subset_split(split, train_file)
    fc.data.eval_split = folds_lib.subset_split(split, eval_file)
    fc.cross_validation.folds = 0
    rep, stats, scored = fit_and_evaluate(fc, fold_dir, f'Fold {i + 1}/{k} of '
                                          f'{config.data.name}:{split} (classical)')
    if rep['num_examples'] != len(assignment.held_out(i)):
      raise RuntimeError(f"Fold {i} evaluated {rep['num_examples']} examples, expected "
                         f'{len(assignment.held_out(i))}.')
    names = rep['class_names']
    oof.add(i, assignment.held_out(i), scored['position'], scored['label'], scored['probs'], info)
    pooled = report.add(pooled, stats)
    per_fold.append(report.scalars(rep))
    rows.append({'fold': i, 'workdir': fold_dir, 'train_examples': rep['context']['train_examples'],
                 'eval_examples': rep['num_examples'], 'checkpoint_step': 0,
                 'train_s': rep['context']['train_s'], **per_fold[-1]})
  keys = [key for key in per_fold[0] if all(key in f for f in per_fold)]
  pooled_report = report.summarize(pooled, names, top_confused=int(config.evaluate.top_confused))
  summary = {'folds': k, 'seed': int(config.seed), 'dataset': config.data.name, 'split': split,
             'num_examples': len(assignment.ids), 'per_fold': rows,
             'mean': {key: float(np.mean([f[key] for f in per_fold])) for key in keys},
             'std': {key: float(np.std([f[key] for f in per_fold])) for key in keys},
             'pooled_out_of_fold': pooled_report, 'wall_time_s': time.perf_counter() - t0,
             'model': 'classical'}
  label_issues.remove_stale(workdir)
  issues = oof.finish(names, workdir)
  if issues is not None:
    summary['label_issues'] = issues
  atomic.write_atomic(os.path.join(workdir, 'cv_report.json'),
                      json.dumps(metrics.json_safe(summary), indent=1))
  atomic.write_atomic(os.path.join(workdir, 'cv_report.md'), _markdown(summary))
  atomic.write_atomic(os.path.join(workdir, 'cv_confusion_matrix.png'), lambda path: (
      plots.confusion_matrix(pooled_report['confusion_matrix'], names, path,
                             title='Pooled out-of-fold confusion matrix (classical)')))
  atomic.write_atomic(os.path.join(workdir, 'cv_reliability.png'), lambda path: (
      plots.reliability_diagram(pooled_report['calibration_bins'], pooled_report['ece'], path,
                                title='Pooled out-of-fold reliability (classical)')))
  m, s = summary['mean'], summary['std']
  print(f"{k}-fold cross-validation (classical) of {config.data.name}:{split}: top-1 "
        f"{100 * m['accuracy']:.2f}% +- {100 * s['accuracy']:.2f}, macro F1 {m['f1_macro']:.4f} "
        f"+- {s['f1_macro']:.4f}; pooled out-of-fold {100 * pooled_report['accuracy']:.2f}% over "
        f"{pooled_report['num_examples']} examples; {summary['wall_time_s']:.0f} s. Summary: "
        f"{os.path.join(workdir, 'cv_report.md')}"
        + (f'\n  {label_issues.line(issues, workdir)}' if issues else ''), flush=True)
  return summary


def _markdown(summary: dict[str, Any]) -> str:
  keys = list(summary['mean'])
  md = [f"# {summary['folds']}-fold cross-validation (classical baseline): "
        f"{summary['dataset']}:{summary['split']}", '',
        f"{summary['num_examples']} examples, the stratified folds of data/folds.py (seed "
        f"{summary['seed']}), as the CNN's cross-validation; std over folds (ddof=0).", '',
        '| metric | mean | std |', '|---|---|---|']
  md += [f"| {k} | {summary['mean'][k]:.4f} | {summary['std'][k]:.4f} |" for k in keys]
  md += ['', '| fold | train | held out | train s | ' + ' | '.join(keys) + ' |',
         '|---' * (4 + len(keys)) + '|']
  for r in summary['per_fold']:
    md.append(f"| {r['fold']} | {r['train_examples']} | {r['eval_examples']} | {r['train_s']:.1f} "
              '| ' + ' | '.join(f'{r[k]:.4f}' for k in keys) + ' |')
  md += ['', '## Pooled out-of-fold predictions', '',
         *[f'- {line}' for line in report_text.headline(summary['pooled_out_of_fold'])]]
  if 'label_issues' in summary:
    md += label_issues.markdown(summary['label_issues'])
  return '\n'.join(md) + '\n'
