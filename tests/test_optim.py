"""Optimizer and schedule from config: updates checked against the formulas."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from imgcls_jax import optim
from imgcls_jax.errors import UserError


def test_warmup_then_cosine_to_zero():
  cfg = default.get_config().optim
  lr = optim.schedule(cfg, batch_size=128, total_steps=110, warmup_steps=10)
  np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 0.05, 0.1], atol=1e-7)
  np.testing.assert_allclose(lr(60), 0.05, atol=1e-6)  # half-way through the cosine
  np.testing.assert_allclose(lr(110), 0.0, atol=1e-7)


def test_learning_rate_scales_with_batch_over_reference():
  cfg = default.get_config().optim
  cfg.lr_batch_reference = 256
  assert optim.peak_learning_rate(cfg, 1024) == pytest.approx(0.4)
  lr = optim.schedule(cfg, batch_size=1024, total_steps=100, warmup_steps=0)
  assert float(lr(0)) == pytest.approx(0.4)


def test_weight_decay_applies_to_kernels_only():
  cfg = default.get_config().optim
  cfg.momentum = 0.0
  cfg.weight_decay = 0.5
  tx = optim.build(cfg, optax.constant_schedule(1.0))
  params = {'conv': {'kernel': jnp.ones((3, 3, 1, 2)), 'bias': jnp.ones((2,))},
            'bn': {'scale': jnp.ones((2,))}}
  zero = {'conv': {'kernel': jnp.zeros((3, 3, 1, 2)), 'bias': jnp.zeros((2,))},
          'bn': {'scale': jnp.zeros((2,))}}
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates['conv']['kernel'], -0.5)  # -lr * wd * w
  np.testing.assert_allclose(updates['conv']['bias'], 0.0)
  np.testing.assert_allclose(updates['bn']['scale'], 0.0)


def _params_and_grads(num_steps, scales):
  """Random params (kernels, a bias, a norm scale) and ``num_steps`` gradients, step ``t`` scaled
  to global norm ``scales[t]``; the leaves differ in norm, so per-leaf clipping would differ."""
  rng = np.random.default_rng(0)
  shapes = {'conv': {'kernel': (3, 3, 1, 2), 'bias': (2,)}, 'bn': {'scale': (2,)},
            'head': {'kernel': (2, 3)}}
  make = lambda: jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,  # noqa: E731
                              is_leaf=lambda s: isinstance(s, tuple))
  params = make()
  grads = []
  for t in range(num_steps):
    g = make()
    g['head']['kernel'] *= 5.0
    norm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in jax.tree.leaves(g)))
    grads.append(jax.tree.map(lambda x: (x * scales[t] / norm).astype(np.float32), g))
  return params, grads


def _run(tx, params, grads):
  """The updates of ``tx`` over the gradients, its params moving as training moves them."""
  state, out = tx.init(params), []
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


def _reference(cfg, lr, params, grads):
  """The same updates from the formulas, in float64: gradients clipped to global norm
  ``grad_clip_norm``; SGD adds ``wd * w`` to the gradient of kernels (ndim >= 2), then (Nesterov)
  momentum; AdamW adds the decoupled ``wd * w`` of kernels to the bias-corrected Adam direction."""
  leaves, treedef = jax.tree.flatten(params)
  w = [np.asarray(x, np.float64) for x in leaves]
  m = [np.zeros_like(x) for x in w]
  v = [np.zeros_like(x) for x in w]
  out = []
  for t, grad in enumerate(grads):
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grad)]
    norm = np.sqrt(sum(np.sum(x ** 2) for x in g))
    if cfg.grad_clip_norm > 0 and norm > cfg.grad_clip_norm:
      g = [x * cfg.grad_clip_norm / norm for x in g]
    decay = [cfg.weight_decay * x if x.ndim >= 2 else 0.0 * x for x in w]
    rate = float(lr(t))
    if cfg.name == 'sgd':
      g = [gi + di for gi, di in zip(g, decay)]
      m = [gi + cfg.momentum * mi for gi, mi in zip(g, m)]
      u = [-rate * (gi + cfg.momentum * mi if cfg.nesterov else mi) for gi, mi in zip(g, m)]
    else:
      m = [cfg.b1 * mi + (1 - cfg.b1) * gi for gi, mi in zip(g, m)]
      v = [cfg.b2 * vi + (1 - cfg.b2) * gi ** 2 for gi, vi in zip(g, v)]
      u = [-rate * ((mi / (1 - cfg.b1 ** (t + 1))) /
                    (np.sqrt(vi / (1 - cfg.b2 ** (t + 1))) + cfg.eps) + di)
           for mi, vi, di in zip(m, v, decay)]
    w = [wi + ui for wi, ui in zip(w, u)]
    out.append(jax.tree.unflatten(treedef, u))
  return out


@pytest.mark.parametrize('name,nesterov,clip', [('sgd', True, 0.0), ('sgd', False, 1.0),
                                                ('adamw', False, 0.0), ('adamw', False, 1.0)])
def test_updates_follow_the_formulas(name, nesterov, clip):
  cfg = default.get_config().optim
  cfg.name, cfg.nesterov, cfg.grad_clip_norm = name, nesterov, clip
  cfg.weight_decay = 0.05
  lr = lambda count: 0.1 / (1.0 + count)  # noqa: E731  (a schedule that changes every step)
  params, grads = _params_and_grads(3, scales=[100.0, 0.3, 10.0])  # clipped, not, clipped
  got = _run(optim.build(cfg, lr), params, grads)
  want = _reference(cfg, lr, params, grads)
  # f32 against f64 over three steps of a few element-wise operations.
  for t, (g, w) in enumerate(zip(got, want)):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7,
                                   err_msg=f'step {t}'), g, w)


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_clipping_rescales_a_large_gradient_to_the_clip_norm(name):
  """With ``grad_clip_norm=c`` a gradient of global norm >> c updates exactly as that gradient
  rescaled to norm c would without clipping; a gradient of norm < c is left alone."""
  cfg = default.get_config().optim
  cfg.name = name
  lr = optax.constant_schedule(0.1)
  params, (big, small) = _params_and_grads(2, scales=[50.0, 0.5])
  cfg.grad_clip_norm = 0.0
  unclipped = optim.build(cfg, lr)
  cfg.grad_clip_norm = 2.0
  clipped = optim.build(cfg, lr)
  rescaled = jax.tree.map(lambda g: g * (2.0 / 50.0), big)
  # Two steps: Adam's first update hardly depends on the gradient's scale; its second does.
  got = _run(clipped, params, [big, small])
  for t, (g, w) in enumerate(zip(got, _run(unclipped, params, [rescaled, small]))):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-8,
                                   err_msg=f'step {t}'), g, w)
  # ... and clipping changed the outcome.
  plain = _run(unclipped, params, [big, small])[1]['head']['kernel']
  assert np.max(np.abs(got[1]['head']['kernel'] - plain)) > 1e-3


@pytest.mark.parametrize('key,value,match', [('name', 'adagrad', 'optim.name'),
                                             ('schedule', 'step', 'optim.schedule')])
def test_unknown_optimizer_or_schedule(key, value, match):
  cfg = default.get_config().optim
  cfg[key] = value
  with pytest.raises(UserError, match=match):
    optim.build(cfg, optim.schedule(cfg, batch_size=8, total_steps=10, warmup_steps=0))


# ---- large-batch and optax.contrib optimizers ----

def _trust(w, u, coefficient=1.0):
  """The trust ratio ``c ||w|| / ||u||`` (1 where either norm is 0), as LAMB / LARS define it."""
  wn, un = np.linalg.norm(w), np.linalg.norm(u)
  return 1.0 if wn == 0 or un == 0 else coefficient * wn / un


def _reference_large_batch(cfg, lr, params, grads):
  """LAMB / LARS updates from the papers' formulas in float64. LAMB: the bias-corrected Adam
  direction plus ``wd * w`` (kernels), times ``||w|| / ||that||`` for every tensor. LARS: ``g +
  wd * w`` (kernels), times ``trust_coefficient * ||w|| / ||that||`` for kernels only, times the
  rate, then (Nesterov) momentum."""
  leaves, treedef = jax.tree.flatten(params)
  w = [np.asarray(x, np.float64) for x in leaves]
  m = [np.zeros_like(x) for x in w]
  v = [np.zeros_like(x) for x in w]
  out = []
  for t, grad in enumerate(grads):
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grad)]
    rate = float(lr(t))
    decay = [cfg.weight_decay * x if x.ndim >= 2 else 0.0 * x for x in w]
    if cfg.name == 'lamb':
      m = [cfg.b1 * mi + (1 - cfg.b1) * gi for gi, mi in zip(g, m)]
      v = [cfg.b2 * vi + (1 - cfg.b2) * gi ** 2 for gi, vi in zip(g, v)]
      d = [(mi / (1 - cfg.b1 ** (t + 1))) / (np.sqrt(vi / (1 - cfg.b2 ** (t + 1))) + cfg.eps) + di
           for mi, vi, di in zip(m, v, decay)]
      u = [-rate * _trust(wi, di) * di for wi, di in zip(w, d)]
    else:
      d = [gi + di for gi, di in zip(g, decay)]
      d = [di * (_trust(wi, di, cfg.trust_coefficient) if wi.ndim >= 2 else 1.0)
           for wi, di in zip(w, d)]
      step = [-rate * di for di in d]
      m = [si + cfg.momentum * mi for si, mi in zip(step, m)]
      u = [si + cfg.momentum * mi for si, mi in zip(step, m)] if cfg.nesterov else m
    w = [wi + ui for wi, ui in zip(w, u)]
    out.append(jax.tree.unflatten(treedef, u))
  return out


@pytest.mark.parametrize('name,nesterov', [('lamb', False), ('lars', False), ('lars', True)])
def test_lamb_and_lars_follow_the_formulas(name, nesterov):
  cfg = default.get_config().optim
  cfg.name, cfg.nesterov, cfg.weight_decay = name, nesterov, 0.05
  lr = lambda count: 0.1 / (1.0 + count)  # noqa: E731
  params, grads = _params_and_grads(3, scales=[3.0, 0.3, 10.0])
  got = _run(optim.build(cfg, lr), params, grads)
  want = _reference_large_batch(cfg, lr, params, grads)
  for t, (g, w) in enumerate(zip(got, want)):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-7,
                                   err_msg=f'step {t}'), g, w)


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_every_optimizer_decays_kernels_only(name):
  """Zero gradients: only weight decay acts, and only on kernels (ndim >= 2)."""
  cfg = default.get_config().optim
  cfg.name, cfg.weight_decay = name, 0.1
  tx = optim.build(cfg, optax.constant_schedule(0.1))
  params, _ = _params_and_grads(1, scales=[1.0])
  zero = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  for group in ('conv', 'head'):
    assert np.all(np.sign(updates[group]['kernel']) == -np.sign(params[group]['kernel'])), group
  # Zero up to float32 rounding (schedule-free re-derives y from its averages); kernels move by
  # lr * wd * |w| ~ 1e-2 |w|.
  np.testing.assert_allclose(updates['conv']['bias'], 0.0, atol=1e-7)
  np.testing.assert_allclose(updates['bn']['scale'], 0.0, atol=1e-7)


def test_muon_orthogonalises_conv_kernels_as_inputs_by_outputs():
  """A 3x3x4x8 conv kernel is updated as the 36x8 matrix of its reshape (Newton-Schulz brings its
  singular values close together); biases and norm scales get Adam's update."""
  cfg = default.get_config().optim
  cfg.name, cfg.weight_decay = 'muon', 0.0
  rng = np.random.default_rng(1)
  scales = np.array([10.0, 3.0, 1.0, 0.3, 0.1, 0.05, 0.02, 0.01])
  grad_2d = (rng.normal(size=(36, 8)) * scales).astype(np.float32)  # singular values far apart
  params = {'conv': {'kernel': rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
                     'bias': rng.normal(size=(8,)).astype(np.float32)}}
  grads = {'conv': {'kernel': grad_2d.reshape(3, 3, 4, 8),
                    'bias': rng.normal(size=(8,)).astype(np.float32)}}
  tx = optim.build(cfg, optax.constant_schedule(0.1))
  updates, _ = tx.update(grads, tx.init(params), params)
  flat = np.asarray(updates['conv']['kernel']).reshape(36, 8)
  as_matrix = optax.contrib.muon(0.1, beta=cfg.muon_beta)
  want, _ = as_matrix.update({'k': grad_2d}, as_matrix.init({'k': params['conv']['kernel'].reshape(
      36, 8)}), {'k': params['conv']['kernel'].reshape(36, 8)})
  np.testing.assert_allclose(flat, want['k'], rtol=1e-5, atol=1e-7)
  # Singular values 1000x apart in the gradient end within a few x of each other (5 Newton-Schulz
  # steps with Muon's coefficients only approximate the orthogonal factor).
  sv, sv_grad = (np.linalg.svd(m, compute_uv=False) for m in (flat, grad_2d))
  assert sv.max() / sv.min() < 4.0 and sv_grad.max() / sv_grad.min() > 100
  adam = optax.adam(0.1, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, nesterov=True)  # Muon's Adam part
  want_bias, _ = adam.update(grads['conv']['bias'], adam.init(params['conv']['bias']))
  np.testing.assert_allclose(updates['conv']['bias'], want_bias, rtol=1e-6)


def test_schedule_free_adamw_matches_optax_and_evaluates_the_average():
  cfg = default.get_config().optim
  cfg.name, cfg.weight_decay, cfg.grad_clip_norm = 'schedule_free_adamw', 0.0, 1.0
  params, grads = _params_and_grads(4, scales=[3.0, 0.5, 2.0, 0.3])
  tx = optim.build(cfg, optax.constant_schedule(0.01))
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.contrib.schedule_free_adamw(
      0.01, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  state, ref_state = tx.init(params), ref.init(params)
  ours_p, ref_p = params, params
  for g in grads:
    u, state = tx.update(g, state, ours_p)
    ru, ref_state = ref.update(g, ref_state, ref_p)
    ours_p, ref_p = optax.apply_updates(ours_p, u), optax.apply_updates(ref_p, ru)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), ours_p, ref_p)
  evaluated = optim.eval_params(state, ours_p)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), evaluated,
               optax.contrib.schedule_free_eval_params(ref_state[1], ref_p))
  assert not np.allclose(evaluated['head']['kernel'], ours_p['head']['kernel'])  # x != y
  sgd_state = optim.build(default.get_config().optim, optax.constant_schedule(0.1)).init(params)
  assert optim.eval_params(sgd_state, params) is params


def test_schedule_free_refuses_layer_decay():
  cfg = default.get_config()
  cfg.optim.name = 'schedule_free_adamw'
  cfg.transfer.layer_decay = 0.7
  with pytest.raises(UserError, match='layer_decay cannot be combined with schedule_free_adamw'):
    optim.build(cfg.optim, optax.constant_schedule(0.1), cfg.transfer,
                layer_depths=lambda names: ({n: 0 for n in names}, 1))


def test_layer_depths_type_is_the_models_one():
  from imgcls_jax import models
  assert optim.LayerDepths is models.LayerDepths
