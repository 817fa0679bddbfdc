"""Mesh and state placement: the FSDP rules per array shape, and FSDP == replicated in maths."""
from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from imgcls_jax import checkpoint, run, sharding, train
from imgcls_jax import state as state_lib
from imgcls_jax.data import pipeline
from imgcls_jax.errors import UserError


@pytest.mark.parametrize('shape, n, min_size, expected', [
    ((3, 3, 16, 32), 8, 0, P(None, None, None, 'data')),   # largest divisible dim: 32
    ((3, 3, 64, 32), 8, 0, P(None, None, 'data', None)),   # 64 > 32
    ((64, 64), 8, 0, P(None, 'data')),                     # tie: the last (output features)
    ((100, 10), 8, 0, P()),                                # nothing divides by 8
    ((100, 16), 8, 0, P(None, 'data')),                    # 100 is larger but does not divide
    ((32,), 8, 64, P()),                                   # small: stays replicated
    ((32,), 8, 32, P('data')),
    ((), 8, 0, P()),                                       # scalars (step, counts)
    ((256, 256), 1, 0, P()),                               # one device: nothing to split
])
def test_fsdp_rule_per_shape(shape, n, min_size, expected):
  assert sharding.fsdp_spec(shape, n, min_size) == expected


def test_param_sharding_from_config():
  mesh_cfg = ml_collections.ConfigDict({'num_devices': 0, 'param_sharding': 'fsdp',
                                        'fsdp_min_size': 100})
  assert sharding.ParamSharding.from_config(mesh_cfg) == sharding.ParamSharding('fsdp', 100)
  assert sharding.ParamSharding.from_config(
      ml_collections.ConfigDict({'num_devices': 0})).mode == 'replicated'
  mesh_cfg.param_sharding = 'zero3'
  with pytest.raises(UserError, match="param_sharding='zero3' is not one of replicated, fsdp"):
    sharding.ParamSharding.from_config(mesh_cfg)
  mesh_cfg.param_sharding, mesh_cfg.fsdp_min_size = 'fsdp', -1
  with pytest.raises(UserError, match='fsdp_min_size=-1'):
    sharding.ParamSharding.from_config(mesh_cfg)


def test_fsdp_shards_parameters_and_optimizer_state_alike(digits_config):
  digits_config.model.widths = (32, 64)
  s = run.setup(digits_config)
  rules = sharding.ParamSharding('fsdp', min_size=1024)
  target, shardings = state_lib.abstract_state(s.model_fn, s.tx, 0, s.mesh, rules)
  n = s.mesh.devices.size
  flat = {jax.tree_util.keystr(k): (a, sh) for k, a, sh in zip(
      *zip(*jax.tree_util.tree_flatten_with_path(target.params)[0]),
      jax.tree.leaves(shardings.params))}
  sharded = 0
  for name, (a, sh) in flat.items():
    split_dims = [i for i, ax in enumerate(sh.spec) if ax == sharding.DATA_AXIS]
    if a.size >= 1024 and any(d % n == 0 for d in a.shape):
      assert len(split_dims) == 1 and a.shape[split_dims[0]] % n == 0, name
      sharded += 1
    else:
      assert not split_dims, name
  assert sharded >= 3  # the 3x3 kernels of widths 32 and 64
  # SGD momentum has the parameters' shapes, so it gets the same placement.
  momentum = [x for x in jax.tree.leaves(shardings.opt_state)]
  specs = {str(sh.spec) for sh in jax.tree.leaves(shardings.params)}
  assert {str(sh.spec) for sh in momentum} <= specs | {str(P())}
  assert shardings.step.spec == P() and shardings.rng.spec == P()


@pytest.mark.parametrize('devices, min_size, said', [
    (1, 1024, 'there is one device'),
    (2, 10**9, 'no array has config.mesh.fsdp_min_size=1000000000 elements and a dimension '
               'divisible by the 2 devices'),
    (2, 1024, None)])
def test_fsdp_that_shards_nothing_says_so(digits_config, tmp_path, caplog, devices, min_size,
                                          said):
  """fsdp on one device, or with every array below fsdp_min_size, was silent: the state was
  replicated under an 'fsdp placement' log line."""
  import logging
  digits_config.mesh.num_devices = devices
  digits_config.mesh.param_sharding, digits_config.mesh.fsdp_min_size = 'fsdp', min_size
  s = run.setup(digits_config)
  with caplog.at_level(logging.WARNING), checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    _, shardings = run.restore_or_init(s, ckpt)
  sharded = any(any(sh.spec) for sh in jax.tree.leaves(shardings))
  got = [r.getMessage() for r in caplog.records if 'shards nothing' in r.getMessage()]
  assert sharded == (said is None)
  assert got == ([] if said is None else [
      "config.mesh.param_sharding='fsdp' shards nothing here, so every device holds the whole "
      f'state: {said}.'])


def _train_and_restore(config: ml_collections.ConfigDict,
                       workdir: str) -> tuple[state_lib.TrainState, int]:
  """Trains, then restores the way a resumed run does; (state on the host, max bytes/device)."""
  train.train_and_evaluate(config, workdir)
  s = run.setup(config)
  with checkpoint.Checkpointer(workdir) as ckpt:
    state, _ = run.restore_or_init(s, ckpt)  # placed by config.mesh.param_sharding
  return jax.device_get(state), max(sharding.bytes_per_device(state).values())


def _fsdp_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run of the two tests below (the second's programs are the first's: loaded from the
  compilation cache): a one-conv-per-stage CNN, 8 steps, fsdp splitting every array of >= 256
  elements (both kernels and the head: fsdp then holds ~1/7 of the replicated bytes)."""
  config.model.widths, config.model.convs_per_stage = (32, 64), 1
  config.num_train_steps = 8
  config.mesh.fsdp_min_size = 256
  return config


@pytest.mark.slow
def test_fsdp_trains_to_the_same_parameters_as_replicated(digits_config, tmp_path):
  """8 devices, 8 steps: FSDP and replicated agree within 1e-5 (float32 reduction order only)."""
  digits_config = _fsdp_config(digits_config)
  results = {}
  for mode in ('replicated', 'fsdp'):
    digits_config.mesh.param_sharding = mode
    results[mode] = _train_and_restore(digits_config, str(tmp_path / mode))
  (rep, rep_bytes), (fsdp, fsdp_bytes) = results['replicated'], results['fsdp']
  assert int(rep.step) == int(fsdp.step) == 8
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       (rep.params, rep.batch_stats, rep.opt_state),
                       (fsdp.params, fsdp.batch_stats, fsdp.opt_state))
  worst = max(jax.tree.leaves(diffs))
  s = run.setup(digits_config)
  init = jax.device_get(state_lib.create(s.model_fn, s.tx, digits_config.seed, s.mesh)[0])
  moved = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), rep.params, init.params)))
  print(f'after 8 steps: max |fsdp - replicated| = {worst:.2e} (params moved up to {moved:.2e}); '
        f'state bytes per device: replicated {rep_bytes:,}, fsdp {fsdp_bytes:,}')
  assert moved > 1e-2  # the comparison is not between two untrained states
  assert worst <= 1e-5
  assert fsdp_bytes < rep_bytes / 2  # the end-to-end run really placed the state sharded


def test_fsdp_state_holds_about_one_over_n_bytes_per_device(digits_config):
  """Measured on the state a jitted train step returns (the loop keeps it sharded)."""
  digits_config = _fsdp_config(digits_config)
  s = run.setup(digits_config)
  n = s.mesh.devices.size
  ds, _ = pipeline.train_dataset(digits_config.data, seed=0, local_batch_size=s.local_batch_size)
  batch = sharding.put_batch(next(ds.as_numpy_iterator()), sharding.batch_sharding(s.mesh))
  per_device = {}
  for rules in (sharding.ParamSharding('replicated'), sharding.ParamSharding('fsdp', 256)):
    state, shardings = state_lib.create(s.model_fn, s.tx, 0, s.mesh, rules)
    train_step = run.jit_train_step(s, shardings)
    state, _ = train_step(state, batch)
    counts = sharding.bytes_per_device(state)
    assert len(counts) == n
    assert sharding.planned_bytes_per_device(state, shardings) == max(counts.values())
    per_device[rules.mode] = max(counts.values())
  rep, fsdp = per_device['replicated'], per_device['fsdp']
  print(f'train state bytes per device on {n} devices: replicated {rep:,}, fsdp {fsdp:,} '
        f'(ratio {fsdp / rep:.3f}; 1/{n} = {1 / n:.3f})')
  assert fsdp <= 1.25 * rep / n
