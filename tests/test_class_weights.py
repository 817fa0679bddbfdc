"""Rare classes in the loss: class weights (PyTorch's weighted cross-entropy; 'balanced' as
sklearn's compute_class_weight) and focal loss, each against an independent oracle."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from imgcls_jax import loss_weights, run, state as state_lib, steps
from imgcls_jax.data import digits, info as info_lib
from imgcls_jax.errors import UserError
from tests.test_ema_accumulation import _batch, mlp  # noqa: F401  (fixture: a model without BN)


def _logits_targets(n=40, k=5, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, k)).astype(np.float32) * 2, rng.integers(0, k, n)


def test_weighted_loss_equals_pytorch_weighted_cross_entropy():
  torch = pytest.importorskip('torch')
  logits, labels = _logits_targets()
  weights = (0.5, 2.0, 1.0, 4.0, 0.25)
  cfg = steps.StepConfig(num_classes=5, class_weights=weights)
  loss_B, w_B = steps.weighted_loss_terms(jnp.asarray(logits), jax.nn.one_hot(labels, 5), cfg)
  expected = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels),
                                               weight=torch.tensor(weights))
  assert float((loss_B * w_B).sum() / w_B.sum()) == pytest.approx(float(expected), rel=1e-6)
  # Label smoothing spreads target mass, not weight: an example weighs its own class's weight.
  smoothed = optax.smooth_labels(jax.nn.one_hot(labels, 5), 0.1)
  _, w_smooth = steps.weighted_loss_terms(jnp.asarray(logits), smoothed,
                                          steps.StepConfig(num_classes=5, class_weights=weights,
                                                           label_smoothing=0.1))
  np.testing.assert_allclose(w_smooth, np.asarray(weights)[labels], rtol=1e-5)
  plain, ones = steps.weighted_loss_terms(jnp.asarray(logits), jax.nn.one_hot(labels, 5),
                                          steps.StepConfig(num_classes=5))
  np.testing.assert_allclose(plain, steps.cross_entropy(jnp.asarray(logits),
                                                        jax.nn.one_hot(labels, 5)), rtol=1e-6)
  np.testing.assert_array_equal(ones, 1.0)


def test_focal_loss_follows_its_definition():
  logits, labels = _logits_targets(seed=1)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p = (p / p.sum(1, keepdims=True)).astype(np.float64)[np.arange(len(labels)), labels]
  cfg = steps.StepConfig(num_classes=5, focal_gamma=2.0)
  loss_B, _ = steps.weighted_loss_terms(jnp.asarray(logits), jax.nn.one_hot(labels, 5), cfg)
  np.testing.assert_allclose(loss_B, -(1 - p) ** 2 * np.log(p), rtol=1e-5)
  assert (np.asarray(loss_B) < -np.log(p)).all()   # easy examples count less


def test_train_step_loss_uses_the_weights(mlp):  # noqa: F811
  batch = _batch()
  weights = tuple(float(w) for w in np.linspace(0.2, 3.0, 10))
  mlp.loss.class_weights = ','.join(map(str, weights))
  mlp.label_smoothing = 0.0
  s = run.setup(mlp)
  assert s.step_cfg.class_weights == pytest.approx(weights)
  state, shardings = state_lib.create(s.model_fn, s.tx, mlp.seed, s.mesh, s.placement)
  model = s.model_def.merge(jax.device_get(state.params), jax.device_get(state.batch_stats))
  _, metrics = run.jit_train_step(s, shardings)(state, batch)   # (donates ``state``)
  logits = np.asarray(model(steps.normalize(jnp.asarray(batch['image']), s.step_cfg), train=True),
                      np.float64)
  log_p = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
      - logits.max(1, keepdims=True)
  w = np.asarray(weights)[batch['label']]
  expected = -(w * log_p[np.arange(len(w)), batch['label']]).sum() / w.sum()
  assert float(metrics['loss']) == pytest.approx(expected, rel=1e-5)


def test_logit_adjustment_shifts_the_training_logits_by_tau_log_prior(mlp):  # noqa: F811
  batch = _batch()
  mlp.loss.logit_adjustment = 1.5
  with pytest.raises(UserError, match='logit_adjustment=1.5 needs config.label_smoothing=0'):
    run.setup(mlp)
  mlp.label_smoothing = 0.0
  s = run.setup(mlp)
  _, y = digits.load_arrays('train')
  prior = np.bincount(y, minlength=10) / len(y)
  np.testing.assert_allclose(s.step_cfg.logit_offsets, 1.5 * np.log(prior), rtol=1e-12)
  state, shardings = state_lib.create(s.model_fn, s.tx, mlp.seed, s.mesh, s.placement)
  model = s.model_def.merge(jax.device_get(state.params), jax.device_get(state.batch_stats))
  _, metrics = run.jit_train_step(s, shardings)(state, batch)
  logits = np.asarray(model(steps.normalize(jnp.asarray(batch['image']), s.step_cfg), train=True),
                      np.float64) + 1.5 * np.log(prior)
  log_p = logits - logits.max(1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
  expected = -log_p[np.arange(len(log_p)), batch['label']].mean()
  assert float(metrics['loss']) == pytest.approx(expected, rel=1e-5)
  assert run.setup(mlp, training=False).step_cfg.logit_offsets is None  # inference: plain logits


def test_balanced_weights_are_sklearns(digits_config):
  from sklearn.utils.class_weight import compute_class_weight
  digits_config.loss.class_weights = 'balanced'
  info = info_lib.DatasetInfo(name='sklearn_digits', num_classes=10,
                              class_names=tuple(map(str, range(10))), image_shape=(8, 8, 1),
                              num_examples={})
  got = loss_weights.class_weights(digits_config, info)
  _, y = digits.load_arrays('train')
  np.testing.assert_allclose(got, compute_class_weight('balanced', classes=np.arange(10), y=y),
                             rtol=1e-12)


def test_bad_loss_settings_are_one_line_errors(digits_config):
  info = info_lib.DatasetInfo(name='x', num_classes=3, class_names=('a', 'b', 'c'),
                              image_shape=(8, 8, 1), num_examples={})
  for bad in ('1,2', 'heavy', '1,-1,1', '0,0,0'):
    digits_config.loss.class_weights = bad
    with pytest.raises(UserError, match='must be .., .balanced. or 3 non-negative numbers'):
      loss_weights.class_weights(digits_config, info)
  digits_config.loss.class_weights = ''
  digits_config.loss.focal_gamma = -1.0
  with pytest.raises(UserError, match='focal_gamma=-1.0 must be >= 0'):
    run.setup(ml_collections.ConfigDict(digits_config.to_dict()))
