"""Where the user's images are and how they split: the layout ``config.data`` selects (``Source``),
its split names and its classes. Listing no file's contents; the index of a split (files probed,
held-out draws, the cache) is ``folder_index.py``.

Three layouts, chosen by ``config.data``:
  * ``folder/<split>/<class>/**`` (``data.folder``; splits named by ``train_split`` /
    ``eval_split``);
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
"""
from __future__ import annotations

import dataclasses
import logging
import os
import unicodedata
from typing import Iterable, Sequence

import ml_collections

from imgcls_jax.data import manifest
from imgcls_jax.data.file_walk import walk
from imgcls_jax.errors import UserError

NAME = 'image_folder'  # config.data.name of the user's images (folders or a manifest)
# The folders a command of this package writes a manifest.csv into (the config files' defaults):
# a missing one is named with the command that makes it.
PREPARED_MANIFESTS = {
    'fashion_mnist_collage': 'python -m imgcls_jax.data.prepare_collage --out={dir}',
}
ALL = 'all'            # the split of every image of a folder without split directories / a manifest
VALIDATION = 'validation'  # the split data.validation_fraction carves out of the train split


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
      made_by = PREPARED_MANIFESTS.get(os.path.basename(os.path.dirname(path)))
      fix = (f'write it with {made_by.format(dir=os.path.dirname(path))}, or point it at another'
             if made_by and os.path.basename(path) == 'manifest.csv' else 'point it at a')
      raise UserError(f'The manifest {path} (config.data.manifest) does not exist; {fix} '
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
  first = os.path.join(root, (train if train != ALL else test) or '_')
  split_folders = os.path.isdir(first) and bool(
      subdirs(first) or set(subdirs(root)) <= {train, test, VALIDATION})
  return Source(kind='splits' if split_folders else 'flat', location=root, root=root, **common)


def subdirs(path: str) -> list[str]:
  """The non-hidden sub-directories of ``path``, sorted (class or split directories)."""
  return sorted(d for d in os.listdir(path)
                if os.path.isdir(os.path.join(path, d)) and not d.startswith('.'))


def loose_files(path: str) -> list[str]:
  """The non-hidden files directly in ``path`` (no class folder claims them), sorted."""
  return sorted(f for f in os.listdir(path)
                if not f.startswith('.') and os.path.isfile(os.path.join(path, f)))


def check_split_name(src: Source, split: str) -> None:
  if not split or any(ch in split for ch in '[]+@/'):
    raise UserError(f"Image-folder splits are plain names, got '{split}'; set "
                    'config.data.train_split / eval_split to e.g. train and test.')


def split_dir(src: Source, split: str) -> str:
  check_split_name(src, split)
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

def _sort_labels(labels: Iterable[str]) -> tuple[str, ...]:
  """Sorted, numerically when every label is an integer ('01' and '1' by their text after that:
  the order must not depend on the process)."""
  names = set(labels)
  if all(n.lstrip('-').isdigit() for n in names):
    return tuple(sorted(names, key=lambda n: (int(n), n)))
  return tuple(sorted(names))


_CASE_WARNED: set[tuple[str, tuple]] = set()   # (location, groups of names) warned of


def fold_name(name: str) -> str:
  """``name`` without case or Unicode normalisation: 'Five' and 'five' are one, and so are 'zéro'
  with 'é' as one code point (NFC) and as 'e' + U+0301 (NFD), as macOS and Linux may write it."""
  return unicodedata.normalize('NFC', unicodedata.normalize('NFC', name).casefold())


def _warn_case_twins(src: Source, names: tuple[str, ...]) -> tuple[str, ...]:
  """``names``, after a warning (once per location) for classes or tags that differ only in case
  ('EVEN' / 'even') or Unicode normalisation (NFC / NFD 'zéro', which print alike): they
  train as separate classes, which is rarely meant."""
  groups: dict[str, list[str]] = {}
  for n in names:
    groups.setdefault(fold_name(n), []).append(n)
  twins = tuple(g for g in groups.values() if len(g) > 1)
  if not twins or (src.location, tuple(map(tuple, twins))) in _CASE_WARNED:
    return names
  _CASE_WARNED.add((src.location, tuple(map(tuple, twins))))
  what = 'tags' if src.multilabel else 'classes'
  if all(any(all(unicodedata.is_normalized(form, n) for n in g) for form in ('NFC', 'NFD'))
         for g in twins):   # one normal form in each group: only the case differs
    logging.warning('%s has %s that differ only in case (%s): they train as different %s; write '
                    'each one way if they are the same.', src.location, what,
                    '; '.join(' / '.join(g) for g in twins[:5]), what)
    return names
  fix = ('write each label one way in the manifest' if src.kind == 'manifest' else
         'merge the folders of each group into one, or rename one of them')
  logging.warning('%s has %s whose names differ only in Unicode normalisation or case (%s; '
                  'escaped to show the difference: macOS and Linux may write one name in two '
                  'ways): they print alike but train as different %s; %s.', src.location, what,
                  '; '.join(' / '.join(map(ascii, g)) for g in twins[:5]), what, fix)
  return names


def class_names(src: Source) -> tuple[str, ...]:
  """The classes of the training data, sorted: class directories, or the manifest's labels."""
  return _warn_case_twins(src, _class_names(src))


def _class_names(src: Source) -> tuple[str, ...]:
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
  where = src.root if src.kind == 'flat' else split_dir(src, src.train_split)
  names = tuple(subdirs(where))   # as text (runs saved with this order resume in it)
  if not names:
    raise UserError(f'The image folder {where} has no class sub-directories; put the images in '
                    f'{where}/<class name>/ (or list them in a CSV set as config.data.manifest).')
  if src.kind == 'flat':
    _refuse_split_folders_as_classes(src, names)
  if len(names) < 2:
    inner = os.path.join(where, names[0])
    if subdirs(inner) and not loose_files(inner):   # a wrapper: photos/<class>/...
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


def named_splits(src: Source) -> set[str]:
  """The splits the layout names itself: split directories, or a manifest's split column."""
  if src.kind == 'splits':
    return set(subdirs(src.root))
  if src.kind == 'manifest':
    return {r[2] for r in manifest.read_rows(src.location, src.multilabel) if r[2] is not None}
  return set()


def same_names(unknown: set[str], names: Sequence[str]) -> dict[str, str]:
  """{name read: the model's class} for the names read that equal a class of the model once
  both are Unicode-normalised (NFC), where exactly one class does: a folder copied from macOS
  writes 'zéro' as 'e' + U+0301, which prints as the model's 'zéro' and is the same name."""
  by_nfc: dict[str, list[str]] = {}
  for n in names:
    by_nfc.setdefault(unicodedata.normalize('NFC', n), []).append(n)
  out = {}
  for u in unknown:
    same = by_nfc.get(unicodedata.normalize('NFC', u), [])
    if len(same) == 1:
      out[u] = same[0]
  return out


def class_folders(root: str, where: str, prefix: str, skipped: list[tuple[str, str]]
                  ) -> list[tuple[str, str]]:
  """(path under ``root``, class) of the files in the class folders of ``where``; a file that
  two class folders reach (through links) is refused: it would be trained on as both classes."""
  pairs: list[tuple[str, str]] = []
  first: dict[str, str] = {}   # real path -> the path it was listed at first
  twice: list[tuple[str, str]] = []
  for name in subdirs(where):
    reals: dict[str, str] = {}
    pairs.extend((rel, name) for rel in walk(os.path.join(where, name), os.path.join(prefix, name),
                                             skipped, reals))
    for real, rel in reals.items():
      if real in first:
        twice.append((first[real], rel))
      else:
        first[real] = rel
  if twice:
    more = f' (and {len(twice) - 1} more)' if len(twice) > 1 else ''
    raise UserError(f'{os.path.join(root, twice[0][0])} and {os.path.join(root, twice[0][1])} '
                    f'are one file (through a link) in two class folders{more}: a single-label '
                    'image has one class; remove the link from the wrong class folder (images '
                    'with several labels: a manifest with config.data.multilabel=True).')
  return pairs
