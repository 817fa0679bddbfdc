"""Fault tolerance end to end: kill / SIGTERM / damaged checkpoint / NaN / re-meshing / determinism.

Every run is the same tiny CNN on digits for 40 steps (checkpoints every 10, evaluations at 20 and
40; an epoch is 21 steps, so resumes cross an epoch boundary). ``reference`` is one uninterrupted
in-process run on 8 fake devices; the other runs are compared with it. Child processes run the real
command line (``python -m imgcls_jax.main``) and are killed with real signals.
"""
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from imgcls_jax import steps, train
from imgcls_jax.errors import UserError
from tests import fault_injection
from tests.conftest import REPO, subprocess_env
from tests.test_checkpoint import damage

pytestmark = pytest.mark.slow

TOTAL = 40
# The run under test, as config keys (in-process) and as --config.KEY=VALUE flags (child processes).
OVERRIDES = {
    'model.widths': (16, 32), 'batch_size': 64, 'eval_batch_size': 64, 'num_train_steps': TOTAL,
    'log_every_steps': 3, 'eval_every_steps': 20, 'eval_every_epochs': -1.0,
    'checkpoint_every_steps': 10, 'checkpoint_every_epochs': -1.0, 'keep_checkpoints': 10,
    'progress_bar': False, 'tensorboard': False,
    # A weight EMA rides along (state, checkpoints, evaluations): every exact-resume test below
    # covers it too.
    'ema.decay': 0.9,
}
# 8-device vs 1-device runs differ only in float summation order (BN statistics and gradient
# means over the global batch); measured max |difference| after 20 steps: ~4e-7.
RE_MESH_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def make_config(tfds_dir):
  sys.path.insert(0, REPO)
  from configs import default
  c = default.get_config()
  c.data.data_dir = tfds_dir
  for key, value in OVERRIDES.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def cli(workdir, tfds_dir):
  def fmt(v):
    return '(' + ','.join(map(str, v)) + ')' if isinstance(v, tuple) else str(v)
  return [f'--config={os.path.join(REPO, "configs", "default.py")}', f'--workdir={workdir}',
          f'--config.data.data_dir={tfds_dir}',
          *(f'--config.{k}={fmt(v)}' for k, v in OVERRIDES.items())]


def start(args, log_path, num_devices=8, code=None):
  """A child process running the command line (or ``python -c code``) with output to a file."""
  prog = ['-c', code] if code else ['-m', 'imgcls_jax.main']
  env = subprocess_env(num_devices)
  for k in [k for k in env if k.startswith(('SLURM_', 'OMPI_', 'JAX_COORDINATOR'))]:
    del env[k]  # no cluster environment may leak into these runs
  env['JAX_PLATFORMS'] = 'cpu'
  log = open(log_path, 'w')
  return subprocess.Popen([sys.executable, *prog, *args], cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT, text=True)


def finish(proc, log_path, timeout=300):
  proc.wait(timeout=timeout)
  with open(log_path) as f:
    return proc.returncode, f.read()


def train_steps_logged(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  from imgcls_jax import metrics
  return [r['step'] for r in metrics.read_jsonl(path) if r['split'] == 'train']


def wait_for_step(proc, workdir, log_path, step, checkpoint=None, timeout=300):
  """Polls until ``metrics.jsonl`` has a train record at ``step`` or later (and, when given, the
  async save of ``checkpoint`` has been committed)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    committed = checkpoint is None or checkpoint in checkpoint_steps(workdir)
    if max(train_steps_logged(workdir), default=0) >= step and committed:
      return
    if proc.poll() is not None:
      pytest.fail(f'the run ended (exit {proc.returncode}) before step {step}:\n'
                  + open(log_path).read()[-3000:])
    time.sleep(0.01)
  proc.kill()
  pytest.fail(f'no step {step} within {timeout} s')


def load_state(workdir, step):
  """The saved train state of ``step`` as numpy arrays (restored onto one device)."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as c:
    tree = c.metadata(path).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
    return jax.tree.map(np.asarray, c.restore(path, target))


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def metric_records(workdir):
  """Every ``metrics.jsonl`` record except wall-clock throughput."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [{k: v for k, v in r.items() if k != 'images_per_sec'} for r in records]


def checkpoint_steps(workdir):
  """Committed checkpoint steps (an async save in progress is still a temporary directory)."""
  path = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def copy_run(src, dest, up_to_step):
  """A copy of a run directory with only the checkpoints up to ``up_to_step``."""
  shutil.copytree(src, dest)
  for step in checkpoint_steps(dest):
    if step > up_to_step:
      shutil.rmtree(os.path.join(dest, 'checkpoints', str(step)))
  return str(dest)


@pytest.fixture(scope='module')
def reference(tfds_dir, tmp_path_factory):
  """An uninterrupted 40-step run on 8 fake devices (every checkpoint kept)."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  train.train_and_evaluate(make_config(tfds_dir), workdir)
  assert checkpoint_steps(workdir) == [10, 20, 30, 40]
  return workdir


def test_sigkill_then_the_same_command_ends_bitwise_equal(reference, tfds_dir, tmp_path):
  """Must-show 1: SIGKILL at an arbitrary step, rerun the same command: bitwise-equal parameters."""
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'killed.log')
  proc = start(cli(workdir, tfds_dir), log)
  wait_for_step(proc, workdir, log, 23, checkpoint=20)
  proc.send_signal(signal.SIGKILL)
  rc, _ = finish(proc, log)
  assert rc == -signal.SIGKILL
  assert TOTAL not in checkpoint_steps(workdir)  # it really died mid-run

  log2 = str(tmp_path / 'rerun.log')
  rc, out = finish(start(cli(workdir, tfds_dir), log2), log2)
  assert rc == 0, out[-3000:]
  resumed = re.search(r'Resuming from step (\d+)\.', out)  # the newest committed async save
  assert resumed and int(resumed[1]) in (20, 30), out[-3000:]
  final = load_state(workdir, TOTAL)
  assert set(final['ema']) == {'params', 'batch_stats'}  # the EMA is resumed bit for bit too
  assert_bitwise_equal(final, load_state(reference, TOTAL))
  assert metric_records(workdir) == metric_records(reference)  # records after the resume redone


def test_sigterm_saves_exits_0_and_resume_continues(reference, tfds_dir, tmp_path):
  """Must-show 2: SIGTERM -> exit 0 and a checkpoint at the interrupted step; resume continues."""
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'run.log')
  proc = start(cli(workdir, tfds_dir), log)
  wait_for_step(proc, workdir, log, 13)
  proc.send_signal(signal.SIGTERM)
  rc, out = finish(proc, log)
  assert rc == 0, out[-3000:]
  m = re.search(r'Stopped by SIGTERM at step (\d+) of 40; checkpoint saved in (\S+)\. To resume, '
                r'rerun: python -m imgcls_jax.main --config=\S+ --workdir=(\S+)', out)
  assert m, out[-3000:]
  stopped = int(m[1])
  assert 13 <= stopped < TOTAL and m[3] == workdir
  assert checkpoint_steps(workdir)[-1] == stopped
  assert max(train_steps_logged(workdir)) <= stopped

  result = train.train_and_evaluate(make_config(tfds_dir), workdir)  # resume, in-process
  assert result['count'] == 450
  assert_bitwise_equal(load_state(workdir, TOTAL), load_state(reference, TOTAL))
  assert metric_records(workdir) == metric_records(reference)


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(reference, tmp_path,
                                                                      tfds_dir):
  """Multi-host: JAX's preemption service passes a SIGTERM on one process to all of them; every
  process stops at the same step, they save that checkpoint together and all exit 0."""
  del reference  # (prepared the dataset before the children start)
  workdir = str(tmp_path / 'run')
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
  procs, logs = [], [str(tmp_path / f'p{i}.log') for i in range(2)]
  for i in range(2):
    flags = ['--config.num_train_steps=200', '--config.distributed.enabled=True',
             f'--config.distributed.coordinator_address=127.0.0.1:{port}',
             '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}']
    procs.append(start(cli(workdir, tfds_dir) + flags, logs[i], num_devices=2))
  wait_for_step(procs[0], workdir, logs[0], 5)
  procs[1].send_signal(signal.SIGTERM)
  (rc0, out0), (rc1, out1) = [finish(p, log) for p, log in zip(procs, logs)]
  assert rc0 == 0 and rc1 == 0, out0[-2000:] + out1[-2000:]
  m = re.search(r'Stopped by SIGTERM \(preemption notice\) at step (\d+) of 200; checkpoint saved '
                r'in \S+\. To resume, rerun the same launch command on every host', out0)
  assert m, out0[-3000:]
  assert checkpoint_steps(workdir)[-1] == int(m[1]) >= 5


def test_damaged_newest_checkpoint_resumes_from_the_previous_one(reference, tfds_dir, tmp_path,
                                                                caplog):
  """Must-show 3: a truncated newest checkpoint -> resume from the previous one, and say so."""
  workdir = copy_run(reference, tmp_path / 'run', up_to_step=TOTAL)
  damage(os.path.join(workdir, 'checkpoints', str(TOTAL)))
  train.train_and_evaluate(make_config(tfds_dir), workdir)
  assert f'Checkpoint {TOTAL} in {workdir}/checkpoints is unreadable' in caplog.text
  assert 'resuming from the previous good checkpoint, step 30' in caplog.text
  assert os.path.isdir(os.path.join(workdir, 'corrupt_checkpoints', str(TOTAL)))
  assert_bitwise_equal(load_state(workdir, TOTAL), load_state(reference, TOTAL))


@pytest.mark.parametrize('key, value, message', [
    ('model.widths', (16, 48), r'^Cannot resume checkpoint 40 in \S+: it was written by a '
     r'different model or dataset \(model\.widths: \[16, 32\] in the checkpoint, \[16, 48\] '
     r'now\); resume it with the config that wrote it'),
    ('optim.grad_clip_norm', 1.0, r'^Cannot resume checkpoint 40 in \S+ with this config '
     r'\(optim\.grad_clip_norm: 0\.0 in the checkpoint, 1\.0 now\): its optimizer state has '
     r'another structure now; resume it with'),
])
def test_resuming_with_an_incompatible_config_fails_with_one_line(reference, tfds_dir, tmp_path,
                                                                   caplog, key, value, message):
  """... and nothing else: a change of the optimizer that is refused used to be warned of first
  as a 'changed config' the resumed run would follow."""
  workdir = copy_run(reference, tmp_path / 'run', up_to_step=TOTAL)
  saved_config = open(os.path.join(workdir, 'config.json')).read()
  config = make_config(tfds_dir)
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(UserError) as e, caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, workdir)
  assert '\n' not in str(e.value) and re.search(message, str(e.value)), str(e.value)
  assert 'with a changed config' not in caplog.text
  assert open(os.path.join(workdir, 'config.json')).read() == saved_config  # left as it was
  assert checkpoint_steps(workdir) == [10, 20, 30, 40]  # a mismatch is not damage


def test_nan_loss_exits_nonzero_and_keeps_the_last_finite_checkpoint(reference, tfds_dir,
                                                                     tmp_path):
  """Must-show 4 (command line): a NaN at step 26 -> exit 2, one clear line, latest stays 20."""
  workdir, log = copy_run(reference, tmp_path / 'run', up_to_step=20), str(tmp_path / 'run.log')
  code = 'from tests import fault_injection as f; f.main_with_nan(25)'
  rc, out = finish(start(cli(workdir, tfds_dir), log, code=code), log)
  assert rc == 2, out[-3000:]
  errors = [l for l in out.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'Traceback' not in out, out[-3000:]
  assert re.match(r'error: Training diverged: the loss is nan \(gradient norm \S+\) at step 26; '
                  r'the last good checkpoint is step 20 in \S+/checkpoints\. Lower '
                  r'config\.optim\.learning_rate', errors[0]), errors[0]
  assert checkpoint_steps(workdir) == [10, 20]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(load_state(workdir, 20)['params']))


def test_nan_weights_with_finite_loss_are_never_checkpointed(reference, tfds_dir, tmp_path,
                                                             monkeypatch):
  """Must-show 4 (the subtle case): the update at a checkpoint step makes the weights NaN while
  that step's loss (computed before the update) is finite: no checkpoint is written."""
  workdir = copy_run(reference, tmp_path / 'run', up_to_step=20)
  monkeypatch.setattr(steps, 'train_step', fault_injection.poisoned_train_step(29, loss=False))
  with pytest.raises(train.TrainingDiverged, match='train state holds NaN/Inf values at step 30; '
                     'the last good checkpoint is step 20') as e:
    train.train_and_evaluate(make_config(tfds_dir), workdir)
  assert isinstance(e.value, UserError)  # main prints it as one line and exits 2
  assert checkpoint_steps(workdir) == [10, 20]


def test_8_device_checkpoint_resumes_on_1_device_and_back(reference, tfds_dir, tmp_path):
  """Must-show 5: 8-device save -> 1-device resume (a child with one device) continues like the
  8-device run within RE_MESH_TOLERANCE; its checkpoint resumes on 8 devices again."""
  workdir, log = copy_run(reference, tmp_path / 'run', up_to_step=20), str(tmp_path / 'run.log')
  rc, out = finish(start(cli(workdir, tfds_dir), log, num_devices=1), log)
  assert rc == 0, out[-3000:]
  assert 'Resuming from step 20.' in out and '; 1 devices;' in out
  for step in (30, TOTAL):
    one, eight = load_state(workdir, step), load_state(reference, step)
    assert int(one['step']) == step
    np.testing.assert_array_equal(one['rng'], eight['rng'])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **RE_MESH_TOLERANCE), one, eight)

  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(TOTAL)))  # back: 1-device 30 -> 8 devices
  train.train_and_evaluate(make_config(tfds_dir), workdir)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **RE_MESH_TOLERANCE),
               load_state(workdir, TOTAL), load_state(reference, TOTAL))


def test_same_seed_gives_identical_metrics(reference, tfds_dir, tmp_path):
  """Must-show 6: a second run with the same seed and config writes identical metrics.jsonl values
  (every key but wall-clock images_per_sec) and bitwise-identical parameters."""
  train.train_and_evaluate(make_config(tfds_dir), str(tmp_path))
  records = metric_records(tmp_path)
  assert len([r for r in records if r['split'] == 'eval']) == 2 and len(records) > 15
  assert records == metric_records(reference)
  assert_bitwise_equal(load_state(tmp_path, TOTAL), load_state(reference, TOTAL))
