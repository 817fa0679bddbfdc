"""One training per run directory (imgcls_jax/run_lock.py): a second one on a --workdir being
trained is refused in one line before it writes anything (two mixed their checkpoints and
metrics.jsonl silently, the last writer's model winning); the lock dies with its process."""
import json
import os
import subprocess
import sys
import time

import pytest

from imgcls_jax import run_lock, train
from imgcls_jax.errors import UserError
from tests.conftest import REPO, subprocess_env


def test_a_second_training_of_a_run_being_trained_is_refused(digits_config, tmp_path):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  with run_lock.held(workdir):   # as the first training holds it
    with pytest.raises(UserError, match=r'^--workdir=.* is being trained by another process \(pid '
                       rf'{os.getpid()} on .*holding {workdir}/.train.lock\); .*give a new '
                       r'--workdir.$'):
      train.train_and_evaluate(digits_config, workdir)
    assert not os.path.exists(os.path.join(workdir, 'checkpoints'))   # nothing written
  digits_config.num_train_steps = 2
  train.train_and_evaluate(digits_config, workdir)   # free again once it ended


def test_the_lock_of_a_killed_training_is_free(digits_config, tmp_path):
  """kill -9 leaves no stale lock to clean up: the kernel drops it with the process."""
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from imgcls_jax import run_lock\n'
       'with run_lock.held(sys.argv[1]):\n  print("held", flush=True); time.sleep(600)', workdir],
      stdout=subprocess.PIPE, text=True, cwd=REPO, env=subprocess_env(1))
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(UserError, match=f'pid {holder.pid} on '):
      with run_lock.held(workdir):
        pass
  finally:
    holder.kill()
    holder.wait()
  with run_lock.held(workdir):
    pass


@pytest.mark.slow
def test_two_trainings_started_together_leave_one_run(tmp_path):
  """The second command exits 2 with one line; the first's metrics.jsonl holds one record per
  evaluation (there were two different ones at each step) and its own final model."""
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 'imgcls_jax.main', '--config=configs/default.py',
         f'--workdir={workdir}', '--config.progress_bar=False', '--config.num_train_steps=300',
         '--config.eval_every_steps=100']
  first = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(1), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  lock = os.path.join(workdir, run_lock.LOCK_FILE)
  deadline = time.monotonic() + 120
  while not (os.path.exists(lock) and os.path.getsize(lock)) and time.monotonic() < deadline:
    time.sleep(0.05)
  second = subprocess.run(cmd + ['--config.optim.learning_rate=0.03'], cwd=REPO,
                          env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  out, _ = first.communicate(timeout=300)
  assert first.returncode == 0, out[-2000:]
  assert second.returncode == 2, second.stderr[-2000:]
  lines = second.stderr.strip().splitlines()
  assert len(lines) == 1 and 'is being trained by another process (pid ' in lines[0], lines
  evals = [r['step'] for r in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl')))
           if r['split'] == 'eval']
  assert evals == [100, 200, 300]
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['optim']['learning_rate'] != 0.03
