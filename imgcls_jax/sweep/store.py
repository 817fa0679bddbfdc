"""A sweep trial's record in its directory (``checkpoint.SWEEP_TRIAL_FILE``): the config it trains,
its status and result; whether a rerun may skip, resume or must refuse it; one process at a time.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from typing import Any, Iterator

from imgcls_jax import atomic, checkpoint, configlib, metrics

# Keys that cannot change what a trial trains: a rerun with other values still skips or resumes it.
IGNORED = ('progress_bar', 'log_every_steps', 'tensorboard', 'compilation_cache_dir',
           'data.data_dir', 'checkpoint.async_save', 'sweep.', 'compare.', 'predict.',
           'export.', 'serve.', 'embed.', 'classical.', 'distributed.',
           # evaluate.* read only by the modes that use a trained run (--mode=evaluate, ...);
           # evaluate.checkpoint is the one a trial is scored at: a change re-scores, untrained.
           # The others (tta, temperature_split, ...) change the training's own evaluations or
           # what its checkpoint holds, and count.
           'evaluate.checkpoint', 'evaluate.split', 'evaluate.output_dir', 'evaluate.errors',
           'evaluate.label_issues', 'evaluate.ood_inputs', 'evaluate.bootstrap_resamples')
# Keys that count only where the trial reads them: (key, whether a flat config reads it).
COUNTED_WHEN = (
    # the abstention threshold fitted at the end of training is at this confidence
    ('evaluate.confidence_level', lambda c: bool(c.get('evaluate.abstain_accuracy'))),
    # a k-fold trial evaluates its folds itself: the ECE it records, each fold's report
    ('evaluate.calibration_bins', lambda c: (c.get('cross_validation.folds') or 0) > 0),
    ('evaluate.top_confused', lambda c: (c.get('cross_validation.folds') or 0) > 0),
    # per-class thresholds are fitted for a multi-label run only
    ('evaluate.threshold_split', lambda c: bool(c.get('data.multilabel'))),
)
LOCK_FILE = '.sweep.lock'


def read(directory: str) -> dict[str, Any] | None:
  """The trial's record, or None (none yet, or unreadable: ``conflict`` says why)."""
  return _load(directory)[0]


def _load(directory: str) -> tuple[dict[str, Any] | None, str]:
  """(the trial's record or None, why it could not be read: '' when there is none)."""
  path = os.path.join(directory, checkpoint.SWEEP_TRIAL_FILE)
  try:
    with open(path) as f:
      record = json.load(f)
  except FileNotFoundError:
    return None, ''
  except (OSError, ValueError) as e:   # (written whole by os.replace: never half another's)
    return None, f'{type(e).__name__}: {e}'
  if not isinstance(record, dict):
    return None, f'a JSON {type(record).__name__}, not a trial record'
  return record, ''


def write(directory: str, record: dict[str, Any]) -> None:
  """Replaces the trial's record whole (another shard may be reading it)."""
  os.makedirs(directory, exist_ok=True)
  atomic.write_atomic(os.path.join(directory, checkpoint.SWEEP_TRIAL_FILE),
                      json.dumps(metrics.json_safe(record), indent=1), unique=True)


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """The keys, but those in IGNORED (and COUNTED_WHEN's where neither config reads them), in
  which two trial configs differ ('key: a before, b now')."""
  flat_saved, flat_current = configlib.flat(saved), configlib.flat(current)
  quiet = {k for k, reads in COUNTED_WHEN if not (reads(flat_saved) or reads(flat_current))}
  def kept(config: dict[str, Any]) -> dict[str, Any]:   # (flat: differences takes it as it is)
    return {k: v for k, v in config.items() if k not in quiet
            and not any(k.startswith(p) if p.endswith('.') else k == p for p in IGNORED)}
  return [d.replace(' in the checkpoint,', ' before,')
          for d in configlib.differences(kept(flat_saved), kept(flat_current))]


def _trained(directory: str) -> bool:
  """Whether ``directory`` holds training state (checkpoints, k-fold runs or a run's config)."""
  return any(n == checkpoint.CHECKPOINTS_DIR or n == checkpoint.CONFIG_FILE or n.startswith('fold_')
             for n in os.listdir(directory)) if os.path.isdir(directory) else False


def holds_run(directory: str) -> bool:
  """Whether ``directory`` is a run's (or a sweep trial's) own: never a sweep's workdir."""
  return _trained(directory) or os.path.exists(
      os.path.join(directory, checkpoint.SWEEP_TRIAL_FILE))


def conflict(directory: str, config_json: dict[str, Any]) -> tuple[str, str] | None:
  """(why ``directory`` cannot hold the trial of ``config_json``: trained with another config,
  another run's, or its record damaged; the fix), or None."""
  if not _trained(directory):
    return None
  saved, damaged = _load(directory)
  if damaged:
    path = os.path.join(directory, checkpoint.SWEEP_TRIAL_FILE)
    return (f"{path}, the trial's record, is unreadable or damaged ({damaged})",
            'restore that file from a copy, or move its directory aside to train the trial again')
  fix = 'delete such a directory to train its trial again, or use a new --workdir'
  if saved is None:
    return f'{directory} holds a run that is not a trial of a sweep', fix
  diffs = differences(saved.get('config') or {}, config_json)
  return (f'{directory} was trained with another config ({"; ".join(diffs[:3])})', fix
          ) if diffs else None


def done(directory: str, config_json: dict[str, Any]) -> dict[str, Any] | None:
  """The record of this trial (same config but for IGNORED keys) when it finished or diverged."""
  saved = read(directory)
  if (saved is None or saved.get('status') not in ('finished', 'diverged')
      or differences(saved.get('config') or {}, config_json)):
    return None
  return saved


@contextlib.contextmanager
def claim(directory: str) -> Iterator[bool]:
  """Holds the trial's lock while the block runs; yields False (and holds nothing) when another
  process holds it. The lock goes with the process that holds it, killed or not."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, LOCK_FILE), 'a') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:   # held by another process
      yield False
      return
    except OSError as e:   # a filesystem without locks (some FUSE mounts): train unguarded
      _no_locks(directory, e)
      yield True
      return
    try:
      yield True
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


_WARNED: set[str] = set()


def _no_locks(path: str, err: OSError) -> None:
  if 'locks' in _WARNED:
    return
  _WARNED.add('locks')
  logging.warning('Cannot lock files under %s (%s): run one process per trial yourself '
                  '(config.sweep.shard) on this filesystem.', path, err.strerror or err)


def busy(directory: str) -> bool:
  """Whether another process is training this trial now."""
  if not os.path.exists(os.path.join(directory, LOCK_FILE)):
    return False
  with claim(directory) as mine:
    return not mine


@contextlib.contextmanager
def summary_lock(workdir: str) -> Iterator[None]:
  """One shard at a time reads the trials' records and writes the summary."""
  with open(os.path.join(workdir, LOCK_FILE), 'a') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX)
    except OSError as e:
      _no_locks(workdir, e)
      yield
      return
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
