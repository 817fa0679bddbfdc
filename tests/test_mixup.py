"""Mixup / CutMix on the device: the mixing maths, per-batch vs per-example weights, the config,
and the hook in the train step (soft targets; the step is unchanged when mixing is off)."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import default
from imgcls_jax import mixup, models, optim, sharding, steps
from imgcls_jax import state as state_lib
from imgcls_jax.errors import UserError

B, H, W, C, K = 16, 8, 10, 3, 5


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, H, W, C)), jnp.float32)
  labels = jnp.asarray(rng.permutation(np.arange(B) % K))
  return x, jax.nn.one_hot(labels, K), labels


def _lam_from_targets(y, y0):
  """Weight of each example's own target: y = lam * y0 + (1 - lam) * flip(y0)."""
  own = jnp.sum(y * y0, -1)
  partner = jnp.sum(y * jnp.flip(y0, 0), -1)
  same = jnp.all(y0 == jnp.flip(y0, 0), -1)
  return np.where(same, np.nan, own / (own + partner))


def test_mixup_per_batch_blends_with_the_reversed_batch():
  x, y0, _ = _inputs()
  cfg = mixup.MixConfig(mixup_alpha=0.4, mode='batch')
  xm, ym = mixup.apply(jax.random.key(0), x, y0, cfg)
  lam = _lam_from_targets(ym, y0)
  lam = lam[~np.isnan(lam)]
  assert np.allclose(lam, lam[0], atol=1e-6) and 0.0 < lam[0] < 1.0
  np.testing.assert_allclose(xm, lam[0] * x + (1 - lam[0]) * jnp.flip(x, 0), atol=1e-5)
  np.testing.assert_allclose(ym.sum(-1), 1.0, atol=1e-6)


def test_mixup_per_example_draws_one_weight_per_example():
  x, y0, _ = _inputs()
  cfg = mixup.MixConfig(mixup_alpha=1.0, mode='example')
  xm, ym = mixup.apply(jax.random.key(1), x, y0, cfg)
  lam = ym[jnp.arange(B), jnp.argmax(y0, -1)] - ym[jnp.arange(B), jnp.argmax(jnp.flip(y0, 0), -1)]
  lam = np.asarray((lam + 1) / 2)  # own - partner = 2 lam - 1 when the two labels differ
  differ = np.asarray(jnp.argmax(y0, -1) != jnp.argmax(jnp.flip(y0, 0), -1))
  assert len(np.unique(np.round(lam[differ], 5))) > 4
  expect = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * jnp.flip(x, 0)
  np.testing.assert_allclose(np.asarray(xm)[differ], np.asarray(expect)[differ], atol=1e-5)


@pytest.mark.parametrize('mode', ['batch', 'example'])
@pytest.mark.parametrize('cutmix', [False, True])
def test_a_blank_row_is_nobodys_partner(mode, cutmix):
  """An image folder's undecodable file leaves a blank, masked row; its partner (row B-1-i) was
  mixed with its blank pixels and its label and still counted in the loss. Now that partner stays
  as it is, and every other row is mixed exactly as without the mask (the same draws)."""
  x, y0, _ = _inputs()
  cfg = mixup.MixConfig(mixup_alpha=0.0 if cutmix else 1.0, cutmix_alpha=1.0 if cutmix else 0.0,
                        mode=mode)
  valid = np.ones(B, bool)
  valid[[2, 5]] = False
  key = jax.random.key(7)
  xm, ym = mixup.apply(key, x, y0, cfg, jnp.asarray(valid))
  x_all, y_all = mixup.apply(key, x, y0, cfg)
  partners_blank = [B - 1 - 2, B - 1 - 5]
  np.testing.assert_array_equal(np.asarray(xm)[partners_blank], np.asarray(x)[partners_blank])
  np.testing.assert_array_equal(np.asarray(ym)[partners_blank], np.asarray(y0)[partners_blank])
  rest = [i for i in range(B) if i not in partners_blank]
  np.testing.assert_array_equal(np.asarray(xm)[rest], np.asarray(x_all)[rest])
  np.testing.assert_array_equal(np.asarray(ym)[rest], np.asarray(y_all)[rest])
  assert not np.array_equal(np.asarray(x_all)[partners_blank], np.asarray(x)[partners_blank])


@pytest.mark.parametrize('mode', ['batch', 'example'])
def test_cutmix_pastes_a_box_and_weights_targets_by_its_area(mode):
  x, y0, _ = _inputs()
  cfg = mixup.MixConfig(cutmix_alpha=1.0, mode=mode)
  xm, ym = mixup.apply(jax.random.key(2), x, y0, cfg)
  xm, x, xf = np.asarray(xm), np.asarray(x), np.asarray(jnp.flip(x, 0))
  pasted = np.all(xm == xf, -1) & ~np.all(x == xf, -1)
  kept = np.all(xm == x, -1)
  assert np.all(pasted | kept)                      # every pixel is one image or the other
  boxes = []
  for i in range(B):
    if pasted[i].any():                             # the pasted region is one rectangle
      ys, xs = np.nonzero(pasted[i])
      assert pasted[i, ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
      boxes.append((ys.min(), ys.max(), xs.min(), xs.max()))
    own = float(ym[i] @ y0[i]) if not np.array_equal(y0[i], y0[B - 1 - i]) else None
    if own is not None:
      np.testing.assert_allclose(own, 1.0 - pasted[i].mean(), atol=1e-6)
  assert boxes
  assert (len(set(boxes)) == 1) == (mode == 'batch')


def test_both_alphas_switch_between_mixup_and_cutmix_per_example():
  x, y0, _ = _inputs()
  cfg = mixup.MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5, mode='example')
  xm, _ = mixup.apply(jax.random.key(3), x, y0, cfg)
  xm, x, xf = np.asarray(xm), np.asarray(x), np.asarray(jnp.flip(x, 0))
  is_cut = [np.all((xm[i] == x[i]) | (xm[i] == xf[i])) for i in range(B)]
  assert 0 < sum(is_cut) < B


def test_prob_zero_and_determinism():
  x, y0, _ = _inputs()
  off = mixup.MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0)
  xm, ym = mixup.apply(jax.random.key(4), x, y0, off)
  np.testing.assert_array_equal(xm, x)
  np.testing.assert_array_equal(ym, y0)
  on = mixup.MixConfig(mixup_alpha=0.5, cutmix_alpha=1.0, mode='example')
  a = mixup.apply(jax.random.key(5), x, y0, on)
  b = jax.jit(functools.partial(mixup.apply, cfg=on))(jax.random.key(5), x, y0)
  c = mixup.apply(jax.random.key(6), x, y0, on)
  np.testing.assert_allclose(a[0], b[0], atol=1e-6)
  np.testing.assert_allclose(a[1], b[1], atol=1e-6)
  assert not np.allclose(a[0], c[0])


def test_bfloat16_images_stay_bfloat16():
  x, y0, _ = _inputs()
  xm, ym = mixup.apply(jax.random.key(0), x.astype(jnp.bfloat16), y0,
                       mixup.MixConfig(mixup_alpha=0.2))
  assert xm.dtype == jnp.bfloat16 and ym.dtype == jnp.float32


def test_from_config():
  c = default.get_config()
  assert mixup.from_config(c.mixup) is None            # default: off
  assert mixup.from_config(None) is None
  c.mixup.cutmix_alpha = 1.0
  c.mixup.mode = 'example'
  assert mixup.from_config(c.mixup) == mixup.MixConfig(cutmix_alpha=1.0, mode='example')
  for key, value, match in [('mode', 'pair', 'config.mixup.mode'),
                            ('prob', 1.5, 'prob'), ('mixup_alpha', -1.0, 'alpha')]:
    bad = ml_collections.ConfigDict(c.mixup.to_dict())
    bad[key] = value
    with pytest.raises(UserError, match=match):
      mixup.from_config(bad)


def _train_setup(mix, num_devices=8, scfg=None, warmup_steps=2):
  """(initial state, the jitted donating train step, model def, optimizer, schedule)."""
  cfg = default.get_config()
  mesh = sharding.make_mesh(num_devices)
  lr = optim.schedule(cfg.optim, batch_size=32, total_steps=10, warmup_steps=warmup_steps)
  tx = optim.build(cfg.optim, lr)
  model_fn = functools.partial(models.get, 'cnn', num_classes=10, in_channels=1, widths=(8, 16))
  mdef = state_lib.model_def(model_fn)
  state, shardings = state_lib.create(model_fn, tx, 0, mesh)
  scfg = scfg or steps.StepConfig(num_classes=10, mix=mix)
  train = jax.jit(functools.partial(steps.train_step, model_def=mdef, tx=tx, lr_schedule=lr,
                                    cfg=scfg),
                  in_shardings=(shardings, sharding.batch_sharding(mesh)),
                  out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return state, train, mdef, tx, lr


def _plain_step(state, batch, mdef, tx, *, mean, std, smoothing, num_classes):
  """An unmixed SGD step written out by hand: normalise, smoothed one-hot, softmax cross-entropy."""
  x = (jnp.asarray(batch['image'], jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
  y = jax.nn.one_hot(batch['label'], num_classes) * (1.0 - smoothing) + smoothing / num_classes

  def loss_fn(params):
    model = mdef.merge(params, state.batch_stats)
    logits = model(x, train=True)
    loss = -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), -1))
    return loss, (logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

  (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      batch_stats=stats, opt_state=opt_state)
  return new, {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}


def test_mixing_off_is_the_plain_step_and_mixing_on_is_not():
  """Both alphas 0: the step from the config is a plain cross-entropy step; alpha > 0 mixes."""
  c = default.get_config()
  c.data.device_preprocess = ''          # the plain step: no augmentation either
  c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.mixup.prob = 0.0, 0.0, 1.0
  assert mixup.from_config(c.mixup) is None
  rng = np.random.default_rng(2)
  batch = {'image': rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8),
           'label': rng.integers(0, 10, (16,), dtype=np.int32)}
  state, _, mdef, tx, _ = _train_setup(None, num_devices=1, warmup_steps=0)  # lr(0) > 0
  ref_state, ref_metrics = jax.jit(functools.partial(
      _plain_step, mdef=mdef, tx=tx, mean=c.data.mean, std=c.data.std,
      smoothing=c.label_smoothing, num_classes=10))(state, batch)
  results = {}
  for alpha in (0.0, 0.4):
    c.mixup.mixup_alpha = alpha
    scfg = steps.step_config(c, 10)
    assert (scfg.mix is None) == (alpha == 0.0)
    if alpha:
      assert scfg.mix == mixup.MixConfig(mixup_alpha=alpha)
    fresh, train, _, _, _ = _train_setup(None, num_devices=1, scfg=scfg, warmup_steps=0)
    results[alpha] = train(fresh, batch)
  off_state, off_metrics = results[0.0]
  # Tolerance: two separately compiled f32 programs may reduce in a different order.
  np.testing.assert_allclose(off_metrics['loss'], ref_metrics['loss'], rtol=1e-6)
  np.testing.assert_array_equal(off_metrics['accuracy'], ref_metrics['accuracy'])
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               (off_state.params, off_state.batch_stats, off_state.opt_state),
               (ref_state.params, ref_state.batch_stats, ref_state.opt_state))
  head = lambda s: np.asarray(s.params['head']['kernel'])  # noqa: E731
  assert np.max(np.abs(head(ref_state) - head(state))) > 1e-3    # the step did move the weights
  on_state, on_metrics = results[0.4]
  assert abs(float(on_metrics['loss']) - float(ref_metrics['loss'])) > 1e-3
  assert np.max(np.abs(head(on_state) - head(ref_state))) > 1e-4


def test_train_step_mixes_on_the_device_over_8_devices_like_on_1():
  rng = np.random.default_rng(1)
  batch = {'image': rng.integers(0, 256, (32, 8, 8, 1), dtype=np.uint8),
           'label': rng.integers(0, 10, (32,), dtype=np.int32)}
  mix = mixup.MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0, mode='example')
  losses = {}
  for n in (1, 8):
    state, train, *_ = _train_setup(mix, num_devices=n)
    losses[n] = float(train(state, batch)[1]['loss'])
  plain_state, plain, *_ = _train_setup(None, num_devices=1)
  plain_loss = float(plain(plain_state, batch)[1]['loss'])
  np.testing.assert_allclose(losses[1], losses[8], rtol=1e-4)
  assert np.isfinite(losses[1]) and abs(losses[1] - plain_loss) > 1e-3
