"""Pure steps: golden loss values, masking, and 8 devices == 1 device."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from imgcls_jax import eval_steps, models, optim, sharding, steps
from imgcls_jax import state as state_lib

CFG = steps.StepConfig(num_classes=3, label_smoothing=0.0, mean=(0.5,), std=(0.5,))


def test_cross_entropy_golden_values():
  logits = jnp.array([[2.0, 1.0, 0.1], [0.0, 0.0, 0.0]])
  loss = steps.cross_entropy(logits, steps.targets(jnp.array([0, 2]), CFG))
  # -log softmax: log(e^2 + e^1 + e^0.1) - 2 = 0.41703; log(3) = 1.09861
  np.testing.assert_allclose(loss, [0.4170299, 1.0986123], rtol=1e-6)


def test_label_smoothing_targets():
  cfg = steps.StepConfig(num_classes=4, label_smoothing=0.1)
  np.testing.assert_allclose(steps.targets(jnp.array([1]), cfg), [[0.025, 0.925, 0.025, 0.025]])


def test_normalize_maps_uint8_to_unit_range():
  x = steps.normalize(jnp.array([0, 255, 128], jnp.uint8).reshape(1, 1, 3, 1), CFG)
  np.testing.assert_allclose(x.ravel(), [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-6)


def _setup(num_devices, batch=32, wd=5e-4, model='cnn', total_steps=10, device_flip=False):
  cfg = default.get_config()
  cfg.optim.weight_decay = wd
  mesh = sharding.make_mesh(num_devices)
  lr = optim.schedule(cfg.optim, batch_size=batch, total_steps=total_steps, warmup_steps=2)
  tx = optim.build(cfg.optim, lr)
  model_fn = functools.partial(models.get, model, num_classes=10, in_channels=1,
                               widths=(8, 16), dropout=0.0)
  mdef = state_lib.model_def(model_fn)
  state, shardings = state_lib.create(model_fn, tx, 0, mesh)
  scfg = steps.StepConfig(num_classes=10, device_flip=device_flip)
  batch_sh = sharding.batch_sharding(mesh)
  train = jax.jit(functools.partial(steps.train_step, model_def=mdef, tx=tx, lr_schedule=lr,
                                    cfg=scfg),
                  in_shardings=(shardings, batch_sh),
                  out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  ev = jax.jit(functools.partial(eval_steps.eval_step, model_def=mdef, cfg=scfg),
               in_shardings=(shardings, batch_sh))
  return state, train, ev, batch_sh


def _batches(n, batch=32, seed=0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.integers(0, 256, (batch, 8, 8, 1), dtype=np.uint8),
           'label': rng.integers(0, 10, (batch,), dtype=np.int32)} for _ in range(n)]


@pytest.mark.parametrize('device_flip', [False, True])
def test_eight_devices_give_the_same_parameters_as_one(device_flip):
  """Same global batch, 5 SGD steps: 8-way data parallel == 1 device within float32 rounding.

  Tolerance: atol 2e-5 / rtol 1e-4. Only the reduction order of the batch mean (per-device partial
  sums, then an all-reduce) differs, which moves float32 results by ~1e-6 relative. With the flip
  on the device, each example's draw does not depend on how the batch is split.
  """
  results = []
  for n in (1, 8):
    state, train, _, batch_sh = _setup(n, device_flip=device_flip)
    guard = sharding.InFlightGuard(batch_sh.mesh)   # as the training loop: 2 steps in flight
    for b in _batches(5):
      state, m = train(state, sharding.put_batch(b, batch_sh))
      guard.after_dispatch(m)
    results.append((jax.device_get(state.params), jax.device_get(state.batch_stats), float(m['loss'])))
    assert len(state.params['head']['kernel'].sharding.device_set) == n
  (p1, s1, l1), (p8, s8, l8) = results
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), p1, p8)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), s1, s8)
  assert l1 == pytest.approx(l8, rel=1e-5)


def test_train_step_lowers_loss_on_a_fixed_batch_and_counts_steps():
  state, train, _, batch_sh = _setup(8, wd=0.0, total_steps=40)
  b = sharding.put_batch(_batches(1)[0], batch_sh)
  losses = []
  for _ in range(20):
    state, m = train(state, b)
    losses.append(float(m['loss']))
  assert int(state.step) == 20
  assert losses[-1] < 0.5 * losses[0]


def test_eval_step_ignores_masked_examples():
  state, _, ev, batch_sh = _setup(8)
  b = _batches(1)[0]
  b['mask'] = np.arange(32) < 20
  garbage = dict(b)
  garbage['image'] = b['image'].copy()
  garbage['image'][20:] = 255 - garbage['image'][20:]
  garbage['label'] = b['label'].copy()
  garbage['label'][20:] = (garbage['label'][20:] + 1) % 10
  out1 = jax.device_get(ev(state, sharding.put_batch(b, batch_sh)))
  out2 = jax.device_get(ev(state, sharding.put_batch(garbage, batch_sh)))
  assert out1['count'] == 20
  for k in out1:
    np.testing.assert_allclose(out1[k], out2[k], rtol=1e-6)
  assert 0 <= out1['correct'] <= out1['correct_top5'] <= 20
  assert np.isfinite(out1['loss']) and out1['loss'] > 0


def test_random_flip_mirrors_about_half_the_images_reproducibly():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 5, 7, 3), dtype=np.uint8))
  out = np.asarray(steps.random_flip(jax.random.key(3), images))
  x = np.asarray(images)
  same = np.all(out == x, axis=(1, 2, 3))
  mirrored = np.all(out == x[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same ^ mirrored)               # each image is itself or its mirror image
  assert 20 <= mirrored.sum() <= 44            # p = 1/2 (binomial(64, 0.5): 99.9% within)
  np.testing.assert_array_equal(out, steps.random_flip(jax.random.key(3), images))
  assert not np.array_equal(out, steps.random_flip(jax.random.key(4), images))


@pytest.mark.parametrize('symmetric', [True, False])
def test_device_flip_is_applied_in_the_train_step(symmetric):
  """device_flip changes the step exactly when mirroring changes the images."""
  batch = _batches(1)[0]
  if symmetric:  # left-right symmetric images: a flip is the identity
    batch['image'][:, :, 4:] = batch['image'][:, :, 3::-1]
  results = []
  for flip in (False, True):
    state, train, _, batch_sh = _setup(1, device_flip=flip)
    _, m = train(state, sharding.put_batch(batch, batch_sh))
    results.append(float(m['loss']))
  if symmetric:
    assert results[0] == pytest.approx(results[1], rel=1e-6)
  else:
    assert results[0] != pytest.approx(results[1], rel=1e-4)


def test_linear_probe_step_trains_only_the_head_in_inference_mode():
  """probe_head: with a plain optimizer (no freezing mask) the backbone still does not move, so no
  gradient reached it; the BN statistics stay the source's; the head trains."""
  state, _, _, batch_sh = _setup(1)
  model_fn = functools.partial(models.get, 'cnn', num_classes=10, in_channels=1,
                               widths=(8, 16), dropout=0.0)
  before = jax.device_get((state.params, state.batch_stats))
  train = jax.jit(functools.partial(steps.train_step, model_def=state_lib.model_def(model_fn),
                                    tx=optax.sgd(0.1), lr_schedule=optax.constant_schedule(0.1),
                                    cfg=steps.StepConfig(num_classes=10, probe_head='head')))
  for b in _batches(2):
    state, m = train(state, sharding.put_batch(b, batch_sh))
  params, stats = jax.device_get((state.params, state.batch_stats))
  for name in params:
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), params[name],
                                         before[0][name]))
    assert all(moved) if name == 'head' else not any(moved), name
  jax.tree.map(np.testing.assert_array_equal, stats, before[1])
  assert float(m['grad_norm']) > 0
