"""The evaluation report on disk and on the terminal: report.json / .md, the confusion matrix as
CSV and PNG, the reliability diagram, training curves, the most confident errors (errors.csv /
.png; multi-label: wrong tag decisions), and the short printed table."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
from typing import Any

import numpy as np

from imgcls_jax import atomic, label_issues, metrics, plots, report_multilabel, report_text
from imgcls_jax.data import folder_layout
from imgcls_jax.errors import UserError

REPORT_FILES = ('report.json', 'report.md', 'confusion_matrix.csv', 'confusion_matrix.png',
                'reliability.png', 'roc_curves.png', 'selective.png')
MULTILABEL_REPORT_FILES = ('report.json', 'report.md', 'pr_curves.png', 'reliability.png')
CURVES_FILE = 'training_curves.png'
ERROR_FILES = ('errors.csv', 'errors.png')
ISSUE_FILES = (label_issues.EVAL_FILE, label_issues.EVAL_PICTURE)   # evaluate's, when searched
_ALL_FILES = frozenset(REPORT_FILES + MULTILABEL_REPORT_FILES + ERROR_FILES + ISSUE_FILES
                       + (CURVES_FILE,))
ERROR_COLUMNS = ('rank', 'position', 'id', 'label', 'predicted', 'p_predicted', 'p_label')
# Multi-label: one row per wrong tag decision; 'error' is 'missed' (a labelled tag below its
# threshold) or 'extra' (another tag at or above it); labels / predicted: the example's tag sets.
TAG_ERROR_COLUMNS = ('rank', 'position', 'id', 'tag', 'error', 'p_tag', 'threshold', 'labels',
                     'predicted')
_ERRORS_IN_MD = 10


@dataclasses.dataclass
class Errors:
  """The wrongly predicted examples of an evaluation (multi-label: the wrong tag decisions), the
  most confident first."""
  rows: list[dict[str, Any]]                  # one per error, keyed by ``columns``
  images: list[tuple[np.ndarray, str]]        # (image as the model saw it, caption), the first ones
  columns: tuple[str, ...] = ERROR_COLUMNS    # TAG_ERROR_COLUMNS for a multi-label run


def write(rep: dict[str, Any], out_dir: str, title: str, metrics_path: str | None,
          errors: Errors | None = None) -> list[str]:
  """report.json / .md, confusion CSV + PNG, reliability PNG, training curves when available,
  and with ``errors`` errors.csv (every error) and errors.png (those with images); returns the
  names written.

  A file an earlier report in ``out_dir`` wrote (listed in its report.json's ``files``) that
  this one does not write (a ROC plot, the other task's files, training curves without a metrics
  log) is removed: left there it would sit beside a report.json that no longer matches it. Files
  no report wrote are left alone, whatever their names. Each file is written whole or not at all;
  when one fails (a full disk), those this report added are removed again (no report.json lists
  them, and ``check_output`` would refuse to overwrite them when the same command runs again).
  """
  os.makedirs(out_dir, exist_ok=True)
  earlier = _earlier_files(out_dir)
  there = {n for n in _ALL_FILES if os.path.lexists(os.path.join(out_dir, n))}
  try:
    written = _write_files(rep, out_dir, title, metrics_path, errors)
  except BaseException:   # a full disk: each file is whole, and none is left unlisted
    _remove(out_dir, [atomic.temporary_path(n) for n in _ALL_FILES]
            + [n + '.tmp' for n in ISSUE_FILES])   # (older versions' label_issues files)
    _remove(out_dir, _ALL_FILES - there - earlier)  # which would stop the same command rerun
    raise
  for name in sorted(earlier - set(written)):
    stale = os.path.join(out_dir, name)
    if os.path.exists(stale):
      os.remove(stale)
      logging.info('Removed %s: left by an earlier report, not part of this one.', stale)
  return written


def _write_files(rep: dict[str, Any], out_dir: str, title: str, metrics_path: str | None,
                 errors: Errors | None) -> list[str]:
  """``write``'s files, each whole or not at all (``atomic.write_atomic``), report.json last;
  returns the names written."""
  if rep.get('task') == 'multilabel':
    written, markdown = _write_multilabel(rep, out_dir, title)
  else:
    written, markdown = _write_single_label(rep, out_dir, title)
  if errors is not None:
    names, lines = _write_errors(errors, out_dir, title)
    written, markdown = written + names, markdown + '\n'.join(lines) + '\n'
  atomic.write_atomic(os.path.join(out_dir, 'report.md'), markdown)
  written.insert(0, 'report.md')
  issues = rep.get('label_issues')   # the files evaluate wrote before the report
  if issues:
    written += [name for name in (issues['file'], issues.get('picture')) if name]
  if metrics_path and os.path.exists(metrics_path):
    records = metrics.read_jsonl(metrics_path)
    _plot(lambda path: plots.training_curves(records, path), out_dir, CURVES_FILE)
    written.append(CURVES_FILE)
  elif metrics_path:  # None: a report with no training run behind it (k-NN, classical)
    logging.info('No metrics.jsonl next to the checkpoints: no training-curve plot.')
  written = ['report.json', *written]
  atomic.write_atomic(os.path.join(out_dir, 'report.json'),   # last: it lists the files
                       json.dumps(metrics.json_safe({**rep, 'files': written}), indent=1))
  return written


def _plot(draw: Any, out_dir: str, name: str) -> None:
  """``draw(path)`` (a ``plots`` function) writes ``out_dir/name`` whole or not at all."""
  atomic.write_atomic(os.path.join(out_dir, name), draw)


def _remove(out_dir: str, names: Any) -> None:
  """Removes the files ``names`` of ``out_dir`` that are there."""
  for name in names:
    try:
      os.remove(os.path.join(out_dir, name))
    except OSError:   # not there
      pass


def check_output(out_dir: str, data: Any, names: set[str]) -> None:
  """Refuses ``out_dir`` before any work where writing the report files ``names`` there would
  harm the user's files: a folder that is (or is inside) the image folder ``data`` reads (a
  manifest's: its own folder), whose images the report would mix with, or one holding a file of
  ``names`` that no earlier report wrote (``_earlier_files``), which it would overwrite.
  ``training_curves.png`` is --mode=curves' too, so it may be there without a report."""
  where = f'config.evaluate.output_dir={out_dir}'
  if data is not None and folder_layout.is_folder(data):
    src = folder_layout.source_of(data)
    real, root = os.path.realpath(out_dir), os.path.realpath(src.root)
    inside = real == root if src.kind == 'manifest' else os.path.commonpath([real, root]) == root
    if inside:
      what = ('the folder of config.data.manifest' if src.kind == 'manifest' else
              f'config.data.folder={root}')
      raise UserError(f'{where} is {"" if real == root else "inside "}{what}, the images being '
                      'evaluated, where the report files would mix with them; set '
                      '--config.evaluate.output_dir to a folder outside it.')
  if not os.path.isdir(out_dir):
    return
  earlier = _earlier_files(out_dir) | _issue_files(out_dir)
  theirs = sorted(n for n in names - {CURVES_FILE} - earlier
                  if os.path.lexists(os.path.join(out_dir, n)))
  if theirs:
    raise UserError(f"{where} holds {', '.join(theirs[:5])}, which no earlier report wrote and "
                    'this one would overwrite; move them out first, or set '
                    '--config.evaluate.output_dir to another folder.')


def _issue_files(out_dir: str) -> set[str]:
  """The label-issue files an evaluation wrote before its report.json (which lists them) and
  did not get to list, interrupted: its CSV by its header, and the picture beside it."""
  try:
    with open(os.path.join(out_dir, label_issues.EVAL_FILE), newline='') as f:
      header = tuple(next(csv.reader(f), []))
  except (OSError, UnicodeDecodeError, csv.Error):
    return set()
  return (set(ISSUE_FILES) if header in (label_issues.EVAL_COLUMNS,
                                          label_issues.EVAL_TAG_COLUMNS) else set())


def remove(out_dir: str) -> list[str]:
  """Removes the report an earlier ``write`` left in ``out_dir`` (the files its report.json
  lists, then report.json, then the folder if nothing else is in it); returns the names removed.
  Files no report wrote are left alone."""
  if not os.path.isfile(os.path.join(out_dir, 'report.json')):
    return []
  gone = []
  for name in sorted(_earlier_files(out_dir)) + ['report.json']:
    path = os.path.join(out_dir, name)
    if os.path.isfile(path):
      os.remove(path)
      gone.append(name)
  if not os.listdir(out_dir):
    os.rmdir(out_dir)
  return gone


def _earlier_files(out_dir: str) -> set[str]:
  """The report files an earlier report in ``out_dir`` wrote: its report.json's ``files`` (a
  report.json from before that list: every report file name; no report.json: none)."""
  known = set(_ALL_FILES)
  try:
    with open(os.path.join(out_dir, 'report.json')) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return set()
  files = old.get('files') if isinstance(old, dict) else None
  return known & set(files) if isinstance(files, list) else known


def _write_multilabel(rep: dict[str, Any], out_dir: str, title: str) -> tuple[list[str], str]:
  """The plots of a multi-label report; returns their names and the text of report.md."""
  markdown = report_text.with_notes(report_multilabel.to_markdown(rep, title,
                                                                  rep.get('context', {})), rep)
  _plot(lambda path: plots.pr_curves(rep['pr_curves'], rep['mean_average_precision'] or 0.0, path,
                                     micro=rep.get('pr_curve_micro')), out_dir, 'pr_curves.png')
  if not rep.get('calibration_bins'):
    return ['pr_curves.png'], markdown
  _plot(lambda path: plots.reliability_diagram(rep['calibration_bins'], rep['ece'], path,
                                               'Reliability of the tag probabilities', tags=True),
        out_dir, 'reliability.png')
  return ['pr_curves.png', 'reliability.png'], markdown


def _write_single_label(rep: dict[str, Any], out_dir: str, title: str) -> tuple[list[str], str]:
  """The CSV and plots of a single-label report; returns their names and the text of
  report.md."""
  markdown = report_text.with_notes(report_text.to_markdown(rep, title, rep.get('context', {})),
                                    rep)
  atomic.write_atomic(os.path.join(out_dir, 'confusion_matrix.csv'),
                       report_text.confusion_csv(rep))
  _plot(lambda path: plots.confusion_matrix(rep['confusion_matrix'], rep['class_names'], path),
        out_dir, 'confusion_matrix.png')
  _plot(lambda path: plots.reliability_diagram(rep['calibration_bins'], rep['ece'], path),
        out_dir, 'reliability.png')
  written = ['confusion_matrix.csv', 'confusion_matrix.png', 'reliability.png']
  if rep.get('roc_curves'):
    _plot(lambda path: plots.roc_curves(rep['roc_curves'], rep['roc_auc_macro'], path), out_dir,
          'roc_curves.png')
    written.append('roc_curves.png')
  if rep.get('selective'):
    _plot(lambda path: plots.selective(rep['selective'], path), out_dir, 'selective.png')
    written.append('selective.png')
  return written, markdown


def _write_errors(errors: Errors, out_dir: str, title: str) -> tuple[list[str], list[str]]:
  """errors.csv and errors.png (when there are images); returns their names and the lines of
  report.md's table of the first ones."""
  table = io.StringIO(newline='')
  w = csv.DictWriter(table, fieldnames=errors.columns)
  w.writeheader()
  w.writerows({k: (f'{v:.6f}' if isinstance(v, float) else v) for k, v in r.items()}
              for r in errors.rows)
  atomic.write_atomic(os.path.join(out_dir, 'errors.csv'), table.getvalue())
  what = 'errors' if errors.columns == ERROR_COLUMNS else 'wrong tag decisions'
  shown = [c.replace('p_', 'p(') + ')' if c.startswith('p_') else c for c in errors.columns]
  lines = ['', f'## The most confident {what} ({len(errors.rows)} in all: errors.csv)', '',
           '| ' + ' | '.join(shown) + ' |', '|' + '---|' * len(shown)]
  lines += ['| ' + ' | '.join(_cell(r[c]) for c in errors.columns) + ' |'
            for r in errors.rows[:_ERRORS_IN_MD]]
  if not errors.images:
    return ['errors.csv'], lines
  caption = (f'{title}: the {len(errors.images)} most confident errors' if what == 'errors' else
             f'{title}: the {len(errors.images)} examples with the most confident wrong tag '
             'decisions')
  _plot(lambda path: plots.image_grid([img for img, _ in errors.images],
                                      [c for _, c in errors.images], path, caption),
        out_dir, 'errors.png')
  return list(ERROR_FILES), lines


def _cell(v: Any) -> str:
  if isinstance(v, float):
    return f'{v:.4f}'
  return str(v) if v != '' else '-'


def table_lines(rep: dict[str, Any], title: str, out_dir: str,
                written: list[str] | None = None) -> list[str]:
  """The short printed summary (``written``: what ``write`` wrote; else the report files that
  are in ``out_dir``)."""
  ctx = rep.get('context', {})
  lines = [f"{title} (checkpoint {ctx.get('checkpoint_step')}: {ctx.get('checkpoint')}, TTA "
           f"{ctx.get('tta', 'none')})"]
  lines += [f'  Note: {note}' for note in report_text.notes(rep)]
  if rep.get('task') == 'multilabel':
    lines += ['  ' + line for line in report_multilabel.headline(rep)]
    lines += ['  ' + line for line in report_multilabel.class_table(rep, max_rows=20)]
    files: tuple[str, ...] = ('report.json', 'pr_curves.png', 'reliability.png')
  else:
    lines += ['  ' + line for line in report_text.headline(rep)]
    lines += ['  ' + line for line in report_text.class_table(rep, max_rows=20)]
    lines += ['  ' + line for line in report_text.confused_lines(rep)]
    files = (*REPORT_FILES[:1], *REPORT_FILES[2:])
  if rep.get('label_issues'):
    s = rep['label_issues']
    lines.append(f"  likely label issues: {s['count']} of {s['num_examples']} ({s['fraction']:.2%})"
                 + (f", most likely first in {s['file']}" if s['count'] else ''))
  lines.append(_written(out_dir, (*files, *ERROR_FILES, *ISSUE_FILES, CURVES_FILE), written))
  return lines


def _written(out_dir: str, names: tuple[str, ...], written: list[str] | None) -> str:
  """'Report: <out_dir>/report.md (+ the files of ``names`` that ``write`` wrote there)'."""
  there = [n for n in names if (n in written if written is not None
                                else os.path.exists(os.path.join(out_dir, n)))]
  return f'Report: {os.path.join(out_dir, "report.md")} (+ {", ".join(there)})'
