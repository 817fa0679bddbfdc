"""Multi-process runs: the data path, jax.distributed start-up, and 2 processes == 1 process.

The end-to-end test starts 2 real processes (CPU, 2 fake devices each, joined by jax.distributed
over gloo) through ``launch/local.sh`` and compares their checkpoints with a single-process run on
4 devices at the same global batch: within float32 rounding after 1 and 2 steps, and within a
measured noise floor (the single-process run on 2 devices) after 6 steps and after resuming. The
2-process run's checkpoint is also evaluated (--mode=evaluate, with out-of-distribution images) in
2 processes and in this one: the same mistakes, label issues and OOD section. (The parts of the
OOD images each process reads: tests/test_multihost_ood.py.)
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import pytest

from imgcls_jax import checkpoint, distributed, metrics, run, train
from imgcls_jax import state as state_lib
from imgcls_jax.data import pipeline
from imgcls_jax.errors import UserError
from tests.conftest import REPO, main_run_each, small_digits_config, subprocess_env

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


@pytest.mark.parametrize('address', ['127.0.0.1:99999', '127.0.0.1:0', ':1234', '[]:1234'])
def test_coordinator_address_needs_a_host_and_a_port_in_range(address):
  d = ml_collections.ConfigDict({'coordinator_address': address, 'num_processes': 2,
                                 'process_id': 0})
  with pytest.raises(UserError, match=r"must be 'host:port' \(process 0's address and a free "
                     r'port, 1-65535\)'):
    distributed.initialize(d)


def test_a_negative_mesh_num_devices_is_refused():
  from imgcls_jax import sharding
  with pytest.raises(UserError, match=r'num_devices=-1 must be 0 \(all 8 devices\) or a positive'):
    sharding.make_mesh(-1)


def test_evaluate_and_predict_take_this_launchs_distributed_keys():
  """A run trained by one launch is evaluated by another: the coordinator, process id and count
  are where the work runs, not part of the model (as mesh.* are)."""
  from imgcls_jax import inference
  saved = {'model': {'name': 'cnn'}, 'mesh': {'num_devices': 0},
           'distributed': {'enabled': True, 'coordinator_address': '127.0.0.1:4000',
                           'num_processes': 2, 'process_id': 0}}
  run_config = inference.effective_config(saved, None, {
      'distributed.coordinator_address': '127.0.0.1:5000', 'distributed.process_id': 1,
      'distributed.num_processes': 4})
  assert run_config.distributed.to_dict() == {
      'enabled': True, 'coordinator_address': '127.0.0.1:5000', 'num_processes': 4,
      'process_id': 1}
  with pytest.raises(UserError, match='model.name=resnet18 conflicts with the trained run'):
    inference.effective_config(saved, None, {'model.name': 'resnet18'})


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _no_cluster_env() -> dict[str, str]:
  """A child's environment with one CPU device and no cluster variables (none may leak into
  these tests)."""
  env = subprocess_env(1)
  for k in [k for k in env if k.startswith(('SLURM_', 'OMPI_', 'JAX_COORDINATOR'))]:
    del env[k]
  return env


START_UP_ERRORS = [
    ([], 'no cluster environment .* was detected; set config.distributed.coordinator_address'),
    (['--config.distributed.num_processes=2', '--config.distributed.process_id=2'],
     'process_id=2 must be smaller than config.distributed.num_processes=2'),
    (['--config.distributed.coordinator_address=localhost'], "must be 'host:port'"),
    (['--config.distributed.coordinator_address=127.0.0.1:{port}',
      '--config.distributed.num_processes=2', '--config.distributed.process_id=1',
      '--config.distributed.initialization_timeout=1'], 'No coordinator answers at 127.0.0.1:'),
    (['--config.distributed.heartbeat_timeout=0'], 'heartbeat_timeout=0 must be at least 2'),
]

# One child process (no cluster environment) runs every case through main.run (conftest's
# main_run_each: it imports once, ~4 s a child otherwise); the case that waits for a coordinator
# runs last.
@pytest.fixture(scope='module')
def start_up_errors(tmp_path_factory) -> dict[str, tuple[int, str]]:
  """json.dumps(flags) -> (exit status, stderr) of ``main --config=configs/default.py
  --config.distributed.enabled=True FLAGS`` for each case of START_UP_ERRORS."""
  base = tmp_path_factory.mktemp('start_up_errors')
  cases = sorted(START_UP_ERRORS, key=lambda case: any('{port}' in f for f in case[0]))
  port = _free_port()
  argvs = [['--config=configs/default.py', f'--workdir={base / str(i)}',
            '--config.distributed.enabled=True', *(f.format(port=port) for f in flags)]
           for i, (flags, _) in enumerate(cases)]
  runs = main_run_each(argvs, base, env=_no_cluster_env(), timeout=120)
  return {json.dumps(flags): (r.returncode, r.stderr) for (flags, _), r in zip(cases, runs)}


@pytest.mark.parametrize('flags, message', START_UP_ERRORS)
def test_distributed_start_up_errors_are_one_line(start_up_errors, flags, message):
  status, err = start_up_errors[json.dumps(flags)]
  assert status == 2, err[-2000:]
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and __import__('re').search(message, errors[0]), err[-2000:]


def test_a_process_given_another_num_processes_than_process_0_refuses_to_start(tmp_path):
  """Process 1 says 3 processes, process 0 (the coordinator) 2: JAX joins them regardless; the
  odd one out ends with one sentence and status 2, before any work (process 0 then loses it)."""
  port, env = _free_port(), _no_cluster_env()

  def start(pid: int, n: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, '-m', 'imgcls_jax.main', '--config=configs/default.py',
         f'--workdir={tmp_path}', '--config.distributed.enabled=True',
         f'--config.distributed.coordinator_address=127.0.0.1:{port}',
         f'--config.distributed.num_processes={n}', f'--config.distributed.process_id={pid}',
         '--config.distributed.initialization_timeout=60'], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  coordinator = start(0, 2)
  try:
    odd = start(1, 3)
    _, err = odd.communicate(timeout=120)
  finally:
    coordinator.kill()
    coordinator.communicate()
  assert odd.returncode == 2, err[-2000:]
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert errors == ['error: config.distributed.num_processes=3 here, but the run that process 0 '
                    'coordinates has 2 processes; give every process the same num_processes.'], \
      err[-2000:]


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


def _setup(config: ml_collections.ConfigDict) -> run.Setup:
  """The library's set-up of a run from a config (the one place that names it)."""
  return run.setup(config)


def _ood_images(folder) -> str:
  """31 inputs: 30 noise and stripe images (none of the digits), then an unreadable file (sorted
  last: in process 1's part of 2)."""
  from PIL import Image
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  for i in range(30):
    if i % 2:
      pixels = rng.integers(0, 256, (16, 16, 3), np.uint8)
    else:
      pixels = np.zeros((16, 16, 3), np.uint8)
      pixels[:, i % 16::3] = 255
    Image.fromarray(pixels).save(os.path.join(folder, f'p{i:02d}.png'))
  with open(os.path.join(folder, 'z_broken.png'), 'wb') as f:
    f.write(b'not a png')
  return str(folder)


def _evaluate_in_one_and_in_two_processes(workdir: str, tmp_path) -> tuple[Any, Any]:
  """(output folder of --mode=evaluate in this process on 4 devices, of the same in 2 processes x
  2 devices), with out-of-distribution images at a global eval batch of 16 (8 per process: 2
  batches each, the second of process 1 short and holding the unreadable file)."""
  from imgcls_jax import evaluate
  one, two = tmp_path / 'eval_one', tmp_path / 'eval_two'
  flags = {'evaluate.ood_inputs': _ood_images(tmp_path / 'ood'), 'eval_batch_size': 16}
  evaluate.evaluate(None, workdir, {**flags, 'evaluate.output_dir': str(one),
                                    'mesh.num_devices': 4})   # (the run says 0, all: 8 here)
  cmd = ['bash', os.path.join(REPO, 'launch', 'local.sh'), '-n', '2', '--cpu-devices', '2',
         '--port', str(_free_port()), '--timeout', '300', '--python', sys.executable, '--',
         '--mode=evaluate', f'--workdir={workdir}', f'--config.evaluate.output_dir={two}',
         *(f'--config.{k}={v}' for k, v in flags.items())]
  r = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                     timeout=350)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
  return one, two


def _two_processes_evaluate_like_one(one, two) -> None:
  """--mode=evaluate in 2 processes (2 devices each) lists the same mistakes and label issues
  as in this process (4 devices): every process reads its half of the split, and the per-example
  records are gathered in process order (positions counted from the split's start)."""
  import csv
  # The same examples (by position in the split), labels and answers; the ranks are not
  # compared (another device layout may round two near-equal probabilities into another order).
  for name, exact in (('errors.csv', ('position', 'label', 'predicted')),
                      ('label_issues.csv', ('position', 'label', 'suggested'))):
    rows = [sorted(tuple(row[k] for k in exact) for row in csv.DictReader(open(d / name)))
            for d in (one, two)]
    assert rows[0] and rows[0] == rows[1], name
  # The pictured errors are the same images (each kept by the process that read it): at most
  # a caption's last digit may differ.
  from PIL import Image
  a, b = (np.asarray(Image.open(d / 'errors.png').convert('L'), np.int16) for d in (one, two))
  assert a.shape == b.shape and np.mean(a != b) < 0.005, np.mean(a != b)


def _restore(target: state_lib.TrainState, workdir: str, step: int) -> state_lib.TrainState:
  with checkpoint.Checkpointer(workdir) as ckpt:
    state, _ = ckpt.restore(target, step)
  return jax.device_get(state)


def _leaves(tree: Any) -> list[np.ndarray]:
  """A train state's parameters, BN statistics and optimizer state (its step counter included),
  or any other tree's leaves."""
  if isinstance(tree, state_lib.TrainState):
    tree = (tree.params, tree.batch_stats, tree.opt_state)
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _max_diff(a: Any, b: Any, *, floats_only: bool = False) -> float:
  """max |a - b| over the leaves (``floats_only``: skip integer ones, e.g. step counters)."""
  return max(float(np.max(np.abs(x - y))) for x, y in zip(_leaves(a), _leaves(b), strict=True)
             if not floats_only or np.issubdtype(x.dtype, np.floating))


def _moved(a: state_lib.TrainState, init: state_lib.TrainState) -> float:
  """How far training moved the float state from ``init`` (the counters say nothing of that)."""
  return _max_diff(a, init, floats_only=True)


def _max_abs(a: state_lib.TrainState) -> float:
  """The largest magnitude of any float entry (sets the size of one float32 rounding error)."""
  return max(float(np.max(np.abs(x))) for x in _leaves(a) if np.issubdtype(x.dtype, np.floating))


# Tolerances of the 2-process test. 2 processes x 2 devices reduce gradients and BN statistics in
# another order than 1 process x 4 devices, so the runs differ by rounding, not maths. After 1-2
# steps that is a few float32 ulps of the state's largest magnitude (measured 7e-8 to 1.2e-7 at
# magnitude ~1: about 1 ulp); EARLY_ULPS ulps still sit far below a real divergence (wrong rows, a
# wrong reduction, a broken update), which differs by the size of an update (checked > 100x).
# Training amplifies rounding differences (BatchNorm, momentum): by step 12 (the test ran 12 steps
# then) they reached 2.45e-3 on an AMD EPYC and stayed < 1e-5 on an Intel Xeon. So later steps are
# compared with a noise floor measured in the test: the same single-process run on 2 devices
# instead of 4 (same batches and maths, another reduction order: 32 examples per device instead of
# 16, then 2 partial sums instead of 4; the 2 processes change only the latter) vs the 4-device
# run. Both differences start as ~1-ulp perturbations (1.2e-7 and 8e-8 after 1 step) amplified by
# the same training dynamics, so they usually agree within an order of magnitude: bound =
# FLOOR_FACTOR x floor + ABS_FLOOR (ABS_FLOOR for machines where the floor is ~0). A last-bit
# difference can also flip a threshold (a ReLU or max-pool tie) in one run and not in the other, a
# jump the floor run need not share; such chaotic growth stays a small fraction of how far training
# moved the state, while a real divergence is caught at steps 1-2 above. So the later bound is at
# least CHAOS_FRACTION of the state's movement (1e-2 of ~1.0 after 12 steps; the 2.45e-3 seen on
# the AVX2 machine fits under it).
EARLY_ULPS = 64
FLOOR_FACTOR = 10.0
ABS_FLOOR = 1e-5
CHAOS_FRACTION = 1e-2


STEPS, MORE = 6, 2   # trained by 1 and by 2 processes; then resumed by 1 process


@pytest.fixture(scope='module')
def two_processes(tfds_dir, tmp_path_factory) -> dict[str, Any]:
  """The run of 1 process x 4 devices, its noise floor (1 x 2: see above) and the same run in 2
  processes x 2 devices, STEPS steps each; then the 2-process run's checkpoint evaluated in 1
  and in 2 processes (``_evaluate_in_one_and_in_two_processes``). The tests below share it."""
  tmp_path = tmp_path_factory.mktemp('two_processes')
  config = small_digits_config(tfds_dir)
  config.num_train_steps = STEPS
  config.log_every_steps = 4
  config.checkpoint_every_steps = 1  # steps 1 and 2 are compared too
  config.keep_checkpoints = STEPS + MORE
  config.mesh.num_devices = 4  # 8 fake devices in this process: use 4, as 2 x 2 do
  floor_config = config.copy_and_resolve_references()
  floor_config.mesh.num_devices = 2  # the noise floor: same run, another reduction order
  floor_config.checkpoint_every_steps = -1  # steps 6 and 8 (the ends of its runs) suffice

  single, multi, floor = (str(tmp_path / name) for name in ('single', 'multi', 'floor'))
  train.train_and_evaluate(config, single)  # also prepares the dataset for the children
  train.train_and_evaluate(floor_config, floor)

  # The 2-process run also shards parameters and optimizer state over its 4 devices (FSDP, where
  # it matters: the state then spans processes); the maths, and so the result, are the same.
  flags = [f for f in _overrides(config) if not f.startswith('--config.mesh.num_devices')]
  flags += ['--config.mesh.param_sharding=fsdp', '--config.mesh.fsdp_min_size=256']
  cmd = ['bash', os.path.join(REPO, 'launch', 'local.sh'), '-n', '2', '--cpu-devices', '2',
         '--port', str(_free_port()), '--timeout', '400', '--python', sys.executable, '--',
         '--config=configs/default.py', *flags, f'--workdir={multi}']
  r = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                     timeout=450)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
  records = metrics.read_jsonl(os.path.join(multi, 'metrics.jsonl'))
  eval_one, eval_two = _evaluate_in_one_and_in_two_processes(multi, tmp_path)
  return {'config': config, 'floor_config': floor_config, 'single': single, 'multi': multi,
          'floor': floor, 'stdout': r.stdout, 'records': records, 'eval_one': eval_one,
          'eval_two': eval_two}


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(two_processes):
  steps, more = STEPS, MORE
  config, floor_config = two_processes['config'], two_processes['floor_config']
  single, multi, floor = (two_processes[k] for k in ('single', 'multi', 'floor'))
  out = two_processes['stdout']
  assert '[p0] ' in out and '[p1] ' in out
  assert 'Process 1 of 2: 2 local devices, 4 in all' in out
  assert 'fsdp placement over 4 devices' in out

  # Only process 0 wrote metrics: each (step, split) record appears once.
  records = two_processes['records']
  keys = [(rec['step'], rec['split']) for rec in records]
  assert len(keys) == len(set(keys)) and (steps, 'eval') in keys

  s = _setup(config)
  target, _ = state_lib.abstract_state(s.model_fn, s.tx, config.seed, s.mesh)
  init = jax.device_get(state_lib.create(s.model_fn, s.tx, config.seed, s.mesh)[0])
  eps = float(np.finfo(np.float32).eps)
  label = '2 processes x 2 devices (fsdp) vs 1 process x 4 devices'

  # Steps 1 and 2: rounding only. Step 1 holds the first gradient (in the momentum) and BN
  # statistics; step 2 the first parameter update (the warmup's learning rate is 0 at step 0).
  for step in (1, 2):
    a, b = _restore(target, single, step), _restore(target, multi, step)
    assert int(a.step) == int(b.step) == step
    tolerance = EARLY_ULPS * eps * _max_abs(a)
    diff, moved = _max_diff(a, b), _moved(a, init)
    params_moved = _max_diff(a.params, init.params)
    print(f'{label} after {step} step(s): max |diff| = {diff:.2e} (tolerance {tolerance:.2e} = '
          f'{EARLY_ULPS} ulps of {_max_abs(a):.3g}); the state moved up to {moved:.2e} from '
          f'init, the parameters {params_moved:.2e}')
    assert moved > 100 * tolerance
    assert diff <= tolerance, f'{label} diverge at step {step}: {diff:.2e} > {tolerance:.2e}'
  assert params_moved > 100 * tolerance  # step 2 did update the parameters

  def compare(step: int) -> None:
    a, b, f = (_restore(target, w, step) for w in (single, multi, floor))
    assert int(a.step) == int(b.step) == int(f.step) == step
    diff, noise, moved = _max_diff(a, b), _max_diff(a, f), _moved(a, init)
    bound = max(FLOOR_FACTOR * noise + ABS_FLOOR, CHAOS_FRACTION * moved)
    print(f'{label} after {step} steps: max |diff| = {diff:.2e}; noise floor (1 process x 2 vs '
          f'x 4 devices) {noise:.2e}; bound max({FLOOR_FACTOR:g} x floor + {ABS_FLOOR:.0e}, '
          f'{CHAOS_FRACTION:g} x moved) = {bound:.2e}; the state moved up to {moved:.2e} '
          'from init')
    assert moved >= 10 * bound  # the bound still tells a diverged run from a matching one
    assert diff <= bound, f'{label} diverge at step {step}: {diff:.2e} > {bound:.2e}'

  compare(steps)
  _two_processes_evaluate_like_one(two_processes['eval_one'], two_processes['eval_two'])

  # The 2-process (FSDP) checkpoint resumes in one process (replicated) and continues like the
  # 1-process run (and the noise-floor run, continued the same way).
  config.num_train_steps = floor_config.num_train_steps = steps + more
  train.train_and_evaluate(config, multi)
  train.train_and_evaluate(config, single)
  train.train_and_evaluate(floor_config, floor)
  with checkpoint.Checkpointer(multi) as ckpt:
    assert ckpt.all_steps() == list(range(1, steps + more + 1))
  resumed_train_steps = [rec['step'] for rec in metrics.read_jsonl(
      os.path.join(multi, 'metrics.jsonl'))[len(records):] if rec['split'] == 'train']
  assert resumed_train_steps and min(resumed_train_steps) > steps  # resumed, not restarted
  compare(steps + more)


@pytest.mark.slow
def test_two_processes_report_the_ood_section_of_one(two_processes):
  """--mode=evaluate with config.evaluate.ood_inputs, 2 processes x 2 devices against 1 process x
  4 devices at the same global eval batch of 16 (8 per process: 2 batches each, the second of
  process 1 short and holding the unreadable file): each process scores its part of the images,
  the histogram is summed over the global batches and the per-image scores gathered in process
  order; the same per-device programs, so the same scores, and the same OOD figures."""
  one, two = two_processes['eval_one'], two_processes['eval_two']
  reports = [json.load(open(d / 'report.json')) for d in (one, two)]
  want, got = (rep.get('out_of_distribution') for rep in reports)
  assert want is not None and (want['inputs'], want['examples'], want['skipped']) == (31, 30, 1)
  assert [d['score'] for d in want['detectors']] == ['msp', 'logsumexp', 'max_logit']
  assert 0 < want['auroc'] < 1 and len({d['auroc'] for d in want['detectors']}) > 1
  assert reports[0]['num_examples'] == reports[1]['num_examples']   # the split, scored alike
  assert got == want
  md = [open(d / 'report.md').read() for d in (one, two)]
  section = [m[m.index('## Out-of-distribution images'):].split('\n## ')[0] for m in md]
  assert section[0] == section[1]
