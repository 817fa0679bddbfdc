"""Examples whose label looks wrong, from probabilities of models that never trained on them.

Three sources: k-fold cross-validation, where every example of the split is predicted once by
the fold model that did not train on it (``cross_validation.py``: ``cv_label_issues.csv``), the
classical baseline's cross-validation (``classical.py``, the same files; both gather the
probabilities with ``out_of_fold.py``), and
``--mode=evaluate`` on a split the run did not train on (``evaluate.py``: ``label_issues.csv``
beside the report, e.g. label mistakes in a test set). The probabilities go to cleanlab's
confident learning
(``cleanlab.filter.find_label_issues``, Northcutt et al. 2021, default ``prune_by_noise_rate``):
per class, the threshold is the mean probability the models give that class on the examples
labelled with it; an example is counted as "labelled i, truly j" when its probability of j clears
j's threshold, the counts estimate how many examples of each (i, j) pair are mislabelled, and that
many of each pair, the least likely under their label first, are flagged. The list is ranked by
the probability of the given label (the least self-confident first).

Tagging runs (multi-label) go through cleanlab's multi-label search
(``cleanlab.multilabel_classification``): the same confident learning, tag by tag (is tag k's
presence or absence wrong for this example?), so each flagged example also says which tags look
``missing`` (not labelled, but the models see it) and which ``extra`` (labelled, but the models
do not see it); the list is ranked by cleanlab's label-quality score: each tag's self-confidence
(p for a labelled tag, 1 - p for another), pooled over the tags by a soft minimum
(``aggregator_kwargs={'method': 'softmin', 'temperature': 0.1}``), the worst first. cleanlab's
default pooling, an exponential moving average, lets the many sure tags of an example outweigh
its one wrong tag: on Fashion-MNIST collages with one tag changed on 5% of the images
(benchmarks/label_noise.py --tagging), 43% of its first 100 were changed images, against 86% with
the soft minimum (the flagged set is the same).

What this does not say: an example flagged may be a hard or ambiguous one rather than a wrong
label (the confusion is the model's as much as the labeller's), so the list is for a person to
look through, most likely first; nothing is changed or dropped by it.
"""
from __future__ import annotations

import csv
import logging
import os
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from imgcls_jax import atomic

FILE = 'cv_label_issues.csv'
PICTURE = 'cv_label_issues.png'   # image folders / manifests: the first flagged images
KEPT = 'cv_kept_ids.txt'   # every other id: train on them with data.train_split='SPLIT@<this>'
COLUMNS = ('rank', 'id', 'fold', 'label', 'suggested', 'p_label', 'p_suggested')
METHOD = ('cleanlab.filter.find_label_issues (confident learning, prune_by_noise_rate) on the '
          'pooled out-of-fold probabilities')
EVAL_FILE, EVAL_PICTURE = 'label_issues.csv', 'label_issues.png'   # --mode=evaluate's
EVAL_COLUMNS = ('rank', 'position', 'id', 'label', 'suggested', 'p_label', 'p_suggested')
UNSEEN = ', which it did not train on'      # the evaluated split's, ending either method
EVAL_METHOD = ('cleanlab.filter.find_label_issues (confident learning, prune_by_noise_rate) on '
               "the model's probabilities of this split" + UNSEEN)
# Tagging runs: one row per flagged example; tags / suggested: its labelled tags and those with
# the flagged ones changed (missing added, extra removed), ';'-joined as in a manifest; quality:
# cleanlab's label-quality score (0-1, low = likely wrong), the ranking.
TAG_RANKING = {'method': 'softmin', 'temperature': 0.1}   # how a row's tags pool (docstring)
TAG_COLUMNS = ('rank', 'id', 'fold', 'tags', 'suggested', 'missing', 'extra', 'quality')
EVAL_TAG_COLUMNS = ('rank', 'position', 'id', 'tags', 'suggested', 'missing', 'extra', 'quality')
TAG_METHOD = ('cleanlab.multilabel_classification.filter.find_multilabel_issues_per_class '
              '(confident learning tag by tag, prune_by_noise_rate) on the pooled out-of-fold '
              'probabilities')
EVAL_TAG_METHOD = ('cleanlab.multilabel_classification.filter.find_multilabel_issues_per_class '
                   "(confident learning tag by tag, prune_by_noise_rate) on the model's "
                   'probabilities of this split' + UNSEEN)
# Every example's probabilities are held on the host: 4 bytes a cell while the folds run (a
# tagging run's labels: 1 more), and at the search's peak (its float64 copies and cleanlab's;
# measured) ~19-25 bytes a cell for single-label data (+484 MB for 20M cells) and ~54 for tagging
# (+822 MB for 16M cells, cleanlab's per-tag passes): each cap is ~1.3 GB.
MAX_CELLS = 50_000_000
MAX_TAG_CELLS = 25_000_000


def cell_cap(multilabel: bool) -> int:
  """How many (example, class) probabilities the search takes: ``MAX_TAG_CELLS`` for tagging."""
  return MAX_TAG_CELLS if multilabel else MAX_CELLS
SHOWN = 20   # rows of the list in cv_report.md (the CSV has them all)
PICTURED = 48   # images in PICTURE


def find(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
  """Indices of the likely label issues among ``labels`` (int N) given ``probs`` (float N x K,
  out of fold), the lowest probability of the given label first."""
  from cleanlab.filter import find_label_issues
  labels = np.asarray(labels, np.int64)
  probs = np.asarray(probs, np.float64)
  probs = probs / probs.sum(axis=1, keepdims=True)   # float32 softmax rows, summed in float64
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    ranked = find_label_issues(labels, probs, return_indices_ranked_by='self_confidence',
                               n_jobs=1)
  for w in caught:   # e.g. a class with too few examples to estimate its noise rate
    logging.info('cleanlab: %s', w.message)
  return np.asarray(ranked, np.int64)


def find_tags(labels: np.ndarray, probs: np.ndarray,
              class_names: Sequence[str] | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The likely label issues of a tagging split: ``labels`` (bool N x K, the labelled tags),
  ``probs`` (float N x K, each tag's sigmoid, out of fold). Returns (the flagged examples, the
  least likely labelling first; bool N x K, the (example, tag) cells that look wrong; float N,
  every example's label-quality score, ``TAG_RANKING``). The same examples as cleanlab's
  ``multilabel_classification.filter.find_label_issues``, from one search that also keeps the
  tags. A tag on every example of the split, or on none, cannot be judged (confident learning
  needs examples with and without it): its cells are left unflagged, with a warning."""
  from cleanlab.multilabel_classification import filter as ml_filter
  from cleanlab.multilabel_classification import rank as ml_rank
  labels = np.asarray(labels, bool)
  probs = np.clip(np.asarray(probs, np.float64), 0.0, 1.0)
  n, k = labels.shape
  judged = labels.any(axis=0) & ~labels.all(axis=0)
  if not judged.all():
    names = class_names or [str(j) for j in range(k)]
    logging.warning('Label-issue search: %s on every example of the split or on none, so not '
                    'judged (confident learning needs examples with and without a tag).',
                    ', '.join(names[j] for j in np.flatnonzero(~judged)))
  cells = np.zeros((n, k), bool)
  if not judged.any():
    return np.zeros(0, np.int64), cells, np.ones(n)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    cells[:, judged] = np.asarray(ml_filter.find_multilabel_issues_per_class(
        [np.flatnonzero(row).tolist() for row in labels[:, judged]], probs[:, judged],
        n_jobs=1), bool).reshape(n, -1)
    quality = np.asarray(ml_rank.get_label_quality_scores(
        [np.flatnonzero(row).tolist() for row in labels], probs, aggregator_kwargs=TAG_RANKING),
        np.float64)
  for w in caught:
    logging.info('cleanlab: %s', w.message)
  flagged = np.flatnonzero(cells.any(axis=1))
  return flagged[np.argsort(quality[flagged], kind='stable')], cells, quality


def tag_rows(ranked: np.ndarray, cells: np.ndarray, quality: np.ndarray, *, ids: Sequence[str],
             labels: np.ndarray, class_names: Sequence[str], folds: np.ndarray | None = None,
             positions: np.ndarray | None = None) -> list[dict[str, Any]]:
  """``rows`` for a tagging split (``TAG_COLUMNS`` / ``EVAL_TAG_COLUMNS``), from ``find_tags``."""
  def joined(mask: np.ndarray) -> str:
    return ';'.join(class_names[k] for k in np.flatnonzero(mask))
  out = []
  for rank, i in enumerate(np.asarray(ranked).tolist(), 1):
    given, wrong = np.asarray(labels[i], bool), cells[i]
    out.append({**_head(rank, i, ids, folds, positions), 'tags': joined(given),
                'suggested': joined(given ^ wrong),
                'missing': joined(wrong & ~given), 'extra': joined(wrong & given),
                'quality': float(quality[i])})
  return out


def rows(ranked: np.ndarray, *, ids: Sequence[str], labels: np.ndarray, probs: np.ndarray,
         class_names: Sequence[str], folds: np.ndarray | None = None,
         positions: np.ndarray | None = None) -> list[dict[str, Any]]:
  """One row per flagged example (``COLUMNS`` with ``folds``, ``EVAL_COLUMNS`` with
  ``positions``), in ``ranked`` order: its id (image path, tfds id; '' where the split has none),
  the fold that held it out or its position in the split's read order, its label and the class
  the model(s) find most likely."""
  out = []
  for rank, i in enumerate(np.asarray(ranked).tolist(), 1):
    y, top = int(labels[i]), int(np.argmax(probs[i]))
    out.append({**_head(rank, i, ids, folds, positions), 'label': class_names[y],
                'suggested': class_names[top],
                'p_label': float(probs[i, y]), 'p_suggested': float(probs[i, top])})
  return out


def _head(rank: int, i: int, ids: Sequence[str], folds: np.ndarray | None,
          positions: np.ndarray | None) -> dict[str, Any]:
  """A row's first columns: rank, position (an evaluation's), id, fold (cross-validation's)."""
  row: dict[str, Any] = {'rank': rank}
  if positions is not None:
    row['position'] = int(positions[i])
  row['id'] = ids[i] if ids else ''
  if folds is not None:
    row['fold'] = int(folds[i])
  return row


def remove_stale(workdir: str) -> None:
  """Removes an earlier cross-validation's lists and picture from ``workdir`` (before a new
  search, or none; an evaluation report's own files are report_files.write's)."""
  for name in (FILE, PICTURE, KEPT):
    if os.path.exists(os.path.join(workdir, name)):
      os.remove(os.path.join(workdir, name))


def write_csv(found: list[dict[str, Any]], path: str,
              columns: Sequence[str] = COLUMNS) -> None:
  """``found`` as CSV (``columns``), written whole or not at all (``atomic.write_atomic``)."""
  def write(tmp: str) -> None:
    with open(tmp, 'w', newline='') as f:
      w = csv.DictWriter(f, fieldnames=columns)
      w.writeheader()
      for r in found:
        w.writerow({k: f'{v:.6f}' if isinstance(v, float) else v for k, v in r.items()})
  atomic.write_atomic(path, write)


def picture(found: list[dict[str, Any]], path: str,
            load: Callable[[dict[str, Any]], np.ndarray | None]) -> bool:
  """The first ``PICTURED`` flagged examples that ``load`` gives an image for (uint8 HxWxC, or
  None), each captioned "#rank label -> suggested (p)", in ``path``; False when there are none."""
  from imgcls_jax import plots
  shown, captions = [], []
  for r in found:
    if len(shown) == PICTURED:
      break
    img = load(r)
    if img is None:
      continue
    step = max(1, max(img.shape[:2]) // 128)   # a thumbnail is enough to judge a label
    shown.append(img[::step, ::step])
    captions.append(_caption(r))
  if not shown:
    return False
  plots.image_grid(shown, captions, path, f'The {len(shown)} most likely label issues ' + (
      '(#rank +missing tags -extra tags)' if 'tags' in found[0] else
      '(#rank label -> suggested class (its probability))'), columns=8)
  return True


def _caption(r: dict[str, Any]) -> str:
  if 'tags' in r:
    changes = [f'+{t}' for t in r['missing'].split(';') if t]
    changes += [f'-{t}' for t in r['extra'].split(';') if t]
    return f"#{r['rank']} {' '.join(changes)}"
  return f"#{r['rank']} {r['label']} -> {r['suggested']} ({r['p_suggested']:.2f})"


def file_loader(root: str, channels: int) -> Callable[[dict[str, Any]], np.ndarray | None]:
  """``picture``'s loader for rows whose ids are image paths under ``root`` (None: unreadable)."""
  from imgcls_jax.data import images

  def load(r: dict[str, Any]) -> np.ndarray | None:
    try:
      return images.decode(os.path.join(root, r['id']), channels=channels)
    except (images.UnreadableImage, OSError):
      return None
  return load


def write_kept(ids: Sequence[str], found: list[dict[str, Any]], path: str) -> int:
  """The ids of ``ids`` not flagged in ``found``, one per line (the input pipeline's id-list
  format), written whole or not at all; returns how many."""
  flagged = {r['id'] for r in found}
  kept = sorted(set(ids) - flagged)
  atomic.write_atomic(path, ''.join(f'{i}\n' for i in kept))
  return len(kept)


def summary(found: list[dict[str, Any]], num_examples: int, split: str,
            pictured: bool = False, *, evaluation: bool = False,
            tagged: bool = False, copies: int = 0) -> dict[str, Any]:
  """The ``label_issues`` entry of ``cv_report.json`` (``evaluation``: of an evaluation's
  report.json, whose files have other names and no kept-ids list; ``tagged``: a tagging run's;
  ``copies``: files of an evaluated split that hold a training image's bytes)."""
  method = ((EVAL_TAG_METHOD if evaluation else TAG_METHOD) if tagged else
            (EVAL_METHOD if evaluation else METHOD))
  if evaluation and copies:   # not new to the model after all: say so where the method is named
    method = (method[:-len(UNSEEN)] + ', whose files it did not train on'
              + f', though {copies} of them hold the bytes of images it trained on (copies): '
              'their probabilities are of learnt images, which flag a copy labelled otherwise '
              'than in training but not a wrong label it was trained with')
  return {'method': method, 'task': 'multilabel' if tagged else 'single_label', 'split': split,
          'count': len(found), 'num_examples': num_examples,
          'fraction': len(found) / max(num_examples, 1),
          'file': EVAL_FILE if evaluation else FILE,
          'picture': (EVAL_PICTURE if evaluation else PICTURE) if pictured else None,
          'kept_ids': None if evaluation else KEPT, 'most_likely': found[:SHOWN]}


def search(labels: np.ndarray, probs: np.ndarray, *, ids: Sequence[str],
           class_names: Sequence[str], out_dir: str, split: str,
           load: Callable[[dict[str, Any]], np.ndarray | None] | None,
           folds: np.ndarray | None = None, positions: np.ndarray | None = None,
           copies: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """``find`` (``labels`` int N; a tagging split's, bool N x K: ``find_tags``), then the list
  (cross-validation, ``folds``: ``FILE``; an evaluation, ``positions``: ``EVAL_FILE``) and, with
  ``load``, the picture written to ``out_dir``; returns (the rows, the report's ``summary``;
  ``copies``: as ``summary``'s)."""
  evaluation, tagged = folds is None, np.ndim(labels) == 2
  where = {'ids': ids, 'labels': labels, 'class_names': class_names, 'folds': folds,
           'positions': positions}
  if tagged:
    found = tag_rows(*find_tags(labels, probs, class_names), **where)
    columns = EVAL_TAG_COLUMNS if evaluation else TAG_COLUMNS
  else:
    found = rows(find(labels, probs), probs=probs, **where)
    columns = EVAL_COLUMNS if evaluation else COLUMNS
  os.makedirs(out_dir, exist_ok=True)
  write_csv(found, os.path.join(out_dir, EVAL_FILE if evaluation else FILE), columns)
  pictured = bool(found) and load is not None and picture(
      found, os.path.join(out_dir, EVAL_PICTURE if evaluation else PICTURE), load)
  return found, summary(found, len(labels), split, pictured, evaluation=evaluation,
                        tagged=tagged, copies=copies)


def line(s: dict[str, Any], workdir: str) -> str:
  """A cross-validation's printed line on its label-issue list (``s``: its ``summary``)."""
  if not s['count']:
    return f"likely label issues: none of the {s['num_examples']} examples"
  return (f"likely label issues: {s['count']} ({s['fraction']:.2%}), most likely first in "
          f"{os.path.join(workdir, s['file'])}"
          + (f" (pictured: {s['picture']})" if s.get('picture') else ''))


def _md(text: str) -> str:
  """A class name as a markdown table cell ('|' would end the cell)."""
  return text.replace('|', '\\|')


def _id(text: str) -> str:
  """An id as a table cell: a code span, '-' where the split has none (an arrays file)."""
  return f'`{_md(text)}`' if text else '-'


def markdown(s: dict[str, Any]) -> list[str]:
  """The "Likely label issues" section of cv_report.md or report.md."""
  if not s['count']:
    return ['', '## Likely label issues', '',
            f"None of the {s['num_examples']} examples looks mislabelled: {s['method']}."]
  kept = (f" `{s['kept_ids']}` lists every other example: "
          f"`--config.data.train_split='{s['split']}@<workdir>/{s['kept_ids']}'` trains on those "
          'only.' if s.get('kept_ids') else '')
  where = 'fold' if s['most_likely'] and 'fold' in s['most_likely'][0] else 'position'
  lines = ['', '## Likely label issues', '',
           f"{s['count']} of {s['num_examples']} examples ({s['fraction']:.2%}) look mislabelled: "
           f"{s['method']}. All of them, most likely first, are in `{s['file']}`"
           + (f" (the first ones pictured in `{s['picture']}`)" if s.get('picture') else '')
           + '; a flagged example may also be a hard or ambiguous one, so look before '
           f'relabelling.{kept}', '']
  if s.get('task') == 'multilabel':
    lines += [f'| rank | id | {where} | tags | suggested | quality |', '|---|---|---|---|---|---|']
    lines += [f"| {r['rank']} | {_id(r['id'])} | {r[where]} | {_md(r['tags'] or '-')} | "
              f"{_md(r['suggested'] or '-')} | {r['quality']:.3f} |" for r in s['most_likely']]
    return lines
  lines += [f'| rank | id | {where} | label | suggested | p(label) | p(suggested) |',
            '|---|---|---|---|---|---|---|']
  lines += [f"| {r['rank']} | {_id(r['id'])} | {r[where]} | {_md(r['label'])} | "
            f"{_md(r['suggested'])} | {r['p_label']:.3f} | {r['p_suggested']:.3f} |"
            for r in s['most_likely']]
  return lines
