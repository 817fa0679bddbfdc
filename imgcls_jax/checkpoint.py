"""Orbax checkpoints: async saves, keep-last-N plus best-N, config checks, restore with fallback.

A checkpoint holds everything needed to continue a run exactly:
- ``state``: the ``TrainState`` (params, batch_stats, opt_state, step, rng as raw key data);
- ``meta`` (JSON): dataset name and class names, model name, the full config that wrote it, and the
  input pipeline's position.

The input pipeline keeps no iterator state: its order is a pure function of ``(seed, step)``
(``imgcls_jax/data/pipeline.py``), so a run resumed at step ``s`` rebuilds exactly the batches an
uninterrupted run would see from ``s`` on. ``meta['data_position']`` records that position for
readers; nothing else is needed to restore it. (tf.data iterator checkpoints were the alternative;
they tie a checkpoint to one process layout and grow with shuffle buffers.)

Restoring walks the checkpoints newest first. One whose files are truncated or unreadable is moved
to ``<workdir>/corrupt_checkpoints/`` with a warning and the previous one is used. One that is
readable but was written by a different model or dataset is a ``UserError`` that says what differs.
A reader (evaluate, predict, export, ...) that cannot use a step says so in ``unreadable_error``.

Reading a checkpoint's weights without a manager (inference, transfer, export) and amending its
meta after training live in ``checkpoint_files.py``; the run directory's other files
(``config.json``, ``samples.npz``) and why a ``--workdir`` holds no checkpoint, in
``run_directory.py``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from typing import Any, Callable, Mapping

import jax
import ml_collections
import orbax.checkpoint as ocp

from imgcls_jax import configlib, failed_reads, model_defaults, resume_diff
from imgcls_jax import state as state_lib
from imgcls_jax.errors import UserError, first_line

CHECKPOINTS_DIR = 'checkpoints'
CORRUPT_DIR = 'corrupt_checkpoints'
CONFIG_FILE = 'config.json'
META_FILE = 'metadata'   # the meta item's one JSON file (ocp.JsonCheckpointHandler's default)
SWEEP_TRIAL_FILE = 'sweep_trial.json'  # a sweep's trial: its config and result (imgcls_jax/sweep/)
SAMPLES_FILE = 'samples.npz'  # a few eval-preprocessed images of each split (export checks, int8)
# (failed_reads, imported above, also quiets Orbax's log noise about saves and their metadata)


@dataclasses.dataclass
class Restored:
  """A restored checkpoint: its step, the state, its meta, and the newer steps found unreadable."""
  step: int
  state: Any
  meta: dict[str, Any]
  skipped: list[int]


def _key(k: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaves(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype'))
  return {'/'.join(_key(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in flat}


def structure_differences(saved_metadata: Any, target: Any) -> list[str]:
  """Differences in paths, shapes and dtypes between a checkpoint's tree and a target state."""
  saved, want = _leaves(saved_metadata), _leaves(target)
  diffs = []
  for path in sorted(set(saved) | set(want)):
    if path not in want:
      diffs.append(f'{path} is only in the checkpoint')
    elif path not in saved:
      diffs.append(f'{path} is missing from the checkpoint')
    elif saved[path] != want[path]:
      (s_shape, s_dtype), (w_shape, w_dtype) = saved[path], want[path]
      diffs.append(f'{path} is {s_shape} {s_dtype} in the checkpoint, {w_shape} {w_dtype} now')
  return diffs


def finished_steps(directory: str) -> list[int]:
  """The steps of ``directory`` (a checkpoints directory) whose state was written completely."""
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d, 'state')))


def another_step(steps: list[int], step: int, step_key: str = '') -> str:
  """The fix for an unusable checkpoint ``step``: another of ``steps`` (set by ``step_key``)."""
  others = [s for s in steps if s != step]
  if not others:
    return 'restore the folder from a copy or train the run again'
  key = f' with --config.{step_key}' if step_key else ''
  return f"pick another step ({', '.join(map(str, others))}){key}"


def unreadable_cause(step_dir: str, err: BaseException | None, limit: int = 200) -> str:
  """Why the checkpoint in ``step_dir`` cannot be read: its folder empty or without state, else
  ``err``'s first line (after the meta file's name for a JSON error, which names no file)."""
  names = os.listdir(step_dir) if os.path.isdir(step_dir) else None
  if names is None or err is None or 'state' not in names:
    return ('its folder is gone' if names is None else 'its folder holds no state' if names
            else 'its folder is empty')
  text = first_line(err, limit)
  return f'meta/{META_FILE}: {text}' if isinstance(err, json.JSONDecodeError) else text


class UnreadableCheckpoint(UserError):
  """``unreadable_error``'s: also its ``directory``, ``step`` and ``cause``, for a caller that
  says the fix its own way."""

  def __init__(self, message: str, directory: str, step: int, cause: str):
    super().__init__(message)
    self.directory, self.step, self.cause = directory, step, cause


def unreadable_error(directory: str, step: int, err: BaseException | None,
                     step_key: str = '') -> UnreadableCheckpoint:
  """The one error for a checkpoint step of ``directory`` that a reader (evaluate, predict, export,
  ...) cannot use: why (``unreadable_cause``), and the other finished steps with ``step_key``, the
  config key that picks one (e.g. 'predict.step'; '' where the caller sets the step itself)."""
  why = unreadable_cause(os.path.join(directory, str(step)), err)
  return UnreadableCheckpoint(
      f'Cannot read checkpoint {step} of {directory} ({why}); it is damaged, incomplete or not a '
      f'checkpoint of this project; {another_step(finished_steps(directory), step, step_key)}.',
      directory, step, why)


def _one_copy_per_array() -> None:
  """Saves each replicated array from one device's buffer when this job is one process.

  Orbax's default on CPU and TPU is "replica-parallel" saving: each replica of a replicated array
  writes a slice of it, which spreads the writes over hosts. In one process every replica is on
  this host, so the slices only add work: each is an eager on-device slice, compiled per shape and
  offset. On 8 CPU devices the first save of a ResNet-18 training state (167 arrays, 89 MiB)
  blocked for 6 s; of a 160-array tree, 2.5 s against 0.06 s without the slices, and each later
  save 4-8x longer. The files and what a restore reads are the same either way.
  Several processes keep Orbax's default.
  """
  if jax.process_count() > 1:
    return
  try:   # Orbax's own default store (a private module of orbax<0.13, the pin in pyproject.toml)
    from orbax.checkpoint._src.metadata import array_metadata_store
  except ImportError:   # another Orbax: keep its default (slower, the same files);
    return              # tests/test_checkpoint.py then fails on the compiles
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(handler, '_use_replica_parallel', False):
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store(), use_replica_parallel=False),
        override=True)


class Checkpointer:
  """An Orbax ``CheckpointManager`` over ``<workdir>/checkpoints``; use it as a context manager.

  Keeps the newest ``keep`` checkpoints, plus the ``keep_best`` best by the evaluation metric
  ``best_metric`` (``best_mode`` 'max' or 'min') among checkpoints saved with metrics.
  """

  def __init__(self, workdir: str, *, keep: int = 3, keep_best: int = 0,
               best_metric: str = 'accuracy', best_mode: str = 'max', async_save: bool = True,
               read_only: bool = False):
    if best_mode not in ('max', 'min'):
      raise UserError(f"config.checkpoint.best_mode must be 'max' or 'min', got '{best_mode}'.")
    if keep < 1 or keep_best < 0:
      raise UserError(f'Keep at least one checkpoint (config.keep_checkpoints={keep}) and a '
                      'non-negative number of best ones '
                      f'(config.checkpoint.keep_best={keep_best}).')
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINTS_DIR)
    self.best_metric = best_metric
    self.best_mode = best_mode
    self._track_best = keep_best > 0
    worst = -math.inf if best_mode == 'max' else math.inf
    metric = lambda m: float(m.get(best_metric, worst))
    policies: list[Any] = [ocp.checkpoint_managers.LatestN(keep)]
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=metric, reverse=best_mode == 'min', n=keep_best,
          keep_checkpoints_without_metrics=False))
    # A reader (evaluate, calibrate, compare) may run beside the training that writes the run:
    # it must neither delete that run's in-flight '<step>.orbax-checkpoint-tmp' nor prune steps.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=metric if keep_best else None, best_mode=best_mode,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
        create=not read_only)   # (Orbax's own read_only option logs two warnings per reader)
    if not read_only:
      _one_copy_per_array()
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  @classmethod
  def from_config(cls, workdir: str, config: ml_collections.ConfigDict, *,
                  read_only: bool = False) -> 'Checkpointer':
    """The keep / best / async policy of ``config.keep_checkpoints`` and ``config.checkpoint``
    (``read_only``: a reader of a run that may still be training; it writes and deletes nothing)."""
    c = config.checkpoint
    return cls(workdir, keep=config.keep_checkpoints, keep_best=c.keep_best,
               best_metric=c.best_metric, best_mode=c.best_mode, async_save=c.async_save,
               read_only=read_only)

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def close(self) -> None:
    """Waits for pending saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The saved step with the best ``best_metric`` (None when none was saved with metrics)."""
    if not self._track_best:
      return None
    steps = [s for s in self.all_steps() if self.metrics(s)]
    return self._manager.best_step() if steps else None

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def metrics(self, step: int) -> dict[str, Any] | None:
    """The evaluation metrics saved with ``step``, if any."""
    m = self._manager.metrics(step)
    return dict(m) if m else None

  def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None,
           metrics: Mapping[str, Any] | None = None) -> bool:
    """Starts an (async) save of ``state`` at ``step``; False when that step is already saved.

    ``metrics`` (evaluation results) rank the checkpoint for keep-best; the state is copied off the
    devices before this returns, so the caller may donate it to the next step right away.
    """
    if step in self._manager.all_steps():
      return False
    if metrics is not None and self._track_best:
      if self.best_metric not in metrics:
        raise UserError(f"config.checkpoint.best_metric='{self.best_metric}' is not an evaluation "
                        f"metric; use one of: {', '.join(sorted(metrics))}.")
      metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta or {}))),
        metrics=dict(metrics) if metrics is not None else None, force=True)
    return True

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def read_meta(self, step: int, step_key: str = '') -> dict[str, Any]:
    """The JSON meta saved with ``step``; unreadable: ``unreadable_error``, naming ``step_key``."""
    try:
      return self._read_meta(step)
    except Exception as e:  # json / OS errors on a damaged checkpoint
      raise unreadable_error(self.directory, step, e, step_key) from None

  def _read_meta(self, step: int) -> dict[str, Any]:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored['meta'] or {})

  def _check_fits(self, step: int, target: Any, saved_config: Mapping[str, Any] | None = None,
                  config: ml_collections.ConfigDict | None = None) -> None:
    """A UserError unless checkpoint ``step``'s tree fits ``target``: it names the keys of
    ``config`` that differ from ``saved_config`` (the checkpoint's) and shape the state, else the
    first differing tree path."""
    diffs = structure_differences(self._manager.metadata(step).item_metadata['state'].tree, target)
    if diffs and config is not None:
      message = resume_diff.changed_keys_message(diffs, saved_config, config,
                                                 f'checkpoint {step} in {self.directory}')
      if message:
        raise UserError(message)
    if diffs:
      more = f' (and {len(diffs) - 1} more differences)' if len(diffs) > 1 else ''
      raise UserError(f'Checkpoint {step} in {self.directory} does not fit this model/config: '
                      f'{diffs[0]}{more}; resume with the config that wrote it (config.json in '
                      'the workdir) or use a new --workdir.')

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(state placed as ``abstract_state``'s shardings say, meta) at ``step`` (default latest).

    Strict: a missing, unreadable or mismatched checkpoint is a UserError (no fallback).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f'No checkpoint in {self.directory}; train first or point --workdir at a '
                      'run directory.')
    if step not in self._manager.all_steps():
      raise UserError(f'No checkpoint of step {step} in {self.directory}; it holds steps '
                      f'{self.all_steps()}.')
    failed_reads.install()  # a damaged checkpoint: one line, not tensorstore's leftovers
    try:
      self._check_fits(step, abstract_state)
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except UserError:
      raise
    except Exception as e:  # tensorstore / json / OS errors on a damaged checkpoint
      raise UserError(f'Checkpoint {step} in {self.directory} is unreadable ({first_line(e)}); '
                      'use another step or a new --workdir.') from None
    logging.info('Restored checkpoint %d from %s', step, self.directory)
    return restored['state'], dict(restored['meta'] or {})

  def restore_latest(self, abstract_state: Any,
                     config: ml_collections.ConfigDict | None = None,
                     check_meta: Callable[[dict[str, Any], str], None] | None = None
                     ) -> Restored | None:
    """The newest readable checkpoint that fits ``abstract_state``; None when there is none.

    Unreadable (truncated, partly deleted) checkpoints are moved to
    ``<workdir>/corrupt_checkpoints`` with a warning, and the previous one is tried. A readable
    checkpoint written by a different model/dataset (``config``'s state-defining keys, then
    ``check_meta(meta, 'checkpoint <step> in <directory>')``, e.g. its classes, then the state's
    tree, a mismatch named by the changed ``config`` keys that shape it) raises UserError, before
    any array is read. A changed training trajectory is warned of once, for the checkpoint resumed
    from, after the warnings about the unreadable ones.
    """
    moved: list[tuple[int, str, str]] = []   # (step, why it is unreadable, where it went)
    resumed: list[Restored] = []
    failed_reads.install()  # a damaged checkpoint: one warning, not tensorstore's leftovers
    try:
      for step in sorted(self._manager.all_steps(), reverse=True):
        try:
          meta = self._read_meta(step)
          _ = self._manager.metadata(step).item_metadata['state'].tree  # readable tree metadata
        except Exception as e:  # unreadable meta or tree metadata
          moved.append(self._quarantine(step, e))
          continue
        where = f'checkpoint {step} in {self.directory}'
        if config is not None:   # (a constructor default changed since: named first)
          model_defaults.check_resume(meta, config, where)
          configlib.check_config(model_defaults.completed(meta.get('config'), meta), config,
                                 where, warn=False)
        if check_meta is not None:
          check_meta(meta, where)
        self._check_fits(step, abstract_state, meta.get('config'), config)
        try:
          state = self._manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state)))['state']
        except Exception as e:  # truncated or missing array data
          moved.append(self._quarantine(step, e))
          continue
        if not bool(state_lib.is_finite(state)):   # damaged bytes that decode; saved after a NaN
          moved.append(self._quarantine(step, 'its arrays hold NaN or infinite values'))
          continue
        resumed.append(Restored(step=step, state=state, meta=meta, skipped=[m[0] for m in moved]))
        break
    finally:   # once the step resumed from is known; before an older checkpoint's error too
      for step, why, dest in moved:
        logging.warning('Checkpoint %d in %s is unreadable (%s); moved it to %s%s.', step,
                        self.directory, why, dest, f' and resuming from the previous good '
                        f'checkpoint, step {resumed[0].step}' if resumed else '')
    if resumed:   # only the checkpoint resumed from, once its state is read: a changed trajectory
      if config is not None:
        configlib.warn_trajectory(resumed[0].meta.get('config'), config,
                                  f'checkpoint {resumed[0].step} in {self.directory}')
      return resumed[0]
    if moved:
      raise UserError(f'No readable checkpoint in {self.directory}: steps '
                      f'{", ".join(str(m[0]) for m in moved)} were damaged and moved to '
                      f'{os.path.join(self.workdir, CORRUPT_DIR)}; run again to start from scratch '
                      'or put back a good copy.')
    return None

  def _quarantine(self, step: int, err: BaseException | str) -> tuple[int, str, str]:
    """Moves an unreadable checkpoint out of the manager's directory (kept for inspection);
    (step, why it is unreadable, where it went)."""
    src = os.path.join(self.directory, str(step))
    why = err if isinstance(err, str) else unreadable_cause(src, err)
    root = os.path.join(self.workdir, CORRUPT_DIR)
    dest, n = os.path.join(root, str(step)), 1
    while os.path.exists(dest):
      dest, n = os.path.join(root, f'{step}.{n}'), n + 1
    if jax.process_index() == 0:
      os.makedirs(root, exist_ok=True)
      shutil.move(src, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'imgcls_jax_quarantine_{step}')
    self._manager.reload()
    return step, why, dest
