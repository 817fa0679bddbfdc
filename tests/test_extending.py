"""Extending the package from the user's own code, as a researcher does: a model family and a
preprocessing op registered by modules the --config file imports, patch whitening for a new
family, and ``main.run(argv)`` called in-process.

Before: a mode given --workdir alone named the helper module as the --config to pass (which has no
``get_config``) for a family, and only "Unknown preprocessing op" for an op; ``main.run`` read the
``--config.*`` overrides from ``sys.argv`` (and kept the flags of an earlier call); whitening kept
its own table of families.
"""
from __future__ import annotations

import os
import sys
import textwrap

import numpy as np
import pytest

from imgcls_jax import inference, main, models, whitening
from imgcls_jax.errors import UserError
from tests.conftest import REPO

HELPER = 'test_extending_helper'   # the user's module, imported by the config file
FAMILY = 'test_extending_lin'
OP = 'test_extending_identity'

HELPER_CODE = textwrap.dedent(f'''\
    """The user's code: a model family and a preprocessing op."""
    from flax import nnx

    from imgcls_jax import models


    class Lin(nnx.Module):
      def __init__(self, *, num_classes, in_channels, rngs, dtype='float32'):
        self.fc = nnx.Linear(64 * in_channels, num_classes, rngs=rngs)

      def __call__(self, x, *, train=False):
        return self.fc(x.reshape(x.shape[0], -1))


    models.register({FAMILY!r}, Lin, replace=True)

    if OPS:
      from imgcls_jax.data import pp

      @pp.register({OP!r})
      def identity():
        return lambda image, seed: image
    ''')

CONFIG_CODE = textwrap.dedent('''\
    """The user's --config file: it imports the helper, which registers what the run uses."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import {helper}  # noqa: E402,F401

    from configs import default  # noqa: E402


    def get_config():
      c = default.get_config()
      {data}
      c.model = {{'name': {family!r}}}
      c.num_train_steps, c.batch_size, c.eval_batch_size = 2, 64, 64
      c.progress_bar = c.tensorboard = False
      return c
    ''')


@pytest.fixture
def user_code(tmp_path, monkeypatch):
  """``write(ops, data)``: the helper module and a config file importing it, in ``tmp_path``
  (path of the config file); what they register is gone afterwards."""
  monkeypatch.chdir(REPO)
  monkeypatch.syspath_prepend(REPO)

  def write(ops: bool = False, data: str = 'pass') -> str:
    (tmp_path / f'{HELPER}.py').write_text(f'OPS = {ops}\n' + HELPER_CODE)
    path = tmp_path / 'lin_config.py'
    path.write_text(CONFIG_CODE.format(helper=HELPER, data=data, family=FAMILY))
    return str(path)
  yield write
  models.unregister(FAMILY)
  from imgcls_jax.data.pp import registry
  registry._OPS.pop(OP, None)
  sys.modules.pop(HELPER, None)
  sys.path[:] = [p for p in sys.path if p != str(tmp_path)]


def _a_new_process(ops: bool = False) -> None:
  """What a new process knows: nothing the helper registered, and the helper not imported."""
  models.unregister(FAMILY)
  if ops:
    from imgcls_jax.data.pp import registry
    registry._OPS.pop(OP)
  sys.modules.pop(HELPER)


@pytest.mark.parametrize('spaced', [False, True])   # --config=PATH, or absl's --config PATH
def test_a_family_from_a_module_the_config_imports_names_that_config(user_code, tmp_path, spaced):
  config = user_code()
  workdir = str(tmp_path / 'run')
  given = ['--config', config] if spaced else [f'--config={config}']
  assert main.run(['main', *given, f'--workdir={workdir}']) == 0
  _a_new_process()
  helper = str(tmp_path / f'{HELPER}.py')
  with pytest.raises(UserError) as e:
    inference.load(workdir, None, overrides={})
  assert str(e.value) == (
      f"Model '{FAMILY}' of this run is a family registered by your own code ({helper}, imported "
      f'by the --config file {config} the run was trained with), not one of imgcls_jax.models; '
      f'pass --config={config}, which registers it.')
  assert FAMILY not in models.names()            # loading the run ran none of the user's code
  main.parse(['main', '--mode=predict', f'--config={config}', f'--workdir={workdir}'])  # the fix
  assert inference.load(workdir, None, overrides={}).run.model.name == FAMILY


def test_an_op_from_a_module_the_config_imports_names_that_config(user_code, tmp_path, tfds_dir):
  data = (f"c = default.tfds_digits(c); c.data.data_dir = {tfds_dir!r}; "
          f"c.data.eval_preprocess = {OP!r}")
  config = user_code(ops=True, data=data)
  workdir = str(tmp_path / 'run')
  assert main.run(['main', f'--config={config}', f'--workdir={workdir}']) == 0
  _a_new_process(ops=True)
  models.register(FAMILY, lambda **kw: None)      # the family known: the op is what is missing
  with pytest.raises(UserError) as e:
    inference.load(workdir, None, overrides={})
  assert str(e.value) == (
      f"Preprocessing op '{OP}' of this run is an op registered by your own code "
      f'({tmp_path / HELPER}.py, imported by the --config file {config} the run was trained '
      f'with), not one of the ops of imgcls_jax/data/pp; pass --config={config}, which '
      'registers it.')
  models.unregister(FAMILY)
  main.parse(['main', '--mode=predict', f'--config={config}', f'--workdir={workdir}'])  # the fix
  trained = inference.load(workdir, None, overrides={})
  assert inference.prepare(trained, _png()).shape == (8, 8, 1)   # through the user's op


def _png() -> bytes:
  import io

  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(np.full((8, 8), 7, np.uint8)).save(buffer, format='PNG')
  return buffer.getvalue()


def test_run_honours_its_argv_and_keeps_nothing_of_an_earlier_call(tmp_path, monkeypatch):
  """``--config.*`` overrides come from the argv given (sys.argv is left as it was), and a second
  call neither keeps the first one's --mode nor refuses its override flags as defined twice."""
  monkeypatch.chdir(REPO)
  monkeypatch.setattr(sys, 'argv', ['pytest', '-q'])
  flags = ['--config.progress_bar=False', '--config.tensorboard=False']
  first, second = str(tmp_path / 'first'), str(tmp_path / 'second')
  assert main.run(['main', '--config=configs/default.py', f'--workdir={first}',
                   '--config.num_train_steps=2', *flags]) == 0
  assert sys.argv == ['pytest', '-q']
  assert main.run(['main', '--mode=predict', f'--workdir={first}']) == 2   # (no inputs given)
  assert main.run(['main', '--config=configs/default.py', f'--workdir={second}',
                   '--config.num_train_steps=3', *flags]) == 0            # trains: no --mode
  assert sorted(os.listdir(os.path.join(first, 'checkpoints'))) == ['2']
  assert sorted(os.listdir(os.path.join(second, 'checkpoints'))) == ['3']


def test_a_family_opts_in_to_patch_whitening_from_its_own_registration():
  """The family's ``models.FirstConv`` names the kernel whitening sets and the stem before it;
  a family without one is refused, naming those that have one."""
  from configs import default

  def halve(x_NxHxWxC, model):
    return x_NxHxWxC[:, ::2, ::2]
  models.register(FAMILY, lambda **kw: None,
                  first_conv=models.FirstConv('stem_conv.kernel', halve))
  try:
    c = default.get_config()
    c.model = {'name': FAMILY}
    c.data.mean, c.data.std = (0.5,), (0.25,)
    c.init.patch_whitening = c.init.freeze_whitening = True
    assert whitening.frozen_names(c) == frozenset({'stem_conv.kernel'})
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    want = ((images / 255.0 - 0.5) / 0.25)[:, ::2, ::2]
    np.testing.assert_array_equal(whitening.conv_inputs(images, c), want)
    c.model = {'name': 'resnet18'}
    with pytest.raises(UserError, match=rf"the model families cnn, fast_cnn, {FAMILY}, not "
                                        "'resnet18'; set it to False"):
      whitening.frozen_names(c)
  finally:
    models.unregister(FAMILY)
