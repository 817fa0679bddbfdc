"""Optimizer and schedule from config."""
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


def test_adamw_and_clipping_build():
  cfg = default.get_config().optim
  cfg.name = 'adamw'
  cfg.grad_clip_norm = 1.0
  tx = optim.build(cfg, optax.constant_schedule(1e-3))
  params = {'w': jnp.ones((2, 2))}
  updates, _ = tx.update({'w': jnp.full((2, 2), 100.0)}, tx.init(params), params)
  assert np.all(np.isfinite(updates['w']))


@pytest.mark.parametrize('key,value,match', [('name', 'lamb', 'optim.name'),
                                             ('schedule', 'step', 'optim.schedule')])
def test_unknown_optimizer_or_schedule(key, value, match):
  cfg = default.get_config().optim
  cfg[key] = value
  with pytest.raises(UserError, match=match):
    optim.build(cfg, optim.schedule(cfg, batch_size=8, total_steps=10, warmup_steps=0))
