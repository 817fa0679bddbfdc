"""The user's images as an index of (file, class): folders or a CSV manifest, probed once, cached.

Three layouts, chosen by ``config.data``:
  * ``folder/<split>/<class>/**`` (``data.folder``; splits named by ``train_split`` / ``eval_split``);
  * ``folder/<class>/**`` without split directories (``data.folder``): a seeded, stratified
    hold-out of ``data.holdout_fraction`` of every class is the eval split, the rest the train
    split (as Keras' ``validation_split``, but per class); split ``all`` is every image;
  * a CSV manifest (``data.manifest``): rows ``path,label`` or ``path,label,split`` (an optional
    header naming the columns), paths relative to the CSV; without a split column, the hold-out
    above. Labels are class names (sorted; numerically when all are integers). With
    ``data.multilabel`` a row's label is a set of tags, ``tag1;tag2`` (possibly empty; column
    ``labels`` or ``label``), and the hold-out is stratified by each image's first tag.

In any layout, ``data.validation_fraction`` > 0 carves a split named ``validation`` out of the
train split the same way (seeded, stratified; the eval split is left as it was): held-out images
to fit a temperature or thresholds on (``config.evaluate.temperature_split`` /
``threshold_split``), which a folder of ``<class>/`` directories has no other way to give.

Building the index reads only file headers (``file_probe.py``; PIL: size, mode, EXIF orientation): ~9,000-25,000
files/s per core from the page cache (one process per core past 20,000 files), where decoding
every file ran at ~570 files/s on 2 cores. A truncated file (no JPEG/PNG end marker) is decoded once to tell. The result is cached per
folder or manifest (``data.index_cache``; one JSON file, keyed by each file's size and mtime), so a
restart lists and stats the files and probes only new or changed ones. A file that still fails to
decode during training is reported and masked out of its batch (``image_folder.dataset``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from typing import Iterable

import ml_collections
import numpy as np

from imgcls_jax.data import file_probe, holdout, manifest
from imgcls_jax.data.images import is_image_file, unreadable_summary
from imgcls_jax.errors import UserError

NAME = 'image_folder'  # config.data.name of the user's images (folders or a manifest)
ALL = 'all'            # the split of every image of a folder without split directories / a manifest
VALIDATION = 'validation'  # the split data.validation_fraction carves out of the train split
_SHOWN = 10            # skipped file names listed in the warning
_IMBALANCE = 10.0      # warn when the largest class has more than this many times the smallest's images


def is_folder(data: ml_collections.ConfigDict) -> bool:
  """True when ``config.data`` selects an image folder or manifest."""
  return data.get('name') == NAME


@dataclasses.dataclass(frozen=True)
class Source:
  """Where the images of ``config.data`` are and how they split."""
  kind: str                  # 'splits' | 'flat' | 'manifest'
  location: str              # the folder, or the manifest file (absolute)
  root: str                  # directory that relative paths and example ids start from
  train_split: str
  eval_split: str
  holdout_fraction: float
  holdout_seed: int
  cache_dir: str             # '' = no cache
  multilabel: bool = False   # manifest labels are ';'-separated tag sets
  validation_fraction: float = 0.0   # of every class of the train split, held out as VALIDATION


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

  def __len__(self) -> int:
    return len(self.paths)


  @property
  def typical_hw(self) -> tuple[int, int]:
    """The largest height and width found: the size of the blank that stands in for a file that
    fails to decode when it is read (so any crop of the preprocessing fits)."""
    if not self.sizes_found:
      return 32, 32
    return max(h for h, _ in self.sizes_found), max(w for _, w in self.sizes_found)


def _default_cache_dir() -> str:
  base = os.environ.get('IMGCLS_JAX_CACHE_DIR') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'imgcls_jax')
  return os.path.join(base, 'image_index')


def source_of(data: ml_collections.ConfigDict) -> Source:
  """The layout ``config.data`` selects (folder with or without splits, or a manifest)."""
  folder, manifest = data.get('folder') or '', data.get('manifest') or ''
  fraction = float(data.get('holdout_fraction', 0.0) or 0.0)
  if not 0.0 <= fraction < 1.0:
    raise UserError(f'config.data.holdout_fraction={fraction} must be in [0, 1); e.g. 0.2 holds '
                    'out a fifth of every class for evaluation.')
  validation = float(data.get('validation_fraction', 0.0) or 0.0)
  if not 0.0 <= validation < 1.0:
    raise UserError(f'config.data.validation_fraction={validation} must be in [0, 1); e.g. 0.1 '
                    f"holds out a tenth of every class of the train split as split '{VALIDATION}'.")
  cache = data.get('index_cache', '') or ''
  cache_dir = '' if cache == 'off' else os.path.abspath(os.path.expanduser(cache or
                                                                           _default_cache_dir()))
  # The split names; a cross-validation fold's 'SPLIT@IDS_FILE' (sources.read) selects from SPLIT.
  common = dict(train_split=str(data.train_split).split('@')[0],
                eval_split=str(data.eval_split).split('@')[0],
                holdout_fraction=fraction, holdout_seed=int(data.get('holdout_seed', 0) or 0),
                cache_dir=cache_dir, multilabel=bool(data.get('multilabel', False)),
                validation_fraction=validation)
  if folder and manifest:
    raise UserError('Both config.data.folder and config.data.manifest are set; set one of them.')
  if manifest:
    path = os.path.abspath(os.path.expanduser(manifest))
    if os.path.isdir(path):
      raise UserError(f'The manifest {path} (config.data.manifest) is a directory; point it at a '
                      'CSV file of path,label rows (a folder of class directories goes in '
                      'config.data.folder).')
    if not os.path.isfile(path):
      raise UserError(f'The manifest {path} (config.data.manifest) does not exist; point it at a '
                      'CSV file of path,label rows.')
    return Source(kind='manifest', location=path, root=os.path.dirname(path), **common)
  if common['multilabel']:
    raise UserError('config.data.multilabel=True needs a manifest: set config.data.manifest to a '
                    'CSV of path,labels rows with the tags separated by ";" (a folder of class '
                    'directories gives one label per image).')
  if not folder:
    raise UserError("config.data.name is 'image_folder' but neither config.data.folder nor "
                    'config.data.manifest is set; set config.data.folder to the directory holding '
                    '<class>/*.jpg (or <split>/<class>/*.jpg).')
  root = os.path.abspath(os.path.expanduser(folder))
  if os.path.isfile(root):
    raise UserError(f'The image folder {root} (config.data.folder) is a file; point it at the '
                    'directory holding <class>/*.jpg (a CSV of path,label rows goes in '
                    'config.data.manifest).')
  if not os.path.isdir(root):
    raise UserError(f'The image folder {root} (config.data.folder) does not exist; point '
                    'config.data.folder at the directory holding <class>/*.jpg or '
                    '<split>/<class>/*.jpg.')
  train, test = common['train_split'], common['eval_split']
  # Split directories hold class directories; a 'train' of images only, beside other class
  # directories, is a class of a flat folder.
  split_dir = os.path.join(root, (train if train != ALL else test) or '_')
  has_splits = os.path.isdir(split_dir) and bool(
      subdirs(split_dir) or set(subdirs(root)) <= {train, test, VALIDATION})
  return Source(kind='splits' if has_splits else 'flat', location=root, root=root, **common)


def subdirs(path: str) -> list[str]:
  """The non-hidden sub-directories of ``path``, sorted (class or split directories)."""
  return sorted(d for d in os.listdir(path)
                if os.path.isdir(os.path.join(path, d)) and not d.startswith('.'))


def _loose_files(path: str) -> list[str]:
  """The non-hidden files directly in ``path`` (no class folder claims them), sorted."""
  return sorted(f for f in os.listdir(path)
                if not f.startswith('.') and os.path.isfile(os.path.join(path, f)))


def _check_split_name(src: Source, split: str) -> None:
  if not split or any(ch in split for ch in '[]+@/'):
    raise UserError(f"Image-folder splits are plain names, got '{split}'; set "
                    'config.data.train_split / eval_split to e.g. train and test.')


def _split_dir(src: Source, split: str) -> str:
  _check_split_name(src, split)
  path = os.path.join(src.root, split)
  if not os.path.isdir(path):
    raise UserError(f"Split '{split}' does not exist in the image folder {src.root} (found: "
                    f"{', '.join(subdirs(src.root)) or 'no sub-directories'}); create "
                    f'{path}/<class>/ or set config.data.train_split / eval_split.')
  return path


def has_splits(src: Source) -> bool:
  """True when the images come in named splits (split directories, or a manifest's split column)."""
  if src.kind == 'manifest':
    return manifest.read_rows(src.location, src.multilabel)[0][2] is not None
  return src.kind == 'splits'


# ---- listing: (example id, class name) per candidate file ----

def walk(directory: str, prefix: str) -> Iterable[str]:
  """Relative paths (``prefix/...``) of the non-hidden files under ``directory``, sorted."""
  for dirpath, dirnames, filenames in os.walk(directory):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    rel = os.path.relpath(dirpath, directory)
    for f in sorted(filenames):
      if not f.startswith('.'):
        yield os.path.normpath(os.path.join(prefix, rel, f))


def _sort_labels(labels: Iterable[str]) -> tuple[str, ...]:
  """Sorted, numerically when every label is an integer ('01' and '1' by their text after that:
  the order must not depend on the process)."""
  names = set(labels)
  if all(n.lstrip('-').isdigit() for n in names):
    return tuple(sorted(names, key=lambda n: (int(n), n)))
  return tuple(sorted(names))


def class_names(src: Source) -> tuple[str, ...]:
  """The classes of the training data, sorted: class directories, or the manifest's labels."""
  if src.kind == 'manifest':
    rows = manifest.read_rows(src.location, src.multilabel)
    train = [r for r in rows if r[2] in (None, src.train_split) or src.train_split == ALL]
    if src.multilabel:
      names = _sort_labels(t for _, label, _ in (train or rows) for t in manifest.tags(label))
      if not names:
        raise UserError(f'The manifest {src.location} tags no image; write path,tag1;tag2 rows.')
      return names
    names = _sort_labels(label for _, label, _ in (train or rows))
    if len(names) < 2:
      raise UserError(f"The manifest {src.location} labels every training image '{names[0]}'; a "
                      'classifier needs at least 2 classes: add rows of images of another class.')
    return names
  where = src.root if src.kind == 'flat' else _split_dir(src, src.train_split)
  names = tuple(subdirs(where))   # as text (runs saved with this order resume in it)
  if not names:
    raise UserError(f'The image folder {where} has no class sub-directories; put the images in '
                    f'{where}/<class name>/ (or list them in a CSV set as config.data.manifest).')
  if src.kind == 'flat':
    _refuse_split_folders_as_classes(src, names)
  if len(names) < 2:
    inner = os.path.join(where, names[0])
    if subdirs(inner) and not _loose_files(inner):   # a wrapper: photos/<class>/...
      raise UserError(f'The image folder {where} holds one folder, {names[0]}, whose sub-folders '
                      f"({', '.join(subdirs(inner)[:5])}) look like the classes; set "
                      f'config.data.folder={inner}.')
    raise UserError(f'The image folder {where} has only one class, {names[0]}; a classifier needs '
                    f'at least 2 classes: add {where}/<another class>/ with its images.')
  return names


# Folder names that name a split, not a class (case-insensitive): 'Training' / 'Testing' of a
# downloaded dataset are split directories under names other than train_split / eval_split.
_SPLIT_LIKE = {'train', 'training', 'test', 'testing', 'val', 'valid', 'validation', 'eval',
               'evaluation', 'dev'}


def _refuse_split_folders_as_classes(src: Source, names: tuple[str, ...]) -> None:
  """A folder without ``train_split`` / ``eval_split`` directories whose "classes" are two or
  more split-like names each holding class folders: training on it would classify splits."""
  splits = [n for n in names if n.casefold() in _SPLIT_LIKE
            and subdirs(os.path.join(src.root, n))]
  if len(splits) < 2:
    return
  train = next((n for n in splits if n.casefold().startswith('train')), splits[0])
  test = next((n for n in splits if n != train and n.casefold().startswith('test')),
              next(n for n in splits if n != train))
  raise UserError(f"The image folder {src.root} has split folders {', '.join(splits)} (each "
                  'holding class folders), none named config.data.train_split '
                  f"('{src.train_split}') / eval_split ('{src.eval_split}'): as classes they "
                  f"would train a split classifier; set config.data.train_split='{train}' and "
                  f"config.data.eval_split='{test}'.")


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
  return [ids[i] for i in keep], [labels[i] for i in keep], skipped


def named_splits(src: Source) -> set[str]:
  """The splits the layout names itself: split directories, or a manifest's split column."""
  if src.kind == 'splits':
    return set(subdirs(src.root))
  if src.kind == 'manifest':
    return {r[2] for r in manifest.read_rows(src.location, src.multilabel) if r[2] is not None}
  return set()


def _listed(src: Source, split: str, names: tuple[str, ...],
            ) -> tuple[list[str], list[int], list[tuple[str, str]]]:
  """(ids, labels, skipped) of the files the layout puts in ``split``."""
  _check_split_name(src, split)
  index = {n: k for k, n in enumerate(names)}
  pairs: list[tuple[str, str]] = []
  skipped: list[tuple[str, str]] = []
  needs_holdout = src.kind == 'flat'
  if src.kind == 'manifest':
    has_split, pairs, skipped = manifest.split_pairs(src.location, src.multilabel, split, ALL)
    needs_holdout = not has_split
  elif src.kind == 'flat':
    skipped += [(f, 'outside every class folder') for f in _loose_files(src.root)]
    for name in subdirs(src.root):
      pairs.extend((rel, name) for rel in walk(os.path.join(src.root, name), name))
  else:
    split_dir = _split_dir(src, split)
    skipped += [(os.path.join(split, f), 'outside every class folder')
                for f in _loose_files(split_dir)]
    for name in subdirs(split_dir):
      pairs.extend((rel, name) for rel in walk(os.path.join(split_dir, name),
                                                os.path.join(split, name)))
  if src.multilabel:
    tag_pairs = [(rel, manifest.tags(label)) for rel, label in pairs]
    unknown = sorted({t for _, tags in tag_pairs for t in tags} - set(names))
  else:
    unknown = sorted({label for _, label in pairs} - set(names))
  if unknown:
    raise UserError(f"Split '{split}' of {src.location} has classes the model does not know "
                    f"({', '.join(unknown[:5])}); every class must exist in the training data "
                    f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}).")
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
      raise UserError(f'{src.location} has no split directories (no {src.root}/{split}/ for '
                      f'config.data.{key}); set config.data.holdout_fraction (e.g. 0.2) to hold '
                      f"out part of every class for evaluation (split '{ALL}' reads every image).")
    held = holdout.draw(ids, holdout.strata(labels, src.multilabel), names, src.holdout_fraction,
                    src.holdout_seed)
    held_out = split == src.eval_split != src.train_split   # a k-fold's folds both read train
    keep = [i for i in range(len(ids)) if (i in held) == held_out]
    ids, labels = [ids[i] for i in keep], [labels[i] for i in keep]
  return ids, labels, skipped


# ---- the index of a split ----

_MEMO: dict[tuple[Source, str, tuple[str, ...]], Split] = {}
_WARNED: set[tuple[str, str, str]] = set()   # (location, id, why) a warning already named
_LOCK = threading.Lock()


def clear_memo() -> None:
  """Forgets the splits indexed by this process (the on-disk cache stays)."""
  with _LOCK:
    _MEMO.clear()
    _WARNED.clear()


def _digest(ids: list[str], labels: list) -> str:
  rows = sorted(f'{i}\t{y}' for i, y in zip(ids, labels))
  return hashlib.sha256('\n'.join(rows).encode()).hexdigest()[:16]


def listed(src: Source, split: str, names: tuple[str, ...]) -> tuple[list[str], list]:
  """(ids, labels) of the files the layout puts in ``split`` (held-out draws applied), from the
  listing alone: no file is opened."""
  ids, labels, _ = _candidates(src, split, names)
  return ids, labels


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
  result = Split(root=src.root, split=split,
                 paths=tuple(os.path.join(src.root, ids[i]) for i in keep),
                 labels=tuple(labels[i] for i in keep), ids=tuple(ids[i] for i in keep),
                 channels_found=frozenset(probed[i][2] for i in keep),
                 sizes_found=frozenset(probed[i][:2] for i in keep), skipped=tuple(skipped),
                 counts=tuple(int(c) for c in counts), digest=digest)
  with _LOCK:
    _MEMO[key] = result
  return result


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
