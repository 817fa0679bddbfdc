"""Fixing the labels a label-issue search flagged: a copy of the manifest with the chosen rows
relabelled as the search suggests.

  python -m imgcls_jax.relabel --issues=<workdir>/cv_label_issues.csv --manifest=labels.csv \
      --ranks=1-200 [--out=labels.relabelled.csv]

``--issues``: a list written by k-fold cross-validation (``cv_label_issues.csv``) or by
``--mode=evaluate`` (``label_issues.csv``), single-label or tagging (``label_issues.py``);
``--ranks``: which of its rows to apply, e.g. ``1-200``, ``1-40,45,50-60`` or ``all``, after
looking at them (``cv_label_issues.png`` shows the first 48); ``--manifest``: the CSV manifest the
run read (``config.data.manifest``). Each chosen row's image gets the ``suggested`` label (a
tagging run's: the ``suggested`` tag set, its missing tags added and extra ones removed). Every
other row, column and the header are copied as they are. A row is left alone, with a line saying
why, when the manifest no longer gives the image the label the list was made with (relabelled
since, or another manifest), or does not list it. The output (default: beside the manifest,
``<name>.relabelled.csv``) is written whole or not at all, with its paths rewritten relative to
its own folder when that is another one; the manifest itself is never overwritten. Train on it with
``--config.data.manifest=<out>``.

An image folder of class directories (``config.data.folder``: ``<class>/**`` or
``<split>/<class>/**``) is given as ``--folder=DIR`` instead of ``--manifest``: the output is then a
manifest of all its files (``path,label[,split]``, default ``DIR.relabelled.csv`` beside it), each
labelled by its class directory or, for the chosen rows, by the suggestion; train on it with
``--config.data.folder='' --config.data.manifest=<out>``. The folder is not touched. A tfds
dataset or an arrays file has nothing to copy: keep the list as a record.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Any

from imgcls_jax.data import manifest as manifest_lib
from imgcls_jax.errors import UserError


def parse_ranks(spec: str, count: int) -> list[int]:
  """The ranks ``spec`` names ('all', or comma-separated ``N`` / ``N-M``; 1-based, within the
  list's ``count`` rows), in ascending order, each once."""
  spec = spec.strip().lower()
  if spec == 'all':
    return list(range(1, count + 1))
  chosen: set[int] = set()
  for part in filter(None, (p.strip() for p in spec.split(','))):
    lo, _, hi = part.partition('-')
    try:
      a, b = int(lo), int(hi or lo)
    except ValueError:
      raise UserError(f"--ranks='{spec}': '{part}' is not a rank or a range of ranks; write e.g. "
                      "1-200, 1-40,45 or all.") from None
    if not 1 <= a <= b <= count:
      raise UserError(f"--ranks='{spec}': '{part}' is outside the list's ranks 1-{count}; "
                      'choose ranks the list has.')
    chosen.update(range(a, b + 1))
  if not chosen:
    raise UserError('--ranks is empty; name the rows to apply, e.g. 1-200 or all.')
  return sorted(chosen)


def read_issues(path: str) -> tuple[list[dict[str, str]], bool]:
  """The rows of a label-issue list and whether it is a tagging run's."""
  try:
    with open(path, newline='', encoding='utf-8') as f:
      reader = csv.DictReader(f)
      rows, columns = list(reader), set(reader.fieldnames or ())
  except OSError as e:
    raise UserError(f'Cannot read the label-issue list {path} ({e.strerror}); give the '
                    'cv_label_issues.csv or label_issues.csv a search wrote.') from None
  tagged = 'tags' in columns
  needed = {'rank', 'id', 'suggested', 'tags' if tagged else 'label'}
  if not needed <= columns:
    raise UserError(f'{path} is not a label-issue list (it lacks the column(s) '
                    f"{', '.join(sorted(needed - columns))}); give the cv_label_issues.csv or "
                    'label_issues.csv a search wrote.')
  if rows and not any(r['id'] for r in rows):
    raise UserError(f'{path} names its examples by position only (an arrays file or a dataset '
                    'without ids): there is no manifest row to relabel.')
  return rows, tagged


def _columns(rows: list[list[str]]) -> tuple[int, int, int]:
  """(first data row, path column, label column) of a manifest's raw rows, by
  ``manifest.read_rows``' rule (a header naming path and label / labels, else columns 0, 1)."""
  header = [x.strip().lower() for x in rows[0]] if rows else []
  label_col = 'label' if 'label' in header else 'labels'
  if 'path' in header and label_col in header:
    return 1, header.index('path'), header.index(label_col)
  return 0, 0, 1


def folder_rows(root: str, found: list[dict[str, str]]) -> list[list[str]]:
  """A manifest's rows (a ``path,label[,split]`` header first; paths relative to ``root``) of the
  files of an image folder, as its layout lists them: ``root/<class>/**``, or
  ``root/<split>/<class>/**`` when the list's ids name a split first (``split/class/file``: an id's
  class directory is its label)."""
  from imgcls_jax.data import folder_index
  if not os.path.isdir(root):
    raise UserError(f'The image folder {root} does not exist; give the folder the run read '
                    '(config.data.folder).')
  parts = [os.path.normpath(r['id']).split(os.sep) for r in found[:20]]
  split_first = bool(parts) and all(len(p) > 2 and p[1] == r['label']
                                    for p, r in zip(parts, found))
  if not split_first and not all(len(p) > 1 and p[0] == r['label'] for p, r in zip(parts, found)):
    raise UserError(f'The ids of the list do not name their label\'s class directory under {root} '
                    '(<class>/<file> or <split>/<class>/<file>); give the folder the run read.')
  if split_first:
    return [['path', 'label', 'split']] + [
        [rel, name, split] for split in folder_index.subdirs(root)
        for name in folder_index.subdirs(os.path.join(root, split))
        for rel in folder_index.walk(os.path.join(root, split, name), os.path.join(split, name))]
  return [['path', 'label']] + [[rel, name] for name in folder_index.subdirs(root)
                                for rel in folder_index.walk(os.path.join(root, name), name)]


def relabel(issues_path: str, manifest_path: str, ranks: str, out: str = '', *,
            folder: str = '') -> dict[str, Any]:
  """Writes the relabelled copy of ``manifest_path`` (with ``folder`` instead, an image folder of
  class directories: a manifest of its files, ``folder_rows``); returns what was done."""
  found, tagged = read_issues(issues_path)
  if bool(manifest_path) == bool(folder):
    raise UserError('Give the manifest (--manifest) or the image folder (--folder) the run read, '
                    'one of them.')
  if folder:
    src = os.path.abspath(folder).rstrip(os.sep)
    rows, src_dir = folder_rows(src, found), src
    default = src + '.relabelled.csv'
  else:
    src = os.path.abspath(manifest_path)
    manifest_lib.read_rows(src, tagged)   # a manifest the pipeline reads, or one line
    with open(src, newline='', encoding='utf-8-sig') as f:
      rows = list(csv.reader(f))
    src_dir, default = os.path.dirname(src), os.path.splitext(src)[0] + '.relabelled.csv'
  out = os.path.abspath(out or default)
  if out == src:
    raise UserError(f'--out is the manifest itself ({out}); write the relabelled copy to '
                    'another file.')
  chosen = {int(r['rank']): r for r in found}
  picked = [chosen[k] for k in parse_ranks(ranks, len(found)) if k in chosen]
  first, path_col, label_col = _columns([r for r in rows if r and any(x.strip() for x in r)])
  at = {os.path.normpath(r[path_col].strip()): i for i, r in enumerate(rows)
        if i >= first and len(r) > max(path_col, label_col)}
  changed, skipped = [], []
  for r in picked:
    i = at.get(os.path.normpath(r['id']))
    if i is None:
      skipped.append((r['rank'], r['id'], 'not in the manifest'))
      continue
    now = rows[i][label_col].strip()
    same = (set(manifest_lib.tags(now)) == set(manifest_lib.tags(r['tags'])) if tagged
            else now == r['label'])
    if not same:
      skipped.append((r['rank'], r['id'], f"labelled '{now}' in the manifest, not "
                                          f"'{r['tags'] if tagged else r['label']}' as listed"))
      continue
    rows[i][label_col] = r['suggested']
    changed.append((r['rank'], r['id'], now, r['suggested']))
  out_dir = os.path.dirname(out)
  if src_dir != out_dir:   # paths are relative to the CSV: keep them pointing at the images
    for i in range(first, len(rows)):
      if len(rows[i]) > path_col and rows[i][path_col].strip() and not os.path.isabs(
          rows[i][path_col].strip()):
        rows[i][path_col] = os.path.relpath(
            os.path.join(src_dir, rows[i][path_col].strip()), out_dir)
  os.makedirs(out_dir, exist_ok=True)
  tmp = out + '.tmp'
  with open(tmp, 'w', newline='', encoding='utf-8') as f:
    csv.writer(f).writerows(rows)
  os.replace(tmp, out)
  return {'output': out, 'relabelled': changed, 'skipped': skipped, 'chosen': len(picked)}


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--issues', required=True, help='cv_label_issues.csv or label_issues.csv')
  ap.add_argument('--manifest', default='', help='the CSV manifest the run read')
  ap.add_argument('--folder', default='', help='or the image folder of class directories')
  ap.add_argument('--ranks', required=True, help="rows to apply: e.g. 1-200, 1-40,45 or all")
  ap.add_argument('--out', default='', help='default: <manifest>.relabelled.csv beside it')
  args = ap.parse_args(argv)
  try:
    done = relabel(args.issues, args.manifest, args.ranks, args.out, folder=args.folder)
  except UserError as e:
    print(f'Error: {e}', file=sys.stderr)
    return 2
  for rank, ident, why in done['skipped']:
    print(f'  rank {rank} ({ident}) left alone: {why}')
  print(f"Relabelled {len(done['relabelled'])} of the {done['chosen']} chosen images "
        f"({len(done['skipped'])} left alone): {done['output']}\n"
        f"Train on it with --config.data.manifest={done['output']}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
