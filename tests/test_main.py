"""The command line: clear one-line errors, and the embedded default run end to end."""
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, main_run_each, subprocess_env


def _main(*args, num_devices=1, timeout=600):
  return subprocess.run([sys.executable, '-m', 'imgcls_jax.main', *args], cwd=REPO,
                        env=subprocess_env(num_devices), capture_output=True, text=True,
                        timeout=timeout)


def _one_error_line(proc):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  return lines[0]


BAD_CONFIGS = [
    ('--config.optim.learning_rat=0.1', r"Unknown config key 'optim.learning_rat'.*learning_rate"),
    ('--config.nonsense=1', r"Unknown config key 'nonsense'"),
    ('--config.batch_size=abc', (r'Bad config value --config.batch_size=abc: config.batch_size '
                                 r'must be a whole number \(its default is \d+\)')),
    ('--config.progress_bar=maybe', r'config.progress_bar must be True or False'),
    ('--config.optim.learning_rate=fast', r'config.optim.learning_rate must be a number'),
    ('--config.batch_size=-4', r'config.batch_size must be positive'),
    ("--config.data.mean=(0.5,0.5)", r'config.data.mean has 2 value\(s\) and config.data.std 1: '
                                     r'give each one value per image channel'),
    ('--config.model.name=resnet51', r"Unknown model 'resnet51'"),
    ('--config.model.name=resnet18', (r"config.model sets convs_per_stage, dropout, widths, "
                                      r"which model 'resnet18' does not take.*"
                                      r"--config.model=\"\{'name': 'resnet18'\}\"")),
    ('--config.data.name=no_such_set', r"'no_such_set' is not a tfds dataset"),
    ('--config.optim.name=adagrad', r"Unknown config.optim.name 'adagrad'"),
    ('--config.optim.momentum=2', r'config.optim.momentum=2.0 must be in \[0, 1\)'),
    ('--config.optim.b2=1', r'config.optim.b2=1.0 must be in \[0, 1\)'),
    ('--config.mesh.cpu_devices=-2', r'config.mesh.cpu_devices=-2 is not a sensible'),
    ('--config.data.device_preprocess=randaugment', r'device_preprocess.*not a device-side op'),
]

@pytest.fixture(scope='module')
def bad_config_runs(tmp_path_factory):
  """override -> the run of ``main --config=configs/default.py OVERRIDE`` (``main_run_each``)."""
  base = tmp_path_factory.mktemp('bad_configs')
  argvs = [['--config=configs/default.py', f'--workdir={base}/{i}', override,
            f'--config.data.data_dir={base}/{i}/tfds']
           for i, (override, _) in enumerate(BAD_CONFIGS)]
  return dict(zip([override for override, _ in BAD_CONFIGS], main_run_each(argvs, base)))


@pytest.mark.parametrize('override,pattern', BAD_CONFIGS)
def test_bad_config_fails_with_one_clear_line(bad_config_runs, override, pattern):
  proc = bad_config_runs[override]
  assert re.search(pattern, _one_error_line(proc)), proc.stderr[-1000:]


@pytest.mark.parametrize('group, key, value, pattern', [
    ('model', 'name', 'resnet51', "Unknown model 'resnet51'"),
    ('model', 'widthz', (8, 16), "widthz"),
    ('optim', 'name', 'adagrad', "Unknown config.optim.name 'adagrad'"),
    ('data', 'device_preprocess', 'randaugment', 'not a device-side op'),
    ('evaluate', 'calibration_bins', 0, r'calibration_bins=0 must be an integer >= 1'),
])
def test_names_in_the_config_are_checked_before_the_dataset_is_read(group, key, value, pattern):
  """A misspelt model, model argument, optimizer or device op is reported before the dataset is
  described (which imports TensorFlow: seconds): here the dataset does not even exist."""
  from configs import default
  from imgcls_jax import run
  from imgcls_jax.errors import UserError
  c = default.get_config()
  c.data.name = 'no_such_set'
  c[group][key] = value
  with pytest.raises(UserError, match=pattern):
    run.setup(c)


@pytest.mark.parametrize('group, pattern', [
    ({'name': 'efficientnet_b0', 'small_inputs': 'no'},   # 'no' would read as True
     r"config.model.small_inputs='no' must be True or False \(model 'efficientnet_b0's default "
     r'is False\)'),
    ({'name': 'cnn', 'convs_per_stage': 2.5}, r'convs_per_stage=2.5 must be a whole number'),
    ({'name': 'vit_ti16', 'patch_size': 4, 'pool': 1}, r'pool=1 must be a string'),
])
def test_a_model_group_given_whole_is_type_checked(group, pattern):
  """A group given whole (--config.model="{...}") bypasses the parser's type checks."""
  import ml_collections
  from configs import default
  from imgcls_jax import run
  from imgcls_jax.errors import UserError
  c = default.get_config()
  c.data.name = 'no_such_set'
  c.model = ml_collections.ConfigDict(group)
  with pytest.raises(UserError, match=pattern):
    run.setup(c)


def test_type_checks_leave_numbers_of_registered_families_and_numpy_scalars_alone():
  """A family of the user's may write ``dropout=0`` for a float: only its bools and strings
  are held to their defaults' types; numpy scalars (a sweep's grid) pass as numbers."""
  import numpy as np
  from imgcls_jax import models
  from imgcls_jax.errors import UserError

  def mine(*, num_classes, in_channels, dtype, rngs, dropout=0, fast=False):
    raise AssertionError('not built')
  models.register('mine_for_types', mine)
  try:
    models.check_types('mine_for_types', {'dropout': 0.1, 'fast': np.bool_(True)})
    with pytest.raises(UserError, match=r"config.model.fast='no' must be True or False"):
      models.check_types('mine_for_types', {'fast': 'no'})
  finally:
    models.unregister('mine_for_types')
  models.check_types('cnn', {'convs_per_stage': np.int64(2), 'dropout': np.float32(0.5)})


def test_a_model_family_is_switched_by_replacing_the_model_group(tmp_path, monkeypatch):
  """--config.model="{...}" replaces the config file's model group (no cnn keys are left)."""
  from imgcls_jax import main, models
  monkeypatch.chdir(REPO)
  group = "--config.model={'name': 'resnet18', 'small_inputs': True}"
  c, _, _ = main.parse(['imgcls_jax.main', '--config=configs/default.py',
                        f'--workdir={tmp_path}', group, '--config.model.width=8'])
  models.check_arguments(c.model.name, c.model.keys())
  assert str(sorted(c.model.items())) == (
      "[('name', 'resnet18'), ('small_inputs', True), ('width', 8)]")


@pytest.mark.parametrize('argv, folded', [
    # A constructor argument the config file does not set joins the file's model group, given
    # whole before the first model flag; a flag of a key the group holds stays a flag after it
    # (parsed as the file's type: 'false' is False).
    (['--config=configs/cifar10_resnet18.py', '--config.model.small_inputs=false',
      '--config.model.width=8', '--workdir=w'],
     ['--config=configs/cifar10_resnet18.py',
      "--config.model={'name': 'resnet18', 'small_inputs': True, 'width': 8}",
      '--config.model.small_inputs=false', '--workdir=w']),
    # After a group given whole, every model flag joins it (its keys' values as their types).
    (['--config=configs/default.py', "--config.model={'name': 'vit_ti16', 'patch_size': 4}",
      '--config.model.patch_size=8', '--config.model.pool=gap'],
     ['--config=configs/default.py', "--config.model={'name': 'vit_ti16', 'patch_size': 8, "
      "'pool': 'gap'}"]),
    (['--config=configs/default.py', "--config.model={'name': 'resnet18', 'small_inputs': True}",
      '--config.model.small_inputs=false'],
     ['--config=configs/default.py', "--config.model={'name': 'resnet18', 'small_inputs': False}"]),
    # Keys the file's group holds, alone: the flags as given.
    (['--config=configs/default.py', '--config.model.dropout=0.5'],
     ['--config=configs/default.py', '--config.model.dropout=0.5']),
    # A trained run's modes take the model from the run: nothing is folded.
    (['--mode=evaluate', '--config.model.patch_size=8'],
     ['--mode=evaluate', '--config.model.patch_size=8']),
])
def test_model_keys_the_config_file_does_not_set_join_its_model_group(argv, folded):
  from imgcls_jax import main
  assert main._fold_new_model_keys(['imgcls_jax.main', *argv]) == ['imgcls_jax.main', *folded]


def test_cpu_devices_split_the_host_for_data_parallel_training(tmp_path):
  """config.mesh.cpu_devices=3 gives a 3-device mesh on the CPU (it overrides XLA_FLAGS' 8).
  (A one-stage, one-conv CNN and one step: the mesh is the point, and it compiles in less time.)"""
  proc = _main('--config=configs/default.py', f'--workdir={tmp_path}/run',
               f'--config.data.data_dir={tmp_path}/tfds', '--config.mesh.cpu_devices=3',
               '--config.batch_size=48', '--config.eval_batch_size=48',
               '--config.model.widths=(8,)', '--config.model.convs_per_stage=1',
               '--config.num_train_steps=1', '--config.progress_bar=false', num_devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '3 devices; 1 steps' in proc.stderr, proc.stderr[-3000:]


def test_missing_config_file_and_workdir(tmp_path):
  line = _one_error_line(_main('--config=configs/nope.py', f'--workdir={tmp_path}'))
  assert 'config file' in line
  line = _one_error_line(_main('--config=configs/default.py'))
  assert 'Missing --workdir' in line
  # Overrides without a config file: absl said only "Unknown command line flag".
  line = _one_error_line(_main(f'--workdir={tmp_path}', '--config.num_train_steps=30'))
  assert line == ('error: --config.num_train_steps sets a key of a config file, and none was '
                  'given: add --config=configs/default.py (or another file in configs/) before it.')
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('body, detail', [
    ('def get_config(:\n', 'SyntaxError'),
    ('def get_config():\n  raise RuntimeError("no GPU here")\n', 'RuntimeError: no GPU here'),
    ('x = 1\n', "AttributeError: module '_imgcls_config' has no attribute 'get_config'"),
    (None, 'FileNotFoundError')])
def test_a_config_file_that_does_not_load_is_one_line_with_overrides(tmp_path, body, detail):
  """With a --config.X override, config_flags loads the file while parsing flags: its error was a
  traceback (a missing file, a syntax error, get_config() raising or missing)."""
  path = tmp_path / 'my_config.py'
  if body is not None:
    path.write_text(body)
  line = _one_error_line(_main(f'--config={path}', f'--workdir={tmp_path}/run',
                               '--config.batch_size=3'))
  assert line.startswith(f'error: Cannot load the config file {path} ({detail}'), line


def test_paths_that_cannot_be_created_are_one_line(tmp_path):
  """A --workdir that is a file, or a compilation cache under /proc: one sentence naming the
  path, not an os.makedirs traceback."""
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  cases = (([f'--workdir={a_file}'], str(a_file)),
           ([f'--workdir={tmp_path}/run', '--config.compilation_cache_dir=/proc/nope'],
            '/proc/nope'))
  runs = main_run_each([['--config=configs/default.py', *args, '--config.num_train_steps=1']
                     for args, _ in cases], tmp_path)
  for (_, path), proc in zip(cases, runs):
    line = _one_error_line(proc)
    assert line.startswith(f'error: Cannot use {path}'), line
    assert 'this user can create and write' in line
    # the flag or key that gave the path is named
    key = '--workdir' if path == str(a_file) else 'config.compilation_cache_dir'
    assert f'check {key}={path}:' in line, line


def test_help_prints_the_flags_and_modes_and_unknown_flags_point_to_it(tmp_path):
  """--help printed 'Unknown command line flag' (the flags live in their own FlagValues), while
  every flag error sent the user to --helpfull, which did not work either."""
  *helps, unknown = main_run_each([['--help'], ['-h'], ['--helpfull'], [
      '--config=configs/default.py', f'--workdir={tmp_path}', '--work_dir=x']], tmp_path)
  for proc in helps:
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '--workdir' in proc.stdout and '--mode' in proc.stdout
    assert 'predict' in proc.stdout and 'configs/default.py' in proc.stdout
  line = _one_error_line(unknown)
  assert line.endswith('(see --help).'), line


@pytest.mark.slow
def test_default_config_trains_digits_to_98_5_percent(tmp_path):
  """The README's main command: the embedded default run, as a user runs it (1 CPU device)."""
  workdir = tmp_path / 'run'
  proc = _main('--config=configs/default.py', f'--workdir={workdir}',
               f'--config.data.data_dir={tmp_path}/tfds', num_devices=None)
  assert proc.returncode == 0, proc.stderr[-3000:]
  m = re.search(r'Final eval on test \(450 examples\): top-1 ([\d.]+)%, top-5 ', proc.stdout)
  assert m, proc.stdout[-2000:]
  assert float(m.group(1)) >= 98.5
  assert f'Checkpoints: {workdir}/checkpoints' in proc.stdout
  assert os.path.exists(workdir / 'metrics.jsonl')


@pytest.mark.parametrize('mode, resumes', [('train', True), ('predict', False)])
def test_ctrl_c_that_stops_at_once_is_one_line_and_status_130(tmp_path, monkeypatch, capsys,
                                                               mode, resumes):
  """A second Ctrl-C in training (the first one saves and stops cleanly), or one in another mode,
  raises KeyboardInterrupt wherever the program is: one line, exit status 130, no traceback (it
  printed ~40 lines of one)."""
  from imgcls_jax import main, predict, train

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(train, 'train_and_evaluate', interrupted)
  monkeypatch.setattr(predict, 'predict', interrupted)
  monkeypatch.chdir(REPO)
  status = main.run(['main.py', f'--mode={mode}', '--config=configs/default.py',
                     f'--workdir={tmp_path}'])
  err = capsys.readouterr().err
  assert status == 130 and 'Traceback' not in err
  assert err.strip().splitlines()[-1] == (
      'Interrupted: stopped at once, saving nothing more' +
      (f'; the same command resumes from what {tmp_path} holds (its newest checkpoints, '
       'finished trials or folds).' if resumes else '.'))
