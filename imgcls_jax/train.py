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
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from imgcls_jax import (checkpoint, configlib, metrics, models, optim, preemption, report,
                        sharding, steps)
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
  if 'evaluate' in config:
    pipeline.check_tta(config.data, config.evaluate.tta)
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
  tx = optim.build(config.optim, lr, config.get('transfer'))
  model_fn = models.from_config(config, info.num_classes, info.channels)
  step_cfg = steps.step_config(config, info.num_classes,
                              probe_head=_probe_head(config, model_fn))
  return Setup(config=config, mesh=mesh, info=info, model_fn=model_fn,
               model_def=state_lib.model_def(model_fn), tx=tx, lr_schedule=lr, step_cfg=step_cfg,
               steps_per_epoch=steps_per_epoch, total_steps=total, local_batch_size=local_bs,
               local_eval_batch_size=local_eval_bs)


def _probe_head(config: ml_collections.ConfigDict, model_fn: Any) -> str:
  """The head's parameter group when ``config.transfer.mode`` is a linear probe, else ''."""
  if not (config.get('transfer') and config.transfer.mode == 'linear_probe'):
    return ''
  from imgcls_jax import transfer
  return transfer.head_name(state_lib.param_names(model_fn), config.transfer)


def jit_steps(s: Setup, state_shardings: Any) -> tuple[Any, Any]:
  """(train_step, eval_step) jitted over the mesh with explicit shardings; train donates state."""
  batch_sh, repl = sharding.batch_sharding(s.mesh), sharding.replicated(s.mesh)
  train = jax.jit(functools.partial(steps.train_step, model_def=s.model_def, tx=s.tx,
                                    lr_schedule=s.lr_schedule, cfg=s.step_cfg),
                  in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, repl),
                  donate_argnums=0)
  tta = s.config.evaluate.tta if 'evaluate' in s.config else ''
  evaluate = jax.jit(functools.partial(steps.eval_step, model_def=s.model_def, cfg=s.step_cfg,
                                       tta=tta),
                     in_shardings=(state_shardings, batch_sh), out_shardings=repl)
  return train, evaluate


def restore_or_init(s: Setup, ckpt: checkpoint.Checkpointer) -> tuple[Any, Any]:
  """(state, shardings): the newest readable checkpoint in the workdir if any, else a fresh init.

  Damaged checkpoints are skipped with a warning (previous one used); one written by another
  model/dataset is a UserError naming what differs.
  """
  placement = sharding.ParamSharding.from_config(s.config.mesh)
  target, shardings = state_lib.abstract_state(s.model_fn, s.tx, s.config.seed, s.mesh, placement)
  logging.info('Train state: %.2f MiB per device (%s placement over %d devices).',
               sharding.planned_bytes_per_device(target, shardings) / 2**20, placement.mode,
               s.mesh.devices.size)
  restored = ckpt.restore_latest(target, config=s.config)
  if restored is not None:
    logging.info('Resuming from step %d.', restored.step)
    return restored.state, shardings
  state, shardings = state_lib.create(s.model_fn, s.tx, s.config.seed, s.mesh, placement)
  if s.config.get('transfer') and s.config.transfer.init_from:
    from imgcls_jax import transfer  # weights from another run or a torch file; new head
    state = transfer.init_state(state, shardings, s.config.transfer, s.tx)
  return state, shardings


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


def _rewind_metrics(path: str, step: int) -> None:
  """Drops ``metrics.jsonl`` records after ``step``: a resumed run writes them again."""
  if not os.path.exists(path):
    return
  records = metrics.read_jsonl(path)
  kept = [r for r in records if r.get('step', 0) <= step]
  if len(kept) < len(records):
    with open(path + '.tmp', 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
    os.replace(path + '.tmp', path)
    logging.info('Dropped %d metrics.jsonl records after step %d (they are redone on resume).',
                 len(records) - len(kept), step)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  """True when every float in ``tree`` is finite."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def _checkpoint_meta(s: Setup, step: int) -> dict[str, Any]:
  """JSON saved beside the state: dataset, model, the config, and the input pipeline's position."""
  c = s.config
  return {'dataset': s.info.name, 'class_names': list(s.info.class_names),
          'num_classes': s.info.num_classes, 'model': c.model.name,
          'config': checkpoint.config_dict(c),
          # The training order is a pure function of (seed, step) (data/pipeline.py): the step
          # is the whole position; resuming rebuilds the stream from it.
          'data_position': {'step': step, 'seed': c.seed, 'examples_seen': step * c.batch_size}}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming from its newest good checkpoint) and evaluates.

  Returns the final evaluation metrics, or ``{'interrupted_at_step': n}`` after a SIGTERM / SIGINT
  (the loop finishes the current step, saves a checkpoint and returns; rerunning resumes there).
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
  pidx, pcount = jax.process_index(), jax.process_count()
  eval_data = pipeline.EvalData(config.data, config.data.eval_split,
                                local_batch_size=s.local_eval_batch_size, process_index=pidx,
                                process_count=pcount,
                                split_size=s.info.num_examples.get(config.data.eval_split))
  eval_every = configlib.steps_from(config, 'eval_every', s.steps_per_epoch) or s.total_steps
  ckpt_every = configlib.steps_from(config, 'checkpoint_every', s.steps_per_epoch) or s.total_steps
  ckpt_on_eval = config.checkpoint.keep_best > 0  # best-N needs a checkpoint at every evaluation

  with checkpoint.Checkpointer.from_config(workdir, config) as ckpt, \
       preemption.StopWatcher() as stop:
    state, state_sh = restore_or_init(s, ckpt)  # checks the workdir's config first
    start = int(jax.device_get(state.step))
    if is_main:
      _write_config(workdir, config)
      _rewind_metrics(os.path.join(workdir, 'metrics.jsonl'), start)
    writer = metrics.MetricWriter(workdir, enabled=is_main, tensorboard=config.tensorboard)
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

    def diverged(what: str, step: int) -> TrainingDiverged:
      good = (f'the last good checkpoint is step {last_good} in {ckpt.directory}'
              if last_good is not None else 'no checkpoint was saved before it')
      return TrainingDiverged(
          f'Training diverged: {what} at step {step}; {good}. Lower config.optim.learning_rate or '
          'set config.optim.grad_clip_norm.')

    def flush(step: int, keep_last: bool) -> None:
      """Fetches pending train metrics (all but the newest when ``keep_last``) and logs them."""
      nonlocal history, t_log, n_log
      fetch, history = (history[:-1], history[-1:]) if keep_last else (history, [])
      if not fetch:
        return
      values = jax.device_get(fetch)
      for i, v in enumerate(values):
        if not metrics.all_finite({'loss': v['loss'], 'grad_norm': v['grad_norm']}):
          bad = step - len(history) - len(values) + i + 1
          raise diverged(f'the loss is {float(v["loss"])} (gradient norm '
                         f'{float(v["grad_norm"])})', bad)
      elapsed = time.perf_counter() - t_log
      summary = metrics.mean_train(values)
      summary['images_per_sec'] = n_log * config.batch_size / max(elapsed, 1e-9)
      writer.write(step - len(history), 'train', summary)
      bar.set_postfix(loss=f"{summary['loss']:.4f}", img_s=f"{summary['images_per_sec']:.0f}")
      t_log, n_log = time.perf_counter(), len(history)

    def save(step: int, eval_result: dict[str, Any] | None = None) -> None:
      """Starts an async save once every step up to ``step`` is known to be finite."""
      nonlocal last_good
      flush(step, keep_last=False)  # raises on a non-finite loss: never save after one
      if not bool(_all_finite(state)):
        raise diverged('the train state holds NaN/Inf values', step)
      ckpt.save(step, state, _checkpoint_meta(s, step), metrics=eval_result)
      last_good = step

    stopped_at = None
    for step in range(start, s.total_steps):
      if stop.requested(step):
        stopped_at = step
        break
      state, step_metrics = train_step(state, next(batches))
      history.append(step_metrics)
      n_log += 1
      done = step + 1
      do_eval = done % eval_every == 0 or done == s.total_steps
      do_ckpt = done % ckpt_every == 0 or done == s.total_steps or (do_eval and ckpt_on_eval)
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
        save(done, eval_metrics if do_eval else None)
      bar.update(1)
    bar.close()
    if stopped_at is not None:
      save(stopped_at)
      ckpt.wait()
    elif not eval_metrics:  # resumed a finished run: evaluate what is there
      eval_metrics = evaluate(eval_step, state, eval_data, s.mesh)
  writer.close()
  if stopped_at is not None:
    if is_main:
      print(f'Stopped by {stop.signal_name} at step {stopped_at} of {s.total_steps}; checkpoint '
            f'saved in {ckpt.directory}. To resume, {preemption.resume_hint(workdir)}', flush=True)
    return {'interrupted_at_step': stopped_at}
  if is_main:
    print(f'Final eval on {config.data.eval_split} ({eval_metrics["count"]} examples): top-1 '
          f'{eval_metrics["accuracy"]:.2%}, top-5 {eval_metrics["accuracy_top5"]:.2%}, loss '
          f'{eval_metrics["loss"]:.4f}.\nMetrics: {writer.path}\nTensorBoard: '
          f'{os.path.join(workdir, "tensorboard")}\nCheckpoints: {ckpt.directory}', flush=True)
  return eval_metrics
