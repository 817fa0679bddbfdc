"""Transfer learning: linear-probe masking, layer-wise lr decay, init from a run (whether transfer
helps: tests/test_fashion_mnist.py::test_transfer_beats_scratch_on_fashion_mnist_5_to_9)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import functools

from imgcls_jax import models, optim, train, weights
from imgcls_jax.errors import UserError
from tests.test_predict import trained_run


def _transfer_cfg(**kw):
  c = ml_collections.ConfigDict({'init_from': '', 'init_step': -1, 'mode': 'finetune',
                                 'layer_decay': 1.0, 'head': '', 'keep_head': False})
  c.update(kw)
  return c


def _optim_cfg(**kw):
  from configs import default
  c = default.get_config().optim
  c.update(kw)
  return c


def _params(name, **kw):
  model = models.get(name, num_classes=5, in_channels=1, rngs=nnx.Rngs(0), **kw)
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _steps(tx, params, n=3, seed=0):
  state = tx.init(params)
  key = jax.random.key(seed)
  for i in range(n):
    leaves, treedef = jax.tree.flatten(params)
    grads = jax.tree.unflatten(treedef, [jax.random.normal(jax.random.fold_in(key, i * 1000 + j),
                                                           x.shape) for j, x in enumerate(leaves)])
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_linear_probe_freezes_everything_but_the_head():
  p0 = _params('cnn', widths=(8, 16))
  tx = optim.build(_optim_cfg(weight_decay=5e-3, momentum=0.9), optax.constant_schedule(0.1),
                   _transfer_cfg(mode='linear_probe', init_from='somewhere'))
  p1, opt_state = _steps(tx, p0)
  for name, before in weights.flatten(p0).items():
    after = weights.flatten(p1)[name]
    if name.startswith('head.'):
      assert not np.allclose(before, after), name
    else:
      np.testing.assert_array_equal(before, after, err_msg=name)  # bit-identical, decay included
  # Frozen parameters carry no optimizer state: the only momentum buffers are the head's.
  momentum_leaves = [x for x in jax.tree.leaves(opt_state) if getattr(x, 'ndim', 0) > 0]
  assert sorted(x.shape for x in momentum_leaves) == [(5,), (16, 5)]


def test_layer_decay_scales_each_depth():
  p0 = _params('resnet18', width=8, small_inputs=True)
  tx = optim.build(_optim_cfg(momentum=0.0, weight_decay=0.0, nesterov=False),
                   optax.constant_schedule(1.0), _transfer_cfg(layer_decay=0.5),
                   layer_depths=functools.partial(models.layer_depths, 'resnet18'))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, p0), tx.init(p0), p0)
  u = {k: float(v.reshape(-1)[0]) for k, v in weights.flatten(updates).items()}
  # ResNet-18: stem depth 0, blocks 1..8, head 9.
  assert u['fc.kernel'] == u['fc.bias'] == -1.0
  assert u['layer4.1.conv2.kernel'] == -0.5
  assert u['layer4.0.downsample.conv.kernel'] == -0.25
  assert u['layer1.0.bn1.scale'] == pytest.approx(-0.5**8)
  assert u['conv1.kernel'] == u['bn1.bias'] == pytest.approx(-0.5**9)


def test_layer_decay_without_a_depth_rule_is_one_line():
  with pytest.raises(UserError, match='layer-depth rule'):
    optim.build(_optim_cfg(), optax.constant_schedule(0.1), _transfer_cfg(layer_decay=0.5))


def test_defaults_leave_the_optimizer_unchanged():
  p0 = _params('cnn', widths=(8,))
  lr = optax.constant_schedule(0.1)
  a, sa = _steps(optim.build(_optim_cfg(), lr), p0)
  b, sb = _steps(optim.build(_optim_cfg(), lr, _transfer_cfg()), p0)
  assert jax.tree.structure(sa) == jax.tree.structure(sb)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize('kw,match', [
    ({'mode': 'linear_probe'}, 'random without weights'),
    ({'mode': 'probe'}, "Unknown config.transfer.mode 'probe'"),
    ({'layer_decay': 0.0}, 'layer_decay must be in'),
    ({'layer_decay': 0.8, 'mode': 'linear_probe', 'init_from': 'x'}, 'applies to fine-tuning'),
    ({'head': 'classifier_head', 'init_from': 'x', 'mode': 'linear_probe'}, 'is not a top-level'),
])
def test_bad_transfer_config(kw, match):
  with pytest.raises(UserError, match=match):
    tx = optim.build(_optim_cfg(), optax.constant_schedule(0.1), _transfer_cfg(**kw))
    tx.init(_params('cnn', widths=(8,)))


def test_init_from_another_architecture_names_the_parameter(tmp_path_factory, tfds_dir, tmp_path):
  config, source, _ = trained_run(tmp_path_factory, tfds_dir)     # CNN widths (8, 16)
  c = config.copy_and_resolve_references()
  c.transfer.init_from = source
  c.model.widths = (8, 24)
  with pytest.raises(UserError, match=r"Parameter 'convs\.2\.kernel' has shape \(3, 3, 8, 16\) in "
                                      r'checkpoint 30 of .* but \(3, 3, 8, 24\) in this model'):
    train.train_and_evaluate(c, str(tmp_path / 'a'))
  c.model.widths = (8, 16, 32)
  with pytest.raises(UserError, match=r"Parameter 'convs\.4\.kernel' \(and 5 more\) of this "
                                      r"model is not in checkpoint 30.*: match config\.model's "
                                      r'other keys \(widths, depth, \.\.\.\) to those checkpoint'):
    train.train_and_evaluate(c, str(tmp_path / 'b'))
  c.model.widths = (8, 16)
  c.transfer.init_from = str(tmp_path / 'missing')
  with pytest.raises(UserError, match='does not exist'):
    train.train_and_evaluate(c, str(tmp_path / 'c'))
  assert not (tmp_path / 'c').exists()   # refused before the new run directory is made


def test_a_changed_init_from_on_resume_is_warned_of(tmp_path_factory, tfds_dir, tmp_path, caplog):
  """A workdir with checkpoints resumes from them: another transfer.init_from was ignored without
  a word; now a warning names it and the fix. Resuming with the one it started from says nothing."""
  import logging
  config, source, _ = trained_run(tmp_path_factory, tfds_dir)
  c = config.copy_and_resolve_references()
  c.transfer.init_from = source
  c.num_train_steps = 4
  c.checkpoint_every_steps = 4
  work = str(tmp_path / 'tuned')
  train.train_and_evaluate(c, work)
  c.num_train_steps = 6
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(c, work)                 # the same source: nothing to say
    assert 'is not used' not in caplog.text
    c.num_train_steps = 8
    c.transfer.init_from = str(tmp_path)               # another one
    train.train_and_evaluate(c, work)
  assert (f'config.transfer.init_from={tmp_path} is not used: this --workdir resumes from its own '
          f'checkpoint 6 (it started from {source}); train in a new --workdir') in caplog.text
