"""Schedule-free AdamW is evaluated, predicted and exported at its averaged weights x.

Schedule-free training (Defazio et al. 2024) takes gradients at a point y between the averaged
sequence x and the SGD sequence z; the train state's ``params`` are y, and the weights to use are
``x = (y - (1 - b1) z) / b1`` (``optax.contrib.schedule_free_eval_params``). The oracle here is
optax's function applied to the restored train state, and scikit-learn's metrics on predictions
made with those weights.
"""
import functools
import os

import jax
import numpy as np
import optax.contrib
import pytest
from sklearn import metrics as skm

from imgcls_jax import (checkpoint, checkpoint_files, eval_steps, evaluate, inference, metrics, run,
                        schedule_free_bn, steps, train)
from imgcls_jax import state as state_lib


def _schedule_free(config):
  """``digits_config`` (conftest) trained 30 steps by schedule-free AdamW, one conv frozen."""
  c = config
  c.num_train_steps = 30
  c.eval_every_steps = 30
  c.checkpoint_every_steps = 30
  c.optim.name = 'schedule_free_adamw'
  c.optim.learning_rate = 0.01
  c.optim.schedule = 'constant'
  c.optim.warmup_steps = 5
  c.optim.freeze = 'convs.0'      # frozen leaves have no z (optax.partition masks them): x = y
  return c


def _x(opt_state, params):
  """optax's evaluation weights. The frozen kernel is masked out of z; with z = y there, optax's
  formula gives y for it, as it never moved."""
  found = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.contrib.ScheduleFreeState))
           if isinstance(s, optax.contrib.ScheduleFreeState)]
  assert len(found) == 1
  masked = lambda v: isinstance(v, optax.MaskedNode)  # noqa: E731
  assert sum(map(masked, jax.tree.leaves(found[0].z, is_leaf=masked))) == 1
  z = jax.tree.map(lambda zi, yi: yi if masked(zi) else zi, found[0].z, params, is_leaf=masked)
  return optax.contrib.schedule_free_eval_params(found[0]._replace(z=z), params)


def _train_and_restore(config, workdir):
  """Trains ``config`` in ``workdir``; (setup, the train state of step 30, y, x as numpy)."""
  train.train_and_evaluate(config, workdir)
  s = run.setup(config)
  with checkpoint.Checkpointer(workdir, async_save=False) as ckpt:
    target, _ = state_lib.abstract_state(s.model_fn, s.tx, config.seed, s.mesh)
    state, _ = ckpt.restore(target, 30)
  y = jax.device_get(state.params)
  return s, state, y, jax.device_get(_x(state.opt_state, y))


def test_schedule_free_run_is_evaluated_and_loaded_at_x(tmp_path, digits_config):
  config = _schedule_free(digits_config)
  workdir = str(tmp_path / 'run')
  s, state, y, x = _train_and_restore(config, workdir)
  kernel = lambda p: np.asarray(p['head']['kernel'])  # noqa: E731
  assert not np.allclose(kernel(x), kernel(y), rtol=1e-3)  # x and y really differ here

  # What every reader of a run gets (evaluate, predict, export, serve, transfer): x.
  loaded = checkpoint_files.read_weights(workdir)
  np.testing.assert_allclose(loaded.params['head.kernel'], kernel(x), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(loaded.params['convs.0.kernel'], y['convs'][0]['kernel'])
  trained = inference.load(workdir)
  np.testing.assert_allclose(np.asarray(trained.variables.params['head']['kernel']), kernel(x),
                             rtol=1e-5, atol=1e-7)

  # Predictions at x, scored by scikit-learn, equal the training-time evaluation and the report;
  # predictions at y score differently (so the equality says which weights were evaluated).
  from imgcls_jax.data import digits
  images, labels = digits.load_arrays('test')
  predict = jax.jit(functools.partial(eval_steps.probabilities, model_def=s.model_def,
                                      cfg=s.step_cfg))

  def scores(params):
    variables = state_lib.InferenceState(params=params, batch_stats=state.batch_stats)
    probs = np.asarray(predict(variables, images)['probabilities'], np.float64)
    probs /= probs.sum(axis=1, keepdims=True)
    return skm.accuracy_score(labels, probs.argmax(1)), skm.log_loss(labels, probs)

  (acc_x, loss_x), (_, loss_y) = scores(x), scores(y)
  assert abs(loss_x - loss_y) > 1e-3
  last_eval = [r for r in metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
               if r['split'] == 'eval'][-1]
  assert last_eval['step'] == 30
  assert last_eval['accuracy'] == pytest.approx(acc_x)
  assert last_eval['loss'] == pytest.approx(loss_x, rel=1e-4)
  config.evaluate.output_dir = str(tmp_path / 'report')
  rep = evaluate.evaluate(config, workdir)
  assert rep['accuracy'] == pytest.approx(acc_x)
  assert rep['loss'] == pytest.approx(loss_x, rel=1e-4)


def _conv3x3(a_BxHxWxC, k_3x3xCxO):
  """numpy 'SAME' 3x3 convolution (cross-correlation, as lax.conv), no bias."""
  h, w = a_BxHxWxC.shape[1:3]
  p = np.pad(a_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(p[:, i:i + h, j:j + w, :] @ k_3x3xCxO[i, j] for i in range(3) for j in range(3))


def _second_norm_statistics(params, images, mean, std):
  """The mean and biased variance of the second BatchNorm's input over ``images`` (numpy, the
  model in training mode: the first BatchNorm normalises with the batch's own statistics)."""
  x = (images.astype(np.float64) / 255.0 - mean) / std
  a = _conv3x3(x, np.asarray(params['convs'][0]['kernel'], np.float64))
  mu, var = a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2))
  bn0 = params['norms'][0]
  a = np.maximum((a - mu) / np.sqrt(var + 1e-5) * np.asarray(bn0['scale']) + np.asarray(bn0['bias']),
                 0.0)
  a = _conv3x3(a, np.asarray(params['convs'][1]['kernel'], np.float64))
  return a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2))


def test_batch_statistics_are_re_estimated_at_x(tmp_path, digits_config, monkeypatch):
  """BatchNorm's running statistics, collected at y, are replaced before each evaluation and save
  by the mean over the first ``schedule_free_bn_batches`` training batches of each batch's
  statistics at x; checked against numpy on the second BatchNorm layer (its input depends on x).
  A run stopped and resumed ends bitwise equal to the whole run."""
  from imgcls_jax import configlib
  from imgcls_jax.data import pipeline
  from imgcls_jax.errors import UserError
  config = _schedule_free(digits_config)
  config.optim.schedule_free_bn_batches = 3
  workdir = str(tmp_path / 'run')
  _, state, y, x = _train_and_restore(config, workdir)
  ds, _ = pipeline.train_dataset(config.data, seed=config.seed, local_batch_size=config.batch_size)
  batches = [b['image'] for _, b in zip(range(3), ds.as_numpy_iterator())]
  mean, std = np.asarray(config.data.mean), np.asarray(config.data.std)
  at_x = [_second_norm_statistics(x, b, mean, std) for b in batches]
  at_y = [_second_norm_statistics(y, b, mean, std) for b in batches]
  saved = jax.device_get(state.batch_stats)['norms'][1]
  want_mean, want_var = np.mean([m for m, _ in at_x], 0), np.mean([v for _, v in at_x], 0)
  np.testing.assert_allclose(saved['mean'], want_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(saved['var'], want_var, rtol=1e-4, atol=1e-5)
  # x and y really differ here: y's statistics would not pass the check above.
  assert np.max(np.abs(np.mean([m for m, _ in at_y], 0) - want_mean)) > 1e-2
  # What every reader of the run gets.
  loaded = checkpoint_files.read_weights(workdir)
  np.testing.assert_allclose(loaded.batch_stats['norms.1.mean'], want_mean, rtol=1e-4, atol=1e-5)

  # Exact resume: the stopped run's save re-estimates the statistics at step 13, which the whole
  # run never did; training does not read them, so both end the same.
  from imgcls_jax import preemption
  from tests import test_fault_tolerance as ft
  stopped = str(tmp_path / 'stopped')
  monkeypatch.setattr(preemption.StopWatcher, 'requested', lambda self, step: step >= 13)
  assert train.train_and_evaluate(config, stopped) == {'interrupted_at_step': 13}
  monkeypatch.undo()
  train.train_and_evaluate(config, stopped)
  ft.assert_bitwise_equal(ft.load_state(workdir, 30), ft.load_state(stopped, 30))
  evals = lambda w: [r for r in ft.metric_records(w) if r['split'] == 'eval']  # noqa: E731
  assert evals(workdir) == evals(stopped) and len(evals(workdir)) == 1

  config.optim.schedule_free_bn_batches = -1
  with pytest.raises(UserError, match='schedule_free_bn_batches=-1 must be >= 0'):
    configlib.validate(config)


def test_batch_statistics_with_gradient_accumulation_average_the_micro_batches():
  """With k micro-batches per step the statistics are those the train step normalises with: the
  mean over micro-batch j = rows j, k + j, ... of each one's statistics."""
  import dataclasses
  from flax import nnx
  from imgcls_jax import models
  model_fn = lambda rngs: models.get('cnn', num_classes=3, in_channels=1, rngs=rngs,  # noqa: E731
                                     widths=(4, 8), convs_per_stage=1)
  model = model_fn(nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
  cfg = steps.StepConfig(num_classes=3)
  stats_of = lambda c, x: jax.jit(functools.partial(  # noqa: E731
      steps.batch_statistics, model_def=state_lib.model_def(model_fn), cfg=c))(
          params, stats, {'image': x})
  got = stats_of(dataclasses.replace(cfg, accumulation=3), images)
  want = jax.tree.map(lambda *a: np.mean(a, axis=0), *(stats_of(cfg, images[j::3]) for j in range(3)))
  whole = stats_of(cfg, images)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), got, want)
  assert not np.allclose(got['norms'][1]['var'], whole['norms'][1]['var'], rtol=1e-3)


def test_statistics_batches_are_capped_in_bytes(caplog):
  """The batches held for the statistics at x stop at the byte cap (at least one is kept, and a
  warning names how many), so 16 ImageNet-sized batches do not fill the host's memory."""
  images = [np.full((4, 8, 8, 3), i, np.uint8) for i in range(10)]   # 768 bytes each
  stream = iter([{'image': im, 'label': np.zeros(4, np.int32)} for im in images])
  kept = schedule_free_bn.first_batches(stream, 5, max_bytes=10_000)
  assert [int(b['image'][0, 0, 0, 0]) for b in kept] == [0, 1, 2, 3, 4] and 'label' not in kept[0]
  with caplog.at_level('WARNING'):
    kept = schedule_free_bn.first_batches(iter([{'image': im} for im in images]), 5,
                                          max_bytes=2_000)
  assert [int(b['image'][0, 0, 0, 0]) for b in kept] == [0, 1]
  assert '2 of the 5 batches' in caplog.text
  assert len(schedule_free_bn.first_batches(iter([{'image': im} for im in images]), 5,
                                            max_bytes=10)) == 1
