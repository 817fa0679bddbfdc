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

from imgcls_jax import checkpoint, configlib, metrics

# Keys that cannot change what a trial trains: a rerun with other values still skips or resumes it.
# ('evaluate.' holds the checkpoint a trial is scored at: a change re-scores, without training.)
IGNORED = ('progress_bar', 'log_every_steps', 'tensorboard', 'compilation_cache_dir',
           'data.data_dir', 'checkpoint.async_save', 'sweep.', 'evaluate.', 'compare.', 'predict.',
           'export.', 'serve.', 'embed.', 'classical.', 'distributed.')
LOCK_FILE = '.sweep.lock'


def read(directory: str) -> dict[str, Any] | None:
  """The trial's record, or None (none yet, unreadable, or being replaced by another shard)."""
  try:
    with open(os.path.join(directory, checkpoint.SWEEP_TRIAL_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write(directory: str, record: dict[str, Any]) -> None:
  """Replaces the trial's record whole (another shard may be reading it)."""
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f'.{os.getpid()}.{checkpoint.SWEEP_TRIAL_FILE}')
  with open(tmp, 'w') as f:
    json.dump(metrics.json_safe(record), f, indent=1)
  os.replace(tmp, os.path.join(directory, checkpoint.SWEEP_TRIAL_FILE))


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """The keys, but those in IGNORED, in which two trial configs differ ('key: a before, b now')."""
  def kept(config: dict[str, Any]) -> dict[str, Any]:   # (flat: differences takes it as it is)
    return {k: v for k, v in configlib.flat(config).items()
            if not any(k.startswith(p) if p.endswith('.') else k == p for p in IGNORED)}
  return [d.replace(' in the checkpoint,', ' before,')
          for d in configlib.differences(kept(saved), kept(current))]


def _trained(directory: str) -> bool:
  """Whether ``directory`` holds training state (checkpoints, k-fold runs or a run's config)."""
  return any(n == checkpoint.CHECKPOINTS_DIR or n == checkpoint.CONFIG_FILE or n.startswith('fold_')
             for n in os.listdir(directory)) if os.path.isdir(directory) else False


def conflict(directory: str, config_json: dict[str, Any]) -> str | None:
  """Why ``directory`` cannot hold the trial of ``config_json`` (trained with another config, or
  another run's), or None."""
  if not _trained(directory):
    return None
  saved = read(directory)
  if saved is None:
    return f'{directory} holds a run that is not a trial of a sweep'
  diffs = differences(saved.get('config') or {}, config_json)
  return f'{directory} was trained with another config ({"; ".join(diffs[:3])})' if diffs else None


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
