"""Stratified k-fold membership of a tfds split, deterministic for a seed.

Multi-label splits get plain shuffled ``KFold`` folds (documented choice: iterative
stratification is not in scikit-learn; with thousands of images per tag plain folds keep each
tag's share within a few per cent).

Examples are named by their tfds id (``ReadConfig(add_tfds_id=True)``), sorted, and assigned to
folds by ``sklearn.model_selection.StratifiedKFold(k, shuffle=True, random_state=seed)`` on their
labels: the same split, ``k`` and seed always give the same folds, however the files are read.
A fold is handed to the input pipeline as the split ``'SPLIT@IDS_FILE'`` (see
``sources.read``): the examples of SPLIT whose ids the file lists, one per line. Listed ids that
SPLIT lacks are left out with a warning (``check_listed``): e.g. a cross-validation's
``cv_kept_ids.txt`` read with another split than the one it was written from.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import ml_collections
import numpy as np
from imgcls_jax.data import tf_import  # noqa: F401  (before tensorflow_datasets: no Keras)
import tensorflow_datasets as tfds

from imgcls_jax.data import arrays, folder_index, folder_layout, image_folder, sources
from imgcls_jax import atomic
from imgcls_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Folds:
  """``fold[i]`` is the held-out fold of example ``ids[i]`` (label ``labels[i]``)."""
  split: str
  ids: tuple[str, ...]
  labels: np.ndarray
  fold: np.ndarray
  k: int

  def held_out(self, i: int) -> list[str]:
    """Ids evaluated in fold ``i``."""
    return [x for x, f in zip(self.ids, self.fold) if f == i]

  def training(self, i: int) -> list[str]:
    """Ids trained on in fold ``i`` (every other fold)."""
    return [x for x, f in zip(self.ids, self.fold) if f != i]


def read_ids_and_labels(data: ml_collections.ConfigDict, split: str) -> tuple[list[str], np.ndarray]:
  """(tfds ids, labels) of every example of ``split``, sorted by id; images are not decoded."""
  if image_folder.is_folder(data):  # ids are paths relative to the folder / manifest
    src = folder_layout.source_of(data)
    indexed = folder_index.index(src, split, folder_layout.class_names(src))
    order = sorted(range(len(indexed)), key=lambda j: indexed.ids[j])
    labels = image_folder.labels_array(indexed)
    return [indexed.ids[j] for j in order], labels[order]
  b = sources.builder(data)
  sources.check_split(b, split, data.name)
  image_key, label_key = sources.supervised_keys(b, data.name, bool(data.get('multilabel', False)))
  ds = b.as_dataset(split=split, shuffle_files=False,
                    read_config=tfds.ReadConfig(try_autocache=False, add_tfds_id=True),
                    decoders={image_key: tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: (ex['tfds_id'], ex[label_key]))
  pairs = sorted(((i.decode(), np.asarray(y)) for i, y in tfds.as_numpy(ds)), key=lambda p: p[0])
  if len({i for i, _ in pairs}) != len(pairs):
    raise UserError(f"Split '{split}' of '{data.name}' lists some examples twice (overlapping "
                    'parts?); give each example once in config.data.train_split.')
  if data.get('multilabel', False):
    k = int(sources.label_feature(b, label_key).num_classes)
    hot = np.zeros((len(pairs), k), np.uint8)
    for row, (_, tags) in enumerate(pairs):
      hot[row, np.asarray(tags, np.int64).ravel()] = 1
    return [i for i, _ in pairs], hot
  return [i for i, _ in pairs], np.array([int(y) for _, y in pairs], np.int64)


def assign(data: ml_collections.ConfigDict, split: str, k: int, seed: int) -> Folds:
  """Stratified ``k``-fold membership of ``split``, shuffled with ``seed``."""
  from sklearn.model_selection import StratifiedKFold
  if k < 2:
    raise UserError(f'config.cross_validation.folds={k}: use 0 (off) or at least 2 folds.')
  if arrays.is_arrays(data):
    raise UserError(f"k-fold cross-validation lists examples by tfds id or file, which "
                    f"config.data.name='{data.name}' (an arrays file) has not; read the data "
                    "through tfds or as an image folder (the digits: configs/digits_cv.py, i.e. "
                    "--config.data.name=sklearn_digits --config.data.train_preprocess="
                    "'pad_crop(pad=1)' --config.data.device_preprocess='').")
  if image_folder.is_folder(data):
    _check_pool(folder_layout.source_of(data), split)
  ids, labels = read_ids_and_labels(data, split)
  if labels.ndim == 2:  # multi-label: plain shuffled folds (sklearn has no multi-label stratifier)
    from sklearn.model_selection import KFold
    if len(ids) < k:
      raise UserError(f"Split '{split}' has {len(ids)} examples, fewer than "
                      f'config.cross_validation.folds={k}; use fewer folds.')
    fold = np.full(len(ids), -1, np.int64)
    for i, (_, held_out) in enumerate(KFold(k, shuffle=True, random_state=int(seed)).split(ids)):
      fold[held_out] = i
    return Folds(split=split, ids=tuple(ids), labels=labels, fold=fold, k=k)
  counts = np.bincount(labels)
  smallest = int(counts[counts > 0].min()) if len(labels) else 0
  if smallest < k:
    raise UserError(f"Split '{split}' has a class with only {smallest} examples, fewer than "
                    f'config.cross_validation.folds={k}; use fewer folds.')
  fold = np.full(len(ids), -1, np.int64)
  splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=int(seed))
  for i, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
    fold[held_out] = i
  return Folds(split=split, ids=tuple(ids), labels=labels, fold=fold, k=k)


def _check_pool(src: folder_layout.Source, split: str) -> None:
  """Refuses to cut folds from a split that an image folder or manifest without named splits
  lacks: there the pool is ``all`` (the folds are the evaluation, so no ``test`` is needed), or
  what a ``holdout_fraction`` leaves in ``data.train_split``."""
  if (split == folder_layout.ALL or src.holdout_fraction > 0 or folder_layout.has_splits(src)
      or '@' in split or '+' in split):
    return
  what = 'split directories' if src.kind == 'flat' else 'split column'
  raise UserError(f"{src.location} has no {what}, so config.data.train_split='{split}', the "
                  'examples cross-validation cuts into folds, names none of its images; set '
                  f"--config.data.train_split={folder_layout.ALL} to cross-validate every image "
                  '(the held-out folds are the evaluation: no test split is needed).')


def subset_split(split: str, ids_file: str) -> str:
  """The split spec that reads only the examples of ``split`` listed in ``ids_file``."""
  return f'{split}@{ids_file}'


_CHECKED: set[tuple[str, str, float, int]] = set()   # (dataset, spec, file mtime, size) checked


def _not_in_split(data: ml_collections.ConfigDict, split: str, names: tuple[str, ...] | None,
                  listed: set[str]) -> int | None:
  """How many of ``listed`` are not ids of ``split``: an image folder's listed files (unreadable
  ones too); a tfds split's from its shard files' names and lengths, reading no record (a tfds id
  is ``<shard file>__<index>``); None for a sliced tfds split (``train[:80%]``), whose ids take a
  pass over the records to tell (the pipeline's own filter leaves them out anyway)."""
  if image_folder.is_folder(data):
    src = folder_layout.source_of(data)
    ids = folder_index.listed(src, split, names or folder_layout.class_names(src))[0]
    return len(listed - set(ids))
  if '[' in split:
    return None
  splits = sources.builder(data).info.splits
  shards = {f: n for part in split.split('+') if part in splits
            for f, n in zip(splits[part].filenames, splits[part].shard_lengths)}
  def known(i: str) -> bool:
    shard, _, index = i.rpartition('__')
    return index.isdigit() and int(index) < shards.get(shard, 0)
  return sum(not known(i) for i in listed)


def _written_from(ids_file: str) -> tuple[str, str]:
  """(the split a cross-validation's id file was cut from, its cv_report.json), from the report
  beside the file or one folder up (a fold's id lists); ('', '') when none says."""
  here = os.path.dirname(os.path.abspath(ids_file))
  for folder in (here, os.path.dirname(here)):
    path = os.path.join(folder, 'cv_report.json')
    try:
      with open(path) as f:
        split = json.load(f).get('split')
    except (OSError, ValueError, AttributeError):
      continue
    if isinstance(split, str) and split:
      return split, path
  return '', ''


def check_listed(data: ml_collections.ConfigDict, spec: str, key: str = '',
                 names: tuple[str, ...] | None = None) -> int:
  """For an id-listed split ``'SPLIT@IDS_FILE'`` (``key``: the config key that gave it, named in
  the message; ``names``: a trained run's classes, for an image folder), warns once per process
  when the file lists ids that SPLIT lacks, which are left out of it; returns how many (0 for
  other splits, an arrays file, or a file the reader will name as missing)."""
  base, sep, ids_file = str(spec).partition('@')
  if not sep or arrays.is_arrays(data):
    return 0
  try:
    stat = os.stat(ids_file)
    with open(ids_file) as f:
      listed = {line.strip() for line in f if line.strip()}
  except OSError:
    return 0
  where = sources.dataset_name(data)
  checked = (where, str(spec), stat.st_mtime, stat.st_size)
  if checked in _CHECKED or not listed:
    return 0
  _CHECKED.add(checked)
  missing = _not_in_split(data, base, names, listed)
  if not missing:
    return 0
  given = f"config.{key}='{spec}'" if key else f"Split '{spec}'"
  written, report = _written_from(ids_file)
  if written and written != base:
    fix = (f"the file was written from split '{written}' ({report}): set "
           f"{f'config.{key}' if key else 'the split'}='{written}@{ids_file}' to read them all, "
           f"or keep '{base}' if leaving them out is meant")
  else:
    fix = (f"name the split the file was written from before its '@' to read them all, or list "
           f"only ids of '{base}' in it")
  logging.warning("%s: %d of the %d ids %s lists are not in split '%s' of %s and are left out "
                  '(the other %d are read); %s.', given, missing, len(listed), ids_file, base,
                  where, len(listed) - missing, fix)
  return missing


def write_ids(path: str, ids: list[str]) -> None:
  """Writes ``ids`` one per line; if ``path`` exists it must hold exactly these ids.

  A mismatch means the folds changed under an existing run (another seed, fold count or split),
  which would silently resume a model trained on different data.
  """
  text = ''.join(f'{i}\n' for i in ids)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    raise UserError(f'{path} lists other examples than this config assigns to the fold (were '
                    'config.seed, config.cross_validation.folds or config.data.train_split '
                    'changed?); use a new --workdir.')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic.write_atomic(path, text)
