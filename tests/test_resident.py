"""config.data.device_resident: the training split held on the devices trains on exactly the batches
of the streamed pipeline (the oracle: data/pipeline.py's tf.data stream), from any step."""
from __future__ import annotations

import numpy as np
import pytest

from imgcls_jax.errors import UserError


def _resident_config(c):
  c.data.train_preprocess = ''               # no host augmentation: what a resident split needs
  c.data.device_preprocess = 'translate(pad=1)'
  c.data.shuffle_buffer = 500                 # smaller than the split: the buffer's order counts
  return c


def _stream(c, start_step, steps):
  from imgcls_jax.data import pipeline
  ds, _ = pipeline.train_dataset(c.data, seed=c.seed, local_batch_size=c.batch_size,
                                 start_step=start_step)
  return [b for _, b in zip(range(steps), ds.as_numpy_iterator())]


@pytest.mark.parametrize('start_step', [0, 20])
def test_resident_batches_are_the_streamed_batches(digits_config, start_step):
  """Batches from the resident arrays (gathered on an 8-device mesh) equal the tf.data stream's,
  across epoch boundaries (the split is not a multiple of the batch: one batch straddles them)
  and from a resumed step."""
  from imgcls_jax import dispatch, sharding
  from imgcls_jax.data import resident
  c = _resident_config(digits_config)
  c.seed = 3
  arrays = resident.load(c.data)
  n = arrays.num_examples
  assert n % c.batch_size  # some batch holds the end of one epoch and the start of the next
  steps = 2 * (n // c.batch_size) + 3        # into a third epoch
  mesh = sharding.make_mesh(0)              # all 8 test devices
  order = resident.Order.of_stream(c.data, c.seed, n)
  got = list(dispatch.resident_batches(arrays.images, arrays.labels, order.indices,
                                       start_step=start_step, sizes=[1] * (steps - 3) + [3],
                                       batch_size=c.batch_size, mesh=mesh))
  want = _stream(c, start_step, steps)
  flat = [{k: np.asarray(v) for k, v in b.items()} for b in got[:-1]]
  flat += [{k: np.asarray(v)[i] for k, v in got[-1].items()} for i in range(3)]  # a stack of 3
  assert len(flat) == len(want) == steps
  for i, (a, b) in enumerate(zip(flat, want)):
    np.testing.assert_array_equal(a['image'], b['image'], err_msg=f'step {start_step + i}')
    np.testing.assert_array_equal(a['label'], b['label'], err_msg=f'step {start_step + i}')
  assert got[0]['image'].sharding.spec == sharding.batch_sharding(mesh).spec  # split over devices
  # Every example once per epoch: the first epoch's order is a permutation of the split.
  assert sorted(order.epoch(0).tolist()) == list(range(n))
  assert not np.array_equal(order.epoch(0), order.epoch(1))


def test_resident_training_equals_streamed_training(digits_config, tmp_path):
  """The same run with and without the resident split: identical metrics and weights, bit for bit."""
  from imgcls_jax import train, transfer
  results, weights = [], []
  for resident_on in (False, True):
    c = _resident_config(digits_config)
    c.num_train_steps = 30
    c.data.device_resident = resident_on
    workdir = str(tmp_path / f'run_{resident_on}')
    results.append(train.train_and_evaluate(c, workdir))
    weights.append(transfer.load_weights(workdir).params)
  assert results[0]['accuracy'] == results[1]['accuracy']
  assert results[0]['loss'] == results[1]['loss']
  assert weights[0].keys() == weights[1].keys()
  for name in weights[0]:
    np.testing.assert_array_equal(weights[0][name], weights[1][name], err_msg=name)


@pytest.mark.parametrize('change, message', [
    (dict(train_preprocess='pad_crop(pad=1)'), r"train_preprocess='pad_crop\(pad=1\)'\) cannot run"),
    (dict(read_shards=2), r'set config.data.read_shards=1'),
    (dict(balanced_sampling=True), r'set config.data.balanced_sampling=False'),
    (dict(device_resident_max_mb=0.01), r'takes [\d.]+ MB as arrays, more than '
                                        r'config.data.device_resident_max_mb=0.01'),
])
def test_settings_a_resident_split_cannot_honour_are_user_errors(digits_config, change, message):
  from imgcls_jax.data import resident
  c = _resident_config(digits_config)
  c.data.device_resident = True
  c.data.update(change)
  with pytest.raises(UserError, match=message):
    resident.load(c.data)


def test_more_than_one_process_is_a_user_error(digits_config):
  from imgcls_jax.data import resident
  with pytest.raises(UserError, match=r'runs in one process \(this run has 2\)'):
    resident.check(_resident_config(digits_config).data, process_count=2)
