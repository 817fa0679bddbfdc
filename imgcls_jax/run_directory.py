"""The run directory around its checkpoints (``checkpoint.py`` owns the layout and the
checkpoints themselves): the run's ``config.json`` and ``samples.npz``, the one-line answer
when a ``--workdir`` holds no checkpoint (a file, a folder inside a run, a cross-validation or
sweep parent, damaged checkpoints moved aside, an export, a classical baseline). No TensorFlow at
import. (The one line when a mode cannot write its files: ``write_problems.py``.)
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import ml_collections
import numpy as np

from imgcls_jax import atomic
from imgcls_jax.checkpoint import (CHECKPOINTS_DIR, CONFIG_FILE, CORRUPT_DIR, SAMPLES_FILE,
                                   SWEEP_TRIAL_FILE)
from imgcls_jax.errors import UserError

def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """``<workdir>/config.json``: the config of the run (human-readable; checkpoints hold it too),
  written whole or not at all (on a full disk the earlier one stays as it was)."""
  atomic.write_atomic(os.path.join(workdir, CONFIG_FILE),
                       config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str) -> dict[str, Any] | None:
  """The run's ``config.json`` as a dict; None when there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'Cannot read {path} ({e}); restore it or delete it.') from None


def write_samples(workdir: str, arrays: Mapping[str, np.ndarray]) -> None:
  """``<workdir>/samples.npz``: a few images of the run's data (``eval_images``, ``eval_labels``,
  ``train_images``, ``train_labels``), so an export can be checked after the data is gone."""
  atomic.write_atomic(os.path.join(workdir, SAMPLES_FILE),
                       lambda tmp: np.savez_compressed(tmp, **arrays))


def read_samples(workdir: str) -> dict[str, np.ndarray] | None:
  """What ``write_samples`` stored; None when the run has none (or it is unreadable)."""
  path = os.path.join(workdir, SAMPLES_FILE)
  try:
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError):
    return None


def require_checkpoint(workdir: str) -> None:
  """Raises UserError (one line) unless ``workdir`` holds at least one checkpoint."""
  ckpt_dir = os.path.join(workdir, CHECKPOINTS_DIR)
  if os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir)):
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} is a file, not a run directory; point --workdir at the '
                    'folder a training run wrote (it holds checkpoints/ and config.json).')
  inside = _run_directory_above(workdir)
  if inside:
    raise UserError(f'No checkpoint in {ckpt_dir}: --workdir={workdir} is inside the run '
                    f'directory {inside}; point --workdir at {inside}.')
  moved = moved_aside(workdir)
  if moved:
    raise UserError(f'No checkpoint in {ckpt_dir}: {moved}.')
  if os.path.isfile(os.path.join(workdir, 'export.json')):
    raise UserError(f'--workdir={workdir} is an export (it holds export.json), not a run '
                    'directory: point --workdir at the run it was exported from (its exported '
                    'models run under their own runtimes; see the README, "Export").')
  classical = classical_advice(workdir)
  if classical:
    raise UserError(f'{classical}.')
  subdirs = sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []
  folds = [n for n in subdirs if n.startswith('fold_')]
  trials = [n for n in subdirs if os.path.exists(os.path.join(workdir, n, SWEEP_TRIAL_FILE))]
  if folds:
    hint = (' This is a cross-validation run: use one fold, e.g. '
            f'--workdir={os.path.join(workdir, folds[0])}.')
  elif trials:
    best = _best_trial(workdir)
    hint = (' This is a sweep: use one of its trials (sweep.md ranks them), '
            + (f'e.g. its best, --workdir={best}.' if best else
               f'e.g. --workdir={os.path.join(workdir, trials[0])}.'))
  else:
    hint = ' Train first (--mode=train) or point --workdir at a run directory.'
  raise UserError(f'No checkpoint in {ckpt_dir}.{hint}')


CLASSICAL_FILE = 'classical.json'   # a classical baseline's record (classical.py)
_KINDS = {'run': 'a training run (checkpoints/, config.json)',
          'cross_validation': 'a cross-validation of the network (fold_*/)',
          'classical': 'a classical baseline (classical.json)',
          'classical_cv': 'a cross-validation of a classical baseline (fold_*/classical.json)',
          'sweep': 'a sweep (trial folders, sweep.json)',
          'export': 'an export (export.json)'}


def kind(workdir: str) -> str:
  """What ``workdir`` holds of this project's outputs: one of ``_KINDS``, or '' (nothing: a new
  or empty folder, or only other files)."""
  if not os.path.isdir(workdir):
    return ''
  names = os.listdir(workdir)
  sub = lambda n, f: os.path.exists(os.path.join(workdir, n, f))   # noqa: E731
  if 'export.json' in names:
    return 'export'
  if 'sweep.json' in names or any(sub(n, SWEEP_TRIAL_FILE) for n in names):
    return 'sweep'
  folds = [n for n in names if n.startswith('fold_') and os.path.isdir(os.path.join(workdir, n))]
  if folds:
    return 'classical_cv' if any(sub(n, CLASSICAL_FILE) for n in folds) else 'cross_validation'
  if CLASSICAL_FILE in names:
    return 'classical'
  if CHECKPOINTS_DIR in names or CONFIG_FILE in names:
    return 'run'
  return ''


def classical_advice(workdir: str) -> str:
  """What ``workdir`` is and where its results are, when ``--mode=classical`` wrote it (a
  classical baseline, one fold of its cross-validation, or the cross-validation): it holds a
  scikit-learn model, no network checkpoint (evaluate, predict and compare use its model); else
  ''."""
  found = kind(workdir)
  if found == 'classical_cv':
    return (f'--workdir={workdir} is a cross-validation of the classical baseline '
            '(--mode=classical), which has no network checkpoint to restore; its results are '
            f"{os.path.join(workdir, 'cv_report.md')} and fold_<i>/report.md (--mode=evaluate, "
            'predict and compare take one fold_<i>), and a network comes from --mode=train')
  if found != 'classical':
    return ''
  parent = os.path.dirname(os.path.abspath(workdir))
  what = (f'a fold of the classical cross-validation in {parent}' if kind(parent) == 'classical_cv'
          else 'a classical baseline')
  return (f'--workdir={workdir} is {what} (--mode=classical), which has no network checkpoint to '
          f"restore; its evaluation is {os.path.join(workdir, 'report.md')} (--mode=evaluate, "
          'predict and compare use its scikit-learn model), and a network comes from '
          '--mode=train')


def check_writable_by(mode: str, workdir: str) -> None:
  """Before ``mode`` (train, cross_validation, classical, classical_cv) writes into ``workdir``:
  refuses a folder that holds another kind of output, which it would mix with or overwrite, or
  one inside a run directory."""
  path = os.path.abspath(workdir)
  inside = _run_directory_above(path)
  if inside:
    raise UserError(f'--workdir={workdir} is inside the run directory {inside}, which it would '
                    'mix with; give a --workdir of its own (outside it).')
  found, writes = kind(path), {'train': 'run'}.get(mode, mode)
  if found and found != writes:
    raise UserError(f'--workdir={workdir} holds {_KINDS[found]}, which this '
                    f"{_KINDS[writes].split(' (')[0][2:]} would mix with or overwrite; give a new "
                    '--workdir.')


def _best_trial(workdir: str) -> str:
  """The best trial's directory as the sweep's ``sweep.json`` ranks it ('' when not known)."""
  try:
    with open(os.path.join(workdir, 'sweep.json')) as f:
      best = (json.load(f).get('best') or {}).get('best_workdir') or ''
  except (OSError, ValueError, AttributeError):
    return ''
  return best if isinstance(best, str) and os.path.isdir(best) else ''


def moved_aside(workdir: str) -> str:
  """Why ``workdir`` has no checkpoint left when its damaged ones were moved to
  ``corrupt_checkpoints/`` (else ''): the steps, where, and what to do."""
  root = os.path.join(workdir, CORRUPT_DIR)
  steps = sorted(os.listdir(root)) if os.path.isdir(root) else []
  if not steps:
    return ''
  return (f"its checkpoints were damaged and moved to {root} (step(s) {', '.join(steps[:5])}); "
          'put back a good copy of one, or train the run again')


def _run_directory_above(path: str) -> str | None:
  """The run directory that ``path`` lies inside (``RUN/checkpoints``, ``RUN/checkpoints/20``,
  ...), if any: the nearest parent whose ``checkpoints/`` holds a step."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  while parent != path:
    ckpt_dir = os.path.join(parent, CHECKPOINTS_DIR)
    try:
      if os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir)):
        return parent
    except OSError:   # a parent this user may not list
      return None
    path, parent = parent, os.path.dirname(parent)
  return None
