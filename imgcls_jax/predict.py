"""``--mode=predict``: top-k class names and probabilities for image files and folders; for a
multi-label run also its ``tags``: every class whose probability reaches the threshold the run
saved for it (chosen on its validation split; 0.5 where none was chosen).

  python -m imgcls_jax.main --mode=predict --workdir=RUN \
      --config.predict.inputs=photos/,extra.png [--config.predict.format=csv]

The model, its dataset (class names, input size, eval preprocessing) and its dtype come from the
run in ``--workdir`` alone (``inference.load``); ``config.predict`` says what to do. Images of any
size and mode are decoded with PIL (EXIF orientation applied), converted to the model's channels,
resized to the dataset's image size, then put through the run's ``data.eval_preprocess``, exactly
as evaluation sees them. Unreadable files are reported and skipped.

With ``--config.predict.explain=gradcam`` (convolutional models) or ``integrated_gradients`` (any
model), heat-map overlay PNGs (``imgcls_jax/explain.py``) are written to
``config.predict.explain_dir`` (default: ``explanations/`` next to the output file, or in the
current folder when printing): for a single-label run one per image, of its top-1 class; for a
multi-label run one per predicted tag (none for an image without one). Each JSON line names the
explained class(es) in ``explained`` and the PNG(s) in ``explanation`` (single-label: a class
name and a path; multi-label: lists, in the order of ``tags``); CSV output gets an
``explanation`` column, filled on the row of each explained class.

A map is named ``<image file name>[.<tag>].<method>.png``, with ``_<n>`` added to the name's
stem where that file exists already. The only maps overwritten are those the earlier output at
``config.predict.output`` names (and not changed since it was written): rerunning a command
replaces its own maps, while a map of any other prediction (another output file, another input
folder with the same file names, output printed to stdout) is never replaced, so every output
names its own images' maps. Printed output records none, so each such call adds new files.
Those earlier maps that the new output does not name (a rerun on fewer images, or without
explanations) are removed once it is written.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import stat
import sys
from typing import Any, Iterable, TextIO

import jax
import ml_collections
import numpy as np

from imgcls_jax import answers, classical_model, explain_files, inference
from imgcls_jax.data import images
from imgcls_jax.errors import UserError

FORMATS = ('jsonl', 'csv')


def predict_files(clf: inference.Classifier, files: list[str], *, top: int = 5,
                  batch_size: int = 64, explainer: Any = None, explain_dir: str = '',
                  replaces: Iterable[str] = ()
                  ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
  """(one ``{'file', 'predictions'}`` per readable file in order, [(skipped file, reason)]).

  With an ``explain.Explainer``, heat maps of each image's top-1 class (multi-label: of each
  predicted tag) are written to ``explain_dir`` as overlay PNGs, named in the result's
  ``'explanation'`` and their classes in ``'explained'``; of the files already there, only those
  in ``replaces`` (the maps of the output this call replaces) may be overwritten.
  """
  skipped: list[tuple[str, str]] = []
  results = []
  maps = explain_files.MapFiles(explain_dir, getattr(explainer, 'method', ''), replaces,
                   write=jax.process_index() == 0) if explainer is not None else None
  for paths, arrays in images.image_batches(files, clf.prepare, batch_size, skipped):
    out = clf.predict_arrays(arrays)
    probs = out['probabilities']
    batch = [{'file': p, 'predictions': answers.top_k(pr, clf.class_names, top)}
             for p, pr in zip(paths, probs)]
    if clf.trained.info.multilabel:
      for r, pr in zip(batch, probs):
        r['tags'] = answers.tags(pr, clf.class_names, clf.trained.decision_thresholds)
    else:   # below the run's thresholds: "not sure" (abstained), "none of the classes" (unknown)
      for r, pr, lg in zip(batch, probs, out['logits']):
        r.update(answers.answer_gates(clf.trained, pr, lg))
    if maps is not None:
      explain_files.explain_batch(explainer, maps, batch, arrays, clf.trained.info.multilabel)
    results.extend(batch)
  return results, skipped


def _maps_of(output: str) -> list[str]:
  """The explanation PNGs an earlier prediction file at ``output`` names and that were not
  changed after it was written (none when it is not a regular earlier prediction file): the
  maps a rerun writing ``output`` may replace."""
  if not output or not os.path.isfile(output) or _is_special(output) or not _is_predictions(
      output):
    return []
  found: list[str] = []
  try:
    with open(output, encoding='utf-8', newline='') as f:
      if f.readline().startswith('file,rank,'):
        f.seek(0)
        found = [row.get('explanation') or '' for row in csv.DictReader(f)]
      else:
        f.seek(0)
        for line in f:
          value = json.loads(line).get('explanation') if line.strip() else None
          found.extend(value if isinstance(value, list) else [value])
  except (OSError, ValueError, AttributeError, csv.Error):
    return []
  written = os.path.getmtime(output)
  return [p for p in found if isinstance(p, str) and p
          and (not os.path.lexists(p) or os.lstat(p).st_mtime <= written)]


def write(results: Iterable[dict[str, Any]], out: TextIO, fmt: str) -> None:
  """JSON lines (one object per image) or CSV (one row per image and rank, with an ``abstained``
  column where the run has an abstention threshold, an ``unknown`` one where it has an
  unknown-input gate; multi-label: per image and tag above its
  threshold, or one row with an empty tag). With explanations, a CSV's last column
  ``explanation`` holds the map of the row's class on the explained rows (top-1; every tag)."""
  results = list(results)
  explained = bool(results) and 'explanation' in results[0]
  if fmt == 'jsonl':
    for r in results:
      out.write(json.dumps(r) + '\n')
  elif results and 'tags' in results[0]:
    w = csv.writer(out)
    w.writerow(['file', 'rank', 'tag', 'index', 'probability', 'threshold']
               + ['explanation'] * explained)
    for r in results:
      maps = r.get('explanation') or [''] * len(r['tags'])
      for rank, (t, m) in enumerate(zip(r['tags'], maps), 1):
        w.writerow([r['file'], rank, t['class'], t['index'], f"{t['probability']:.6f}",
                    f"{t['threshold']:.4f}"] + [m] * explained)
      if not r['tags']:
        w.writerow([r['file'], 0, '', '', '', ''] + [''] * explained)
  else:   # with the run's gates, every row of an image says whether it abstained / is unknown
    w = csv.writer(out)
    gates = [k for k in ('abstained', 'unknown') if results and k in results[0]]
    w.writerow(['file', 'rank', 'class', 'index', 'probability'] + gates
               + ['explanation'] * explained)
    for r in results:
      for rank, p in enumerate(r['predictions'], 1):
        w.writerow([r['file'], rank, p['class'], p['index'], f"{p['probability']:.6f}"]
                   + [int(r[k]) for k in gates]
                   + [r.get('explanation', '') if rank == 1 else ''] * explained)


def _is_predictions(path: str) -> bool:
  """True when ``path`` starts as ``write`` starts a file (CSV header or a JSON line of an
  image's results): an earlier output that predict may replace."""
  try:
    with open(path, encoding='utf-8') as f:
      first = f.readline()
  except (OSError, UnicodeDecodeError):
    return False
  if first.startswith('file,rank,'):
    return True
  try:
    row = json.loads(first)
  except ValueError:
    return False
  return isinstance(row, dict) and 'file' in row and ('predictions' in row or 'tags' in row)


def _stream_of(path: str) -> TextIO | None:
  """sys.stdout / sys.stderr when ``path`` is that stream (``/dev/stdout``, or the very file the
  shell redirected it to), else None."""
  for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
    try:
      if os.path.samestat(os.stat(path), os.fstat(fd)):
        return stream
    except (OSError, ValueError):
      continue
  return None


def _is_special(path: str) -> bool:
  """True for what is written to, never replaced: the standard streams, a FIFO or device, anything
  under /dev or /proc (e.g. a shell's process substitution, /dev/fd/63)."""
  if _stream_of(path) is not None or os.path.abspath(path).startswith(('/dev/', '/proc/')):
    return True
  try:
    return not stat.S_ISREG(os.stat(path).st_mode)
  except FileNotFoundError:
    return False


def write_output(output: str, results: list[dict[str, Any]], fmt: str) -> None:
  """A regular file (or a link to one) is replaced whole, never left half-written: written
  beside its target, then renamed over it (its permissions kept); the standard streams are
  written to as streams, a FIFO or another special file opened and written."""
  stream = _stream_of(output)
  if stream is not None:
    write(results, stream, fmt)
    stream.flush()
    return
  if _is_special(output):
    with open(output, 'w', newline='') as f:
      write(results, f, fmt)
    return
  target = os.path.realpath(output)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = f'{target}.incomplete'
  with open(tmp, 'w', newline='') as f:
    write(results, f, fmt)
  if os.path.exists(target):
    shutil.copymode(target, tmp)   # the earlier output's permissions
  os.replace(tmp, target)


def check_output(output: str, files: list[str]) -> None:
  """Refuses ``config.predict.output`` before any work where writing it would lose a file: one
  of the inputs, or an existing file that is not an earlier prediction file (a run's config,
  metrics or checkpoint files, a manifest, an image); or where it cannot be a file."""
  path = os.path.abspath(os.path.expanduser(output))
  key = f'config.predict.output={output}'
  if os.path.isdir(path):
    raise UserError(f'{key} is a folder; give a file to write, e.g. '
                    f"{os.path.join(output, 'predictions.csv')}.")
  parent = os.path.dirname(path)   # the nearest existing folder above it must be a folder
  while not os.path.exists(parent) and os.path.dirname(parent) != parent:
    parent = os.path.dirname(parent)
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise UserError(f'{key}: {parent} is a file, not a folder; give a path in a folder.')
  if any(os.path.abspath(f) == path for f in files):
    raise UserError(f'{key} is also one of config.predict.inputs; writing it would replace that '
                    'image: give another output file.')
  if (os.path.isfile(path) and not _is_special(path) and os.path.getsize(path)
      and not _is_predictions(path)):
    raise UserError(f'{key} exists and is not an earlier prediction file (predict replaces only '
                    'those); give a new file name, or move that file away first.')


def predict(config: ml_collections.ConfigDict | None, workdir: str,
            overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
  """The ``predict`` mode: classifies ``config.predict.inputs`` and writes the top-k of each."""
  from imgcls_jax import run_directory
  if run_directory.kind(workdir) == 'classical':   # a classical fit: its scikit-learn model
    return predict_classical(config, workdir, overrides)
  step = int(overrides.get('predict.step', -1)) if overrides is not None else config.predict.step
  trained = inference.load(workdir, config, step=step, overrides=overrides,
                           step_key='predict.step')
  cfg = trained.run.predict
  if cfg.format not in FORMATS:
    raise UserError(f"config.predict.format must be one of {', '.join(FORMATS)}, got "
                    f"'{cfg.format}'.")
  for key in ('top_k', 'batch_size'):
    if cfg[key] < 1:
      raise UserError(f'config.predict.{key}={cfg[key]} must be a positive integer (e.g. '
                      f'--config.predict.{key}={5 if key == "top_k" else 64}).')
  files = images.list_inputs(cfg.inputs)
  output = os.path.expanduser(cfg.output) if cfg.output else ''
  if output:
    check_output(output, files)
  clf = inference.classifier(trained, max_batch=cfg.batch_size)
  explainer, explain_dir = None, ''
  if cfg.get('explain'):
    from imgcls_jax import explain
    explainer = explain.explainer(clf, cfg.explain, ig_steps=int(cfg.get('ig_steps', 32)))
    beside = os.path.dirname(os.path.abspath(cfg.output)) if cfg.output else os.getcwd()
    explain_dir = os.path.abspath(cfg.get('explain_dir') or os.path.join(beside, 'explanations'))
  earlier_maps = _maps_of(output)   # (a rerun without explanations names none of them)
  results, skipped = predict_files(clf, files, top=cfg.top_k, batch_size=cfg.batch_size,
                                   explainer=explainer, explain_dir=explain_dir,
                                   replaces=earlier_maps if explainer is not None else ())
  if not results:
    raise UserError(f'None of the {len(files)} input file(s) in config.predict.inputs is a '
                    f'readable image ({images.unreadable_summary(skipped)}); give image files or '
                    'folders.')
  if jax.process_index() == 0:   # several processes: the first one writes
    if output:
      write_output(output, results, cfg.format)
      explain_files.remove_unnamed(earlier_maps, results)
    else:
      write(results, sys.stdout, cfg.format)
      sys.stdout.flush()
  logging.info('Predicted %d image(s)%s; skipped %d unreadable file(s)%s.', len(results),
               f' into {cfg.output}' if cfg.output else '', len(skipped),
               ': ' + ', '.join(p for p, _ in skipped[:10]) + (' ...' if len(skipped) > 10 else '')
               if skipped else '')
  if results and 'abstained' in results[0]:
    logging.info('Abstained on %d of %d image(s): top-1 probability below the run\'s threshold '
                 '%.3f.', sum(r['abstained'] for r in results), len(results),
                 results[0]['min_confidence'])
  if results and 'unknown' in results[0]:
    logging.info("Unknown: %d of %d image(s), their logits' log-sum-exp below the run's gate "
                 '%.4f.', sum(r['unknown'] for r in results), len(results),
                 results[0]['unknown_below'])
  if explainer is not None:
    count = sum(len(r['explanation']) if isinstance(r['explanation'], list) else 1
                for r in results)
    logging.info('%d %s overlay(s) of %d image(s) in %s.', count, cfg.explain, len(results),
                 explain_dir)
  return results


def predict_classical(config: ml_collections.ConfigDict | None, workdir: str,
                      overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
  """``--mode=predict`` of a classical fit's folder: the top-k of each input, as predict writes
  them (the fit's own evaluation reads the same probabilities: ``tests/test_classical_runs.py``)."""
  meta, pixels, fitted = classical_model.load(workdir)
  cfg = inference.mode_settings(workdir, config, overrides, 'predict')
  if cfg.get('explain'):
    raise UserError('config.predict.explain needs a network; a classical baseline has no '
                    'gradients to explain: drop it.')
  if cfg.format not in FORMATS or cfg.top_k < 1 or cfg.batch_size < 1:
    raise UserError(f"config.predict.format must be one of {', '.join(FORMATS)} and "
                    'top_k, batch_size positive integers.')
  files = images.list_inputs(cfg.inputs)
  output = os.path.expanduser(cfg.output) if cfg.output else ''
  if output:
    check_output(output, files)
  spec = classical_model.spec_of(pixels.run)
  names = list(meta['class_names'])
  results: list[dict[str, Any]] = []
  skipped: list[tuple[str, str]] = []
  for paths, arrays in images.image_batches(files, lambda f: inference.prepare(pixels, f),
                                            int(cfg.batch_size), skipped):
    probs = classical_model.probabilities(fitted, spec, np.asarray(arrays), len(names))
    for path, p in zip(paths, probs):
      results.append({'file': path, 'predictions': answers.top_k(p, names, int(cfg.top_k))})
  if not results:
    raise UserError(f'None of the {len(files)} input file(s) in config.predict.inputs is a '
                    f'readable image ({images.unreadable_summary(skipped)}); give image files or '
                    'folders.')
  if output:
    write_output(output, results, cfg.format)
  else:
    write(results, sys.stdout, cfg.format)
    sys.stdout.flush()
  logging.info('Predicted %d image(s) with the classical baseline in %s%s; skipped %d '
               'unreadable file(s).', len(results), workdir, f' into {cfg.output}' if output else '',
               len(skipped))
  return results
