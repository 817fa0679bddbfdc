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

from imgcls_jax import checkpoint, evaluate, inference, metrics, run, steps, train
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


def test_schedule_free_run_is_evaluated_and_loaded_at_x(tmp_path, digits_config):
  config = _schedule_free(digits_config)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)

  s = run.setup(config)
  with checkpoint.Checkpointer(workdir, async_save=False) as ckpt:
    target, _ = state_lib.abstract_state(s.model_fn, s.tx, config.seed, s.mesh)
    state, _ = ckpt.restore(target, 30)
  y = jax.device_get(state.params)
  x = jax.device_get(_x(state.opt_state, y))
  kernel = lambda p: np.asarray(p['head']['kernel'])  # noqa: E731
  assert not np.allclose(kernel(x), kernel(y), rtol=1e-3)  # x and y really differ here

  # What every reader of a run gets (evaluate, predict, export, serve, transfer): x.
  loaded = checkpoint.read_weights(workdir)
  np.testing.assert_allclose(loaded.params['head.kernel'], kernel(x), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(loaded.params['convs.0.kernel'], y['convs'][0]['kernel'])
  trained = inference.load(workdir)
  np.testing.assert_allclose(np.asarray(trained.variables.params['head']['kernel']), kernel(x),
                             rtol=1e-5, atol=1e-7)

  # Predictions at x, scored by scikit-learn, equal the training-time evaluation and the report;
  # predictions at y score differently (so the equality says which weights were evaluated).
  from imgcls_jax.data import digits
  images, labels = digits.load_arrays('test')
  predict = jax.jit(functools.partial(steps.probabilities, model_def=s.model_def, cfg=s.step_cfg))

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
