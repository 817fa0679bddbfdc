"""A frozen parameter (config.init.freeze_whitening's kernel, config.optim.freeze's names) has its
gradient stopped in the train step: XLA never computes it, and the other parameters train exactly as
before."""
import functools

import jax
import ml_collections
import numpy as np
import optax
import pytest

from imgcls_jax import models, param_groups, run, sharding, steps
from imgcls_jax import state as state_lib
from imgcls_jax import weights as weights_lib
from imgcls_jax.errors import UserError


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


def _fast_cnn_digits(freeze: str = ''):
  from configs import default
  c = default.get_config()                 # sklearn digits, 8x8, 10 classes
  c.model = ml_collections.ConfigDict({'name': 'fast_cnn', 'widths': ((8,), (16,)),
                                       'stem': 'none', 'image_size': 8})
  c.batch_size = 16
  c.mesh.num_devices = 1
  c.optim.freeze = freeze
  return c


def test_optim_freeze_selects_by_dotted_prefix_and_rejects_a_prefix_that_matches_nothing():
  names = ['convs.0.kernel', 'convs.1.kernel', 'norms.0.scale', 'norms.0.bias', 'norms.1.scale',
           'fc.kernel', 'fc.bias']
  cfg = ml_collections.ConfigDict({'freeze': 'norms.0, fc.bias'})
  assert param_groups.frozen_by_name(cfg, names) == {'norms.0.scale', 'norms.0.bias', 'fc.bias'}
  cfg.freeze = 'norms'
  assert param_groups.frozen_by_name(cfg, names) == {'norms.0.scale', 'norms.0.bias',
                                                     'norms.1.scale'}
  cfg.freeze = ''
  assert param_groups.frozen_by_name(cfg, names) == frozenset()
  cfg.freeze = 'norm'                      # a prefix of names, not of dotted components
  with pytest.raises(UserError, match="config.optim.freeze names 'norm', which matches no"):
    param_groups.frozen_by_name(cfg, names)


def test_optim_freeze_keeps_the_named_parameters_and_drops_the_backward_pass_only_they_needed():
  batch = {'image': np.random.default_rng(1).integers(0, 17, (16, 8, 8, 1), dtype=np.uint8),
           'label': np.arange(16, dtype=np.int32) % 10}
  runs = {}
  for freeze in ('', 'norms.0', 'convs.0,norms.0'):
    s = run.setup(_fast_cnn_digits(freeze))
    state, sh = state_lib.create(s.model_fn, s.tx, 0, s.mesh, s.placement)
    step = run.jit_train_step(s, sh)
    convs = step.lower(state, batch).as_text().count('stablehlo.convolution')
    start = weights_lib.flatten(jax.device_get(state.params))
    state, _ = step(state, batch)
    first = weights_lib.flatten(jax.device_get(state.params))
    for _ in range(2):
      state, _ = step(state, batch)
    end = weights_lib.flatten(jax.device_get(state.params))
    runs[freeze] = (s.step_cfg.frozen, convs, start, end, first)
  assert runs['norms.0'][0] == ('norms.0.bias', 'norms.0.scale')
  # 2 forward convolutions + 2 filter gradients + conv 1's input gradient, which only conv 0 and
  # norms.0 need: freezing norms.0 alone keeps it (conv 0 still trains); freezing both drops it
  # and conv 0's filter gradient.
  assert [runs[f][1] for f in ('', 'norms.0', 'convs.0,norms.0')] == [5, 5, 3]
  for freeze in ('norms.0', 'convs.0,norms.0'):
    frozen, _, start, end, first = runs[freeze]
    for name in frozen:
      np.testing.assert_array_equal(end[name], start[name], err_msg=name)
    # The first step's gradients of the other parameters do not depend on the freeze: the oracle
    # is the unfrozen run's first step.
    for name in set(first) - set(frozen):
      np.testing.assert_allclose(first[name], runs[''][4][name], rtol=1e-6, atol=1e-7,
                                 err_msg=name)
    assert not np.allclose(end['convs.1.kernel'], start['convs.1.kernel'])
    assert not np.allclose(end['fc.kernel'], runs[''][3]['fc.kernel'])  # training differs after
  free_start, free_end = runs[''][2], runs[''][3]
  assert not np.allclose(free_end['norms.0.scale'], free_start['norms.0.scale'])


def test_optim_freeze_with_an_unknown_prefix_fails_at_setup_with_one_clear_sentence():
  with pytest.raises(UserError, match=r"optim.freeze names 'layer1'.*e.g. 'convs.0'"):
    run.setup(_fast_cnn_digits('layer1'))
