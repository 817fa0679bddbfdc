"""Every config in configs/: its docstring gives its command and an expected figure (with the
machine that measured it), its keys are exactly configs/default.py's schema (config.model holds
the family's own constructor arguments), and every part of it parses (model, preprocessing,
mixup, device augmentation, arrays settings). A new config must pass these."""
import importlib
import os
import re

import ml_collections
import pytest

from tests.conftest import REPO


def _key_paths(c, prefix=''):
  """Dotted paths of every leaf key of a ConfigDict, e.g. {'data.name', 'seed', ...}."""
  paths = set()
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      paths |= _key_paths(v, f'{prefix}{k}.')
    else:
      paths.add(prefix + k)
  return paths


CONFIGS = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(REPO, 'configs'))
                 if f.endswith('.py') and f != '__init__.py')


def test_every_named_config_is_checked():
  assert {'default', 'fashion_mnist_quick', 'fashion_mnist_wrn', 'cifar10_resnet18',
          'imagenet_resnet50'} <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_configs_document_command_and_expected_result(name):
  """Each config's docstring gives its command and an expected figure; its keys are exactly the
  default schema's (config.model holds the model family's own constructor arguments)."""
  module = importlib.import_module(f'configs.{name}')
  doc = module.__doc__ or ''
  assert f'python -m imgcls_jax.main --config=configs/{name}.py' in doc
  assert re.search(r'^Expected\b[^\n]*?\d+(\.\d+)?%', doc, re.M), 'no expected top-1 figure'
  c = module.get_config()
  from configs import default
  schema = {p for p in _key_paths(default.get_config()) if not p.startswith('model.')}
  keys = {p for p in _key_paths(c) if not p.startswith('model.')}
  assert keys - schema == set(), 'keys not in configs/default.py'
  assert schema - keys == set(), 'keys of configs/default.py missing'
  from flax import nnx
  from imgcls_jax import configlib, mixup, models
  from imgcls_jax.data import pp
  kwargs = {k: v for k, v in c.model.items() if k != 'name'}
  nnx.eval_shape(lambda: models.get(c.model.name, num_classes=10, in_channels=3, dtype=c.dtype,
                                    rngs=nnx.Rngs(0), **kwargs))  # unknown / missing keys raise
  configlib.validate(c)
  pp.parse(c.data.train_preprocess)
  pp.parse(c.data.eval_preprocess)
  mixup.from_config(c.mixup)
  from imgcls_jax import device_augment
  from imgcls_jax.data import arrays
  device_augment.parse(c.data.device_preprocess)
  if arrays.is_arrays(c.data):  # an arrays file: only settings it honours (no host preprocessing)
    arrays.check(c.data)
