"""A trained run's checkpoint restored for one split (the run layer under ``--mode=evaluate``,
``--mode=compare``, ``--mode=calibrate`` and k-fold cross-validation): the step chosen
(``choose_step``: 'best', 'latest' or a number), its weights placed on the mesh with the run's
parameter placement, and the eval data of the split. ``evaluation.py`` sums a split's report over
it, ``outcomes.py`` gathers its per-example predictions. No TensorFlow at import.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections

from imgcls_jax import checkpoint, held_out, inference, metrics, run, run_directory
from imgcls_jax.data import arrays, folder_index, folder_layout, reader
from imgcls_jax.data.info import check_flips
from imgcls_jax.errors import UserError


def choose_step(ckpt: checkpoint.Checkpointer, spec: str, metrics_path: str) -> tuple[int, str]:
  """(step, how it was chosen) for ``config.evaluate.checkpoint``: 'best', 'latest' or a step.

  'best' is the checkpoint the Checkpointer ranks best (``config.checkpoint.best_metric``); for a
  run saved without evaluation metrics, the kept checkpoint with the highest eval ``accuracy``
  (top-1; a tagging run's exact match) in ``metrics.jsonl`` (ties: the later step); failing both,
  the latest.
  """
  available = sorted(ckpt.all_steps())
  spec = str(spec).strip().lower()
  if spec == 'latest':
    return available[-1], 'latest'
  if spec == 'best':
    best = ckpt.best_step()
    if best is not None:
      return best, f'best by eval {ckpt.best_metric} ({ckpt.best_mode})'
    records = metrics.read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
    acc = {int(r['step']): float(r['accuracy']) for r in records
           if r.get('split') == 'eval' and r.get('accuracy') is not None}
    scored = [(acc[s], s) for s in available if s in acc]
    if scored:
      best_acc, best = max(scored)
      return best, f'best (eval accuracy {best_acc:.4f} in metrics.jsonl)'
    logging.warning('No kept checkpoint has an eval record in %s; using the latest.', metrics_path)
    return available[-1], 'latest (no evaluated checkpoint to pick the best from)'
  if spec.isdigit():
    step = int(spec)
    if step not in available:
      raise UserError(f"Checkpoint step {step} is not in {ckpt.directory}; kept steps: "
                      f"{', '.join(map(str, available))}.")
    return step, f'step {step}'
  raise UserError(f"config.evaluate.checkpoint='{spec}' must be 'best', 'latest' or a step "
                  'number.')


def best_among(ckpt: checkpoint.Checkpointer, chosen: str, metrics_path: str) -> int:
  """How many kept checkpoints, each evaluated on the run's eval split during training,
  ``choose_step`` picked ``chosen`` from when it is a 'best' (0: another choice): those saved with
  metrics, or else those with an eval record in ``metrics.jsonl``. With 2 or more, the pick is
  itself a fit to that split, and the split's figures of it are optimistic."""
  if not chosen.startswith('best'):
    return 0
  if ckpt.best_step() is not None:
    return sum(1 for s in ckpt.all_steps() if ckpt.metrics(s))
  records = metrics.read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
  evaluated = {int(r['step']) for r in records
               if r.get('split') == 'eval' and r.get('accuracy') is not None}
  return len(evaluated & set(ckpt.all_steps()))


def _new_image_location(saved: dict[str, Any], overrides: dict[str, Any]) -> bool:
  """True when the command line points an image-folder run at another folder or manifest."""
  def where(v: Any) -> str:
    return os.path.abspath(os.path.expanduser(v)) if v else ''
  return any(where(overrides[f'data.{k}']) != where(saved.get('data', {}).get(k))
             for k in ('folder', 'manifest') if f'data.{k}' in overrides)


def _check_other_dataset(data: ml_collections.ConfigDict, info: Any, saved_name: Any,
                         split: str, split_key: str) -> None:
  """A run evaluated on another arrays file than its own (``--config.data.name=arrays:OTHER``;
  another dataset is refused by ``inference.effective_config``, an image folder checked by its
  index) must find there the classes it was trained on, in its order, and images of its input
  shape (arrays are read as stored, never resized): labels are class indices, so other classes
  would be scored under the run's names. Only ``split`` (set by ``split_key``) is read."""
  if not saved_name or data.name == saved_name or not arrays.is_arrays(data):
    return
  other = arrays.load(data)
  images, _ = other.split(split, split_key)        # a missing split: named with its key
  where = f"config.data.name='{data.name}'"
  if tuple(other.class_names) != tuple(info.class_names):
    def names(n: tuple[str, ...]) -> str:
      return ', '.join(n[:5]) + (', ...' if len(n) > 5 else '')
    raise UserError(f'{where} has {len(other.class_names)} classes ({names(other.class_names)}) '
                    f'where the run was trained on {len(info.class_names)} '
                    f"({names(info.class_names)}); evaluate on data of the run's classes, in its "
                    'order (the class_names of an arrays file).')
  if tuple(images.shape[1:]) != tuple(info.image_shape):
    shape = 'x'.join(str(d) for d in images.shape[1:])
    want = 'x'.join(str(d) for d in info.image_shape)
    raise UserError(f'{where} holds {shape} images where the run reads {want}; write the arrays '
                    f'file at {want} (arrays are read as stored, never resized).')


def _check_input_size(data: ml_collections.ConfigDict, trained: inference.Trained,
                      split: str) -> None:
  """An image folder's or manifest's ``split`` whose images share one size must reach the model
  at the size it was trained on after ``data.eval_preprocess``: a network that pools globally
  takes any size and would score them at their own (64x64 digits through the default 8x8 digits
  CNN: 17% top-1, 99.7% resized to 8x8 as --mode=predict does). Images of several sizes are the
  pipeline's to check (``pipeline.check_fixed_size``); arrays files are checked by
  ``_check_other_dataset``; a tfds dataset is the run's own."""
  if not folder_layout.is_folder(data):
    return
  src = folder_layout.source_of(data)
  sizes = folder_index.index(src, split.split('@')[0], trained.info.class_names).sizes_found
  if len(sizes) != 1:
    return
  (h, w), = sizes
  one_size = dataclasses.replace(trained.info, image_shape=(h, w, trained.info.channels))
  _, made = inference.input_spec(data, one_size)
  want = tuple(trained.image_shape)
  if tuple(made) == want:
    return
  def hwc(shape: tuple[int, ...]) -> str:
    return 'x'.join(str(d) for d in shape)
  spec = data.eval_preprocess or ''
  after = f" after config.data.eval_preprocess='{spec}'" if spec else ''
  if want[0] != want[1]:
    fix = (f'resize the image files to {want[1]}x{want[0]} pixels (width x height): no '
           'config.data.eval_preprocess op makes a size that is not square')
  else:
    ops = f"{spec}|resize(size={want[0]})" if spec else f'resize(size={want[0]})'
    fix = f"add --config.data.eval_preprocess='{ops}' to evaluate them at its size"
  raise UserError(f"The images of split '{split}' of {src.location} are {hwc(made)} (height x "
                  f'width x channels){after} where the model reads {hwc(want)}; {fix}.')


@dataclasses.dataclass
class Restored:
  """One checkpoint of a run placed on the mesh, ready to read ``split`` (``restore_for_split``)."""
  trained: inference.Trained
  setup: run.Setup
  variables: Any
  shardings: Any
  data: Any              # reader.eval_data of the split
  split: str
  step: int
  chosen: str            # how the step was chosen
  # 'temperature' / 'thresholds' -> the split it was fitted on; 'checkpoint' -> the split a
  # 'best' checkpoint was picked on (``best_among``, 2 or more evaluated checkpoints)
  fitted_on: dict[str, str] = dataclasses.field(default_factory=dict)
  new_images: bool = False   # the command line points the run at another folder / manifest


def restore_for_split(workdir: str, config: ml_collections.ConfigDict | None, *, split: str = '',
                      checkpoint_spec: str = 'latest', tta: str = '',
                      overrides: dict[str, Any] | None = None,
                      warn_redrawn: bool = True, step_key: str = '',
                      split_key: str = '') -> Restored:
  """The checkpoint ``checkpoint_spec`` of ``workdir`` on the mesh with the run's parameter
  placement, and the eval data of ``split`` ('' = the run's eval split); ``warn_redrawn``: warn
  when an image folder's held-out ``split`` is drawn otherwise than at training
  (``held_out.folder_changed``). ``step_key`` / ``split_key`` are the config keys that set the
  checkpoint and ``split`` ('' where the caller sets them itself), named in errors."""
  workdir = os.path.abspath(workdir)
  run_directory.require_checkpoint(workdir)
  saved = run_directory.read_config(workdir)
  # The run's own 'best' rule (config.checkpoint.best_metric / best_mode), not a given config's.
  keep = ml_collections.ConfigDict(saved) if saved else config
  with checkpoint.Checkpointer.from_config(workdir, keep, read_only=True) as ckpt:
    step, chosen = choose_step(ckpt, checkpoint_spec, os.path.join(workdir, 'metrics.jsonl'))
    among = best_among(ckpt, chosen, os.path.join(workdir, 'metrics.jsonl'))
    latest = ckpt.latest_step()
    meta = ckpt.read_meta(step, step_key)   # unreadable: the other steps, with step_key
    try:   # what the final weights were fitted with (a damaged newest checkpoint: nothing)
      latest_meta = ckpt.read_meta(latest) if step != latest else meta
    except UserError:
      latest_meta = {}
    fitted = [k for k in ('temperature', 'thresholds') if k in latest_meta and k not in meta]
  fitted_on = {k: str(meta[k]['split']) for k in ('temperature', 'thresholds')
               if isinstance(meta.get(k), dict) and meta[k].get('split')}
  if fitted:  # chosen at the end of training, for the final weights only
    logging.warning('Checkpoint %d (%s) has no %s: the run fitted %s on its final weights '
                    '(step %d) only; --config.evaluate.checkpoint=latest evaluates with %s.',
                    step, chosen, ' or '.join(fitted), 'them' if len(fitted) > 1 else 'it',
                    latest, 'them' if len(fitted) > 1 else 'it')
  trained = inference.load(workdir, config, step=step, overrides=overrides, step_key=step_key)
  cfg = trained.run
  held_out.check_location_keys(cfg.data)   # e.g. a folder named for a run that read tfds
  saved = saved or {}
  new_images = _new_image_location(saved, overrides or {})
  split_key = split_key if split else 'data.eval_split'
  split = split or (reader.default_eval_split(cfg.data) if new_images else cfg.data.eval_split)
  picked_on = saved.get('data', {}).get('eval_split')
  if among > 1 and picked_on and not new_images:   # the split the training evaluations read
    fitted_on['checkpoint'] = str(picked_on)
  _check_other_dataset(cfg.data, trained.info, saved.get('data', {}).get('name'), split,
                       split_key)
  check_flips(cfg.data, tta, mirror_safe=trained.info.mirror_safe)
  _check_input_size(cfg.data, trained, split)
  if '@' in split and not arrays.is_arrays(cfg.data):   # an id list: ids the split lacks, warned of
    from imgcls_jax.data import folds
    folds.check_listed(cfg.data, split, split_key, trained.info.class_names)
  changed = ('' if new_images or not warn_redrawn else
             held_out.folder_changed(cfg, trained.info, split, saved.get('data', {})))
  if changed:
    logging.warning("%s, so the held-out split '%s' drawn from it may hold images the model "
                    'trained on and its figures may be optimistic; restore the folder as it was, '
                    'or train again.', changed, split)
  s = run.setup(cfg, trained.info, training=False, thresholds=trained.thresholds,
                temperature=trained.temperature)
  total = meta.get('total_steps')   # written by runs since session 39
  if isinstance(total, int) and step == latest < total:   # a halving trial, a stopped run
    finish = ("rerun the sweep without config.sweep.halving to finish it (a rerun with it stops "
              'it again)' if os.path.exists(os.path.join(workdir, checkpoint.SWEEP_TRIAL_FILE))
              else 'rerun its training command to finish it')
    logging.warning("Checkpoint %d is the run's latest, but the run is of %d steps: it stopped "
                    '%d%% of the way (a signal, a crash, or a sweep halving its trials), so these '
                    'figures are of a model not trained to the end; %s.', step, total,
                    100 * step // total, finish)
  variables, shardings = run.place_variables(s, trained.variables)
  data = reader.eval_data(cfg.data, split, local_batch_size=s.local_eval_batch_size,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          split_size=reader.split_size(cfg.data, split, trained.info),
                          info=trained.info)
  return Restored(trained=trained, setup=s, variables=variables, shardings=shardings, data=data,
                  split=split, step=step, chosen=chosen, fitted_on=fitted_on,
                  new_images=new_images)


def seen_examples(r: Restored, workdir: str) -> int | None:
  """How many examples of ``r``'s split the run trained on (0: none; None: not known): split
  slices of its own data (``reader.shared_examples``); for other images (another folder or
  manifest on the command line), the same files by real path when the run trained on an image
  folder or manifest (a run trained on tfds or arrays: not known)."""
  data = r.trained.run.data
  if r.new_images:
    return _seen_files(_trained_on(workdir), r.trained.info.class_names, data, r.split)
  if arrays.is_arrays(data) and r.trained.info.name != reader.dataset_name(data):
    return None   # another arrays file's splits
  try:
    return reader.shared_examples(data, r.split, data.train_split, r.trained.info)
  except UserError:
    return None


def skipped_files(r: Restored) -> list[tuple[str, str]]:
  """(file, why) for each file of ``r``'s split (an image folder or manifest) that the index
  passed over: unreadable, not an image, outside every class folder (none for other data)."""
  data = r.trained.run.data
  if not folder_layout.is_folder(data):
    return []
  base, _, ids_file = r.split.partition('@')
  try:
    skipped = folder_index.index(folder_layout.source_of(data), base,
                                 r.trained.info.class_names).skipped
    if ids_file:   # a cross-validation fold: the files its id list names
      with open(ids_file) as f:
        listed = {line.strip() for line in f}
      skipped = tuple(s for s in skipped if s[0] in listed)
  except (UserError, OSError):
    return []
  return list(skipped)


def training_copies(r: Restored, workdir: str) -> int | None:
  """How many files of ``r``'s split (an image folder or manifest, the run's own or another) are
  not themselves training files but hold the bytes of one: a copy, or a link under another name
  (None: not known, e.g. a run trained on tfds or arrays)."""
  return _copied_files(_trained_on(workdir) if r.new_images else r.trained.run.data,
                       r.trained.info.class_names, r.trained.run.data, r.split)


def _copied_files(trained_on: ml_collections.ConfigDict, names: tuple[str, ...],
                  data: ml_collections.ConfigDict, split_name: str) -> int | None:
  if not (folder_layout.is_folder(trained_on) and folder_layout.is_folder(data)):
    return None
  try:
    return len(folder_index.copied_files(folder_layout.source_of(data), split_name,
                                         folder_layout.source_of(trained_on),
                                         str(trained_on.train_split), names))
  except (UserError, OSError):
    return None


def _trained_on(workdir: str) -> ml_collections.ConfigDict:
  """The data config the run trained with (its saved ``config.json``)."""
  return ml_collections.ConfigDict((run_directory.read_config(workdir) or {}).get('data') or {})


def _seen_files(trained_on: ml_collections.ConfigDict, names: tuple[str, ...],
                data: ml_collections.ConfigDict, split: str) -> int | None:
  if not folder_layout.is_folder(trained_on):
    return None
  try:
    return len(folder_index.real_files(folder_layout.source_of(trained_on),
                                       str(trained_on.train_split), names)
               & folder_index.real_files(folder_layout.source_of(data), split, names))
  except (UserError, OSError):
    return None
