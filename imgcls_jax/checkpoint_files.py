"""A saved checkpoint's files read, or its meta amended, without an Orbax ``CheckpointManager``:
the weights inference, transfer and export take (numpy, any device layout), and a choice fitted
after training written into the meta. The layout itself (``checkpoints/<step>/{state,meta}``) is
``checkpoint.py``'s; this module only reads it (and rewrites one meta file atomically).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from imgcls_jax import atomic, failed_reads, optim
from imgcls_jax.checkpoint import (CHECKPOINTS_DIR, META_FILE, another_step, finished_steps,
                                   unreadable_error)
from imgcls_jax.run_directory import moved_aside
from imgcls_jax.errors import UserError
from imgcls_jax.weights import Weights, check_finite, flatten


def update_meta(workdir: str, step: int, fields: Mapping[str, Any]) -> dict[str, Any]:
  """Sets ``fields`` in the JSON meta of checkpoint ``step`` of the run in ``workdir`` (a choice
  fitted after training, ``--mode=calibrate``; call it on one process) and returns the new meta.
  The new file is written and flushed to disk beside the old one, then renamed over it: a crash
  leaves the old meta or the new one, never a mix."""
  directory, _ = _locate(workdir)
  if step not in finished_steps(directory):
    raise UserError(f'Checkpoint step {step} is not in {directory}; pick one of its steps.')
  path = os.path.join(directory, str(step), 'meta', META_FILE)
  try:
    with open(path) as f:
      meta = dict(json.load(f) or {})
  except (OSError, ValueError) as e:
    raise UserError(f'Cannot read the meta of checkpoint {step} in {directory} ({e}); it is '
                    'damaged: retrain, or restore the run directory from a copy.') from None
  meta.update(fields)
  text = json.dumps(meta)   # fails here, before anything is written, on a value JSON cannot hold
  atomic.write_atomic(path, text)
  dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
  try:
    os.fsync(dir_fd)   # the rename itself reaches the disk
  finally:
    os.close(dir_fd)
  return meta


def _locate(path: str) -> tuple[str, int | None]:
  """(checkpoints directory, explicit step or None) for a run dir, checkpoints dir or step dir."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    return os.path.join(path, CHECKPOINTS_DIR), None
  base = os.path.basename(path.rstrip('/'))
  if base.isdigit() and os.path.isdir(os.path.join(path, 'state')):
    return os.path.dirname(path), int(base)
  if os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path)):
    return path, None
  raise UserError(f'No checkpoint of this project at {path}; point at a run directory (with '
                  'checkpoints/) or one checkpoint step directory.')


def ema_weights(weights: Weights, path: str, step_key: str = '') -> Weights:
  """The weight EMA of the checkpoint ``weights`` were read from (``read_weights(path)``: the same
  step, even when a newer one has been saved since), with their meta."""
  ema = read_weights(path, weights.meta['step'], ema=True, step_key=step_key)
  return Weights(params=ema.params, batch_stats=ema.batch_stats, origin=ema.origin,
                 meta=weights.meta)


def read_weights(path: str, step: int | None = None, *, ema: bool = False,
                 step_key: str = '') -> Weights:
  """Parameters, batch statistics and meta of a checkpoint, as numpy (no optimizer state); with
  ``ema`` the weight EMA's (a UserError when the run kept none). A schedule-free run's parameters
  are its evaluation weights, the averaged sequence x (``optax.contrib.schedule_free_eval_params``),
  not the point y its gradients were taken at (what the state holds).

  ``path`` is a run directory, its ``checkpoints`` directory or one step directory; ``step``
  (default: the one in ``path``, else the latest) picks the checkpoint. Any device layout works.
  ``meta`` is the checkpoint's JSON meta plus ``'step'``. ``step_key`` (e.g. 'predict.step'), the
  config key that picks the step, is named in the errors that ask for another one.
  """
  from etils import epath

  directory, path_step = _locate(path)
  if step is not None and step < -1:
    raise UserError(f'Checkpoint step {step} is not a step; give -1 (the latest) or a step of '
                    f'{directory}.')
  steps = finished_steps(directory)
  step = path_step if step is None or step < 0 else step
  if step is None:
    if not steps:
      started = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
      if started:
        raise UserError(f'No finished checkpoint in {directory}: step(s) '
                        f"{', '.join(map(str, started))} hold no complete state (damaged, or "
                        'still being written); wait for the training to save one, restore the '
                        'folder from a copy, or train the run again.')
      moved = moved_aside(os.path.dirname(directory))
      raise UserError(f'No finished checkpoint in {directory}; '
                      f"{moved or 'train that run first'}.")
    step = steps[-1]
    newer = [int(d) for d in os.listdir(directory) if d.isdigit() and int(d) > step]
    if newer:
      logging.warning('Checkpoint %s in %s has no state (incomplete or damaged); using step %d, '
                      'the latest complete one.', max(newer), directory, step)
  if step not in steps and os.path.isdir(os.path.join(directory, str(step))):
    raise unreadable_error(directory, step, None, step_key)   # an empty or stateless folder
  if step not in steps:
    raise UserError(f'Checkpoint step {step} is not in {directory} (it has: '
                    f"{', '.join(map(str, steps)) or 'none'}); pick one of those"
                    f"{f' (--config.{step_key})' if step_key else ''}.")
  step_dir = epath.Path(directory) / str(step)
  origin = f'checkpoint {step} of {directory}'
  failed_reads.install()  # a damaged checkpoint: one line, not tensorstore's leftovers
  try:
    tree = ocp.PyTreeCheckpointHandler().metadata(step_dir / 'state').tree
    if ema and not tree.get('ema'):
      raise UserError(f'{origin} holds no weight EMA (the run had config.ema.decay=0); use its '
                      'weights (--config.ema.inference=False).')
    item = {k: tree[k] for k in ('params', 'batch_stats') if k in tree}
    schedule_free = not ema and optim.schedule_free_parts(tree.get('opt_state')) is not None
    if ema:
      item = {'ema': {k: v for k, v in tree['ema'].items() if k in ('params', 'batch_stats')}}
    elif 'params' not in item:
      raise KeyError('params')
    elif schedule_free:  # its b1 and z: the weights to use are x, not y (below)
      item['opt_state'] = tree['opt_state']
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = ocp.PyTreeCheckpointer().restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    restored = restored['ema'] if ema else restored
    if schedule_free:
      restored['params'] = optim.eval_params(restored['opt_state'], restored['params'])
    meta = {}
    if (step_dir / 'meta').exists():
      meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
          step_dir / 'meta', args=ocp.args.JsonRestore()) or {}
  except (ValueError, KeyError, TypeError, OSError) as e:
    raise unreadable_error(directory, step, e, step_key) from None
  meta = dict(meta)
  meta['step'] = step
  return check_finite(Weights(params=flatten(restored['params']),
                              batch_stats=flatten(restored.get('batch_stats', {})),
                              origin=origin + (' (its weight EMA)' if ema else ''), meta=meta),
                      another_step(steps, step, step_key))
