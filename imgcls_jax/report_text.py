"""A report (``report.summarize``) as text: the training loop's lines, the printed summary,
report.md and the confusion matrix as CSV."""
from __future__ import annotations

import io
import math
from typing import Any, Mapping

from imgcls_jax import intervals, label_issues, ood, report, report_multilabel, selective


def eval_line(m: Mapping[str, Any], num_classes: int | None = None) -> str:
  """The training loop's line for one evaluation's metrics (``training_eval_metrics``); top-5
  only with more than 5 classes (as the report), when ``num_classes`` is given."""
  if 'map' in m:
    return report_multilabel.eval_line(m)
  return (f'eval loss {m["loss"]:.4f}, top-1 {m["accuracy"]:.2%}{_top5(m, num_classes)} on '
          f'{m["count"]} examples')


def final_line(m: Mapping[str, Any], num_classes: int | None = None) -> str:
  """The training loop's closing figures of single-label training metrics (top-5 as
  ``eval_line``)."""
  return (f'({m["count"]} examples): top-1 {m["accuracy"]:.2%}{_top5(m, num_classes)}, loss '
          f'{m["loss"]:.4f}')


def _top5(m: Mapping[str, Any], num_classes: int | None) -> str:
  if num_classes is not None and num_classes <= report.TOP5_MIN_CLASSES:
    return ''
  return f', top-5 {m["accuracy_top5"]:.2%}'


def _pct(x: float | None) -> str:
  return '-' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{100 * x:.2f}%'


def headline(report: Mapping[str, Any]) -> list[str]:
  """Two or three lines: top-1 / top-5 / loss / ECE and the averages."""
  if report.get('task') == 'multilabel':
    return report_multilabel.headline(report)
  top5 = f", top-5 {_pct(report['accuracy_top5'])}" if 'accuracy_top5' in report else ''
  lines = [f"top-1 {_pct(report['accuracy'])}{top5}, loss {report['loss']:.4f}, "
           f"ECE {report['ece']:.4f} ({report['num_examples']} examples)"]
  if 'balanced_accuracy' in report:
    auc = (f", ROC-AUC (macro, one-vs-rest) {report['roc_auc_macro']:.4f}"
           if 'roc_auc_macro' in report else '')
    lines.append(f"balanced accuracy {_pct(report['balanced_accuracy'])}{auc}")
  for avg in ('macro', 'weighted'):
    a = report[f'{avg}_avg']
    lines.append(f"{avg + ' avg':<13} precision {a['precision']:.4f}  recall {a['recall']:.4f}  "
                 f"F1 {a['f1']:.4f}" + (_over(report) if avg == 'macro' else ''))
  if 'intervals' in report:
    lines.append(intervals.headline(report['intervals']))
  if report.get('selective'):
    lines.append(selective.headline(report['selective']))
  if report.get('out_of_distribution'):
    lines.append(ood.headline(report['out_of_distribution']))
  return lines


def _over(report: Mapping[str, Any]) -> str:
  """' (over 2 of 10 classes)' when the macro averages leave classes out, else ''."""
  n = report.get('macro_avg_classes')
  return f" (over {n} of {report['num_classes']} classes)" if (
      n is not None and n < report['num_classes']) else ''


def defined(row: Mapping[str, Any]) -> dict[str, bool]:
  """Which of a per-class row's precision / recall / F1 are defined: recall needs an example of
  the class, precision and F1 an example or a prediction (the report keeps sklearn's 0 for the
  others, ``zero_division=0``; shown as '-')."""
  some = row['support'] > 0
  seen = some or bool(row.get('in_macro_avg', True))
  return {'precision': seen, 'recall': some, 'f1': seen}


def _fig(row: Mapping[str, Any], key: str, width: int = 0) -> str:
  return f"{row[key]:{width}.4f}" if defined(row)[key] else f"{'-':>{width}}"


def class_table(report: Mapping[str, Any], max_rows: int | None = None) -> list[str]:
  """Per-class rows; with ``max_rows``, only the classes with the lowest F1 (worst first; a
  class with neither an example nor a prediction last). '-': not defined (``defined``)."""
  rows = list(report['per_class'])
  title = 'class'
  if max_rows is not None and len(rows) > max_rows:
    rows = sorted(rows, key=lambda r: (not defined(r)['f1'], r['f1'], r['class']))[:max_rows]
    title = f'class ({max_rows} lowest F1 of {len(report["per_class"])})'
  width = max([len(title)] + [len(r['class']) for r in rows])
  out = [f"{title:<{width}}  precision  recall      f1  support"]
  for r in rows:
    out.append(f"{r['class']:<{width}}  {_fig(r, 'precision', 9)}  {_fig(r, 'recall', 6)}  "
               f"{_fig(r, 'f1', 6)}  {r['support']:7d}")
  return out


def macro_note(report: Mapping[str, Any]) -> list[str]:
  """report.md's words on which classes the macro averages cover, when not all of them."""
  if not _over(report):
    return []
  rows = report['per_class']
  names = [r['class'] for r in rows if r.get('in_macro_avg')]
  shown = ', '.join(names[:10]) + (f' and {len(names) - 10} more' if len(names) > 10 else '')
  unseen = [r['class'] for r in rows if r['support'] == 0 and r.get('in_macro_avg')]
  return ['', f"The macro averages run over the {len(names)} of {report['num_classes']} classes "
          f'that have an example or a prediction here ({shown}); the other '
          f"{report['num_classes'] - len(names)} have neither and no figure ('-' below)."
          + (f" {', '.join(unseen[:10])}: predicted but with no example, so no recall ('-'); "
             'they count with recall 0 in the macro recall and F1 (as scikit-learn, '
             'zero_division=0).' if unseen else '')]


def confused_lines(report: Mapping[str, Any], top: int = 5) -> list[str]:
  pairs = report['most_confused'][:top]
  if not pairs:
    return ['most confused: none (no off-diagonal errors)']
  return ['most confused (true -> predicted): ' + ', '.join(
      f"{p['true']} -> {p['predicted']} ({p['count']})" for p in pairs)]


def to_markdown(report: Mapping[str, Any], title: str, context: Mapping[str, Any]) -> str:
  """The readable ``report.md``: context, headline, per-class table, confusions, calibration."""
  md = [f'# {title}', '']
  md += [f'- {k}: {v}' for k, v in context.items()]
  md += ['', '## Summary', '', '| metric | value |', '|---|---|',
         f"| top-1 accuracy | {_pct(report['accuracy'])} |"]
  if 'accuracy_top5' in report:
    md.append(f"| top-5 accuracy | {_pct(report['accuracy_top5'])} |")
  if 'balanced_accuracy' in report:
    md.append(f"| balanced accuracy | {_pct(report['balanced_accuracy'])} |")
  if 'roc_auc_macro' in report:
    md.append(f"| ROC-AUC (one-vs-rest, macro) | {report['roc_auc_macro']:.4f} |")
  md += [f"| loss (cross-entropy) | {report['loss']:.4f} |",
         f"| expected calibration error | {report['ece']:.4f} |",
         f"| examples | {report['num_examples']} |", '',
         '| average | precision | recall | F1 |', '|---|---|---|---|']
  for avg in ('macro', 'weighted'):
    a = report[f'{avg}_avg']
    md.append(f"| {avg}{_over(report) if avg == 'macro' else ''} | {a['precision']:.4f} | "
              f"{a['recall']:.4f} | {a['f1']:.4f} |")
  md += macro_note(report)
  if 'intervals' in report:
    md += intervals.markdown(report['intervals'])
  md += ['', '## Per class', '', '| class | precision | recall (sensitivity) | specificity | F1 | '
         'ROC-AUC | support |', '|---|---|---|---|---|---|---|']
  for r in report['per_class']:
    auc = '-' if r.get('roc_auc') is None else f"{r['roc_auc']:.4f}"
    spec = '-' if r.get('specificity') is None else f"{r['specificity']:.4f}"
    md.append(f"| {r['class']} | {_fig(r, 'precision')} | {_fig(r, 'recall')} | {spec} | "
              f"{_fig(r, 'f1')} | {auc} | {r['support']} |")
  md += ['', '## Most confused pairs', '']
  if report['most_confused']:
    md += ['| true | predicted | count | share of true class |', '|---|---|---|---|']
    md += [f"| {p['true']} | {p['predicted']} | {p['count']} | {_pct(p['rate'])} |"
           for p in report['most_confused']]
  else:
    md.append('No misclassified examples.')
  md += ['', '## Calibration', '', f"Expected calibration error: {report['ece']:.4f} over "
         f"{len(report['calibration_bins'])} equal-width confidence bins.", '',
         '| confidence bin | examples | mean confidence | accuracy |', '|---|---|---|---|']
  for b in report['calibration_bins']:
    if b['count']:
      md.append(f"| {b['lower']:.3f}-{b['upper']:.3f} | {b['count']} | {b['confidence']:.4f} | "
                f"{b['accuracy']:.4f} |")
  if 'selective' in report:
    md += selective.markdown(report['selective'], str(context.get('tta', 'none')))
  if 'out_of_distribution' in report:
    md += ood.lines(report['out_of_distribution'])
  if 'label_issues' in report:
    md += label_issues.markdown(report['label_issues'])
  return '\n'.join(md) + '\n'


_TUNED = {'checkpoint': "the 'best' checkpoint was picked on this split among the run's "
                         'evaluations (--config.evaluate.checkpoint=latest does not pick)',
          'temperature': "the run's temperature was fitted on this split (its calibration "
                         'figures)',
          'thresholds': "the run's tag thresholds were chosen on this split (its F1 and "
                        'exact-match figures)'}


def trained_on_note(seen: int, n: int, split: str = '') -> str:
  """The note for ``seen`` of ``n`` examples the model trained on (with ``split``: evaluate's
  warning, which names it)."""
  which = f"the {n} examples of split '{split}'" if split else f'these {n} examples'
  return (f'The model trained on {seen} of {which}: its figures here are on examples it learnt, '
          'not on new ones; evaluate a split it did not train on (--config.evaluate.split) for '
          'what new images get.')


def copies_note(copies: int, n: int, split: str = '') -> str:
  """The note for ``copies`` of ``n`` images that hold a training image's bytes (with
  ``split``: evaluate's warning, which names it)."""
  which = f"the {n} images of split '{split}'" if split else f'these {n} images'
  return (f'{copies} of {which} hold the bytes of images the model trained on (the same file '
          'under another name, a link or a copy): their figures are on learnt images, not new '
          'ones; delete those copies from one of the splits for a fair score.')


def notes(report: Mapping[str, Any]) -> list[str]:
  """What a reader must know before the figures (one sentence each; '' keys absent: none): the
  examples the model trained on, copies of training images, what was tuned on this split, and
  files of the split that could not be read."""
  n, out = report.get('num_examples'), []
  if report.get('trained_on_split'):
    out.append(trained_on_note(report['trained_on_split'], n))
  if report.get('copies_of_training_images'):
    out.append(copies_note(report['copies_of_training_images'], n))
  tuned = [_TUNED.get(t, t) for t in report.get('tuned_on_split') or ()]
  if tuned:
    out.append(f"Chosen on the split it is scored on: {'; '.join(tuned)}; so these figures are "
               'optimistic: evaluate another split for what new images get.')
  if report.get('loss_note'):
    out.append(report['loss_note'])
  skipped = report.get('skipped_files')
  if skipped:
    first = skipped.get('first') or []
    named = '; '.join(f"{f['file']} ({f['why']})" for f in first[:3])
    more = skipped['count'] - min(len(first), 3)
    out.append(f"{skipped['count']} file(s) in this split's folders were passed over, not "
               f"counted as its examples: {named}{f'; and {more} more' if more > 0 else ''} "
               '(report.json: skipped_files).')
  return out


def with_notes(md: str, report: Mapping[str, Any]) -> str:
  """``md`` (a report.md) with ``notes`` as a quoted block right below its title."""
  lines = notes(report)
  if not lines:
    return md
  title, _, rest = md.partition('\n')
  block = '\n>\n'.join(f'> **Note:** {line}' for line in lines)
  return f'{title}\n\n{block}\n{rest}'


def confusion_csv(report: Mapping[str, Any]) -> str:
  """The confusion matrix as CSV with class names on both axes (rows true, columns predicted)."""
  import csv
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(['true \\ predicted'] + list(report['class_names']))
  for name, row in zip(report['class_names'], report['confusion_matrix']):
    w.writerow([name] + list(row))
  return buf.getvalue()
