"""The training loop: ``train_and_evaluate(config, workdir)``.

Set-up, jitted steps, restore-or-init and evaluation come from ``run.py``; this module only runs
steps, logs, evaluates and saves. The loop never blocks on a step: metrics are fetched every
``log_every_steps``, one step behind the newest dispatched one; a NaN/Inf loss stops the run.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import tqdm

from imgcls_jax import (checkpoint, checkpoint_files, configlib, dispatch, distributed, held_out,
                        held_out_fits, inference, metrics, ood, optim, preemption, report,
                        report_multilabel, report_text, run, run_directory, run_length, run_lock,
                        schedule_free_bn, selective, sharding, startup, steps, train_log)
from imgcls_jax import state as state_lib
from imgcls_jax import teacher as teacher_lib
from imgcls_jax.data import reader
from imgcls_jax.errors import UserError

# The checkpoint-metadata key of the train metrics a signal's stop had not written yet.
TRAIN_LOG_CARRY = 'train_log_carry'


class TrainingDiverged(UserError):
  """The loss became NaN or Inf."""


class _Trainer:
  """One run: the state, its steps and data, the checkpointer, the log."""

  def __init__(self, s: run.Setup, workdir: str, ckpt: checkpoint.Checkpointer, state: Any,
               state_sh: Any, writer: metrics.MetricWriter, bar: tqdm.tqdm, run_started: float):
    self.s, self.workdir, self.ckpt, self.state = s, workdir, ckpt, state
    self.run_started = run_started
    self.train_step = run.jit_train_step(s, state_sh)
    self.train_steps = (run.jit_train_steps(s, state_sh) if s.steps_per_dispatch > 1 else None)
    tta = s.config.evaluate.tta if 'evaluate' in s.config else ''
    # With EMA on (and config.ema.inference), evaluations use the averaged weights.
    self.eval_ema = steps.uses_ema(s.config)
    self.eval_sh = (state_sh.ema_variables() if self.eval_ema else state_lib.InferenceState(
        params=state_sh.params, batch_stats=state_sh.batch_stats))
    self.tta = tta
    self.eval_step = run.jit_eval_step(s, self.eval_sh, tta=tta)
    self.eval_subset = int(s.config.get('eval_subset', 0) or 0)
    if self.eval_subset < 0:
      raise UserError(f'config.eval_subset={self.eval_subset} must be >= 0 (0 = every example).')
    # Chosen on a held-out split at the end: per-class thresholds (multi-label,
    # config.evaluate.threshold_split), a temperature (single-label, temperature_split).
    self.threshold_split = held_out.threshold_split(s.config) if s.info.multilabel else ''
    self.temperature_split = held_out.temperature_split(s.config)
    self.thresholds: tuple[float, ...] | None = None
    self.temperature: dict[str, Any] | None = None   # held_out_fits.fit_temperature's record
    self.writer, self.bar = writer, bar
    self.last_good = ckpt.latest_step()
    self.log = train_log.TrainLog(writer, bar, s.config.batch_size, self.diverged)
    self.is_main = jax.process_index() == 0
    self.eval_data = reader.eval_data(
        s.config.data, s.config.data.eval_split, local_batch_size=s.local_eval_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        split_size=s.info.num_examples.get(s.config.data.eval_split),
        with_head=self.eval_subset > 0)
    # Every dataset a run reads is built here, before its first step: a misnamed
    # threshold_split fails now, not after training, and nothing is built while an async
    # checkpoint is being written.
    self.threshold_data = (held_out_fits.held_out_data(s, 'threshold_split')
                           if self.threshold_split else None)
    self.temperature_data = (held_out_fits.held_out_data(s, 'temperature_split')
                             if self.temperature_split else None)
    self.inference_meta = inference.inference_meta(s.config.data, s.info, s.config.model)
    self.state_sh = state_sh
    self.x_statistics = schedule_free_bn.XStatistics.build(s, state, state_sh)
    # config.data.device_resident: the training split as arrays, and the stream's order
    self.resident = reader.resident_split(s.config.data, s.config.seed, jax.process_count())

  def diverged(self, what: str, step: int) -> TrainingDiverged:
    good = (f'the last good checkpoint is step {self.last_good} in {self.ckpt.directory}'
            if self.last_good is not None else 'no checkpoint was saved before it')
    return TrainingDiverged(
        f'Training diverged: {what} at step {step}; {good}. Lower config.optim.learning_rate or '
        'set config.optim.grad_clip_norm.')

  def evaluate(self, final: bool = False, whole: bool = False) -> dict[str, Any]:
    """Every example of the eval split once (with ``config.eval_subset`` = N > 0, the first N,
    rounded up to whole eval batches, except at the final evaluation or with ``whole``): the
    report's scalars plus ``count``. At the end of
    a multi-label run with ``config.evaluate.threshold_split``, the per-class thresholds are
    first chosen there (best F1 per class) and the eval split is scored with them."""
    if self.x_statistics is not None:
      self.state = self.x_statistics.apply(self.state)
    variables = self.eval_variables()
    if final and self.threshold_split:
      self.choose_thresholds(variables)
    if final and self.temperature_split:
      self.fit_temperature(variables)
    if self.eval_subset > 0 and not (final or whole):  # intermediate ones: the first N
      batches = self.eval_data.head_batches(-(-self.eval_subset // self.s.config.eval_batch_size))
    else:
      batches = self.eval_data.batches()
    sums = run.eval_sums(self.eval_step, variables, batches, self.s.mesh, self.eval_data.split)
    out = report.training_eval_metrics(sums, self.thresholds)
    if self.temperature is not None:  # the final evaluation's probabilities are tempered
      out['temperature'] = self.temperature['value']
    return out

  def eval_variables(self) -> state_lib.InferenceState:
    """The weights evaluations use: the EMA's (with ``config.ema.inference``), else the
    optimizer's evaluation weights (``optim.eval_params``: schedule-free's averaged sequence x,
    not the gradient point y it trains at), with the running batch statistics (for x, those of
    ``schedule_free_bn``)."""
    if self.eval_ema:
      return self.state.ema_variables()
    return state_lib.InferenceState(
        params=optim.eval_params(self.state.opt_state, self.state.params),
        batch_stats=self.state.batch_stats)

  def choose_thresholds(self, variables: Any) -> None:
    """Per-class thresholds maximising F1 on the threshold split; the eval step then uses them."""
    try:
      record = held_out_fits.fit_thresholds(self.s, self.eval_step, variables,
                                            self.threshold_data, self.threshold_split)
    except UserError as e:   # never lose the trained weights over it
      logging.warning('%s The run is saved without thresholds (0.5 for every class).', e)
      return
    self.thresholds = tuple(record['values'])
    self.use_in_evaluations(thresholds=self.thresholds)

  def use_in_evaluations(self, **step_cfg: Any) -> None:
    """Rebuilds the eval step with these ``StepConfig`` fields (a choice fitted at the end)."""
    s = dataclasses.replace(self.s, step_cfg=dataclasses.replace(self.s.step_cfg, **step_cfg))
    self.eval_step = run.jit_eval_step(s, self.eval_sh, tta=self.tta)

  def fit_temperature(self, variables: Any) -> None:
    """The temperature of ``held_out_fits.fit_temperature``; the final evaluation and the checkpoint
    use it. It runs just before the final save: any failure is logged and the run saved without
    one."""
    try:
      self.temperature = held_out_fits.fit_temperature(
          self.s, variables, self.eval_sh, self.temperature_data, self.temperature_split,
          abstain_accuracy=selective.abstain_target(self.s.config.evaluate),
          unknown_keep=ood.keep_target(self.s.config.evaluate))
    except Exception as e:  # noqa: BLE001  (a bad record, memory: never lose the trained weights)
      logging.exception('No temperature fitted (%s); the run is saved without one.', e)
      return
    self.use_in_evaluations(temperature=self.temperature['value'])

  def meta(self, step: int) -> dict[str, Any]:
    """JSON saved beside the state: the config, what inference needs, the pipeline's position."""
    c, info = self.s.config, self.s.info
    return {'dataset': info.name, 'class_names': list(info.class_names),
            'num_classes': info.num_classes, 'model': c.model.name,
            'config': configlib.config_dict(c), **self.inference_meta,
            # The training order is a pure function of (seed, step) (data/pipeline.py): the step
            # is the whole position; resuming rebuilds the stream from it.
            'data_position': {'step': step, 'seed': c.seed, 'examples_seen': step * c.batch_size},
            'total_steps': int(self.s.total_steps),   # below it: a stopped run (or sweep trial)
            **({'thresholds': {'values': list(self.thresholds), 'split': self.threshold_split}}
               if self.thresholds is not None else {}),
            **({'temperature': self.temperature} if self.temperature is not None else {}),
            **({'distill_teachers': self.s.teacher.record()} if self.s.teacher else {})}

  def save(self, step: int, eval_result: dict[str, Any] | None = None,
           stopping: bool = False) -> None:
    """Starts an async save once every step up to ``step`` is known to be finite. ``stopping``
    (a signal): the train metrics since the last record go into the checkpoint, not a record."""
    # Raises on a non-finite loss: never save after one.
    self.log.flush(step, keep_last=False, write=not stopping)
    if self.x_statistics is not None:
      self.state = self.x_statistics.apply(self.state)
    if not bool(state_lib.is_finite(self.state)):
      raise self.diverged('the train state holds NaN/Inf values', step)
    meta = self.meta(step)
    if stopping and self.log.carried:
      meta[TRAIN_LOG_CARRY] = self.log.carried
    self.ckpt.save(step, self.state, meta, metrics=eval_result)
    self.last_good = step

  def loop(self, start: int, stop: preemption.StopWatcher,
           end: int) -> tuple[dict[str, Any], int | None]:
    """Steps ``start`` .. ``end`` (the total, or where the run pauses: evaluated and saved there);
    returns (the last eval metrics, the step a signal stopped it at or None).

    Each dispatch runs one step, or ``config.steps_per_dispatch`` steps (``dispatch.plan``:
    never across an evaluation or checkpoint)."""
    s, c = self.s, self.s.config
    eval_every = configlib.steps_from(c, 'eval_every', s.steps_per_epoch) or s.total_steps
    ckpt_every = configlib.steps_from(c, 'checkpoint_every', s.steps_per_epoch) or s.total_steps
    ckpt_on_eval = c.checkpoint.keep_best > 0  # best-N needs a checkpoint at every evaluation
    sizes = list(dispatch.plan(start, end, s.steps_per_dispatch, (eval_every, ckpt_every)))
    if self.resident is not None:  # the split on the devices, in the stream's order
      split, order = self.resident
      batches = dispatch.resident_batches(split.images, split.labels, order.indices,
                                          start_step=start, sizes=sizes,
                                          batch_size=s.local_batch_size, mesh=s.mesh)
    else:
      stream = reader.train_batches(c.data, seed=c.seed, local_batch_size=s.local_batch_size,
                                    start_step=start, process_index=jax.process_index(),
                                    process_count=jax.process_count())
      batches = dispatch.device_batches(stream, sizes, s.mesh)
    eval_metrics: dict[str, Any] = {}
    guard = sharding.InFlightGuard(s.mesh)
    step = start
    for n in sizes:
      # Every step of the group is asked (multi-process runs agree on a stop step this way).
      if any(stop.requested(t) for t in range(step, step + n)):
        return eval_metrics, step
      if n == 1:
        self.state, step_metrics = self.train_step(self.state, next(batches))
      else:
        self.state, step_metrics = self.train_steps(self.state, next(batches))
      self.log.add(step_metrics, n)
      guard.after_dispatch(step_metrics)   # several CPU devices: at most 2 dispatches in flight
      if step == start:
        self.first_step_done(step_metrics)
      done = step + n
      do_eval = done % eval_every == 0 or done == s.total_steps
      do_ckpt = done % ckpt_every == 0 or done == s.total_steps or (do_eval and ckpt_on_eval)
      pause = done == end < s.total_steps
      crossed = done // c.log_every_steps > step // c.log_every_steps
      if do_eval or do_ckpt or pause:
        if crossed and c.log_every_steps == 1 and len(self.log.pending) > 1:
          self.log.flush(done, keep_last=True)   # every step its own record, the one before too
        self.log.flush(done, keep_last=False)
      elif crossed:
        self.log.flush(done, keep_last=True)  # step `done` is still running: read the one before
      if do_eval:
        eval_metrics = self.evaluate(final=done == s.total_steps)
        self.writer.write(done, 'eval', eval_metrics)
        if self.is_main:
          self.bar.write(f'step {done}: {report_text.eval_line(eval_metrics, s.info.num_classes)}')
      if do_ckpt or pause:
        self.save(done, eval_metrics if do_eval else None)
      if pause and (not do_eval or self.eval_subset > 0):
        # Evaluated on every eval example for the caller, saved above to resume (no metrics:
        # the best-checkpoint ranking never sees it), written as a 'rung' record: the finished
        # run serves and ranks what the plain run would.
        eval_metrics = self.evaluate(whole=True)
        self.writer.write(done, 'rung', eval_metrics)
      self.bar.update(n)
      step = done
    return eval_metrics, None

  def first_step_done(self, step_metrics: Any) -> None:
    """Waits for the run's first step and logs the time since the process started (imports, data,
    compilation: what ``config.compilation_cache_dir`` saves on a rerun), or for a process's later
    run since that run began."""
    jax.block_until_ready(step_metrics['loss'])
    logging.info('%s', startup.first_step_line(self.run_started))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       pause_at: float | None = None) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming from its newest good checkpoint) and evaluates.

  Returns the final evaluation metrics, or ``{'interrupted_at_step': n}`` after a SIGTERM / SIGINT
  (the loop finishes the current step, saves a checkpoint and returns; rerunning resumes there).
  With ``pause_at`` (a share of the run, e.g. a sweep's rung), training stops after
  ``run_length.pause_step(...)`` steps (the schedule stays that of the whole run), evaluates
  every eval example there (a 'rung' record in metrics.jsonl) and saves a checkpoint without
  metrics, so that the finished run serves and keeps as best what the plain run would; it returns that
  evaluation's metrics with ``paused_at_step`` and ``total_steps``, and a later call resumes
  exactly as after a signal. A run already at or past that step is evaluated where it is.
  """
  if config.get('cross_validation') and config.cross_validation.folds > 0:
    raise UserError(f'config.cross_validation.folds={config.cross_validation.folds}: k-fold '
                    'cross-validation is its own entry point; run python -m imgcls_jax.main '
                    '(--mode=train picks it) or imgcls_jax.cross_validation.cross_validate.')
  if config.get('sweep') and config.sweep.grid:
    raise UserError('config.sweep.grid is set: a sweep is its own entry point; run python -m '
                    'imgcls_jax.main (--mode=train picks it) or imgcls_jax.sweep.sweep.')
  run_started = time.time()
  workdir = os.path.abspath(workdir)
  held_out.check_workdir_outside(config.data, workdir)
  teacher_lib.absolute_paths(config)   # saved and compared on resume as absolute paths
  if not os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINTS_DIR)):
    teacher_lib.check_sources(config, workdir)   # a new run: before its directories are made
  s = run.setup(config)
  run_length.check_best_metric(config, s.info.multilabel)
  ckpt_dir = os.path.join(workdir, checkpoint.CHECKPOINTS_DIR)
  if (config.get('transfer') and config.transfer.init_from
      and not (os.path.isdir(ckpt_dir) and checkpoint_files.finished_steps(ckpt_dir))):
    from imgcls_jax import transfer   # a fresh run starts from it: before any directory is made
    transfer.check_source(config.transfer.init_from)
  # A new run's teachers are read (and checked against its data) before its directories are made.
  fresh = not os.path.isdir(ckpt_dir)
  teacher = teacher_lib.load(config, s.info, s.mesh, s.placement, workdir) if fresh else None
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  # Innermost: another process gone ends this one before the checkpointer waits on it;
  # outermost: also while the run's lock is taken (the first collective: a process that joined
  # and then refused to start, e.g. with another num_processes, is gone there).
  with distributed.exit_on_lost_process(ckpt_dir, lambda: None), \
       run_lock.held(workdir), \
       checkpoint.Checkpointer.from_config(workdir, config) as ckpt, \
       preemption.StopWatcher() as stop, \
       distributed.exit_on_lost_process(ckpt_dir, lambda: stop.step):
    state, state_sh = run.restore_or_init(s, ckpt)  # checks the workdir's config first
    start = int(jax.device_get(state.step))
    run_length.check_not_past(start, s.total_steps, ckpt.directory)
    if start < s.total_steps:   # a finished run needs no teacher to be evaluated again
      s.teacher = teacher if fresh else teacher_lib.load(config, s.info, s.mesh, s.placement,
                                                         workdir)
    if 0 < start < s.total_steps:
      run_length.warn_learning_rate_jump(ckpt.read_meta(start), s, start)
    if s.teacher is not None:
      s.step_cfg = dataclasses.replace(s.step_cfg, distill=s.teacher.cfg)
      if start:
        teacher_lib.check_resumed(s.teacher, ckpt.read_meta(start), start)
    if is_main:
      run_directory.write_config(workdir, config)
      metrics.rewind_jsonl(os.path.join(workdir, 'metrics.jsonl'), start)
      if run_directory.read_samples(workdir) is None:  # export checks once the data is gone
        run_directory.write_samples(workdir, reader.samples(config.data, s.info))
    writer = metrics.MetricWriter(workdir, enabled=is_main, tensorboard=config.tensorboard)
    logging.info('Model %s: %s parameters; %d devices; %d steps (%d per epoch), global batch %d.',
                 config.model.name, f'{state_lib.param_count(state.params):,}', s.mesh.devices.size,
                 s.total_steps, s.steps_per_epoch, config.batch_size)
    bar = tqdm.tqdm(total=s.total_steps, initial=start, unit='step', dynamic_ncols=True,
                    disable=(None if config.progress_bar else True) if is_main else True)
    trainer = _Trainer(s, workdir, ckpt, state, state_sh, writer, bar, run_started)
    if 0 < start < s.total_steps:   # stopped by a signal: the steps since its last record
      trainer.log.carried = list(ckpt.read_meta(start).get(TRAIN_LOG_CARRY) or [])
    end = run_length.pause_step(s.total_steps, pause_at, s.steps_per_dispatch)
    paused_at = max(start, end) if end < s.total_steps and start < s.total_steps else None
    eval_metrics, stopped_at = (trainer.loop(start, stop, end) if start < end
                                else ({}, None))
    bar.close()
    if paused_at is not None and stopped_at is None:
      if start >= end:   # already there (or past it): evaluate where the run is
        eval_metrics = trainer.evaluate(whole=True)
    elif stopped_at is not None:
      trainer.save(stopped_at, stopping=True)
      ckpt.wait()
    elif not eval_metrics:  # resumed a finished run: evaluate what is there
      eval_metrics = trainer.evaluate(final=True)
      saved = ckpt.read_meta(start)
      if any(k not in saved for k, v in (('temperature', trainer.temperature),
                                         ('thresholds', trainer.thresholds)) if v is not None):
        logging.warning('The run had finished: the temperature / thresholds fitted now are used '
                        'by this evaluation only, not saved (its final checkpoint exists); '
                        '--mode=calibrate saves them into it.')
  writer.close()
  if stopped_at is not None:
    if is_main:
      print(f'Stopped by {stop.signal_name} at step {stopped_at} of {s.total_steps}; checkpoint '
            f'saved in {ckpt.directory}. To resume, {preemption.resume_hint(workdir)}', flush=True)
    return {'interrupted_at_step': stopped_at}
  if paused_at is not None:
    logging.info('Paused at step %d of %d: %s', paused_at, s.total_steps,
                 report_text.eval_line(eval_metrics, s.info.num_classes))
    return {**eval_metrics, 'paused_at_step': paused_at, 'total_steps': s.total_steps}
  if is_main:
    if 'map' in eval_metrics:  # multi-label
      headline = report_multilabel.final_line(eval_metrics)
    else:
      headline = report_text.final_line(eval_metrics, s.info.num_classes)
    board = (f'\nTensorBoard: {os.path.join(workdir, "tensorboard")}' if config.tensorboard
             else '')
    print(f'Final eval on {config.data.eval_split} {headline}.\nMetrics: {writer.path}{board}'
          f'\nCheckpoints: {ckpt.directory}', flush=True)
  return eval_metrics
