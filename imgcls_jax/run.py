"""The layer under every mode: setup from a config, jitted steps with shardings, restore-or-init,
and the summed statistics of an evaluation (``restored_split.py`` restores a trained checkpoint for
a split on top of it; ``held_out_fits.py`` fits the temperature and thresholds with it).

Modes (``train``, ``evaluate``, ``compare``, ``calibrate``, ``cross_validation``, ``predict``,
``export``, ``serve``) build on this module, ``restored_split.py``, ``evaluation.py``,
``outcomes.py``, ``held_out_fits.py`` and ``inference.py``, never on each other.
Nothing here imports TensorFlow at module level: the dataset is described by a ``DatasetInfo``
(read from the data source only when none is given), so steps, state and shardings run where only
JAX is installed (e.g. the throughput benchmark on synthetic data).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Iterable

import jax
import ml_collections
import numpy as np

from imgcls_jax import (checkpoint, configlib, device_augment, dispatch, eval_steps, held_out,
                        loss_weights, models, optim, param_groups, report, sharding, steps,
                        whitening)
from imgcls_jax import state as state_lib
from imgcls_jax.data import reader
from imgcls_jax.data.info import DatasetInfo, check_flips, read_shards
from imgcls_jax.errors import UserError


@dataclasses.dataclass
class Setup:
  """Everything built from the config before any step runs.

  The training fields (optimizer, schedule, step counts, train batch) are None in a setup made
  with ``training=False`` (evaluation): it builds no optimizer and reads no training split.
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  info: DatasetInfo
  model_fn: state_lib.ModelFn
  model_def: state_lib.ModelDef
  step_cfg: steps.StepConfig
  placement: sharding.ParamSharding
  local_eval_batch_size: int
  tx: Any = None
  lr_schedule: Any = None
  steps_per_epoch: int | None = None
  total_steps: int | None = None
  local_batch_size: int | None = None
  steps_per_dispatch: int = 1         # train steps per jitted call (config.steps_per_dispatch)
  teacher: Any = None                 # teacher.Teachers of a distilled run (config.distill)


def setup(config: ml_collections.ConfigDict, info: DatasetInfo | None = None, *,
          training: bool = True, steps_per_epoch: int | None = None,
          thresholds: tuple[float, ...] | None = None, temperature: float = 1.0) -> Setup:
  """Validates ``config`` and builds mesh, model definition, step numbers and (when ``training``)
  the optimizer and schedule.

  ``info`` describes the dataset (read from ``config.data`` when None); ``steps_per_epoch``
  overrides the count derived from the training split (synthetic-data benchmarks);
  ``thresholds`` are a multi-label model's per-class decision thresholds and ``temperature`` a
  single-label model's fitted temperature (evaluation, inference).
  """
  configlib.validate(config)
  # Names the config gives, checked before the dataset is described (which may import
  # TensorFlow, seconds): a misspelt model, model argument, optimizer or device op is one line now.
  models.check_arguments(config.model.name, config.model.keys())
  models.check_types(config.model.name, {k: v for k, v in config.model.items() if k != 'name'})
  device_ops = device_augment.parse(config.data.get('device_preprocess', '') or '')
  if training:   # a run saved with them restores as it trained: without them (nor an optimizer)
    optim.check(config.optim)
    held_out.check_folder_only_keys(config.data)
    warning = device_augment.twice_shifted(config.data.get('train_preprocess', ''), device_ops)
    if warning:
      logging.warning(warning)
  mesh = sharding.make_mesh(config.mesh.num_devices)
  if info is None:  # the data will be read: its preprocessing specs are checked now, too
    info = reader.describe(config.data)
    reader.check_preprocess(config.data, info)
  if training and any(op[0] == 'flip_alternate' for op in device_ops):   # (a saved run loads)
    device_augment.check_alternation(config.data.device_preprocess, device_ops,
                                     reader.random_host_ops(config.data, info))
  check_flips(config.data, config.evaluate.tta if 'evaluate' in config else '',
              mirror_safe=info.mirror_safe)
  if len(config.data.mean) not in (1, info.channels):
    give = '1 value' if info.channels == 1 else f'1 or {info.channels} values'
    raise UserError(f"config.data.mean has {len(config.data.mean)} values but '{info.name}' "
                    f'images have {info.channels} channel(s); give {give} (and as many in '
                    'config.data.std).')
  placement = sharding.ParamSharding.from_config(config.mesh)
  local_eval_bs = sharding.local_batch_size(config.eval_batch_size, mesh, 'config.eval_batch_size')
  model_fn = models.from_config(config, info.num_classes, info.channels)
  frozen = whitening.frozen_names(config) | (
      param_groups.frozen_by_name(config.optim, state_lib.param_names(model_fn))
      if config.optim.get('freeze') else frozenset())
  if info.multilabel:
    loss_weights.check_multilabel(config)
    if training:
      loss_weights.warn_untrainable_tags(config, info)
  if training:
    held_out.check_fit_splits(config, info)
    held_out.warn_unused_validation(config, info)
    held_out.warn_unused_splits(config)
    held_out.warn_eval_on_training(config, info, main=jax.process_index() == 0)
  s = Setup(config=config, mesh=mesh, info=info, model_fn=model_fn,
            model_def=state_lib.model_def(model_fn), step_cfg=steps.step_config(
                config, info.num_classes, probe_head=_probe_head(config, model_fn),
                frozen=frozen,
                class_weights=loss_weights.class_weights(config, info) if training else None,
                logit_offsets=loss_weights.logit_offsets(config, info) if training else None,
                multilabel=info.multilabel, thresholds=thresholds, temperature=temperature,
                pos_weight=loss_weights.pos_weight(config, info) if training else None),
            placement=placement, local_eval_batch_size=local_eval_bs)
  if not training:
    return s
  s.local_batch_size = sharding.local_batch_size(config.batch_size, mesh)
  _check_ema_and_accumulation(config, s.step_cfg, mesh.devices.size)
  n_local = None
  if steps_per_epoch is None:
    n_local = reader.examples_per_process(config.data, config.data.train_split,
                                          jax.process_index(), jax.process_count())
    steps_per_epoch = max(1, n_local // s.local_batch_size)
  s.steps_per_epoch = steps_per_epoch
  s.total_steps = configlib.train_steps(config, steps_per_epoch)
  s.steps_per_dispatch = dispatch.steps_per_dispatch(config)
  if any(op[0] == 'flip_alternate' for op in s.step_cfg.device_ops):  # rows -> epochs
    epoch = (reader.examples_per_process(config.data, config.data.train_split, 0, 1)
             if n_local is not None else s.steps_per_epoch * config.batch_size)
    s.step_cfg = dataclasses.replace(s.step_cfg, **device_augment.epoch_layout(
        config.batch_size, read_shards(config.data), epoch))
  warmup = configlib.steps_from(config, 'optim.warmup', steps_per_epoch)
  s.lr_schedule = optim.schedule(config.optim, batch_size=config.batch_size,
                                 total_steps=s.total_steps, warmup_steps=warmup)
  groups = (config.optim.get('norm_lr_factor', 1.0), config.optim.get('bias_lr_factor', 1.0))
  s.tx = optim.build(config.optim, s.lr_schedule, config.get('transfer'),
                     layer_depths=functools.partial(models.layer_depths, config.model.name),
                     norm_names=(state_lib.norm_param_names(model_fn) if groups != (1.0, 1.0)
                                 else frozenset()),
                     frozen=frozen)
  return s


def _check_ema_and_accumulation(config: ml_collections.ConfigDict, cfg: steps.StepConfig,
                                devices: int) -> None:
  if cfg.focal_gamma < 0:
    raise UserError(f'config.loss.focal_gamma={cfg.focal_gamma} must be >= 0 (0 = off; e.g. 2).')
  if not 0.0 <= cfg.ema_decay < 1.0:
    raise UserError(f'config.ema.decay={cfg.ema_decay} must be in [0, 1) (0 = off; e.g. 0.999).')
  k, per_device = cfg.accumulation, config.batch_size // devices
  if k < 1 or per_device % k:
    raise UserError(f'config.grad_accumulation_steps={k} must be >= 1 and divide the batch per '
                    f'device ({per_device} = batch_size {config.batch_size} / {devices} devices); '
                    'change one of them.')


def _probe_head(config: ml_collections.ConfigDict, model_fn: state_lib.ModelFn) -> str:
  """The head's parameter group when ``config.transfer.mode`` is a linear probe, else ''."""
  if not (config.get('transfer') and config.transfer.mode == 'linear_probe'):
    return ''
  return param_groups.head_name(state_lib.param_names(model_fn), config.transfer)


def _with_teacher(s: Setup, step: Any, state_shardings: Any, batch_sharding: Any) -> Any:
  """``step(state, batch)`` jitted over the mesh (donating the state); a distilled run's
  teachers' variables go in as a third argument, placed once (not constants in the program)."""
  teacher = s.teacher
  jitted = jax.jit(step, in_shardings=(state_shardings, batch_sharding) + (
                       () if teacher is None else (teacher.shardings,)),
                   out_shardings=(state_shardings, sharding.replicated(s.mesh)), donate_argnums=0)
  if teacher is None:
    return jitted
  return lambda state, batch: jitted(state, batch, teacher.variables)


def _train_step(s: Setup) -> Any:
  return functools.partial(steps.train_step, model_def=s.model_def, tx=s.tx,
                           lr_schedule=s.lr_schedule, cfg=s.step_cfg,
                           teacher_defs=() if s.teacher is None else s.teacher.model_defs)


def jit_train_step(s: Setup, state_shardings: Any) -> Any:
  """``train_step(state, batch) -> (state, metrics)`` jitted over the mesh; donates the state."""
  return _with_teacher(s, _train_step(s), state_shardings, sharding.batch_sharding(s.mesh))


def jit_train_steps(s: Setup, state_shardings: Any) -> Any:
  """``train_steps(state, batches_k) -> (state, metrics_k)``: ``steps_per_dispatch`` train steps
  in one call (``dispatch.scan_steps``) over a ``k x B x ...`` stack of batches; donates the
  state."""
  return _with_teacher(s, dispatch.scan_steps(_train_step(s)), state_shardings,
                       dispatch.stacked_sharding(s.mesh))


def jit_eval_step(s: Setup, variables_shardings: Any, *, tta: str = '',
                  num_bins: int = report.DEFAULT_CALIBRATION_BINS) -> Any:
  """``eval_step(variables, batch) -> sums`` jitted over the mesh (``variables``: a TrainState or
  an InferenceState, with matching shardings)."""
  return jax.jit(functools.partial(eval_steps.eval_step, model_def=s.model_def, cfg=s.step_cfg,
                                   tta=tta, num_bins=num_bins),
                 in_shardings=(variables_shardings, sharding.batch_sharding(s.mesh)),
                 out_shardings=sharding.replicated(s.mesh))


def jit_batch_statistics(s: Setup, state_shardings: Any) -> Any:
  """``batch_statistics(params, batch_stats, batch) -> batch_stats`` of one batch at ``params``
  (``steps.batch_statistics``), jitted over the mesh with the state's placement."""
  return jax.jit(functools.partial(steps.batch_statistics, model_def=s.model_def, cfg=s.step_cfg),
                 in_shardings=(state_shardings.params, state_shardings.batch_stats,
                               sharding.batch_sharding(s.mesh)),
                 out_shardings=state_shardings.batch_stats)


def restore_or_init(s: Setup, ckpt: checkpoint.Checkpointer) -> tuple[Any, Any]:
  """(state, shardings): the newest readable checkpoint in the workdir if any, else a fresh init
  (with weights from ``config.transfer.init_from`` when set).

  Damaged checkpoints are skipped with a warning (previous one used); one written by another
  model/dataset is a UserError naming what differs.
  """
  ema = s.step_cfg.ema_decay > 0
  target, shardings = state_lib.abstract_state(s.model_fn, s.tx, s.config.seed, s.mesh,
                                               s.placement, ema=ema)
  logging.info('Train state: %.2f MiB per device (%s placement over %d devices).',
               sharding.planned_bytes_per_device(target, shardings) / 2**20, s.placement.mode,
               s.mesh.devices.size)
  if s.placement.mode == 'fsdp' and not any(any(sh.spec) for sh in jax.tree.leaves(shardings)):
    logging.warning("config.mesh.param_sharding='fsdp' shards nothing here, so every device holds "
                    'the whole state: %s.', 'there is one device' if s.mesh.devices.size == 1
                    else f'no array has config.mesh.fsdp_min_size={s.placement.min_size} elements '
                    f'and a dimension divisible by the {s.mesh.devices.size} devices')
  # The classes are compared on the checkpoint's meta before its arrays: a changed class count
  # would otherwise first show as a head of another shape.
  restored = ckpt.restore_latest(target, config=s.config,
                                 check_meta=functools.partial(_check_same_classes, s))
  if restored is not None:
    _warn_folder_changed(s, restored.meta, restored.step)
    _warn_init_ignored(s, restored.meta, restored.step)
    logging.info('Resuming from step %d.', restored.step)
    return restored.state, shardings
  override = (whitening.override(s.config, s.info, s.model_fn) if whitening.enabled(s.config)
              else None)  # patch-whitening filters in the first conv (a fresh run only)
  state, shardings = state_lib.create(s.model_fn, s.tx, s.config.seed, s.mesh, s.placement,
                                      ema=ema, override=override)
  if s.config.get('transfer') and s.config.transfer.init_from:
    from imgcls_jax import transfer  # weights from another run or a torch file; new head
    state = transfer.init_state(state, shardings, s.config, s.tx, s.info)
  return state, shardings


def _check_same_classes(s: Setup, meta: dict[str, Any], where: str) -> None:
  """A resumed run must read the classes it was trained on, in the same order, and images of as
  many channels (an image folder's or manifest's classes, and whether it reads in colour, can
  change under the same config)."""
  if meta.get('dataset_info'):
    then_c, now_c = DatasetInfo.from_json(meta['dataset_info']).channels, s.info.channels
    if then_c != now_c:   # else: a first layer of another shape, said as a state mismatch
      why = ({1: 'grey', 3: 'colour'}.get(then_c, f'{then_c}-channel'),
             {1: 'grey', 3: 'colour'}.get(now_c, f'{now_c}-channel'))
      more = (' (an image folder reads in colour once any of its images is in colour)'
              if now_c == 3 and then_c == 1 else '')
      raise UserError(f'Cannot resume {where}: it was trained on {why[0]} images and the data '
                      f'now reads as {why[1]}{more}; restore the data as it was (e.g. convert '
                      'the new images), or train in a new --workdir.')
  then = [str(c) for c in meta.get('class_names') or []]
  now = [str(c) for c in s.info.class_names]
  if then and then != now:
    gone, new = [c for c in then if c not in now], [c for c in now if c not in then]
    what = '; '.join(x for x in (f"gone: {', '.join(gone[:5])}" if gone else '',
                                 f"new: {', '.join(new[:5])}" if new else '') if x) or 'reordered'
    raise UserError(f'Cannot resume {where}: it was trained on {len(then)} classes and the data '
                    f'now has {len(now)} ({what}), so its class indices would mean other classes; '
                    'restore the data as it was, or train in a new --workdir '
                    '(config.transfer.init_from=<this run> starts from its weights).')


def _warn_init_ignored(s: Setup, meta: dict[str, Any], step: int) -> None:
  """A resumed run keeps its own weights: a ``transfer.init_from`` other than the one it started
  from does nothing, so say so (the same one is what resuming with one command line gives)."""
  now = (s.config.get('transfer') or {}).get('init_from') or ''
  saved = ((meta.get('config') or {}).get('transfer') or {}).get('init_from') or ''
  def where(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))
  if now and not (saved and where(now) == where(saved)):
    logging.warning('config.transfer.init_from=%s is not used: this --workdir resumes from its '
                    'own checkpoint %d (%s); train in a new --workdir to start from %s.', now,
                    step, f'it started from {saved}' if saved else 'it started from scratch',
                    now)


def _warn_folder_changed(s: Setup, meta: dict[str, Any], step: int) -> None:
  """Warns when the training split of an image folder or manifest lists other files or labels
  than the checkpoint's run trained on (a relabelled manifest, images added), and when a held-out
  split is drawn from a folder whose files changed since the run."""
  if meta.get('dataset_info'):
    saved = DatasetInfo.from_json(meta['dataset_info'])
    name = str(s.config.data.train_split)
    then, now = saved.split_digests.get(name), s.info.split_digests.get(name)
    if then and now and then != now:
      logging.warning("The training split '%s' of %s lists other images or labels than the run "
                      'trained on until step %s: resuming goes on from the old model (a finished '
                      'run trains no further); for a model of these images alone, train in a new '
                      '--workdir.', name, s.config.data.get('folder') or s.config.data.manifest,
                      step)
    changed = held_out.folder_changed(s.config, saved, str(s.config.data.eval_split))
    if changed:
      logging.warning("%s: the held-out split '%s' drawn from it may now hold images the model "
                      'trained on; restore the folder, or train in a new --workdir.', changed,
                      s.config.data.eval_split)


def place_variables(s: Setup, variables: state_lib.InferenceState) -> tuple[Any, Any]:
  """(numpy ``variables`` placed on the mesh by the config's placement rules, their shardings)."""
  return state_lib.place_variables(s.model_fn, variables, s.mesh, s.placement)


def eval_sums(eval_step: Any, variables: Any, batches: Iterable[dict[str, np.ndarray]],
              mesh: jax.sharding.Mesh, split: str) -> dict[str, Any]:
  """``eval_step`` summed over every (padded, masked) batch: each example exactly once."""
  totals = None
  guard = sharding.InFlightGuard(mesh, strict=True)   # eval batches are independent programs
  for batch in sharding.device_prefetch(batches, sharding.batch_sharding(mesh)):
    totals = report.add(totals, eval_step(variables, batch))
    guard.after_dispatch(totals)
  if totals is None:
    raise UserError(f"The split '{split}' is empty; evaluate a split with examples.")
  return totals
