"""A frozen parameter (config.init.freeze_whitening's kernel) has its gradient stopped in the train
step: XLA never computes it, and the other parameters train exactly as before."""
import functools

import jax
import numpy as np
import optax

from imgcls_jax import models, sharding, steps
from imgcls_jax import state as state_lib
from imgcls_jax import weights as weights_lib


def test_a_frozen_kernel_costs_no_gradient_and_changes_nothing_else():
  lr = 0.1
  tx = optax.sgd(lr)                        # plain SGD: update = -lr * gradient, leaf by leaf
  model_fn = functools.partial(models.get, 'fast_cnn', num_classes=10, in_channels=1,
                               widths=((8,), (16,)), stem='none', image_size=8)
  state, _ = state_lib.create(model_fn, tx, 0, sharding.make_mesh(1))
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8),
           'label': rng.integers(0, 10, (16,), dtype=np.int32)}

  def step(frozen):
    return jax.jit(functools.partial(
        steps.train_step, model_def=state_lib.model_def(model_fn), tx=tx,
        lr_schedule=optax.constant_schedule(lr),
        cfg=steps.StepConfig(num_classes=10, frozen=frozen)))

  free, frozen = step(()), step(('convs.0.kernel',))
  # Forward 2 convolutions; backward the input gradient of conv 1 and both filter gradients:
  # freezing conv 0's kernel drops its filter-gradient convolution from the program.
  convs = [f.lower(state, batch).as_text().count('stablehlo.convolution') for f in (free, frozen)]
  assert convs == [5, 4]

  (a, ma), (b, mb) = free(state, batch), frozen(state, batch)
  fa, fb, f0 = (weights_lib.flatten(jax.device_get(s.params)) for s in (a, b, state))
  np.testing.assert_array_equal(fb['convs.0.kernel'], f0['convs.0.kernel'])
  assert not np.allclose(fa['convs.0.kernel'], f0['convs.0.kernel'])
  for name in fa:
    if name != 'convs.0.kernel':
      np.testing.assert_allclose(fb[name], fa[name], rtol=1e-6, atol=1e-7, err_msg=name)
  np.testing.assert_allclose(mb['loss'], ma['loss'], rtol=1e-6)
  # The logged gradient norm leaves out exactly the frozen kernel's gradient (recovered from the
  # unfrozen SGD update).
  kernel_grad = (f0['convs.0.kernel'] - fa['convs.0.kernel']) / lr
  np.testing.assert_allclose(float(mb['grad_norm']) ** 2,
                             float(ma['grad_norm']) ** 2 - np.sum(kernel_grad ** 2), rtol=1e-4)
