"""CSV manifests of the user's images: rows ``path,label`` or ``path,label,split`` (an optional
header naming the columns ``path``, ``label`` / ``labels``, ``split``), paths relative to the CSV;
a multi-label row's label is a set of tags, ``tag1;tag2``. Read by ``folder_layout`` and
``folder_index``."""
from __future__ import annotations

import collections
import csv
import difflib
import hashlib
import io
import logging
import os
import threading
from typing import Sequence

from imgcls_jax.data import images
from imgcls_jax.errors import UserError


Row = tuple[str, str, str | None]
# The parsed rows of the last manifests read: (file, multilabel, one_split_each) -> (the bytes'
# digest, rows). Describing a manifest's dataset asks for its rows four times.
_MEMO: collections.OrderedDict[tuple[str, bool, bool], tuple[bytes, tuple[Row, ...]]] = (
    collections.OrderedDict())
_MEMO_LOCK = threading.Lock()


def read_rows(location: str, multilabel: bool = False, *,
              one_split_each: bool = True) -> tuple[Row, ...]:
  """(path as written, label, split or None) per row of the CSV at ``location`` (with
  ``multilabel`` a row's label may be empty: an image with no tag). A file listed in two splits
  is refused unless ``one_split_each`` is False (a tool that mends such manifests).

  Parsed once per process while the file's bytes are the same (a digest of them, so an edit is
  seen even within the file system's timestamp granularity): a million-row manifest parses in
  seconds, its digest in tens of milliseconds."""
  with open(location, 'rb') as f:
    data = f.read()
  key = (os.path.abspath(location), bool(multilabel), bool(one_split_each))
  digest = hashlib.blake2b(data, digest_size=16).digest()
  with _MEMO_LOCK:
    hit = _MEMO.get(key)
  if hit is not None and hit[0] == digest:
    return hit[1]
  rows = tuple(_parse_rows(location, data, multilabel, one_split_each))
  with _MEMO_LOCK:
    _MEMO[key] = (digest, rows)
    _MEMO.move_to_end(key)
    while len(_MEMO) > 2:
      _MEMO.popitem(last=False)
  return rows


def _parse_rows(location: str, data: bytes, multilabel: bool, one_split_each: bool) -> list[Row]:
  try:
    text = data.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    if data[:2] in (b'\xff\xfe', b'\xfe\xff'):  # UTF-16's byte-order marks (LE / BE): what
      # Excel's "Unicode Text" and Windows Notepad's "Unicode" save
      raise UserError(f'The manifest {location} is UTF-16 text; save it as a UTF-8 CSV of '
                      'path,label rows (in Excel: Save As "CSV UTF-8").') from None
    raise UserError(f'The manifest {location} is not UTF-8 text (byte {e.start}: '
                    f'{e.object[e.start:e.start + 1]!r}); save it as a UTF-8 CSV of path,label '
                    'rows.') from None
  rows = [r for r in csv.reader(io.StringIO(text, newline='')) if r and any(x.strip() for x in r)]
  if not rows:
    raise UserError(f'The manifest {location} is empty; write one path,label row per image.')
  if all(len(r) == 1 for r in rows):
    sep = next((c for c in (';', '\t', '|') if c in rows[0][0]), None)
    raise UserError(f'The manifest {location} has one column'
                    + (f" (its cells are separated by {sep!r})" if sep else '')
                    + '; write path,label rows separated by commas (in Excel: Save As "CSV UTF-8"'
                    ', or set the list separator to a comma).')
  header = [x.strip().lower() for x in rows[0]]
  label_col = 'label' if 'label' in header else 'labels'
  if 'path' in header and label_col in header:
    cols = (header.index('path'), header.index(label_col),
            header.index('split') if 'split' in header else None)
    rows, first_line = rows[1:], 2
    if not rows:
      raise UserError(f'The manifest {location} has a header but no rows; write one path,label '
                      'row per image under it.')
    for n, row in enumerate(rows, first_line):
      if len(row) > len(header) and any(x.strip() for x in row[len(header):]):
        raise UserError(f'Line {n} of the manifest {location} has {len(row)} cells where its '
                        f"header names {len(header)} columns ({','.join(row)[:80]!r}); quote a "
                        'label that holds a comma ("felid, cat") or remove the extra cell.')
  else:
    if (len(rows) > 1 and not images.is_image_file(rows[0][0].strip())
        and images.is_image_file(rows[1][0].strip())):
      raise UserError(f"The first line of the manifest {location} ({','.join(rows[0])[:80]!r}) "
                      'looks like a header but names no path and label columns; name them '
                      'path,label (and split), or remove the line.')
    # A split column when the rows have a third cell: then every row needs one.
    lengths = collections.Counter(len(r) for r in rows)
    if len(lengths) > 1:
      usual = lengths.most_common(1)[0][0]
      n, odd = next((n, r) for n, r in enumerate(rows, 1) if len(r) != usual)
      raise UserError(f'Line {n} of the manifest {location} has {len(odd)} cells where '
                      f"{lengths[usual]} other rows have {usual} ({','.join(odd)[:80]!r}); every "
                      'row needs the same columns (path,label or path,label,split): quote a label '
                      'that holds a comma, or fix the row.')
    cols, first_line = (0, 1, 2 if max(len(r) for r in rows) > 2 else None), 1
  out = []
  for n, row in enumerate(rows, first_line):
    if (not multilabel and len(row) > cols[1] and row[cols[0]].strip()
        and not row[cols[1]].strip()):
      raise UserError(f"Line {n} of the manifest {location} has no label ({','.join(row)[:80]!r}); "
                      'give every image its class, or, for tags (none or several per image), set '
                      'config.data.multilabel=True.')
    if not multilabel and len(row) > cols[1] and ';' in row[cols[1]]:
      raise UserError(f"Line {n} of the manifest {location} has the label {row[cols[1]].strip()!r}"
                      ", which holds ';', the tag separator: for several tags per image set "
                      "config.data.multilabel=True; a class name cannot hold ';'.")
    if len(row) <= max(c for c in cols if c is not None) or not row[cols[0]].strip() or (
        not row[cols[1]].strip() and not multilabel) or (
            cols[2] is not None and not row[cols[2]].strip()):
      raise UserError(f'Line {n} of the manifest {location} is not path,label'
                      f"{',split' if cols[2] is not None else ''} ({','.join(row)[:80]!r})"
                      f"{' (every row needs its split)' if cols[2] is not None else ''}; fix "
                      'or remove it.')
    out.append((row[cols[0]].strip(), row[cols[1]].strip(),
                 row[cols[2]].strip() if cols[2] is not None else None))
  out = _windows_paths(out, location)
  if cols[2] is not None and one_split_each:
    _one_split_each(out, location)
  if multilabel:
    comma = next((label for _, label, _ in out if ',' in label), None)
    if comma is not None:
      logging.warning("The manifest %s has tags holding ',' (e.g. %r): tags are separated by ';' "
                      "('cat;dog'); a ',' stays inside one tag.", location, comma)
  return out


def _windows_paths(rows: list[Row], location: str) -> list[Row]:
  """``rows``, a path written with '\\' (``folder\\1\\x.png``, as on Windows) that names no
  file where the same path with '/' does read as that one, with a warning."""
  if os.sep == '\\' or not any('\\' in path for path, _, _ in rows):
    return rows
  root, fixed, out = os.path.dirname(location), [], []
  for path, label, split in rows:
    slashed = path.replace('\\', '/')
    if ('\\' in path and not os.path.lexists(os.path.join(root, path))
        and os.path.lexists(os.path.join(root, slashed))):
      fixed.append(path)
      path = slashed
    out.append((path, label, split))
  if fixed:
    logging.warning("The manifest %s writes %d path(s) with '\\' as the folder separator (e.g. "
                    "%s), read as %s; write paths with '/', which every system reads.", location,
                    len(fixed), fixed[0], fixed[0].replace('\\', '/'))
  return out


def split_pairs(location: str, multilabel: bool, split: str, every: str,
                ) -> tuple[bool, list[tuple[str, str]], list[tuple[str, str]]]:
  """(whether the manifest has a split column, [(path, label)] of the rows of ``split`` (every
  row for split ``every``), [(path, why skipped)]): a file listed twice with the same label (tag
  set) is read once, with another refused."""
  rows = read_rows(location, multilabel)
  has_split = rows[0][2] is not None
  if has_split and split != every:
    known = sorted({r[2] for r in rows})
    if split not in known:
      raise UserError(f"Split '{split}' is in no row of the manifest {location} (its splits: "
                      f"{', '.join(known)}); set config.data.train_split / eval_split.")
    warn_near_splits(rows, location, split)
  pairs: list[tuple[str, str]] = []
  skipped: list[tuple[str, str]] = []
  seen: dict[str, str] = {}
  for path, label, row_split in rows:
    if has_split and split != every and row_split != split:
      continue
    rel, key = os.path.normpath(path), image_key(location, path)
    if key in seen:
      if (set(tags(seen[key])) != set(tags(label))) if multilabel else seen[key] != label:
        raise UserError(f"{rel} is listed twice in the manifest {location} with different labels "
                        f"('{seen[key]}' and '{label}'); keep the row with its right label.")
      skipped.append((rel, 'listed twice'))
      continue
    seen[key] = label
    pairs.append((rel, label))
  return has_split, pairs, skipped


def image_key(location: str, path: str) -> str:
  """One name per file of a manifest row (relative or absolute, ``a/./b`` or ``a/b``)."""
  return os.path.normpath(os.path.join(os.path.dirname(location), path))


def _one_split_each(rows: list[Row], location: str) -> None:
  """Refuses a file listed in two splits: a test image also trained on inflates every score."""
  where: dict[str, str | None] = {}
  clashes: dict[str, tuple[str, str | None, str | None]] = {}
  for path, _, split in rows:
    key = image_key(location, path)
    first = where.setdefault(key, split)
    if first != split and key not in clashes:
      clashes[key] = (path, first, split)
  if clashes:
    path, a, b = next(iter(clashes.values()))
    raise UserError(f'{len(clashes)} image(s) of the manifest {location} are listed in two splits '
                    f"(e.g. {path}: '{a}' and '{b}'); an image both trained on and evaluated "
                    'inflates the scores: list each image in one split.')


_WARNED: set[tuple[str, str]] = set()


def _near(name: str, split: str) -> bool:
  """True when ``name`` is not ``split`` but differs from it only in case or spaces ('Train'),
  or looks like a typo of it ('tset', 'training')."""
  a, b = name.strip().casefold(), split.strip().casefold()
  return name != split and (a == b or difflib.SequenceMatcher(None, a, b).ratio() >= 0.7)


def warn_near_splits(rows: tuple[Row, ...], location: str, split: str) -> None:
  """Warns (once per manifest and split) of rows whose split differs from ``split`` only in case
  or spaces ('Train' for 'train'), or looks like a typo of it ('tset' for 'test', 'training' for
  'train'): they are not read as that split."""
  near: dict[str, int] = {}
  for _, _, s in rows:
    if s is not None and _near(s, split):
      near[s] = near.get(s, 0) + 1
  if near and (location, split) not in _WARNED:
    _WARNED.add((location, split))
    listed = ', '.join(f"{n} row(s) of split '{s}'" for s, n in near.items())
    logging.warning("The manifest %s has %s, which is not split '%s' (splits are exact text): "
                    'those images are not read as it; write their split as %s.', location,
                    listed, split, split)


def warn_unused_splits(location: str, multilabel: bool, train: str, test: str,
                       read: Sequence[str]) -> None:
  """Warns (once per manifest) of rows of a split that neither ``train`` nor ``test`` (the run's
  train and eval splits) reads, nor any of ``read`` (the held-out splits the run's temperature,
  thresholds or evaluation read): those images are silently unused. Names ``warn_near_splits``
  gives (a typo of ``train`` / ``test``) are left to it."""
  rows = read_rows(location, multilabel)
  unused = collections.Counter(s for _, _, s in rows if s is not None and s not in (
      train, test, *read) and not _near(s, train) and not _near(s, test))
  if not unused or (location, '') in _WARNED:
    return
  _WARNED.add((location, ''))
  listed = ', '.join(f"'{s}' ({n})" for s, n in sorted(unused.items()))
  nor = ', '.join(f"'{s}'" for s in read)
  logging.warning("The manifest %s has %d row(s) of split(s) %s, which neither "
                  "config.data.train_split '%s' nor eval_split '%s' reads%s: unless a key names "
                  'them later (config.evaluate.split, temperature_split or threshold_split), '
                  'those images are unused; write their split as one of these, or point a split '
                  'key at it.', location, sum(unused.values()), listed, train, test,
                  f' (nor {nor})' if nor else '')


def tags(label: str) -> tuple[str, ...]:
  """The tags of a multi-label manifest cell ``'a;b'`` (stripped, each once, in order)."""
  return tuple(dict.fromkeys(t.strip() for t in label.split(';') if t.strip()))
