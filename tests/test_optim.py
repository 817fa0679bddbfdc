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


@pytest.mark.parametrize('key,value,match', [('name', 'lamb', 'optim.name'),
                                             ('schedule', 'step', 'optim.schedule')])
def test_unknown_optimizer_or_schedule(key, value, match):
  cfg = default.get_config().optim
  cfg[key] = value
  with pytest.raises(UserError, match=match):
    optim.build(cfg, optim.schedule(cfg, batch_size=8, total_steps=10, warmup_steps=0))
