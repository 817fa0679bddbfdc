"""Gradient accumulation (k micro-batches == one batch, for a model without BatchNorm) and the
weight EMA (the recurrence, checked against numpy; evaluation and inference use it). Exact resume of
the EMA after SIGKILL is checked in test_fault_tolerance.py, whose runs keep an EMA."""
import dataclasses

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from imgcls_jax import checkpoint_files, inference, models, run, state as state_lib, train
from imgcls_jax import teacher as teacher_lib
from imgcls_jax.data import digits
from imgcls_jax.errors import UserError

NAME = 'test_ema_accumulation_mlp'


class _Mlp(nnx.Module):
  """No BatchNorm: its gradient over a batch is exactly the sum of its micro-batches' gradients."""

  def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs, dtype='float32',
               width: int = 32):
    self.hidden = nnx.Linear(64 * in_channels, width, rngs=rngs)
    self.dropout = nnx.Dropout(0.0, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, x, *, train: bool = False):
    h = nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))
    return self.head(self.dropout(h, deterministic=not train))


@pytest.fixture
def mlp(digits_config):
  models.register(NAME, _Mlp, replace=True)
  c = ml_collections.ConfigDict(digits_config.to_dict())
  c.model = ml_collections.ConfigDict({'name': NAME})
  c.optim.name = 'adamw'
  c.optim.learning_rate = 1e-2
  c.optim.warmup_steps = 1
  c.label_smoothing = 0.1
  yield c
  models.unregister(NAME)


def _batch(n=64, seed=0):
  x, y = digits.load_arrays('train')
  idx = np.random.RandomState(seed).choice(len(x), n, replace=False)
  return {'image': x[idx], 'label': y[idx].astype(np.int32)}


def _steps(config, batches):
  s = run.setup(config)
  s.teacher = teacher_lib.load(config, s.info, s.mesh, s.placement, workdir='/nowhere')
  if s.teacher is not None:
    s.step_cfg = dataclasses.replace(s.step_cfg, distill=s.teacher.cfg)
  state, shardings = state_lib.create(s.model_fn, s.tx, config.seed, s.mesh, s.placement,
                                      ema=s.step_cfg.ema_decay > 0)
  step = run.jit_train_step(s, shardings)
  history = []
  for b in batches:
    state, metrics = step(state, b)
    history.append((jax.device_get(state.params), jax.device_get(metrics)))
  return jax.device_get(state), history


@pytest.mark.parametrize('distilled', [False, True])
def test_k_micro_batches_give_the_update_of_one_batch(mlp, distilled, tmp_path):
  """Also with a teacher (the same MLP, trained a few steps): it sees one micro-batch at a
  time, and the updates and its agreement metric are those of the whole batch."""
  if distilled:
    teacher = ml_collections.ConfigDict(mlp.to_dict())
    teacher.num_train_steps, teacher.seed = 5, 1
    train.train_and_evaluate(teacher, str(tmp_path / 'teacher'))
    mlp.distill.teacher, mlp.distill.temperature = str(tmp_path / 'teacher'), 2.0
  batches = [_batch(seed=i) for i in range(3)]
  whole, whole_hist = _steps(mlp, batches)
  mlp.grad_accumulation_steps = 4                 # 8 fake devices x 8 rows: micro-batches of 16
  micro, micro_hist = _steps(mlp, batches)
  for (pa, ma), (pb, mb) in zip(whole_hist, micro_hist):
    # f32 sums in another order (per micro-batch, then across): ~1e-7 relative; Adam's first
    # step divides by sqrt(v) ~ |g|, so compare the parameters, not the raw gradients.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), pa, pb)
    np.testing.assert_allclose(ma['loss'], mb['loss'], rtol=1e-6)
    np.testing.assert_allclose(ma['accuracy'], mb['accuracy'], rtol=1e-6)
    np.testing.assert_allclose(ma['grad_norm'], mb['grad_norm'], rtol=1e-5)
    assert ('teacher_agreement' in ma) == distilled
    if distilled:
      np.testing.assert_allclose(ma['teacher_agreement'], mb['teacher_agreement'], rtol=1e-6)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), whole.params, whole_hist[0][0])
  assert max(jax.tree.leaves(moved)) > 1e-3      # the steps did change the weights


def test_accumulation_must_divide_the_batch_per_device(mlp):
  mlp.grad_accumulation_steps = 3
  with pytest.raises(UserError, match='grad_accumulation_steps=3 must be >= 1 and divide the batch '
                                      'per device \\(8 = batch_size 64 / 8 devices\\)'):
    run.setup(mlp)
  mlp.grad_accumulation_steps = 1
  mlp.ema.decay = 1.0
  with pytest.raises(UserError, match=r'config.ema.decay=1.0 must be in \[0, 1\)'):
    run.setup(mlp)


def test_ema_follows_its_recurrence_with_warmup(mlp):
  mlp.ema.decay = 0.9
  batches = [_batch(seed=i) for i in range(4)]
  final, history = _steps(mlp, batches)
  s = run.setup(mlp)
  init = jax.device_get(state_lib.create(s.model_fn, s.tx, mlp.seed, s.mesh)[0].params)
  expected = init
  for t, (params, _) in enumerate(history):
    d = min(0.9, (1 + t) / (10 + t))            # warmup: 0.1, 0.18, 0.25, 0.31
    expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, expected, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               final.ema['params'], expected)
  assert not np.allclose(final.ema['params']['head']['kernel'], final.params['head']['kernel'])


@pytest.mark.slow
def test_evaluation_and_inference_use_the_ema_weights(mlp, tmp_path):
  mlp.ema.decay = 0.95
  mlp.num_train_steps = 30
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(mlp, workdir)
  ema_clf = inference.classifier(inference.load(workdir))
  raw_clf = inference.classifier(inference.load(workdir, overrides={'ema.inference': False}))
  x, y = digits.load_arrays('test')
  p_ema = ema_clf.predict_arrays(x)['probabilities']
  p_raw = raw_clf.predict_arrays(x)['probabilities']
  assert not np.allclose(p_ema, p_raw, atol=1e-3)
  # The trainer's final evaluation (the test split, every example once) used the EMA weights.
  assert result['accuracy'] == pytest.approx(np.mean(p_ema.argmax(-1) == y), abs=1e-9)
  mlp.ema.decay = 0.0
  mlp.num_train_steps = 2
  plain = str(tmp_path / 'plain')
  train.train_and_evaluate(mlp, plain)
  with pytest.raises(UserError, match='holds no weight EMA'):
    checkpoint_files.read_weights(plain, ema=True)
