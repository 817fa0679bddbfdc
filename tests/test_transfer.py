"""Transfer learning: linear-probe masking, layer-wise lr decay, init from a run; does it help."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from imgcls_jax import models, optim, train, transfer
from imgcls_jax.errors import UserError
from tests.conftest import REPO
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
  for name, before in transfer.flatten(p0).items():
    after = transfer.flatten(p1)[name]
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
                   optax.constant_schedule(1.0), _transfer_cfg(layer_decay=0.5))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, p0), tx.init(p0), p0)
  u = {k: float(v.reshape(-1)[0]) for k, v in transfer.flatten(updates).items()}
  # ResNet-18: stem depth 0, blocks 1..8, head 9.
  assert u['fc.kernel'] == u['fc.bias'] == -1.0
  assert u['layer4.1.conv2.kernel'] == -0.5
  assert u['layer4.0.downsample.conv.kernel'] == -0.25
  assert u['layer1.0.bn1.scale'] == pytest.approx(-0.5**8)
  assert u['conv1.kernel'] == u['bn1.bias'] == pytest.approx(-0.5**9)


def test_layer_depths_of_every_family():
  names = list(transfer.flatten(_params('cnn', widths=(8, 16))))
  depths, top = transfer.layer_depths(names)
  assert top == 5 and depths['convs.0.kernel'] == depths['norms.0.scale'] == 1
  assert depths['convs.3.kernel'] == 4 and depths['head.kernel'] == 5
  wrn = list(transfer.flatten(_params('wide_resnet', depth=10, width=1)))
  depths, top = transfer.layer_depths(wrn)
  assert top == 4 and depths['stem.kernel'] == 0 and depths['blocks.2.conv2.kernel'] == 3
  assert depths['bn.scale'] == depths['fc.kernel'] == 4
  with pytest.raises(UserError, match='does not know the layer order'):
    transfer.layer_depths(['encoder.kernel', 'fc.kernel'])


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
                                      'model is not in checkpoint 30'):
    train.train_and_evaluate(c, str(tmp_path / 'b'))
  c.model.widths = (8, 16)
  c.transfer.init_from = str(tmp_path / 'missing')
  with pytest.raises(UserError, match='does not exist'):
    train.train_and_evaluate(c, str(tmp_path / 'c'))


def _demo():
  path = os.path.join(REPO, 'benchmarks', 'transfer_demo.py')
  spec = importlib.util.spec_from_file_location('transfer_demo', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_transfer_beats_scratch_on_digits_5_to_9(tmp_path):
  """Digits 0-4 -> 5-9 from 60 labelled images: fine-tuning beats scratch at the same steps.

  Measured (2-core CPU): scratch 87.1% (lr 0.1; 84.8% at 0.3), fine-tune 94.2%, linear probe 54.9%.
  The probe is weak on digits: a 2-stage CNN trained on five digits keeps little that separates the
  other five (a converged logistic regression on its features reaches ~83% from 100 images).
  """
  work = str(tmp_path)
  r = _demo().run('sklearn_digits', work, target_images=60, source_steps=80, target_steps=24,
                  batch_size=64, target_batch_size=16, scratch_lrs=(0.1,), finetune_lrs=(0.1,),
                  probe_lrs=(0.3,), widths=(16, 32))
  assert r['source_accuracy_0to4'] > 0.9
  assert r['finetune_best'] > r['scratch_best'] + 0.03, r
  assert r['linear_probe_best'] > 0.4, r     # chance is 0.2: the frozen 0-4 features carry over
  # The probe changed the head only: every backbone parameter is the source's, bit for bit.
  src = transfer.read_checkpoint(os.path.join(work, 'source'))
  probe = transfer.read_checkpoint(os.path.join(work, 'linear_probe_lr0.3'))
  for name, value in probe.params.items():
    if name.startswith('head.'):
      assert not np.allclose(value, src.params[name]), name
    else:
      np.testing.assert_array_equal(value, src.params[name], err_msg=name)
  # ... and it ran the backbone in inference mode: the source's BN statistics are kept as they were.
  assert probe.batch_stats.keys() == src.batch_stats.keys()
  for name, value in probe.batch_stats.items():
    np.testing.assert_array_equal(value, src.batch_stats[name], err_msg=name)
