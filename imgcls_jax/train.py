"""``train_and_evaluate(config, workdir)``: wires mesh, data, state, steps, loop, checkpoints, metrics."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from imgcls_jax import checkpoint, configlib, metrics, models, optim, report, sharding, steps
from imgcls_jax import state as state_lib
from imgcls_jax.data import pipeline
from imgcls_jax.errors import UserError


class TrainingDiverged(UserError):
  """The loss became NaN or Inf."""


@dataclasses.dataclass
class Setup:
  """Everything built from the config before the loop starts."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  info: pipeline.DatasetInfo
  model_fn: Any
  model_def: state_lib.ModelDef
  tx: Any
  lr_schedule: Any
  step_cfg: steps.StepConfig
  steps_per_epoch: int
  total_steps: int
  local_batch_size: int
  local_eval_batch_size: int


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Validates the config and builds mesh, dataset info, model definition and optimizer."""
  configlib.validate(config)
  mesh = sharding.make_mesh(config.mesh.num_devices)
  info = pipeline.info(config.data)
  if len(config.data.mean) not in (1, info.channels):
    raise UserError(f"config.data.mean has {len(config.data.mean)} values but '{info.name}' "
                    f'images have {info.channels} channels; give 1 or {info.channels} values.')
  local_bs = sharding.local_batch_size(config.batch_size, mesh)
  local_eval_bs = sharding.local_batch_size(config.eval_batch_size, mesh, 'config.eval_batch_size')
  n_local = pipeline.examples_per_process(config.data, config.data.train_split,
                                          jax.process_index(), jax.process_count())
  steps_per_epoch = max(1, n_local // local_bs)
  total = configlib.train_steps(config, steps_per_epoch)
  warmup = configlib.steps_from(config, 'optim.warmup', steps_per_epoch)
  lr = optim.schedule(config.optim, batch_size=config.batch_size, total_steps=total,
                      warmup_steps=warmup)
  tx = optim.build(config.optim, lr)
  model_fn = models.from_config(config, info.num_classes, info.channels)
  step_cfg = steps.StepConfig(num_classes=info.num_classes,
                              label_smoothing=float(config.label_smoothing),
                              mean=tuple(float(m) for m in config.data.mean),
                              std=tuple(float(s) for s in config.data.std),
                              compute_dtype=config.dtype)
  return Setup(config=config, mesh=mesh, info=info, model_fn=model_fn,
               model_def=state_lib.model_def(model_fn), tx=tx, lr_schedule=lr, step_cfg=step_cfg,
               steps_per_epoch=steps_per_epoch, total_steps=total, local_batch_size=local_bs,
               local_eval_batch_size=local_eval_bs)


def jit_steps(s: Setup, state_shardings: Any) -> tuple[Any, Any]:
  """(train_step, eval_step) jitted over the mesh with explicit shardings; train donates state."""
  batch_sh, repl = sharding.batch_sharding(s.mesh), sharding.replicated(s.mesh)
  train = jax.jit(functools.partial(steps.train_step, model_def=s.model_def, tx=s.tx,
                                    lr_schedule=s.lr_schedule, cfg=s.step_cfg),
                  in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, repl),
                  donate_argnums=0)
  evaluate = jax.jit(functools.partial(steps.eval_step, model_def=s.model_def, cfg=s.step_cfg),
                     in_shardings=(state_shardings, batch_sh), out_shardings=repl)
  return train, evaluate


def restore_or_init(s: Setup, ckpt: checkpoint.Checkpointer) -> tuple[Any, Any]:
  """(state, shardings): the latest checkpoint in the workdir if any, else a fresh init."""
  placement = sharding.ParamSharding.from_config(s.config.mesh)
  if ckpt.latest_step() is not None:
    target, shardings = state_lib.abstract_state(s.model_fn, s.tx, s.config.seed, s.mesh,
                                                 placement)
    state, _ = ckpt.restore(target)
    logging.info('Resuming from step %d.', int(state.step))
    return state, shardings
  return state_lib.create(s.model_fn, s.tx, s.config.seed, s.mesh, placement)


def evaluate(eval_step: Any, state: Any, data: pipeline.EvalData, mesh: jax.sharding.Mesh) -> dict:
  """Every example of the split exactly once: loss, top-1 / top-5, macro and weighted precision /
  recall / F1, and expected calibration error (``report.training_eval_metrics``)."""
  totals = None
  for batch in sharding.device_prefetch(data.batches(), sharding.batch_sharding(mesh)):
    totals = report.add(totals, eval_step(state, batch))
  if totals is None:
    raise UserError(f"The evaluation split '{data.split}' is empty.")
  return report.training_eval_metrics(totals)


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates.

  Returns the final evaluation metrics.
  With ``config.cross_validation.folds`` > 0 it runs k-fold cross-validation instead
  (``cross_validation.py``, which calls this function once per fold) and returns its summary.
  """
  if config.get('cross_validation') and config.cross_validation.folds > 0:
    from imgcls_jax import cross_validation
    return cross_validation.cross_validate(config, workdir)
  workdir = os.path.abspath(workdir)
  s = setup(config)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    _write_config(workdir, config)
  pidx, pcount = jax.process_index(), jax.process_count()
  eval_data = pipeline.EvalData(config.data, config.data.eval_split,
                                local_batch_size=s.local_eval_batch_size, process_index=pidx,
                                process_count=pcount,
                                split_size=s.info.num_examples.get(config.data.eval_split))
  eval_every = configlib.steps_from(config, 'eval_every', s.steps_per_epoch) or s.total_steps
  ckpt_every = configlib.steps_from(config, 'checkpoint_every', s.steps_per_epoch) or s.total_steps
  writer = metrics.MetricWriter(workdir, enabled=is_main, tensorboard=config.tensorboard)
  meta = {'dataset': s.info.name, 'class_names': list(s.info.class_names),
          'num_classes': s.info.num_classes, 'model': config.model.name}

  with checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints) as ckpt:
    state, state_sh = restore_or_init(s, ckpt)
    start = int(jax.device_get(state.step))
    train_step, eval_step = jit_steps(s, state_sh)
    logging.info('Model %s: %s parameters; %d devices; %d steps (%d per epoch), global batch %d.',
                 config.model.name, f'{state_lib.param_count(state.params):,}', s.mesh.devices.size,
                 s.total_steps, s.steps_per_epoch, config.batch_size)
    train_ds, _ = pipeline.train_dataset(config.data, seed=config.seed,
                                         local_batch_size=s.local_batch_size, start_step=start,
                                         process_index=pidx, process_count=pcount)
    batches = sharding.device_prefetch(train_ds.as_numpy_iterator(),
                                       sharding.batch_sharding(s.mesh))
    last_good = ckpt.latest_step()
    history: list[Any] = []
    eval_metrics: dict[str, Any] = {}
    bar = tqdm.tqdm(total=s.total_steps, initial=start, unit='step', dynamic_ncols=True,
                    disable=(None if config.progress_bar else True) if is_main else True)
    t_log, n_log = time.perf_counter(), 0

    def flush(step: int, keep_last: bool) -> None:
      """Fetches pending train metrics (all but the newest when ``keep_last``) and logs them."""
      nonlocal history, t_log, n_log
      fetch, history = (history[:-1], history[-1:]) if keep_last else (history, [])
      if not fetch:
        return
      values = jax.device_get(fetch)
      for i, v in enumerate(values):
        if not metrics.all_finite({'loss': v['loss']}):
          bad = step - len(history) - len(values) + i + 1
          raise TrainingDiverged(
              f'Training diverged: the loss is {float(v["loss"])} at step {bad}; the last good '
              f'checkpoint is step {last_good} in {ckpt.directory}. Lower '
              'config.optim.learning_rate or set config.optim.grad_clip_norm.')
      elapsed = time.perf_counter() - t_log
      summary = metrics.mean_train(values)
      summary['images_per_sec'] = n_log * config.batch_size / max(elapsed, 1e-9)
      writer.write(step - len(history), 'train', summary)
      bar.set_postfix(loss=f"{summary['loss']:.4f}", img_s=f"{summary['images_per_sec']:.0f}")
      t_log, n_log = time.perf_counter(), len(history)

    for step in range(start, s.total_steps):
      state, step_metrics = train_step(state, next(batches))
      history.append(step_metrics)
      n_log += 1
      done = step + 1
      do_eval = done % eval_every == 0 or done == s.total_steps
      do_ckpt = done % ckpt_every == 0 or done == s.total_steps
      if do_eval or do_ckpt:
        flush(done, keep_last=False)
      elif done % config.log_every_steps == 0:
        flush(done, keep_last=True)  # step `done` is still running: read the one before it
      if do_eval:
        eval_metrics = evaluate(eval_step, state, eval_data, s.mesh)
        writer.write(done, 'eval', eval_metrics)
        bar.write(f'step {done}: eval loss {eval_metrics["loss"]:.4f}, top-1 '
                  f'{eval_metrics["accuracy"]:.2%}, top-5 {eval_metrics["accuracy_top5"]:.2%} '
                  f'on {eval_metrics["count"]} examples') if is_main else None
      if do_ckpt:
        ckpt.save(done, state, meta)
        last_good = done
      bar.update(1)
    bar.close()
    if not eval_metrics:  # resumed a finished run: evaluate what is there
      eval_metrics = evaluate(eval_step, state, eval_data, s.mesh)
  writer.close()
  if is_main:
    print(f'Final eval on {config.data.eval_split} ({eval_metrics["count"]} examples): top-1 '
          f'{eval_metrics["accuracy"]:.2%}, top-5 {eval_metrics["accuracy_top5"]:.2%}, loss '
          f'{eval_metrics["loss"]:.4f}.\nMetrics: {writer.path}\nTensorBoard: '
          f'{os.path.join(workdir, "tensorboard")}\nCheckpoints: {ckpt.directory}', flush=True)
  return eval_metrics
