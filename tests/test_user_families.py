"""A model family registered from the user's own code (``models.register`` in the --config file):
the run directory records where, and a mode given ``--workdir`` alone names that file and says to
pass it as --config (loading a run never runs code it names: a run directory may be someone
else's). Before, every mode of such a run without the same --config said "Unknown model
'user_mlp'; set config.model.name to one of ...", wrong advice for a trained run."""
from __future__ import annotations

import os
import textwrap

import pytest

from imgcls_jax import configlib, inference, models, train
from imgcls_jax.errors import UserError
from tests.conftest import small_digits_config

NAME = 'test_user_families_mlp'

USER_CONFIG = textwrap.dedent(f'''\
    """A user's config file: it defines and registers its own model family."""
    from flax import nnx

    from configs import default
    from imgcls_jax import models


    class UserMlp(nnx.Module):
      def __init__(self, *, num_classes, in_channels, rngs, dtype='float32', width=16):
        self.hidden = nnx.Linear(64 * in_channels, width, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

      def __call__(self, x, *, train=False):
        return self.head(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))))


    models.register({NAME!r}, UserMlp, replace=True)


    def get_config():
      c = default.get_config()
      c.model.name = {NAME!r}
      return c
    ''')


@pytest.fixture
def user_run(tmp_path, tfds_dir):
  """A run of the user's family, trained a few steps from the arrays digits (no TensorFlow)."""
  path = tmp_path / 'my_config.py'
  path.write_text(USER_CONFIG)
  configlib.load_config_file(str(path))          # what --config=my_config.py does: registers it
  c = small_digits_config(tfds_dir)
  c.data.name, c.data.train_preprocess, c.data.device_preprocess = 'arrays:sklearn_digits', '', ''
  c.model = {'name': NAME}
  c.num_train_steps = 2
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir)
  models.unregister(NAME)                        # a new process: --workdir alone, no --config
  yield workdir, str(path)
  models.unregister(NAME)


def test_workdir_alone_names_the_registering_file_and_runs_none_of_it(user_run):
  workdir, path = user_run
  with pytest.raises(UserError, match=rf"Model '{NAME}' of this run is a family registered by "
                                      rf'your own code \({path}\).*; pass --config={path}, which '
                                      'registers it'):
    inference.load(workdir, None, overrides={})
  assert NAME not in models.names()              # the file was not run
  configlib.load_config_file(path)               # what --config=my_config.py does
  trained = inference.load(workdir, None, overrides={})
  assert trained.run.model.name == NAME and trained.info.num_classes == 10


def test_a_removed_registering_file_is_named_with_restore(user_run):
  workdir, path = user_run
  os.remove(path)
  with pytest.raises(UserError, match=rf'pass --config={path} \(no longer there: restore it '
                                      r'first\)'):
    inference.load(workdir, None, overrides={})
