"""Fixing the labels a label-issue search flagged: a copy of the manifest with the chosen rows
relabelled as the search suggests.

  python -m imgcls_jax.relabel --issues=<workdir>/cv_label_issues.csv --manifest=labels.csv \
      --ranks=1-200 [--out=labels.relabelled.csv]

``--issues``: a list written by k-fold cross-validation (``cv_label_issues.csv``) or by
``--mode=evaluate`` (``label_issues.csv``), single-label or tagging (``label_issues.py``);
``--ranks``: which of its rows to apply, e.g. ``1-200``, ``1-40,45,50-60`` or ``all``, after
looking at them (``cv_label_issues.png`` shows the first 48); ``--manifest``: the CSV manifest the
run read (``config.data.manifest``). Each chosen row's image gets the ``suggested`` label (a
tagging run's: its extra tags removed and its missing ones added, the others kept in the
manifest's order, so the first tag that stratifies a hold-out stays first). Every other row, column
and the header are copied (cells as Python's csv module writes them). A row is left alone, with a
line saying why, when the manifest no longer gives the image the label the list was made with
(relabelled since, or another manifest), does not list it, or lists it in more than one split
(more than 3 rows left alone for the same reason: one line with their count). A list none of whose
ids the manifest lists (another dataset's: a tfds or arrays run) is refused, and when no chosen
row can be applied nothing is written: an earlier copy is never replaced by one that applies
nothing.
Changing labels changes a hold-out drawn per class (a manifest without a split column): the
relabelled run's eval split is another draw. The output (default: beside the manifest,
``<name>.relabelled.csv``) is written whole or not at all, with its paths rewritten relative to
its own folder when that is another one; the manifest itself is never overwritten. Train on it, in
a new ``--workdir``, with ``--config.data.manifest=<out>``.

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
import dataclasses
import os
import sys
from typing import Any

from imgcls_jax.data import manifest as manifest_lib
from imgcls_jax import atomic
from imgcls_jax.errors import UserError


class NothingApplied(UserError):
  """No chosen row could be applied, so no copy was written; ``skipped``: (rank, id, why) each."""

  def __init__(self, message: str, skipped: list[tuple[str, str, str]]):
    super().__init__(message)
    self.skipped = skipped


def parse_ranks(spec: str, ranks: list[int]) -> list[int]:
  """The ranks ``spec`` names ('all', or comma-separated ``N`` / ``N-M``, 1-based) among the
  list's ``ranks``, ascending, each once; a named rank the list lacks is a UserError (a range
  takes the ranks it spans that the list has)."""
  spec, have = spec.strip().lower(), set(ranks)
  if spec == 'all':
    return sorted(have)
  chosen: set[int] = set()
  span = f'{min(have)}-{max(have)}' if have else 'none'
  for part in filter(None, (p.strip() for p in spec.split(','))):
    lo, dash, hi = part.partition('-')
    try:
      a, b = int(lo), int(hi if dash else lo)
    except ValueError:
      raise UserError(f"--ranks='{spec}': '{part}' is not a rank or a range of ranks; write e.g. "
                      "1-200, 1-40,45 or all.") from None
    if a > b:
      raise UserError(f"--ranks='{spec}': '{part}' runs backwards; write the lower rank first.")
    got = {k for k in range(a, b + 1) if k in have} if dash else {a} & have
    if not got:
      raise UserError(f"--ranks='{spec}': the list has no row of rank{'s' if dash else ''} "
                      f"{part} (its ranks: {span}); choose ranks the list has.")
    chosen |= got
  if not chosen:
    raise UserError('--ranks is empty; name the rows to apply, e.g. 1-200 or all.')
  return sorted(chosen)


def read_issues(path: str) -> tuple[list[dict[str, str]], bool]:
  """The rows of a label-issue list and whether it is a tagging run's."""
  try:
    with open(path, newline='', encoding='utf-8') as f:
      reader = csv.DictReader(f)
      rows, columns = list(reader), set(reader.fieldnames or ())
  except (OSError, UnicodeDecodeError) as e:
    why = e.strerror if isinstance(e, OSError) else 'not UTF-8 text'
    raise UserError(f'Cannot read the label-issue list {path} ({why}); give the '
                    'cv_label_issues.csv or label_issues.csv a search wrote.') from None
  tagged = 'tags' in columns
  needed = {'rank', 'id', 'suggested'} | ({'tags', 'missing', 'extra'} if tagged else {'label'})
  if not needed <= columns:
    raise UserError(f'{path} is not a label-issue list (it lacks the column(s) '
                    f"{', '.join(sorted(needed - columns))}); give the cv_label_issues.csv or "
                    'label_issues.csv a search wrote.')
  if not rows:
    raise UserError(f'{path} lists no label issue (the search flagged nothing): nothing to '
                    'relabel.')
  if not any(r['id'] for r in rows):
    raise UserError(f'{path} names its examples by position only (an arrays file or a dataset '
                    'without ids): there is no manifest row to relabel.')
  bad = next((r['rank'] for r in rows if not r['rank'].strip().isdigit()), None)
  if bad is not None:
    raise UserError(f"{path} has a rank '{bad}' that is not a whole number; give the list as the "
                    'search wrote it.')
  return rows, tagged


def _columns(rows: list[list[str]]) -> tuple[int, int, int, int | None]:
  """(first data row, path column, label column, split column or None) of a manifest's raw rows
  (blank ones included), by ``manifest.read_rows``' rule: a header naming path and label /
  labels (and split) on the first non-blank row; else columns 0, 1 and, when any row has a third
  cell, 2."""
  top = next((i for i, r in enumerate(rows) if r and any(x.strip() for x in r)), len(rows))
  header = [x.strip().lower() for x in rows[top]] if top < len(rows) else []
  label_col = 'label' if 'label' in header else 'labels'
  if 'path' in header and label_col in header:
    return (top + 1, header.index('path'), header.index(label_col),
            header.index('split') if 'split' in header else None)
  return top, 0, 1, 2 if any(len(r) > 2 for r in rows[top:]) else None


def folder_rows(root: str, found: list[dict[str, str]]) -> list[list[str]]:
  """A manifest's rows (a ``path,label[,split]`` header first; paths relative to ``root``) of the
  files of an image folder, as its layout lists them: ``root/<class>/**``, or
  ``root/<split>/<class>/**`` when the list's ids name a split first (``split/class/file``: an id's
  class directory is its label)."""
  from imgcls_jax.data import file_walk, folder_layout
  if os.path.isfile(root):
    raise UserError(f'The image folder {root} is a file; give the folder of class directories the '
                    'run read (config.data.folder), or a CSV manifest as --manifest.')
  if not os.path.isdir(root):
    raise UserError(f'The image folder {root} does not exist; give the folder the run read '
                    '(config.data.folder).')
  if 'label' not in found[0]:
    raise UserError('A tagging run\'s list needs the manifest it was made from (--manifest): an '
                    'image folder gives one label per image.')
  parts = [os.path.normpath(r['id']).split(os.sep) for r in found[:20]]
  split_first = all(len(p) > 2 and p[1] == r['label'] for p, r in zip(parts, found))
  if not split_first and not all(len(p) > 1 and p[0] == r['label'] for p, r in zip(parts, found)):
    raise UserError(f'The ids of the list do not name their label\'s class directory under {root} '
                    '(<class>/<file> or <split>/<class>/<file>); give the folder the run read.')
  if split_first:
    return [['path', 'label', 'split']] + [
        [rel, name, split] for split in folder_layout.subdirs(root)
        for name in folder_layout.subdirs(os.path.join(root, split))
        for rel in file_walk.walk(os.path.join(root, split, name), os.path.join(split, name))]
  return [['path', 'label']] + [[rel, name] for name in folder_layout.subdirs(root)
                                for rel in file_walk.walk(os.path.join(root, name), name)]


def _new_tags(now: str, r: dict[str, str]) -> str:
  """A tagging row's new cell: the manifest's tags in their order, less the extra ones, then the
  missing ones."""
  extra = set(manifest_lib.tags(r['extra']))
  kept = [t for t in manifest_lib.tags(now) if t not in extra]
  return ';'.join(kept + [t for t in manifest_lib.tags(r['missing']) if t not in kept])


@dataclasses.dataclass
class Source:
  """What a list is applied to: a manifest, or an image folder as a manifest of its files."""
  path: str                 # the manifest, or the folder
  root: str                 # the directory its rows' paths are relative to
  rows: list[list[str]]     # its CSV rows as read (a folder's: ``folder_rows``)
  default_out: str          # where the relabelled copy goes unless told

  def files(self) -> set[str]:
    """The absolute paths of the images its rows list."""
    first, path_col, _, _ = _columns(self.rows)
    return {os.path.normpath(os.path.join(self.root, r[path_col].strip()))
            for r in self.rows[first:] if len(r) > path_col and r[path_col].strip()}


def open_source(found: list[dict[str, str]], tagged: bool, manifest: str,
                folder: str) -> Source:
  """The manifest (``manifest``) or image folder (``folder``) a list ``found`` is applied to;
  one of them, readable, or a UserError."""
  if bool(manifest) == bool(folder):
    raise UserError('Give the manifest (--manifest) or the image folder (--folder) the run read, '
                    'one of them.')
  if folder:
    root = os.path.abspath(folder).rstrip(os.sep)
    return Source(root, root, folder_rows(root, found), root + '.relabelled.csv')
  path = os.path.abspath(manifest)
  if os.path.isdir(path):
    raise UserError(f'The manifest {path} is a directory; give the CSV file of path,label rows the '
                    'run read (config.data.manifest), or an image folder as --folder.')
  if not os.path.isfile(path):
    raise UserError(f'The manifest {path} does not exist; give the CSV file of path,label rows '
                    'the run read (config.data.manifest).')
  try:
    # a manifest the pipeline reads, or one line (an image in two splits is left alone below)
    manifest_lib.read_rows(path, tagged, one_split_each=False)
    with open(path, newline='', encoding='utf-8-sig') as f:
      rows = list(csv.reader(f))
  except OSError as e:
    raise UserError(f'Cannot read the manifest {path} ({e.strerror or e}); give a readable CSV '
                    'file of path,label rows (config.data.manifest).') from None
  return Source(path, os.path.dirname(path), rows, os.path.splitext(path)[0] + '.relabelled.csv')


def relabel(issues_path: str, manifest_path: str, ranks: str, out: str = '', *,
            folder: str = '') -> dict[str, Any]:
  """Writes the relabelled copy of ``manifest_path`` (with ``folder`` instead, an image folder of
  class directories: a manifest of its files, ``folder_rows``); returns what was done, with
  ``hint``: how to train on it."""
  found, tagged = read_issues(issues_path)
  source = open_source(found, tagged, manifest_path, folder)
  rows, src, src_dir = source.rows, source.path, source.root
  out = os.path.abspath(out or source.default_out)
  if out in (src, os.path.abspath(issues_path)) or os.path.isdir(out):
    raise UserError(f'--out is {"a folder" if os.path.isdir(out) else "an input"} ({out}); write '
                    'the relabelled copy to a new file.')
  first, path_col, label_col, split_col = _columns(rows)
  at: dict[str, list[int]] = {}   # path -> its rows (the pipeline reads the first of a split)
  for i in range(first, len(rows)):
    if len(rows[i]) > max(path_col, label_col) and rows[i][path_col].strip():
      at.setdefault(os.path.normpath(rows[i][path_col].strip()), []).append(i)
  if not any(os.path.normpath(r['id']) in at for r in found if r['id']):
    what, ident = 'image folder' if folder else 'manifest', next(r['id'] for r in found if r['id'])
    example = next((rows[i][path_col].strip() for i in range(first, len(rows))
                    if len(rows[i]) > path_col and rows[i][path_col].strip()), '')
    raise UserError(f"No row of the list {os.path.abspath(issues_path)} names an image of the "
                    f"{what} {src} (the list's ids look like '{ident}', the {what}'s "
                    f"paths like '{example}'): the list is of another dataset; give the {what} "
                    'the run that wrote it read.')
  chosen = {int(r['rank']): r for r in found}
  picked = [chosen[k] for k in parse_ranks(ranks, list(chosen))]
  changed, skipped = [], []
  for r in picked:
    where = at.get(os.path.normpath(r['id']), [])
    splits = ({rows[i][split_col].strip() for i in where if len(rows[i]) > split_col}
              if split_col is not None else set())
    if not where:
      skipped.append((r['rank'], r['id'], 'not in the manifest'))
      continue
    if len(splits) > 1:
      skipped.append((r['rank'], r['id'], f"in more than one split of the manifest "
                                          f"({', '.join(sorted(splits))}); fix it by hand"))
      continue
    i = where[0]
    now = rows[i][label_col].strip()
    same = (set(manifest_lib.tags(now)) == set(manifest_lib.tags(r['tags'])) if tagged
            else now == r['label'])
    if not same:
      skipped.append((r['rank'], r['id'], f"labelled '{now}' in the manifest, not "
                                          f"'{r['tags'] if tagged else r['label']}' as listed"))
      continue
    rows[i][label_col] = _new_tags(now, r) if tagged else r['suggested']
    changed.append((r['rank'], r['id'], now, rows[i][label_col]))
  if not changed:   # a copy equal to the manifest is of no use, and must not replace an earlier one
    rank, ident, why = skipped[0]
    more = f'; {len(skipped) - 1} more left alone' if len(skipped) > 1 else ''
    kept = f' ({out} is kept as it was)' if os.path.exists(out) else ''
    raise NothingApplied(
        f'None of the {len(picked)} chosen row(s) could be applied (rank {rank} ({ident}): {why}'
        f'{more}), so nothing was written{kept}; choose rows the manifest still labels as the list '
        'does, or search again on this manifest.', skipped)
  out_dir = os.path.dirname(out)
  if src_dir != out_dir:   # paths are relative to the CSV: keep them pointing at the images
    for i in range(first, len(rows)):
      if len(rows[i]) > path_col and rows[i][path_col].strip() and not os.path.isabs(
          rows[i][path_col].strip()):
        rows[i][path_col] = os.path.relpath(
            os.path.join(src_dir, rows[i][path_col].strip()), out_dir)
  def write(path: str) -> None:
    with open(path, 'w', newline='', encoding='utf-8') as f:
      csv.writer(f).writerows(rows)
  try:
    os.makedirs(out_dir, exist_ok=True)
    atomic.write_atomic(out, write)
  except OSError as e:
    raise UserError(f'Cannot write {out} ({e.strerror or e}); choose another --out.') from None
  hint = (f"--config.data.folder='' --config.data.manifest={out}" if folder
          else f'--config.data.manifest={out}')
  return {'output': out, 'relabelled': changed, 'skipped': skipped, 'chosen': len(picked),
          'hint': hint}


def left_alone_lines(skipped: list[tuple[str, str, str]], few: int = 3) -> list[str]:
  """One line per row left alone; the rows left alone for the same reason, when more than
  ``few``, as one line with their count and the first ``few`` of them."""
  by_why: dict[str, list[tuple[str, str]]] = {}
  for rank, ident, why in skipped:
    by_why.setdefault(why, []).append((rank, ident))
  lines = []
  for rank, ident, why in skipped:   # in the list's order; a summary where its first row was
    rows = by_why[why]
    if len(rows) <= few:
      lines.append(f'  rank {rank} ({ident}) left alone: {why}')
    elif (rank, ident) == rows[0]:
      shown = ', '.join(f'{k} ({i})' for k, i in rows[:few])
      lines.append(f'  {len(rows)} rows left alone: {why} (ranks {shown}, ...)')
  return lines


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
    if isinstance(e, NothingApplied) and len(e.skipped) > 1:
      print('\n'.join(left_alone_lines(e.skipped)))
    print(f'Error: {e}', file=sys.stderr)
    return 2
  for line in left_alone_lines(done['skipped']):
    print(line)
  print(f"Relabelled {len(done['relabelled'])} of the {done['chosen']} chosen images "
        f"({len(done['skipped'])} left alone): {done['output']}\n"
        f"Train on it, in a new --workdir, with {done['hint']}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
