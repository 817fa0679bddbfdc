"""Rows masked out of a training batch (an image folder's undecodable file: a blank image stands
in, ``batch['mask']`` False) change nothing. The oracle is a step that never saw them: one train
step on N valid rows plus k masked blank rows gives the parameters, BatchNorm running statistics
and loss of one step on the N valid rows alone, with no mask, for both BatchNorm classes
(``layers.batch_norm``'s in cnn and resnet, fast_cnn's ``AffineBatchNorm`` after im2col
convolutions), with gradient accumulation and over 2 devices (data-parallel with FSDP); every other
family's BatchNorm is one of the two (``test_every_family_normalises_with_a_masked_batch_norm``).

The loss of a masked batch is ``sum(mask * loss_B) / sum(mask)`` (steps.train_step: it divides
by the number of valid rows, not the batch size), so the oracle's plain mean over its N rows is
the same number. Tolerance: only float32 summation order differs (a masked mean sums B rows with
zeros for the masked ones, the oracle N rows; 2 devices add an all-reduce), ~1e-7 relative per
reduction, hence rtol 1e-5 / atol 1e-6 after one step; counting the blank rows moves the
statistics by ~1e-2 and more (checked in ``test_a_fully_valid_mask_is_no_mask``).
"""
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from configs import default
from imgcls_jax import models, optim, sharding, steps
from imgcls_jax import state as state_lib
from imgcls_jax.models import fast_cnn, layers

SIZE, CLASSES = 16, 10
SMALL = {   # the constructor keywords of a small model of each kind of BatchNorm (no dropout)
    # one conv per stage: 2 BatchNorms (the second sees what the first made of the blank rows)
    'cnn': dict(widths=(8, 16), convs_per_stage=1, dropout=0.0),
    # one of resnet18's basic blocks: the stem's BatchNorm, then the block's two around its
    # residual connection (a fraction of the 8 blocks' compile time)
    'resnet18': dict(width=8, small_inputs=True, stage_sizes=(1,)),
    'fast_cnn': dict(widths=((8,), (16,)), image_size=SIZE, conv='im2col'),
}
TOL = dict(rtol=1e-5, atol=1e-6)


@functools.cache
def _train_step(name, devices=1, placement='replicated', accumulation=1):
  """(initial state, the jitted ``steps.train_step``) as run.py builds it (no donation: every
  batch starts from the same state, so the tests of one model share it and its compiled
  programs)."""
  cfg = default.get_config()
  mesh = sharding.make_mesh(devices)
  lr = optim.schedule(cfg.optim, batch_size=16, total_steps=10, warmup_steps=0)
  tx = optim.build(cfg.optim, lr)
  model_fn = functools.partial(models.get, name, num_classes=CLASSES, in_channels=3, **SMALL[name])
  state, shardings = state_lib.create(model_fn, tx, 0, mesh,
                                      sharding.ParamSharding(mode=placement, min_size=0))
  scfg = steps.StepConfig(num_classes=CLASSES, accumulation=accumulation)
  train = jax.jit(functools.partial(steps.train_step, model_def=state_lib.model_def(model_fn),
                                    tx=tx, lr_schedule=lr, cfg=scfg),
                  in_shardings=(shardings, sharding.batch_sharding(mesh)),
                  out_shardings=(shardings, sharding.replicated(mesh)))
  return state, train, sharding.batch_sharding(mesh)


def _batches(masked_rows, batch=16, accumulation=1, seed=0):
  """(a batch of ``batch`` rows whose ``masked_rows`` are blank and masked out, the oracle batch
  of its valid rows only). With accumulation k the oracle's micro-batch j (its rows j, k + j, ...)
  holds the valid rows of the masked batch's micro-batch j, in order."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
  labels = rng.integers(0, CLASSES, (batch,), dtype=np.int32)
  mask = np.ones(batch, bool)
  mask[list(masked_rows)] = False
  images[~mask], labels[~mask] = 0, 0         # the blank stand-in of an unreadable file
  micro = [np.flatnonzero(mask[j::accumulation]) * accumulation + j for j in range(accumulation)]
  assert len({len(m) for m in micro}) == 1, 'each micro-batch needs as many masked rows'
  valid = np.stack(micro, axis=1).reshape(-1)    # oracle row q * k + j = micro j's q-th valid row
  return ({'image': images, 'label': labels, 'mask': mask},
          {'image': images[valid], 'label': labels[valid]})


def _step(state, train, batch_sh, batch):
  new, metrics = train(state, sharding.put_batch(batch, batch_sh))
  return jax.device_get((new.params, new.batch_stats, metrics['loss']))


def _assert_same(got, want, **tol):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **(tol or TOL)), got, want)


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize('name,devices,placement,accumulation', [
    ('cnn', 1, 'replicated', 1),
    ('resnet18', 1, 'replicated', 1),
    ('fast_cnn', 1, 'replicated', 1),             # AffineBatchNorm after im2col convs
    ('cnn', 2, 'fsdp', 2),    # data-parallel (the batch split), state sharded, 2 micro-batches
    ('fast_cnn', 1, 'replicated', 2),
])
def test_masked_blank_rows_change_nothing(name, devices, placement, accumulation):
  state, train, batch_sh = _train_step(name, devices, placement, accumulation)
  masked, oracle = _batches((2, 3, 10, 11), accumulation=accumulation)
  params, stats, loss = _step(state, train, batch_sh, masked)
  want_params, want_stats, want_loss = _step(state, train, batch_sh, oracle)
  # the step does train: parameters and running statistics moved
  assert _max_diff(want_params, jax.device_get(state.params)) > 1e-4
  assert _max_diff(want_stats, jax.device_get(state.batch_stats)) > 1e-3
  _assert_same(params, want_params)
  _assert_same(stats, want_stats)
  np.testing.assert_allclose(loss, want_loss, **TOL)


@pytest.mark.parametrize('name', ['cnn', 'fast_cnn'])
def test_a_fully_valid_mask_is_no_mask(name):
  """Also the guard that the blank rows matter when counted: the same 16 rows with no mask are
  far from the oracle that leaves 4 of them out."""
  state, train, batch_sh = _train_step(name)
  masked, oracle = _batches((2, 3, 10, 11))
  full = dict(masked, mask=np.ones(16, bool))
  plain = {'image': masked['image'], 'label': masked['label']}
  got = _step(state, train, batch_sh, full)
  want = _step(state, train, batch_sh, plain)
  _assert_same(got, want)
  assert _max_diff(want[1], _step(state, train, batch_sh, oracle)[1]) > 1e-2


@pytest.mark.parametrize('name', ['cnn', 'fast_cnn'])
def test_a_batch_of_masked_rows_only_keeps_the_running_statistics(name):
  """No valid row at all (every file of a batch unreadable): the running statistics stay, the
  loss is 0 and everything stays finite (no 0 / 0 mean)."""
  state, train, batch_sh = _train_step(name)
  masked, _ = _batches(range(16))
  params, stats, loss = _step(state, train, batch_sh, masked)
  _assert_same(stats, jax.device_get(state.batch_stats), rtol=0, atol=0)
  assert loss == 0.0
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(params))


def test_the_masked_batch_norm_keeps_nnx_batch_norm_variables():
  """Same variables (names, types, shapes) as ``nnx.BatchNorm``: checkpoints and torch imports of
  models built before it still load."""
  ours = layers.batch_norm(8, dtype='float32', rngs=nnx.Rngs(0))
  theirs = nnx.BatchNorm(8, param_dtype='float32', rngs=nnx.Rngs(0))
  assert isinstance(ours, nnx.BatchNorm) and 'Norm' in type(ours).__name__

  def layout(m):
    return {path: (type(v).__name__, v[...].shape, v[...].dtype)
            for path, v in nnx.to_flat_state(nnx.state(m))}
  assert layout(ours) == layout(theirs)


# Tried first: fewer blocks to build than their family's first name in sorted order
# (convnext_base, mobilenet_v3_large, resnet101), the same layer classes (resnet50's bottleneck
# blocks too).
_PREFERRED = ('convnext_tiny', 'mobilenet_v3_small', 'resnet50')


def _one_name_per_family() -> list[str]:
  by_class = {}
  for name in sorted(models.names(), key=lambda n: n not in _PREFERRED):
    constructor = models.family(name).constructor
    by_class.setdefault(getattr(constructor, 'func', constructor), name)
  return sorted(by_class.values())


@pytest.mark.parametrize('name', _one_name_per_family())
def test_every_family_normalises_with_a_masked_batch_norm(name):
  """Every layer holding BatchNorm statistics in every registered family (one name each) is one
  of the two classes the tests above check (built abstractly: nothing allocated)."""
  model = nnx.eval_shape(lambda: models.get(name, num_classes=CLASSES, in_channels=3,
                                            rngs=nnx.Rngs(0)))
  holders = [m for _, m in nnx.iter_modules(model)
             if any(isinstance(v, nnx.BatchStat) for v in vars(m).values())]
  assert all(isinstance(m, (layers.MaskedBatchNorm, fast_cnn.AffineBatchNorm)) for m in holders)


def test_without_a_mask_the_batch_norm_traces_nnx_s_own_program():
  """Outside ``batch_rows`` (every batch of an arrays file or tfds dataset) the masked BatchNorm
  lowers to exactly ``nnx.BatchNorm``'s program, so those runs' speed cannot change; inside it,
  to another one (the masked statistics)."""
  import re

  import jax.numpy as jnp

  def lowered(norm, mask=None):
    graph, state = nnx.split(norm)
    def step(state, x):
      m = nnx.merge(graph, state)
      with layers.batch_rows(mask):
        y = m(x, use_running_average=False)
      return y, nnx.state(m)
    text = jax.jit(step).lower(state, jnp.ones((6, 3, 3, 5))).as_text()
    return re.sub(r'loc\([^)]*\)', '', text)
  plain = nnx.BatchNorm(5, momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
                        param_dtype=jnp.float32, rngs=nnx.Rngs(0))   # (batch_norm's settings)
  ours = layers.batch_norm(5, dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert type(ours) is not nnx.BatchNorm
  assert lowered(ours) == lowered(plain)
  assert lowered(ours, jnp.arange(6) < 4) != lowered(plain)
