"""``--help`` of the commands that parse their own flags prints their use and flags and exits 0
(the data preparers said "Unknown command line flag 'help'"; time_to_accuracy passed --help on to
the training command it times)."""
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env


@pytest.mark.parametrize('command, first_line, own_flags', [
    (['-m', 'imgcls_jax.data.prepare_collage'], 'Builds "Fashion-MNIST collage"',
     ('--out:', '--train:', '--validation:', '--test:', '--seed:', '--data_dir:')),
    (['-m', 'imgcls_jax.data.prepare_fashion_mnist'],
     'Prepares the standard tfds ``fashion_mnist`` dataset offline',
     ('--data_dir:', '--source_dir:', '--manual_dir:')),
    (['benchmarks/time_to_accuracy.py'], 'Wall-clock time to a test accuracy',
     ('--target:', '--budget:', '--[no]json:')),
])
@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_prints_the_commands_use_and_its_own_flags(command, first_line, own_flags, flag):
  proc = subprocess.run([sys.executable, *command, flag], cwd=REPO, env=subprocess_env(1),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert proc.stdout.startswith(first_line), proc.stdout[:500]
  assert all(f in proc.stdout for f in own_flags), proc.stdout
  assert 'imgcls_jax.main' not in proc.stdout.split('Flags:')[1]   # not the training command's


def test_time_to_accuracy_passes_help_after_the_separator_to_the_training_command():
  """After ``--`` it is the training command's flag: its help, not this script's."""
  proc = subprocess.run([sys.executable, 'benchmarks/time_to_accuracy.py', '--', '--help'],
                        cwd=REPO, env=subprocess_env(1), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert '--config' in proc.stdout and '--target:' not in proc.stdout


def test_time_to_accuracy_refuses_an_unknown_flag_of_its_own_in_one_line():
  proc = subprocess.run([sys.executable, 'benchmarks/time_to_accuracy.py', '--targt=0.9', '--',
                         '--help'], cwd=REPO, env=subprocess_env(1), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2 and proc.stdout == '', proc.stdout[-2000:]
  assert proc.stderr == ('error: time_to_accuracy.py has no flag --targt; its own are --budget, '
                         "--json, --target (the training command's go after --).\n"), proc.stderr


def test_the_training_commands_help_names_the_models_optimizers_schedules_and_device_ops():
  """A user choosing config.model.name / optim.name / optim.schedule / data.device_preprocess
  finds the choices in ``--help``: each table's names, every family the configs train."""
  from imgcls_jax import device_augment, models, optim
  proc = subprocess.run([sys.executable, '-m', 'imgcls_jax.main', '--help'], cwd=REPO,
                        env=subprocess_env(1), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.replace('\n  ', ' ').splitlines()   # (a wrapped line goes on indented)
  paragraphs = {p.split(' (')[0]: p.split(': ', 1)[1].rstrip('.').split(', ') for p in lines
                if p.startswith(('Models (', 'Optimizers (', 'Schedules (', 'Device ops ('))}
  assert paragraphs == {'Models': models.names(), 'Optimizers': list(optim.OPTIMIZERS),
                        'Schedules': list(optim.SCHEDULES), 'Device ops': list(device_augment.OPS)}
  import glob
  import re
  for path in glob.glob(os.path.join(REPO, 'configs', '*.py')):
    for name in re.findall(r"model\.name = '(\w+)'", open(path).read()):
      assert name in paragraphs['Models'], (path, name)
