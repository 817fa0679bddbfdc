"""Multi-process runs: the data path, jax.distributed start-up, and 2 processes == 1 process.

The end-to-end test starts 2 real processes (CPU, 2 fake devices each, joined by jax.distributed
over gloo) through ``launch/local.sh`` and compares their checkpoint with a single-process run on
4 devices at the same global batch.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from imgcls_jax import checkpoint, distributed, metrics, train
from imgcls_jax import state as state_lib
from imgcls_jax.data import pipeline
from imgcls_jax.errors import UserError
from tests.conftest import REPO, subprocess_env

TOLERANCE = 1e-5  # max |difference| of any parameter / BN statistic / optimizer-state entry


def _global_batches(data: ml_collections.ConfigDict, global_batch: int, processes: int,
                    start_step: int, steps: int) -> list[dict[str, np.ndarray]]:
  """The global batches that ``processes`` processes build, concatenated in process order."""
  streams = []
  for p in range(processes):
    ds, per_epoch = pipeline.train_dataset(data, seed=3, local_batch_size=global_batch // processes,
                                           start_step=start_step, process_index=p,
                                           process_count=processes)
    streams.append([b for _, b in zip(range(steps), ds.as_numpy_iterator())])
  return [{k: np.concatenate([s[i][k] for s in streams]) for k in ('image', 'label')}
          for i in range(steps)]


@pytest.mark.parametrize('read_shards, processes', [(1, 2), (2, 2), (4, 2), (2, 4), (1, 4)])
def test_processes_build_slices_of_the_same_global_batches(digits_config, read_shards, processes):
  """Whatever the process count, the global batch sequence is the single-process one."""
  digits_config.data.read_shards = read_shards
  start, steps = 19, 4  # 1347 // 64 = 21 steps per epoch: crosses an epoch boundary
  reference = _global_batches(digits_config.data, 64, 1, start, steps)
  for got, want in zip(_global_batches(digits_config.data, 64, processes, start, steps),
                       reference):
    np.testing.assert_array_equal(got['label'], want['label'])
    np.testing.assert_array_equal(got['image'], want['image'])
  per_process = pipeline.examples_per_process(digits_config.data, 'train', 0, processes)
  assert per_process // (64 // processes) == (1347 // read_shards * read_shards) // 64


def test_read_shards_must_fit_the_batch_and_the_process_count(digits_config):
  digits_config.data.read_shards = 3
  with pytest.raises(UserError, match='read_shards=3 must divide the global batch'):
    pipeline.train_dataset(digits_config.data, seed=0, local_batch_size=32, process_count=2)
  digits_config.data.read_shards = 0
  with pytest.raises(UserError, match='read_shards=0 must be >= 1'):
    pipeline.train_dataset(digits_config.data, seed=0, local_batch_size=32)


def test_device_ids_parse():
  assert distributed.parse_device_ids('') is None
  assert distributed.parse_device_ids('0, 2,3') == [0, 2, 3]
  with pytest.raises(UserError, match="local_device_ids='0,x'"):
    distributed.parse_device_ids('0,x')
  with pytest.raises(UserError, match='distinct'):
    distributed.parse_device_ids('1,1')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _main(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
  env = subprocess_env(1)
  for k in [k for k in env if k.startswith(('SLURM_', 'OMPI_', 'JAX_COORDINATOR'))]:
    del env[k]  # no cluster environment may leak into these tests
  return subprocess.run([sys.executable, '-m', 'imgcls_jax.main', '--config=configs/default.py',
                         *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.parametrize('flags, message', [
    ([], 'no cluster environment .* was detected; set config.distributed.coordinator_address'),
    (['--config.distributed.num_processes=2', '--config.distributed.process_id=2'],
     'process_id=2 must be smaller than config.distributed.num_processes=2'),
    (['--config.distributed.coordinator_address=localhost'], "must be 'host:port'"),
    (['--config.distributed.coordinator_address=127.0.0.1:{port}',
      '--config.distributed.num_processes=2', '--config.distributed.process_id=1',
      '--config.distributed.initialization_timeout=1'], 'No coordinator answers at 127.0.0.1:'),
])
def test_distributed_start_up_errors_are_one_line(tmp_path, flags, message):
  flags = [f.format(port=_free_port()) for f in flags]
  r = _main([f'--workdir={tmp_path}', '--config.distributed.enabled=True', *flags])
  assert r.returncode == 2, r.stderr[-2000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and __import__('re').search(message, errors[0]), r.stderr[-2000:]


def _overrides(config: ml_collections.ConfigDict) -> list[str]:
  """``--config.key=value`` flags that turn configs/default.py into ``config``."""
  sys.path.insert(0, REPO)
  from configs import default
  base = default.get_config()
  flags = []

  def walk(node, ref, prefix):
    for key in node.keys():
      value, ref_value = node[key], ref.get(key) if ref is not None else None
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, ref_value, f'{prefix}{key}.')
      elif value != ref_value and value is not None:
        flags.append(f'--config.{prefix}{key}={value!r}' if isinstance(value, tuple) else
                     f'--config.{prefix}{key}={value}')
  walk(config, base, '')
  return flags


def _restore(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
  s = train.setup(config)
  target, _ = state_lib.abstract_state(s.model_fn, s.tx, config.seed, s.mesh)
  with checkpoint.Checkpointer(workdir) as ckpt:
    state, _ = ckpt.restore(target)
  return jax.device_get(state)


def _max_diff(a: state_lib.TrainState, b: state_lib.TrainState) -> float:
  pairs = zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state)),
              jax.tree.leaves((b.params, b.batch_stats, b.opt_state)))
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(digits_config,
                                                                          tmp_path):
  steps, more = 12, 4
  digits_config.num_train_steps = steps
  digits_config.log_every_steps = 4
  digits_config.mesh.num_devices = 4  # 8 fake devices in this process: use 4, as 2 x 2 do

  single = str(tmp_path / 'single')
  train.train_and_evaluate(digits_config, single)  # also prepares the dataset for the children

  # The 2-process run also shards parameters and optimizer state over its 4 devices (FSDP, where
  # it matters: the state then spans processes); the maths, and so the result, are the same.
  multi = str(tmp_path / 'multi')
  flags = [f for f in _overrides(digits_config) if not f.startswith('--config.mesh.num_devices')]
  flags += ['--config.mesh.param_sharding=fsdp', '--config.mesh.fsdp_min_size=256']
  cmd = ['bash', os.path.join(REPO, 'launch', 'local.sh'), '-n', '2', '--cpu-devices', '2',
         '--port', str(_free_port()), '--timeout', '400', '--python', sys.executable, '--',
         '--config=configs/default.py', *flags, f'--workdir={multi}']
  env = subprocess_env()
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=450)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
  assert '[p0] ' in r.stdout and '[p1] ' in r.stdout
  assert 'Process 1 of 2: 2 local devices, 4 in all' in r.stdout
  assert 'fsdp placement over 4 devices' in r.stdout

  # Only process 0 wrote metrics: each (step, split) record appears once.
  records = metrics.read_jsonl(os.path.join(multi, 'metrics.jsonl'))
  keys = [(rec['step'], rec['split']) for rec in records]
  assert len(keys) == len(set(keys)) and (steps, 'eval') in keys

  a, b = _restore(digits_config, single), _restore(digits_config, multi)
  assert int(a.step) == int(b.step) == steps
  diff = _max_diff(a, b)
  s = train.setup(digits_config)
  init = jax.device_get(state_lib.create(s.model_fn, s.tx, digits_config.seed, s.mesh)[0])
  moved = _max_diff(a, init)
  print(f'2 processes x 2 devices (fsdp) vs 1 process x 4 devices after {steps} steps: max |diff| = '
        f'{diff:.2e} (tolerance {TOLERANCE:.0e}; the state moved up to {moved:.2e} from init)')
  assert moved > 100 * TOLERANCE
  assert diff <= TOLERANCE

  # The 2-process (FSDP) checkpoint resumes in one process (replicated) and continues like the
  # 1-process run.
  digits_config.num_train_steps = steps + more
  train.train_and_evaluate(digits_config, multi)
  train.train_and_evaluate(digits_config, single)
  with checkpoint.Checkpointer(multi) as ckpt:
    assert ckpt.all_steps() == [steps, steps + more]
  resumed_train_steps = [rec['step'] for rec in metrics.read_jsonl(
      os.path.join(multi, 'metrics.jsonl'))[len(records):] if rec['split'] == 'train']
  assert resumed_train_steps and min(resumed_train_steps) > steps  # resumed, not restarted
  diff2 = _max_diff(_restore(digits_config, single), _restore(digits_config, multi))
  print(f'after resuming both in one process to step {steps + more}: max |diff| = {diff2:.2e}')
  assert diff2 <= TOLERANCE
