"""Which held-out splits a run may fit its temperature (single-label) or per-class thresholds
(multi-label) on, checked before training's first step and by ``--mode=calibrate``: each must
share no example with the run's training or eval split, with a fix that works for the run's data
in the one-line error. The fits themselves are ``held_out_fits.fit_temperature`` /
``held_out_fits.fit_thresholds``. No TensorFlow at import.
"""
from __future__ import annotations

import logging
import os

import ml_collections

from imgcls_jax import ood, selective
from imgcls_jax.data import folder_index, folder_layout, reader
from imgcls_jax.data.info import DatasetInfo
from imgcls_jax.errors import UserError


def temperature_split(config: ml_collections.ConfigDict) -> str:
  """``config.evaluate.temperature_split`` ('' = no temperature scaling)."""
  return (config.evaluate.get('temperature_split', '') or '') if 'evaluate' in config else ''


def threshold_split(config: ml_collections.ConfigDict) -> str:
  """``config.evaluate.threshold_split`` ('' = every class at 0.5)."""
  return (config.evaluate.get('threshold_split', '') or '') if 'evaluate' in config else ''


_FITTED = {  # key -> why a split it shares examples with (train, eval) with is refused
    'temperature_split': ('the fitted temperature would make it over-confident',
                          ('a temperature fitted on the examples it is judged on reports a '
                           'calibration no new image gets')),
    'threshold_split': ('thresholds chosen on its training scores do not fit new images',
                        ('thresholds chosen on the examples they are judged on report an F1 no '
                         'new image gets')),
}


def check_location_keys(data: ml_collections.ConfigDict) -> None:
  """``folder`` / ``manifest`` name an image folder's files: set for another dataset, they would
  be silently ignored (at training, or as a trained run's new image location)."""
  if folder_layout.is_folder(data):
    return
  for key in ('folder', 'manifest'):
    if data.get(key):
      raise UserError(f"config.data.{key}={data[key]} is read only when config.data.name="
                      f"'{folder_layout.NAME}', and it is '{data.name}'; add "
                      f'--config.data.name={folder_layout.NAME} (or unset data.{key}).')


def check_workdir_outside(data: ml_collections.ConfigDict, workdir: str) -> None:
  """A run directory inside the image folder it trains on would add its own folders as classes
  (and leave the data unusable): refused before anything is written."""
  if not folder_layout.is_folder(data):
    return
  src = folder_layout.source_of(data)
  if src.kind == 'manifest':
    return
  workdir, root = os.path.realpath(workdir), os.path.realpath(src.location)
  if os.path.commonpath([workdir, root]) == root:
    raise UserError(f'--workdir={workdir} is inside config.data.folder={root}, where its '
                    'checkpoints would be read as images; put the run directory elsewhere, e.g. '
                    f'--workdir={os.path.join(os.path.dirname(root), "runs", "run1")}.')


def check_folder_only_keys(data: ml_collections.ConfigDict) -> None:
  """``folder`` / ``manifest`` locate an image folder's files and ``holdout_fraction`` /
  ``validation_fraction`` draw splits from them; any other dataset would silently ignore them."""
  if folder_layout.is_folder(data):
    return
  check_location_keys(data)
  for key in ('holdout_fraction', 'validation_fraction'):
    value = data.get(key, 0.0) or 0.0
    if value:
      raise UserError(f"config.data.{key}={value} applies to image folders and manifests only; "
                      f"'{data.name}' holds examples out with split slices, e.g. "
                      "data.train_split='train[:90%]' and evaluate.temperature_split="
                      "'train[90%:]'.")


def _drawn(data: ml_collections.ConfigDict, split: str) -> bool:
  """Whether ``split`` of an image folder is drawn from its files by a seed: the eval split held
  out by ``holdout_fraction`` (no split directories or column), or ``validation_fraction``'s
  'validation'."""
  base = split.split('[')[0].split('@')[0]
  if base == folder_layout.VALIDATION and (data.get('validation_fraction', 0.0) or 0.0) > 0:
    return True
  return ((data.get('holdout_fraction', 0.0) or 0.0) > 0 and base != folder_layout.ALL
          and not folder_layout.has_splits(folder_layout.source_of(data)))


_DRAW_KEYS = ('holdout_fraction', 'holdout_seed', 'validation_fraction')


def folder_changed(config: ml_collections.ConfigDict, info: DatasetInfo, split: str,
                   saved_data: dict | None = None) -> str:
  """'' unless ``split`` of the run's image folder is drawn from its files (``_drawn``) and is
  drawn otherwise now than at training: then a clause saying why. Either a draw key differs from
  the run's (``saved_data``: its saved ``config.data``), or the training split lists other files
  or labels (``info.split_digests``, from the listing alone; the image count for runs saved
  before them). Another draw may put images the model trained on into ``split``."""
  data = config.data
  name = str(data.train_split)
  if not folder_layout.is_folder(data) or '@' in name:
    return ''
  try:
    if not _drawn(data, split):
      return ''
    for key in _DRAW_KEYS if saved_data else ():
      then, now = saved_data.get(key, 0), data.get(key, 0)
      if (then or 0) != (now or 0):
        return (f'config.data.{key}={now} draws other held-out images than the run did '
                f'({key}={then})')
    src = folder_layout.source_of(data)
    then = (info.split_digests or {}).get(name)
    if then is not None:
      if then == folder_index.listed_digest(src, name, info.class_names):
        return ''
      return (f"The image folder changed since training (split '{name}' lists other files or "
              'labels)')
    count, now = (info.num_examples or {}).get(name), len(folder_index.index(src, name,
                                                                             info.class_names))
  except UserError:
    return ''   # reading the split says what is wrong
  if count is None or int(count) == now:
    return ''
  return (f"The image folder changed since training (split '{name}': {count} images then, "
          f'{now} now)')


def check_fit_splits(config: ml_collections.ConfigDict, info: DatasetInfo, *,
                     trained: bool = False) -> None:
  """The held-out splits a run fits its temperature (single-label) or per-class thresholds
  (multi-label) on must suit the run and share no example with its training or eval split
  (checked before the first step, and by ``--mode=calibrate`` before it fits: ``trained``, where
  the fix cannot be a new training split)."""
  if temperature_split(config) and info.multilabel:
    raise UserError('config.evaluate.temperature_split is for single-label runs (a multi-label '
                    "run's sigmoids get per-class thresholds from config.evaluate.threshold_split "
                    'instead); unset temperature_split.')
  if selective.abstain_target(config.get('evaluate')) and (
      info.multilabel or not temperature_split(config)):
    raise UserError('config.evaluate.abstain_accuracy is fitted with the temperature of a '
                    'single-label run, on config.evaluate.temperature_split; ' + (
                        "a multi-label run's per-class thresholds (threshold_split) already "
                        'decide each tag: unset abstain_accuracy.' if info.multilabel else
                        "set temperature_split to a held-out split (e.g. 'train[90%:]' with "
                        "data.train_split='train[:90%]'), or unset abstain_accuracy."))
  if ood.keep_target(config.get('evaluate')) and (info.multilabel or not temperature_split(config)):
    raise UserError('config.evaluate.unknown_keep is fitted with the temperature of a '
                    'single-label run, on config.evaluate.temperature_split; ' + (
                        'a multi-label run has no such gate: unset unknown_keep.'
                        if info.multilabel else
                        "set temperature_split to a held-out split (e.g. 'train[90%:]' with "
                        "data.train_split='train[:90%]'), or unset unknown_keep."))
  splits = {'temperature_split': temperature_split(config),
            'threshold_split': threshold_split(config) if info.multilabel else ''}
  for fit_key, reasons in _FITTED.items():
    split = splits[fit_key]
    if not split:
      continue
    for key, why in zip(('train_split', 'eval_split'), reasons):
      try:
        shared = reader.shared_examples(config.data, split, config.data[key], info)
      except UserError as e:
        raise UserError(for_fit_key(str(e), fit_key, split)) from None
      if shared:
        why = f'the model trained on them, so {why}' if key == 'train_split' else why
        raise UserError(f"config.evaluate.{fit_key}='{split}' shares {shared} examples with "
                        f"config.data.{key}='{config.data[key]}' ({why}); "
                        f'{_held_out_hint(config, fit_key, key, split, trained)}.')


def warn_eval_on_training(config: ml_collections.ConfigDict, info: DatasetInfo,
                          main: bool = True) -> None:
  """At training: an eval split that shares examples with the train split reports accuracy on
  images the model trained on (train_split 'all' of an image folder reads its eval images too);
  say so once, with the fix. Deliberate (a check of the fit) it stays allowed. An image folder's
  eval images that are its training images again or copies of them are named too (``main``: on
  the process that reads them, process 0)."""
  train, ev = str(config.data.train_split), str(config.data.eval_split)
  if folder_layout.is_folder(config.data) and '@' not in train + ev:
    # folder splits are disjoint but for 'all' (which holds the other) and one split named twice
    shared = (info.num_examples.get(ev) if train in (ev, folder_layout.ALL) else
              info.num_examples.get(train) if ev == folder_layout.ALL else None)
    fix = ("evaluate on a split it does not train on (data.eval_split='test', or "
           'data.holdout_fraction holding part of every class out when the folder has no split '
           'folders)' if ev in (train, folder_layout.ALL) else
           "train on the rest (data.train_split='train', with data.holdout_fraction holding "
           'part of every class out for evaluation when the folder has no split folders)')
  elif '@' in train + ev:   # an id list (e.g. a cross-validation's cv_kept_ids.txt): its ids
    try:
      shared = reader.shared_examples(config.data, ev, train, info)
    except UserError:
      shared = None
    fix = ('list only training examples in the id file, or evaluate a split it does not list '
           "(a cross-validation's cv_kept_ids.txt lists its whole split, evaluation images too: "
           'for what new images get, read the cross-validation\'s own figures)')
  else:
    try:
      shared = reader.shared_examples(config.data, ev, train, info)
    except UserError:   # a split the data layer names better when it reads it
      shared = None
    except ImportError:   # sizes of slices need the dataset's reader (TensorFlow): not here
      shared = None       # (a step built without it, e.g. benchmarks/throughput.py on a GPU)
    fix = ("train and evaluate on splits without common examples (e.g. "
           "data.train_split='train[:90%]' and data.eval_split='train[90%:]')")
  if shared:
    logging.warning("config.data.eval_split='%s' shares %d examples with train_split='%s': the "
                    'accuracy it reports is on images the model trains on, not on new ones; %s.',
                    ev, shared, train, fix)
  elif folder_layout.is_folder(config.data) and ev != train and main:
    _warn_copies(config.data, info, ev, train)


_COPIES_CHECKED: set[tuple[str, str, str]] = set()   # (location, eval, train) said once


def _warn_copies(data: ml_collections.ConfigDict, info: DatasetInfo, ev: str, train: str) -> None:
  """Eval images whose bytes equal a training image's (a copy; or the same file reached again:
  a link, a manifest path spelt twice): the accuracy counts them as new images. Said once per
  folder and splits, with the fix for each kind."""
  try:
    src = folder_layout.source_of(data)
    if (src.location, ev, train) in _COPIES_CHECKED:
      return
    _COPIES_CHECKED.add((src.location, ev, train))
    pairs = folder_index.copied_files(src, ev, src, train, tuple(info.class_names))
  except (UserError, OSError):   # a split the data layer names better when it reads it
    return
  if not pairs:
    return
  same = [(p, q) for p, q in pairs if os.path.realpath(p) == os.path.realpath(q)]
  copies = [pq for pq in pairs if pq not in same]
  for found, what, fix in (
      (same, "are train_split='{}' images reached again (a link, or a path spelt another way)",
       'remove those links or manifest rows from the eval split'),
      (copies, "are copies of train_split='{}' images (the same bytes)",
       'delete one file of each pair, or move it to the same split')):
    if found:
      shown = '; '.join(f'{os.path.relpath(p, src.root)} = {os.path.relpath(q, src.root)}'
                        for p, q in found[:3])
      logging.warning("%d image(s) of config.data.eval_split='%s' in %s %s (%s%s): the accuracy "
                      'counts them as new images though the model trains on them; %s.',
                      len(found), ev, src.location, what.format(train), shown,
                      '; ...' if len(found) > 3 else '', fix)


def warn_unused_splits(config: ml_collections.ConfigDict) -> None:
  """At training: the splits an image folder or manifest names (split folders, a split column)
  that no split key of the run reads are silently unused; say so once (``folder_index``)."""
  if not folder_layout.is_folder(config.data):
    return
  e = config.get('evaluate') or {}
  read = [folder_layout.VALIDATION] + [
      str(e.get(k) or '').split('@')[0] for k in ('temperature_split', 'threshold_split', 'split')
      if e.get(k) and str(e.get(k)) != folder_layout.VALIDATION]
  try:
    folder_index.warn_unused_splits(folder_layout.source_of(config.data),
                                    list(dict.fromkeys(read)))
  except UserError:   # reading the split says what is wrong
    pass


def warn_unused_validation(config: ml_collections.ConfigDict, info: DatasetInfo) -> None:
  """At training: ``validation_fraction`` images that no fit of this run reads are kept from
  training for nothing unless the user calibrates later; say so, with both ways out."""
  fraction = config.data.get('validation_fraction', 0.0) or 0.0
  key = 'threshold_split' if info.multilabel else 'temperature_split'
  fit = threshold_split(config) if info.multilabel else temperature_split(config)
  read = (fit, str(config.data.eval_split))    # evaluating on it reads it too
  if (not folder_layout.is_folder(config.data) or fraction <= 0
      or any(r.split('[')[0] == folder_layout.VALIDATION for r in read)):
    return
  logging.warning("config.data.validation_fraction=%s holds that part of every class out of "
                  "training as split '%s', and no fit of this run reads it: fit on it now "
                  "(--config.evaluate.%s=%s) or later (--mode=calibrate), or set "
                  'validation_fraction=0 to train on those images.', fraction,
                  folder_layout.VALIDATION, key, folder_layout.VALIDATION)


def _held_out_hint(config: ml_collections.ConfigDict, fit_key: str, clash: str, split: str,
                   trained: bool) -> str:
  """How this run's data can hold examples out for ``config.evaluate.<fit_key>`` (``split``
  clashed with ``config.data.<clash>``; ``trained``: the run exists, only the fit split can
  change)."""
  folder = folder_layout.is_folder(config.data)
  held = folder_layout.VALIDATION if folder else 'train[90%:]'
  if clash == 'eval_split' and split == str(config.data.eval_split) and not trained:
    return (f'evaluate on another split (config.data.eval_split) or fit on another one '
            f"(evaluate.{fit_key})")
  use = f"evaluate.{fit_key}='{held}'"
  has_validation = folder and ((config.data.get('validation_fraction', 0.0) or 0.0) > 0 or (
      folder_layout.VALIDATION in folder_layout.named_splits(folder_layout.source_of(config.data))))
  if has_validation and split != folder_layout.VALIDATION:
    return f'use the held-out split: {use}'
  others = sorted(folder_layout.named_splits(folder_layout.source_of(config.data)) - {
      str(config.data.train_split), str(config.data.eval_split), split}) if folder else []
  if others:   # e.g. a manifest's 'val' rows, or a val/ folder, that no split key reads
    return f"fit on a split the run did not train on: evaluate.{fit_key}='{others[0]}'"
  if trained and folder:
    return ("this run holds no 'validation' images out: train it again with "
            f'data.validation_fraction=0.1 and {use}')
  if trained:
    return (f"fit on examples outside config.data.train_split='{config.data.train_split}' and "
            f"eval_split (e.g. the part of a split it did not train on), or train again holding "
            f"some out, e.g. data.train_split='train[:90%]' and {use}")
  if not folder:
    return f"hold them out of training, e.g. data.train_split='train[:90%]' and {use}"
  return f'hold part of every class out of training: data.validation_fraction=0.1 and {use}'


def for_fit_key(message: str, key: str, split: str) -> str:
  """A data-layer error about ``split`` read as ``config.evaluate.<key>``: it names that key,
  not the train / eval split keys the data layer assumes."""
  if split not in message:
    return message
  message = message.replace('set config.data.train_split / eval_split to e.g. train and test',
                            f'set config.evaluate.{key} to a split name, e.g. validation')
  message = message.replace('set config.data.train_split / eval_split',
                            f'set config.evaluate.{key}')
  return f"config.evaluate.{key}='{split}': {message}"
