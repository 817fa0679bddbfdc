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


def test_a_grey_model_from_colour_weights_sees_what_they_saw_of_its_colourless_images():
  """Colour (ImageNet-style) weights could not start a grey run: the first convolution's shape was
  refused with a fix no key could apply. Its kernel is now summed over the colours (timm's
  adapt_input_conv), so a grey image gives the logits PyTorch's model gives for that image as
  colour (all three channels equal); a 3-channel model from grey weights likewise."""
  import torch
  from imgcls_jax import state as state_lib, torch_import, transfer
  from tests import torch_reference
  tv = torch_reference.torchvision()
  if tv is None:
    pytest.skip('torchvision is not installed')
  torch.manual_seed(0)
  ref = tv.models.resnet18(num_classes=7).eval()
  weights_rgb = torch_import.convert({k: v.numpy() for k, v in ref.state_dict().items()}, 'rgb')
  grey = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32)

  def logits(source, channels, x_NHWC):
    model_fn = lambda rngs: models.get('resnet18', num_classes=7, in_channels=channels,  # noqa
                                       rngs=rngs)
    shapes = state_lib.abstract_variables(model_fn)
    fitted = transfer.fitted(source, shapes.params)
    params, n = weights.merge(shapes.params, fitted.params, origin=fitted.origin)
    stats, _ = weights.merge(shapes.batch_stats, fitted.batch_stats, origin=fitted.origin)
    assert n == len(fitted.params)
    model_def = state_lib.model_def(model_fn)
    return np.asarray(jax.jit(lambda p, s, x: model_def.merge(p, s)(x, train=False))(
        params, stats, x_NHWC))

  with torch.no_grad():
    want = ref(torch.from_numpy(np.repeat(grey, 3, -1).transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(logits(weights_rgb, 1, grey), want, rtol=1e-4, atol=1e-4)
  # grey weights -> a colour model: a grey image as colour gives the grey model's logits
  conv1 = weights_rgb.params['conv1.kernel'].sum(axis=2, keepdims=True)
  weights_grey = weights.Weights({**weights_rgb.params, 'conv1.kernel': conv1},
                                 weights_rgb.batch_stats, 'grey')
  np.testing.assert_allclose(logits(weights_grey, 3, np.repeat(grey, 3, -1)), want, rtol=1e-4,
                             atol=1e-4)


def test_fitted_resamples_a_runs_vit_positions_as_a_torch_files():
  """A ViT of this project could not start a run at another image size: only torch files had their
  position embeddings resampled. ``transfer.fitted`` now does it for any source."""
  from imgcls_jax import state as state_lib, transfer
  kw = dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4)
  small = state_lib.abstract_variables(lambda rngs: models.get(
      'vit_ti16', num_classes=5, in_channels=1, rngs=rngs, image_size=16, **kw))
  big = state_lib.abstract_variables(lambda rngs: models.get(
      'vit_ti16', num_classes=5, in_channels=1, rngs=rngs, image_size=32, **kw))
  rng = np.random.default_rng(0)
  flat = {k: rng.normal(size=v.shape).astype(np.float32)
          for k, v in weights.flatten(small.params).items()}
  run = weights.Weights(flat, {}, 'checkpoint 2 of /runs/vit16')
  got = transfer.fitted(run, big.params)
  assert got.params['pos_embedding'].shape == weights.flatten(big.params)['pos_embedding'].shape
  weights.merge(big.params, got.params, origin=got.origin)   # every shape fits now


def test_a_runs_weights_are_those_it_evaluates_and_a_kept_head_keeps_its_classes(
    tmp_path_factory, tfds_dir, tmp_path, caplog):
  """From a run with a weight EMA, transfer took the raw weights (evaluate, predict and the
  distillation teacher take the EMA). A kept head of a run trained on the same classes in another
  order answered every image with the wrong class, silently; now it is refused. A source that
  normalised its images otherwise is warned of (its 99% fell to 14% under mean 0, std 1), and the
  keep_head hint is given only where the head's shape differs."""
  import dataclasses
  import logging
  from imgcls_jax import checkpoint_files, transfer
  from imgcls_jax.data.info import DatasetInfo
  config, _, _ = trained_run(tmp_path_factory, tfds_dir)
  c = config.copy_and_resolve_references()
  c.ema.decay, c.num_train_steps, c.checkpoint_every_steps = 0.9, 6, 6
  source = str(tmp_path / 'ema')
  train.train_and_evaluate(c, source)
  got = transfer.load_weights(source)
  ema, raw = (checkpoint_files.read_weights(source, ema=e) for e in (True, False))
  assert got.origin.endswith('(its weight EMA)') and got.meta['step'] == 6
  for name, value in ema.params.items():
    np.testing.assert_array_equal(got.params[name], value)
  assert any(not np.array_equal(got.params[n], raw.params[n]) for n in raw.params)

  info = DatasetInfo.from_json(got.meta['dataset_info'])
  transfer._check_same_classes(got, info)   # the same classes: nothing to say
  swapped = ('1', '0') + info.class_names[2:]
  with pytest.raises(UserError, match=r"keep_head=True keeps the head of checkpoint 6 .*the same "
                     r"classes in another order \(class 0 is '0' there and '1' here\).*train a "
                     r'new head \(config\.transfer\.keep_head=False\)'):
    transfer._check_same_classes(got, dataclasses.replace(info, class_names=swapped))
  with pytest.raises(UserError, match=r"other classes \('9' there; 'nine' here\)"):
    transfer._check_same_classes(got, dataclasses.replace(
        info, class_names=info.class_names[:9] + ('nine',)))

  t = config.copy_and_resolve_references()
  t.transfer.init_from, t.transfer.keep_head = source, True
  t.num_train_steps = 1
  t.data.mean, t.data.std = (0.0,), (1.0,)
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(t, str(tmp_path / 'renormalised'))
  assert (f'{got.origin} normalised its images with mean [0.5], std [0.5], and this run with '
          'mean [0.0], std [1.0]') in caplog.text
  t.data.mean, t.data.std = config.data.mean, config.data.std
  t.model.widths = (8, 24)
  with pytest.raises(UserError, match=r"'convs\.2\.kernel' has shape") as e:
    train.train_and_evaluate(t, str(tmp_path / 'wider'))
  assert 'keep_head' not in str(e.value)
