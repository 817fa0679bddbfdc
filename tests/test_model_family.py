"""A model family defined outside the package: registered in one call, trained by the normal
trainer, with layer-wise learning-rate decay from its own layer-depth rule."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from imgcls_jax import checkpoint_files, models, state, train, weights
from imgcls_jax.errors import UserError

NAME = 'test_model_family_tiny'


class _Block(nnx.Module):
  def __init__(self, ch: int, *, rngs: nnx.Rngs, dtype):
    self.conv = nnx.Conv(ch, ch, (3, 3), dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.norm = nnx.BatchNorm(ch, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x, train: bool):
    return nnx.relu(self.norm(self.conv(x), use_running_average=not train))


class TinyNet(nnx.Module):
  """conv stem -> one conv-BN block -> global average pool -> linear head."""

  def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs,
               dtype='float32', width: int = 8):
    dtype = jnp.dtype(dtype)
    self.stem = nnx.Conv(in_channels, width, (3, 3), dtype=dtype, param_dtype=jnp.float32,
                         rngs=rngs)
    self.block = _Block(width, rngs=rngs, dtype=dtype)
    self.head = nnx.Linear(width, num_classes, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x_BxHxWxC, *, train: bool = False):
    x = self.block(nnx.relu(self.stem(x_BxHxWxC)), train)
    return self.head(x.mean(axis=(1, 2))).astype(jnp.float32)


def tiny_layer_depths(names):
  """stem 0, block 1, head 2."""
  order = {'stem': 0, 'block': 1}
  return {n: order.get(n.split('.')[0], 2) for n in names}, 2


@pytest.fixture
def tiny_family():
  models.register(NAME, TinyNet, layer_depths=tiny_layer_depths)
  try:
    yield NAME
  finally:
    models.unregister(NAME)
  assert NAME not in models.names()


def _one_sgd_step(config, workdir, layer_decay):
  config = ml_collections.ConfigDict(config.to_dict())
  config.transfer.layer_decay = layer_decay
  train.train_and_evaluate(config, workdir)
  return checkpoint_files.read_weights(workdir).params


def test_registered_family_trains_with_layer_decay_from_its_own_rule(digits_config, tiny_family,
                                                                     tmp_path):
  c = digits_config
  c.model = ml_collections.ConfigDict({'name': tiny_family, 'width': 8})
  c.num_train_steps = 1
  c.transfer.mode = 'finetune'
  # Plain SGD at a constant rate: one step's update is -lr x gradient, so a parameter at depth d
  # moves by exactly decay ** (L - d) x what it moves without decay.
  c.optim.update(name='sgd', learning_rate=0.5, momentum=0.0, nesterov=False, weight_decay=0.0,
                 schedule='constant', warmup_epochs=0.0, warmup_steps=-1, grad_clip_norm=0.0)
  decayed = _one_sgd_step(c, str(tmp_path / 'decay'), 0.5)
  plain = _one_sgd_step(c, str(tmp_path / 'plain'), 1.0)
  # The same seed builds the same initial parameters in both runs.
  model_fn = models.from_config(c, num_classes=10, in_channels=1)
  init = weights.flatten(jax.jit(state.init_fn(model_fn, optax.identity(), c.seed))().params)
  init = {k: np.asarray(v) for k, v in init.items()}
  assert sorted(init) == sorted(plain) == sorted(decayed)
  assert {'stem.kernel', 'block.conv.kernel', 'block.norm.scale', 'head.bias'} <= set(init)
  depths, top = tiny_layer_depths(list(init))
  for name, p0 in init.items():
    d_plain, d_decay = plain[name] - p0, decayed[name] - p0
    assert np.count_nonzero(d_plain) > d_plain.size // 2, name  # the step moved it
    want = 0.5 ** (top - depths[name]) * d_plain
    # Same gradient in both runs (same program up to the scaling); each delta then carries two
    # float32 roundings (p + u, then p' - p), each within half an ulp of the largest value.
    ulp = np.spacing(np.maximum.reduce([np.abs(p0), np.abs(plain[name]), np.abs(decayed[name])]))
    err = np.abs(d_decay - want)
    assert np.all(err <= 2 * ulp), (name, float(np.max(err / ulp)))


def test_register_refuses_a_taken_name_unless_replace(tiny_family):
  with pytest.raises(UserError, match=f"Model '{NAME}' is already registered.*replace=True"):
    models.register(NAME, TinyNet)
  with pytest.raises(UserError, match="Model 'cnn' is already registered"):
    models.register('cnn', TinyNet)
  models.register(NAME, TinyNet, replace=True)  # now without a layer-depth rule
  assert isinstance(models.get(NAME, num_classes=3, in_channels=1, rngs=nnx.Rngs(0)), TinyNet)
  with pytest.raises(UserError, match=f"model '{NAME}' has no layer-depth rule.*layer_decay=1.0"):
    models.layer_depths(NAME, ['head.kernel'])


def test_layer_depths_come_from_the_registered_rule(tiny_family):
  names = state.param_names(lambda rngs: models.get(NAME, num_classes=3, in_channels=1, rngs=rngs))
  depths, top = models.layer_depths(NAME, names)
  assert top == 2
  assert depths == {'stem.kernel': 0, 'stem.bias': 0, 'block.conv.kernel': 1, 'block.conv.bias': 1,
                    'block.norm.scale': 1, 'block.norm.bias': 1, 'head.kernel': 2, 'head.bias': 2}


def test_a_rule_that_leaves_a_parameter_out_is_a_clear_error(tiny_family):
  models.register(NAME, TinyNet, layer_depths=lambda names: ({'head.kernel': 2}, 2), replace=True)
  with pytest.raises(UserError, match=f"rule of model '{NAME}' gives parameter 'stem.kernel' no "
                                      'depth in 0..2'):
    models.layer_depths(NAME, ['stem.kernel', 'head.kernel'])
