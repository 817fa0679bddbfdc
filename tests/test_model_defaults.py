"""A run directory stays the whole model when a family's constructor default changes after
training: loading builds the network it was trained as, and a resume names the key to set."""

import logging

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from imgcls_jax import checkpoint_files, inference, models, run_directory, train
from imgcls_jax.errors import UserError

NAME = 'test_model_defaults_probe'


class Probe(nnx.Module):
  """conv -> ReLU -> global pool -> linear. ``width`` shapes the parameters; ``pool`` changes
  the outputs and no shape (a default that changes silently)."""

  def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs, dtype='float32',
               width: int = 8, pool: str = 'mean', strides: tuple = (1, 1)):
    self.conv = nnx.Conv(in_channels, width, (3, 3), strides=strides, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, rngs=rngs)
    self.pool = pool

  def __call__(self, x_BxHxWxC, *, train: bool = False):
    h = nnx.relu(self.conv(x_BxHxWxC))
    h = h.mean(axis=(1, 2)) if self.pool == 'mean' else h.max(axis=(1, 2))
    return self.head(h).astype(jnp.float32)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tfds_dir):
  """A run of the probe family at its defaults, with checkpoints at steps 6 and 12; the
  probabilities of its sample images (the oracle: the run loaded before any default changed)."""
  from tests.conftest import small_digits_config
  models.register(NAME, Probe)
  c = small_digits_config(tfds_dir)
  c.model = ml_collections.ConfigDict({'name': NAME})
  c.num_train_steps = 12
  c.checkpoint_every_steps = 6
  workdir = str(tmp_path_factory.mktemp('probe_run'))
  try:
    train.train_and_evaluate(c, workdir)
    images = run_directory.read_samples(workdir)['eval_images'][:16]
    want = inference.classifier(inference.load(workdir)).predict_arrays(images)['probabilities']
    yield c, workdir, images, want
  finally:
    models.unregister(NAME)


def _defaults(monkeypatch, **changes):
  """The probe's constructor defaults as if its code had changed since the run was trained."""
  monkeypatch.setattr(Probe.__init__, '__kwdefaults__',
                      {**Probe.__init__.__kwdefaults__, **changes})


def test_the_checkpoint_records_the_defaults_the_config_left_unset(trained):
  _, workdir, _, _ = trained
  meta = checkpoint_files.read_weights(workdir).meta
  # The constructor's own signature is the oracle; the common arguments are the caller's.
  assert meta['model_defaults'] == {'width': 8, 'pool': 'mean', 'strides': [1, 1]}


@pytest.mark.parametrize('changes', [{'width': 4}, {'pool': 'max'}, {'strides': (2, 2)},
                                     {'width': 16, 'pool': 'max'}])
def test_a_run_loads_as_trained_after_a_default_changed(trained, monkeypatch, caplog, changes):
  """A shape-changing default (``width``) failed to load; an output-only one (``pool``, the
  ``strides``: same parameters) loaded silently as another network."""
  _, workdir, images, want = trained
  _defaults(monkeypatch, **changes)
  with caplog.at_level(logging.INFO):
    loaded = inference.load(workdir)
    got = inference.classifier(loaded).predict_arrays(images)['probabilities']
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  for key in changes:
    assert f"Model '{NAME}': built with {key}=" in caplog.text
  assert loaded.run.model.to_dict() == {'name': NAME, **{
      k: {'width': 8, 'pool': 'mean', 'strides': (1, 1)}[k] for k in changes}}


@pytest.mark.parametrize('key, value', [('pool', 'max'), ('strides', (2, 2))])
def test_the_output_only_defaults_do_change_the_network(trained, key, value):
  """What makes the test above able to fail silently: built with today's (changed) default,
  the same weights give other probabilities."""
  _, workdir, images, want = trained
  loaded = inference.load(workdir)
  loaded.run.model[key] = value
  got = inference.classifier(loaded).predict_arrays(images)['probabilities']
  assert np.max(np.abs(got - want)) > 1e-3


def test_a_resume_after_a_default_changed_names_the_key_and_resumes_with_it(trained, monkeypatch,
                                                                            tmp_path):
  import shutil
  c, workdir, _, _ = trained
  run = str(tmp_path / 'run')
  shutil.copytree(workdir, run)
  shutil.rmtree(f'{run}/checkpoints/12')   # stopped at step 6
  _defaults(monkeypatch, pool='max', strides=(2, 2))
  config = ml_collections.ConfigDict(c.to_dict())
  with pytest.raises(UserError, match=(
      f"Cannot resume checkpoint 6 in .*: model '{NAME}' was trained with constructor defaults "
      r"that have changed since: pool=mean \(now max\); strides=\(1,1\) \(now \(2,2\)\); add "
      r"--config.model.pool=mean --config.model.strides=\(1,1\) to resume it as trained")):
    train.train_and_evaluate(config, run)
  # The named keys resume it; the run ends where the uninterrupted one ended.
  config.model.pool, config.model.strides = 'mean', (1, 1)
  train.train_and_evaluate(config, run)
  a = checkpoint_files.read_weights(workdir).params
  b = checkpoint_files.read_weights(run).params
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_a_resume_giving_another_value_than_the_trained_default_is_refused(trained, tmp_path):
  """The config comparison sees the recorded default: giving today's default (unchanged here)
  for a key the run left unset is no change; another value is."""
  import shutil
  c, workdir, _, _ = trained
  run = str(tmp_path / 'run')
  shutil.copytree(workdir, run)
  shutil.rmtree(f'{run}/checkpoints/12')
  config = ml_collections.ConfigDict(c.to_dict())
  config.model.pool = 'max'
  with pytest.raises(UserError, match=r"model.pool: \"mean\" in the checkpoint, \"max\" now"):
    train.train_and_evaluate(config, run)


def test_an_argument_the_family_no_longer_takes_is_warned_of(trained, caplog):
  class Narrower(Probe):
    def __init__(self, *, num_classes, in_channels, rngs, dtype='float32', width: int = 8,
                 pool: str = 'mean'):
      super().__init__(num_classes=num_classes, in_channels=in_channels, rngs=rngs, width=width,
                       pool=pool)
  _, workdir, images, want = trained
  models.register(NAME, Narrower, replace=True)
  try:
    with caplog.at_level(logging.WARNING):
      loaded = inference.load(workdir)
    assert (f"Model '{NAME}' no longer takes 'strides', which this run was trained with at its "
            'default then, (1,1)') in caplog.text
    got = inference.classifier(loaded).predict_arrays(images)['probabilities']
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  finally:
    models.register(NAME, Probe, replace=True)
