"""The user's images as an index of (file, class) per split, probed once, cached; the layouts and
their split names are ``folder_layout.py``. Without split directories or a split column, a seeded,
stratified hold-out (``holdout.py``) of ``data.holdout_fraction`` of every class is the eval split;
``data.validation_fraction`` carves split ``validation`` out of the train split the same way.

Building the index reads only file headers (``file_probe.py``; PIL: size, mode, EXIF
orientation): ~9,000-25,000 files/s per core from the page cache (one process per core past
20,000 files), where decoding every file ran at ~570 files/s on 2 cores. A truncated file (no
JPEG/PNG end marker) is decoded once to tell. The result is cached per folder or manifest
(``data.index_cache``; one JSON file, keyed by each file's size and mtime), so a restart lists and
stats the files and probes only new or changed ones. A file that still fails to decode during
training is reported and masked out of its batch (``image_folder.dataset``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import threading
from typing import Sequence

import numpy as np

from imgcls_jax.data import duplicates, file_probe, folder_layout, holdout, manifest
from imgcls_jax.data.folder_layout import (ALL, VALIDATION, Source, check_split_name, loose_files,
                                           named_splits, split_dir)
from imgcls_jax.data.images import is_image_file, unreadable_summary
from imgcls_jax.errors import UserError

_SHOWN = 10            # skipped file names listed in the warning
_IMBALANCE = 10.0      # warn when the largest class has over this many times the smallest's images


@dataclasses.dataclass(frozen=True)
class Split:
  """The readable images of one split and what was skipped."""
  root: str
  split: str
  paths: tuple[str, ...]                    # absolute, in a fixed shuffled order
  labels: tuple                            # class index per image; multi-label: a tuple of them
  ids: tuple[str, ...]                      # example ids: paths relative to ``root``
  channels_found: frozenset[int]            # band counts of the images (1 grey ... 4 RGBA)
  sizes_found: frozenset[tuple[int, int]]   # upright (height, width) of the images
  skipped: tuple[tuple[str, str], ...]      # (id, reason)
  counts: tuple[int, ...]                   # images per class (multi-label: images tagged with it)
  digest: str = ''                          # ``listed_digest`` of the split (before any probe)
  # One example per size: ((height, width), id), sizes by falling count of images.
  size_examples: tuple[tuple[tuple[int, int], str], ...] = ()

  def __len__(self) -> int:
    return len(self.paths)


  @property
  def typical_hw(self) -> tuple[int, int]:
    """The largest height and width found: the size of the blank that stands in for a file that
    fails to decode when it is read (so any crop of the preprocessing fits)."""
    if not self.sizes_found:
      return 32, 32
    return max(h for h, _ in self.sizes_found), max(w for _, w in self.sizes_found)


# ---- listing: (example id, class name) per candidate file ----

def _candidates(src: Source, split: str, names: tuple[str, ...],
                ) -> tuple[list[str], list[int], list[tuple[str, str]]]:
  """(ids, labels, skipped) of the files that claim to belong to ``split``; with
  ``validation_fraction``, the train split less its validation part, or that part."""
  if src.validation_fraction <= 0 or split not in (src.train_split, VALIDATION):
    return _listed(src, split, names)
  if src.train_split == ALL:
    raise UserError(f"config.data.validation_fraction={src.validation_fraction} holds images out "
                    f"of train_split '{ALL}', which is every image, the eval split's included; "
                    "train on the train split (e.g. data.train_split='train') or set "
                    'validation_fraction=0.')
  if src.train_split == VALIDATION or VALIDATION in named_splits(src):
    raise UserError(f"config.data.validation_fraction={src.validation_fraction} carves a split "
                    f"'{VALIDATION}' out of train_split '{src.train_split}', but {src.location} "
                    f"already has a split '{VALIDATION}' or trains on it; use that split (set "
                    'validation_fraction=0) or train on another split.')
  ids, labels, skipped = _listed(src, src.train_split, names)
  held = holdout.draw(ids, holdout.strata(labels, src.multilabel), names, src.validation_fraction,
                  src.holdout_seed, salt=1)
  keep = [i for i in range(len(ids)) if (i in held) == (split == VALIDATION)]
  skipped = _not_of(src, skipped, [ids[i] for i in range(len(ids))
                                   if (i in held) != (split == VALIDATION)])
  return [ids[i] for i in keep], [labels[i] for i in keep], skipped


def _listed(src: Source, split: str, names: tuple[str, ...],
            ) -> tuple[list[str], list[int], list[tuple[str, str]]]:
  """(ids, labels, skipped) of the files the layout puts in ``split``."""
  check_split_name(src, split)
  index = {n: k for k, n in enumerate(names)}
  pairs: list[tuple[str, str]] = []
  skipped: list[tuple[str, str]] = []
  needs_holdout = src.kind == 'flat'
  if src.kind == 'manifest':
    has_split, pairs, skipped = manifest.split_pairs(src.location, src.multilabel, split, ALL)
    needs_holdout = not has_split
  elif src.kind == 'flat':
    skipped += [(f, 'outside every class folder') for f in loose_files(src.root)]
    pairs = folder_layout.class_folders(src.root, src.root, '', skipped)
  else:
    where = split_dir(src, split)
    skipped += [(os.path.join(split, f), 'outside every class folder')
                for f in loose_files(where)]
    pairs = folder_layout.class_folders(src.root, where, split, skipped)
  if not needs_holdout and src.holdout_fraction > 0:
    _warn_holdout_unused(src)
  if src.multilabel:
    tag_pairs = [(rel, manifest.tags(label)) for rel, label in pairs]
    found = {t for _, tags in tag_pairs for t in tags}
  else:
    found = {label for _, label in pairs}
  alias = folder_layout.same_names(found - set(names), names)
  if alias:   # 'zéro' written NFD (macOS) for the model's NFC 'zéro': the same name
    if src.multilabel:
      tag_pairs = [(rel, tuple(alias.get(t, t) for t in tags)) for rel, tags in tag_pairs]
    else:
      pairs = [(rel, alias.get(label, label)) for rel, label in pairs]
  unknown = sorted(found - set(names) - set(alias))
  if unknown:
    near = [f"'{u}' differs from the model's '{n}' only in case" for u in unknown
            for n in names if folder_layout.fold_name(u) == folder_layout.fold_name(n)]
    raise UserError(f"Split '{split}' of {src.location} has classes the model does not know "
                    f"({', '.join(unknown[:5])}); every class must exist in the training data "
                    f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})"
                    + (f" ({'; '.join(near[:3])}: rename it)" if near else '') + '.')
  ids, labels = [], []
  for j, (rel, label) in enumerate(pairs):
    if not is_image_file(rel):
      skipped.append((rel, 'not an image file'))
      continue
    ids.append(rel)
    labels.append(tuple(index[t] for t in tag_pairs[j][1]) if src.multilabel else index[label])
  if needs_holdout and split != ALL:
    if split not in (src.train_split, src.eval_split):
      hint = (f" (config.data.validation_fraction > 0 makes a split '{VALIDATION}')"
              if split == VALIDATION else '')
      raise UserError(f"Split '{split}' is neither config.data.train_split "
                      f"('{src.train_split}') nor eval_split ('{src.eval_split}') nor '{ALL}'"
                      f'{hint}; {src.location} has no split directories to choose from.')
    if src.holdout_fraction <= 0:
      key = 'train_split' if split == src.train_split else 'eval_split'
      if src.kind == 'manifest':
        missing = (f"no split column (path,label,split rows) naming split '{split}' for "
                   f'config.data.{key}')
      else:
        missing = f'no split directories (no {src.root}/{split}/ for config.data.{key})'
      raise UserError(f'{src.location} has {missing}; set config.data.holdout_fraction (e.g. 0.2) '
                      f"to hold out part of every class for evaluation (split '{ALL}' reads every "
                      'image).')
    held = holdout.draw(ids, holdout.strata(labels, src.multilabel), names, src.holdout_fraction,
                    src.holdout_seed)
    held_out = split == src.eval_split != src.train_split   # a k-fold's folds both read train
    keep = [i for i in range(len(ids)) if (i in held) == held_out]
    skipped = _not_of(src, skipped, [ids[i] for i in range(len(ids)) if (i in held) != held_out])
    ids, labels = [ids[i] for i in keep], [labels[i] for i in keep]
  return ids, labels, skipped


def _not_of(src: Source, skipped: list[tuple[str, str]], other: list[str]
            ) -> list[tuple[str, str]]:
  """``skipped`` less a manifest's rows that list again a file of ``other`` (the part of a
  drawn split this one is not): such a row goes with its file's split."""
  if src.kind != 'manifest' or not skipped:
    return skipped
  key = functools.partial(manifest.image_key, src.location)
  theirs = {key(i) for i in other}
  return [(rel, why) for rel, why in skipped if key(rel) not in theirs]


def _warn_holdout_unused(src: Source) -> None:
  """Warns (once per location) that ``holdout_fraction`` is ignored: the layout names its
  splits."""
  with _LOCK:
    if src.location in _HOLDOUT_WARNED:
      return
    _HOLDOUT_WARNED.add(src.location)
  what = ('split folders' if src.kind == 'splits' else 'a split column') + (
      f" ({', '.join(sorted(named_splits(src)))})")
  logging.warning('config.data.holdout_fraction=%s has no effect on %s: it has %s, which give '
                  'the splits; set holdout_fraction=0 (config.data.validation_fraction holds '
                  'images out of the train split).', src.holdout_fraction, src.location, what)


def warn_unused_splits(src: Source, read: Sequence[str]) -> None:
  """Warns (once per folder or manifest) of the splits it names (split folders, a split column)
  that neither the train nor the eval split reads, nor any of ``read`` (the held-out splits of
  the run's temperature, thresholds or evaluation): their images are silently unused (e.g.
  ``val/`` beside ``train/`` and ``test/``)."""
  if ALL in (src.train_split, src.eval_split):
    return
  if src.kind == 'manifest':
    if manifest.read_rows(src.location, src.multilabel)[0][2] is not None:
      manifest.warn_unused_splits(src.location, src.multilabel, src.train_split, src.eval_split,
                                  read)
    return
  unused = sorted(named_splits(src) - {src.train_split, src.eval_split, *read})
  with _LOCK:
    if not unused or src.location in _UNUSED_WARNED:
      return
    _UNUSED_WARNED.add(src.location)
  nor = ', '.join(f"'{s}'" for s in read)
  logging.warning("The image folder %s has split folder(s) %s, which neither "
                  "config.data.train_split '%s' nor eval_split '%s' reads%s: unless a key names "
                  'them later (config.evaluate.split, temperature_split or threshold_split), '
                  'those images are unused; rename the folder to a split the run reads, or point '
                  'a split key at it.', src.location, ', '.join(f"'{n}/'" for n in unused),
                  src.train_split, src.eval_split, f' (nor {nor})' if nor else '')


# ---- the index of a split ----

_MEMO: dict[tuple[Source, str, tuple[str, ...]], Split] = {}
_WARNED: set[tuple[str, str, str]] = set()   # (location, id, why) a warning already named
_HOLDOUT_WARNED: set[str] = set()            # locations whose unused holdout_fraction was named
_UNUSED_WARNED: set[str] = set()             # locations whose unread split folders were named
_LOCK = threading.Lock()


def clear_memo() -> None:
  """Forgets the splits indexed by this process (the on-disk cache stays)."""
  with _LOCK:
    _MEMO.clear()
    _WARNED.clear()
    _HOLDOUT_WARNED.clear()
    _UNUSED_WARNED.clear()


def _digest(ids: list[str], labels: list) -> str:
  rows = sorted(f'{i}\t{y}' for i, y in zip(ids, labels))
  return hashlib.sha256('\n'.join(rows).encode()).hexdigest()[:16]


def listed(src: Source, split: str, names: tuple[str, ...]) -> tuple[list[str], list]:
  """(ids, labels) of the files the layout puts in ``split`` (held-out draws applied), from the
  listing alone: no file is opened."""
  ids, labels, _ = _candidates(src, split, names)
  return ids, labels


def files_of(src: Source, spec: str, names: tuple[str, ...]) -> list[str]:
  """The paths of the files ``spec`` lists (``split``, or a cross-validation fold's
  ``split@ids_file``: the ids it names), from the listing alone."""
  base, _, ids_file = str(spec).partition('@')
  ids = listed(src, base, names)[0]
  if ids_file:
    with open(ids_file) as f:
      ids = sorted(set(ids) & {line.strip() for line in f})
  return [os.path.join(src.root, i) for i in ids]


def copied_files(src: Source, spec: str, train_src: Source, train_spec: str,
                 names: tuple[str, ...]) -> list[tuple[str, str]]:
  """(file of ``spec``, a file of ``train_spec`` with its bytes) for each file ``spec`` lists that
  is not itself listed by ``train_spec`` but holds a training file's bytes: a copy, or the same
  file reached again (a link, a path spelt otherwise) (``duplicates.identical``)."""
  train = files_of(train_src, train_spec, names)
  listed = {os.path.normpath(os.path.abspath(p)) for p in train}
  return duplicates.identical([p for p in files_of(src, spec, names)
                               if os.path.normpath(os.path.abspath(p)) not in listed], train)


def real_files(src: Source, spec: str, names: tuple[str, ...]) -> set[str]:
  """The real paths of ``files_of``, to compare the files of two sources."""
  return {os.path.realpath(p) for p in files_of(src, spec, names)}


def listed_digest(src: Source, split: str, names: tuple[str, ...]) -> str:
  """A fingerprint of the files (and labels) the layout puts in ``split``, in any order, from the
  listing alone (no file is opened): another file set, a renamed or moved file or a relabelled
  manifest row changes it; a file that became unreadable does not (the held-out draw is made on
  the listing)."""
  return _digest(*listed(src, split, names))


def index(src: Source, split: str, names: tuple[str, ...]) -> Split:
  """The readable images of ``split`` labelled by ``names``, once per process (memoised)."""
  key = (src, split, names)
  with _LOCK:
    if key in _MEMO:
      return _MEMO[key]
  ids, labels, skipped = _candidates(src, split, names)
  digest = _digest(ids, labels)
  probed = file_probe.probe_all(src.root, src.kind, src.location, src.cache_dir, ids)
  keep = [i for i, p in enumerate(probed) if not isinstance(p, str)]
  skipped += [(ids[i], p) for i, p in enumerate(probed) if isinstance(p, str)]
  if src.multilabel:
    counts = np.bincount([t for i in keep for t in labels[i]], minlength=len(names))
  else:
    counts = np.bincount([labels[i] for i in keep], minlength=len(names))
  if not ids:
    _refuse_empty_draw(src, split, names)
  if not keep:
    why = unreadable_summary(skipped)
    where = (f"; a manifest's paths are relative to its folder {src.root}"
             if src.kind == 'manifest' else '')
    raise UserError(f"Split '{split}' of {src.location} has no readable images"
                    f"{f' (skipped: {why})' if why else ''}{where}.")
  if split == src.train_split:
    empty = [names[k] for k in range(len(names)) if counts[k] == 0]
    if empty:
      raise UserError(f"Class(es) {', '.join(empty[:5])} of split '{split}' in {src.location} "
                      'have no readable images; add images or remove the class.')
  order = np.random.RandomState(0).permutation(len(keep))
  keep = [keep[j] for j in order]
  with _LOCK:   # a folder without split folders lists its non-images for every split: once
    news = [(p, why) for p, why in skipped if (src.location, p, why) not in _WARNED]
    _WARNED.update((src.location, p, why) for p, why in news)
  if news:
    shown = ', '.join(f'{p} ({why})' for p, why in news[:_SHOWN])
    more = f' and {len(news) - _SHOWN} more' if len(news) > _SHOWN else ''
    logging.warning("Image folder %s, split '%s': skipped %d file(s): %s%s.", src.location, split,
                    len(news), shown, more)
  _report_counts(src, split, names, counts, len(keep))
  by_size: dict[tuple[int, int], list] = {}
  for i in sorted(keep, key=lambda i: ids[i]):
    by_size.setdefault(tuple(probed[i][:2]), [0, ids[i]])[0] += 1
  examples = tuple((hw, first) for hw, (_, first) in sorted(by_size.items(),
                                                            key=lambda kv: (-kv[1][0], kv[0])))
  result = Split(root=src.root, split=split,
                 paths=tuple(os.path.join(src.root, ids[i]) for i in keep),
                 labels=tuple(labels[i] for i in keep), ids=tuple(ids[i] for i in keep),
                 channels_found=frozenset(probed[i][2] for i in keep),
                 sizes_found=frozenset(probed[i][:2] for i in keep), skipped=tuple(skipped),
                 counts=tuple(int(c) for c in counts), digest=digest,
                 size_examples=examples)
  with _LOCK:
    _MEMO[key] = result
  return result


def _refuse_empty_draw(src: Source, split: str, names: tuple[str, ...]) -> None:
  """A split drawn by a hold-out (``holdout_fraction`` / ``validation_fraction``) that got no
  image: each class had one image, which always stays in the rest."""
  if split == VALIDATION and src.validation_fraction > 0:
    key, fraction, pool = 'validation_fraction', src.validation_fraction, src.train_split
  elif split == src.eval_split != src.train_split and src.holdout_fraction > 0 and (
      src.kind == 'flat' or (src.kind == 'manifest' and not named_splits(src))):
    key, fraction, pool = 'holdout_fraction', src.holdout_fraction, ALL
  else:
    return
  n = len(_listed(src, pool, names)[0])
  if not n:
    return
  raise UserError(f"config.data.{key}={fraction} holds out no image of the {n} in "
                  f"{'split ' + repr(pool) + ' of ' if pool != ALL else ''}{src.location} for "
                  f"split '{split}': a class's last image always stays in the rest, and no class "
                  'has two; add images (at least 2 per class) or name the splits yourself '
                  '(split folders, or a split column).')


def _report_counts(src: Source, split: str, names: tuple[str, ...], counts: np.ndarray,
                   images: int) -> None:
  listed = ', '.join(f'{n} {c}' for n, c in zip(names[:20], counts[:20]))
  more = f', ... ({len(names) - 20} more classes)' if len(names) > 20 else ''
  logging.info("Image folder %s, split '%s': %d images in %d %s: %s%s.", src.location, split,
               images, len(names), 'tags' if src.multilabel else 'classes', listed, more)
  present = counts[counts > 0]
  if split == src.train_split and len(present) > 1 and present.max() > _IMBALANCE * present.min():
    big, small = int(np.argmax(counts)), int(np.argmin(np.where(counts > 0, counts, counts.max())))
    logging.warning("Split '%s' of %s is imbalanced: class %s has %d images, %.0fx the %d of class "
                    '%s; consider more images of the rare classes or class weights.', split,
                    src.location, names[big], counts[big], counts[big] / counts[small],
                    counts[small], names[small])
