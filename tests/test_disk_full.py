"""A full disk, a read-only one, a file where a folder is needed: one line and exit status 2, and
nothing left half-written (config.json, metrics.jsonl, the report files).

The disk errors are simulated (a writer patched to raise ``OSError(ENOSPC)`` part-way, or the
error Orbax raises): nothing is mounted. Training runs the default digits config in-process, a
few steps on the tests' fake CPU devices.
"""
import builtins
import errno
import json
import logging
import os
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from imgcls_jax import checkpoint, main, metrics, report, run_directory, train, write_problems
from tests.conftest import REPO

ENOSPC = 'No space left on device'
# What Orbax's CheckpointManager.save raises in the main thread when a background save of the
# arrays (tensorstore) met a full disk (seen on a 4 MB tmpfs).
ORBAX_FULL = ('RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database at local file '
              '"{d}/checkpoints/{s}.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/'
              'ocdbt.process_0/": Failed writing: "{d}/checkpoints/{s}.orbax-checkpoint-tmp/'
              'state.orbax-checkpoint-tmp/ocdbt.process_0/d/5e4e": Failed to write 262932 bytes '
              "to file 15: No space left on device [os_error_code='28']")
TRAIN_FLAGS = ('--config.num_train_steps=20', '--config.checkpoint_every_steps=10',
               '--config.eval_every_steps=20', '--config.log_every_steps=10',
               '--config.progress_bar=False', '--config.tensorboard=False',
               '--config.batch_size=64', '--config.eval_batch_size=64',
               '--config.model.widths=(16,32)')


def _run(capsys, *args, mode='train'):
  """``main.run`` in-process: (exit status, its one ``error:`` line, everything on stderr)."""
  status = main.run(['main.py', f'--mode={mode}', '--config=configs/default.py', *args])
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith('error:')]
  return status, (lines[0] if len(lines) == 1 else lines), err


@pytest.fixture
def in_repo(monkeypatch):
  monkeypatch.chdir(REPO)


def test_an_orbax_save_on_a_full_disk_is_one_line(tmp_path, tfds_dir, capsys, monkeypatch,
                                                   in_repo):
  """The checkpoint of step 20 fails as Orbax fails on a full disk: its saving thread logs an
  ERROR with a traceback, and the main thread gets a ValueError quoting the OSError. One line
  (it was a 461-line log and exit status 1), naming the checkpoint and where the run resumes."""
  workdir = str(tmp_path / 'run')
  save = checkpoint.Checkpointer.save

  def full_at_20(self, step, *args, **kwargs):
    if step < 20:
      return save(self, step, *args, **kwargs)
    error = ValueError(ORBAX_FULL.format(d=workdir, s=step))
    try:
      raise error
    except ValueError:   # as Orbax's thread logs it
      logging.getLogger('absl').error('_SignalingThread.run() raised an exception: %s', error,
                                      exc_info=True)
    raise error
  monkeypatch.setattr(checkpoint.Checkpointer, 'save', full_at_20)
  status, line, err = _run(capsys, f'--workdir={workdir}',
                           f'--config.data.data_dir={tfds_dir}', *TRAIN_FLAGS)
  assert status == 2 and 'Traceback' not in err, err[-3000:]
  assert line == (f'error: No space left on the device of --workdir={workdir} (while writing '
                  'checkpoint 20); free space there (or move the run directory to a larger disk '
                  'and point --workdir at it), then rerun the same command: training resumes '
                  'from its newest complete checkpoint, step 10.')


def _full_disk_errors():
  """ENOSPC / EDQUOT as ``write`` raises them (no file name), also behind another error (its
  cause, its context, an exception group) or quoted in a library's message."""
  disk = OSError(errno.ENOSPC, ENOSPC)
  yield disk
  yield OSError(errno.EDQUOT, 'Disk quota exceeded')
  try:
    raise RuntimeError('saving failed') from disk
  except RuntimeError as e:
    yield e
  try:
    try:
      raise disk
    except OSError:
      raise RuntimeError('while saving')   # the full disk is its __context__
  except RuntimeError as e:
    yield e
  yield ExceptionGroup('saves failed', [KeyError('x'), disk])
  yield RuntimeError(f'INTERNAL: write failed: {ENOSPC}')


def test_a_full_disk_anywhere_is_one_line_and_a_bug_stays_a_traceback(tmp_path, capsys,
                                                                       monkeypatch, in_repo):
  """A full disk, however it is raised, is one line and status 2; a bug, or running out of
  accelerator memory (RESOURCE_EXHAUSTED too), is not a disk: it stays a traceback."""
  def fails(config, workdir):
    raise raised
  monkeypatch.setattr(train, 'train_and_evaluate', fails)
  raised = OSError(errno.ENOSPC, ENOSPC)   # no file named, and --workdir's disk has room
  status, line, err = _run(capsys, f'--workdir={tmp_path}/run')
  assert status == 2 and line.startswith(
      f'error: No space left on a device this command writes to (the error names no file, and '
      f'--workdir={tmp_path}/run has '), line
  assert 'perhaps the temporary folder' in line
  monkeypatch.setattr(write_problems, '_free_bytes', lambda folder: 0)   # its disk is full
  for raised in _full_disk_errors():
    status, line, err = _run(capsys, f'--workdir={tmp_path}/run')
    assert status == 2 and 'Traceback' not in err, (raised, err[-3000:])
    what = 'Disk quota exceeded' if 'quota' in str(raised) else 'No space left'
    assert line == (f'error: {what} on the device of --workdir={tmp_path}/run; free space there '
                    '(or move the run directory to a larger disk and point --workdir at it), then '
                    'rerun the same command: training starts again (no checkpoint was complete).')
  for raised in (ValueError('a bug'), RuntimeError('RESOURCE_EXHAUSTED: Out of memory while '
                                                   'trying to allocate 1.2GiB'),
                 PermissionError(errno.EACCES, 'Permission denied')):   # names no file: a bug's
    with pytest.raises(type(raised)):
      _run(capsys, f'--workdir={tmp_path}/run')


@pytest.mark.parametrize('mode, key, module, fn', [
    ('evaluate', 'evaluate.output_dir', 'imgcls_jax.evaluate', 'evaluate'),
    ('export', 'export.output_dir', 'imgcls_jax.export', 'export')])
def test_a_read_only_run_names_the_modes_output_key(tmp_path, capsys, monkeypatch, in_repo, mode,
                                                     key, module, fn):
  """Evaluating (exporting) someone else's run on a read-only disk: the fix is the mode's output
  folder, not --workdir; also for a read-only error that names no file, and a full disk."""
  __import__(module)
  run = str(tmp_path / 'run')
  # the disk is read-only and full, as far as the messages can check
  monkeypatch.setattr(write_problems, '_writable', lambda folder: False)
  monkeypatch.setattr(write_problems, '_free_bytes', lambda folder: 0)
  for raised, expected in (
      (OSError(errno.EROFS, 'Read-only file system', f'{run}/report.md'),
       f'error: Cannot use {run}/report.md (Read-only file system): --mode={mode} writes into the '
       f'run directory unless config.{key} is set; set --config.{key} to a folder this user can '
       'create and write.'),
      (RuntimeError('saving failed: Read-only file system'),
       f'error: Cannot write into --workdir={run} (Read-only file system): --mode={mode} writes '
       f'there unless config.{key} is set; set --config.{key} to a folder this user can create '
       'and write.'),
      (OSError(errno.ENOSPC, ENOSPC),
       f'error: No space left on the device of --workdir={run}; free space there (or set '
       f'--config.{key} to a folder on another disk), then rerun the same command.')):
    def fails(*args, **kwargs):
      raise raised
    monkeypatch.setattr(sys.modules[module], fn, fails)
    status, line, err = _run(capsys, f'--workdir={run}', mode=mode)
    assert status == 2 and 'Traceback' not in err, err[-3000:]
    assert line == expected


def test_a_workdir_that_is_a_file_says_so(tmp_path, capsys, monkeypatch, in_repo):
  """--workdir naming a file (or a path below one): 'File exists' said nothing of the fix."""
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  monkeypatch.setattr(train, 'train_and_evaluate', lambda config, workdir: os.makedirs(workdir))
  status, line, _ = _run(capsys, f'--workdir={a_file}')
  assert status == 2
  assert line == (f'error: Cannot use {a_file}: it is a file, and a folder is needed; check '
                  f'--workdir={a_file}: it must be a folder this user can create and write.')
  status, line, _ = _run(capsys, f'--workdir={a_file}/run')
  assert line.startswith(f'error: Cannot use {a_file}/run: {a_file} is a file, and a folder is '
                         'needed there; check'), line


def _full_after(limit):
  """``open`` whose files opened for writing take ``limit`` characters, then raise ENOSPC."""
  real_open = builtins.open

  def full_open(file, mode='r', *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    if 'w' in mode or 'a' in mode:
      write = f.write

      def short_write(data):
        write(data[:limit])
        f.flush()
        raise OSError(errno.ENOSPC, ENOSPC)
      f.write = short_write
    return f
  return full_open


def test_config_json_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch, digits_config):
  """The disk fills while config.json is rewritten (it was cut to 8192 bytes, and the run could
  not be evaluated any more), or while a new run writes its first one (it was left empty)."""
  old = tmp_path / 'run'
  old.mkdir()
  run_directory.write_config(str(old), digits_config)
  before = (old / 'config.json').read_text()
  assert len(before) > 1000
  new = tmp_path / 'new'
  new.mkdir()
  errors = []
  with monkeypatch.context() as m:
    m.setattr(builtins, 'open', _full_after(1000))
    for workdir in (old, new):
      with pytest.raises(OSError) as e:
        run_directory.write_config(str(workdir), digits_config)
      errors.append(e.value)
  assert (old / 'config.json').read_text() == before
  assert run_directory.read_config(str(old))['seed'] == digits_config.seed
  assert sorted(os.listdir(old)) == ['config.json'] and os.listdir(new) == []
  for e, workdir in zip(errors, (old, new)):   # main.run names the file, and --workdir
    assert e.errno == errno.ENOSPC and e.filename == str(workdir / 'config.json')


def test_a_metrics_record_that_does_not_fit_leaves_no_partial_line(tmp_path, monkeypatch):
  writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write(1, 'train', {'loss': 1.0})
  before = (tmp_path / 'metrics.jsonl').read_text()
  real_write = os.write

  def full(fd, data):
    real_write(fd, bytes(data[:10]))
    raise OSError(errno.ENOSPC, ENOSPC)
  monkeypatch.setattr(os, 'write', full)
  monkeypatch.setattr(builtins, 'open', _full_after(10))
  with pytest.raises(OSError) as e:
    writer.write(2, 'train', {'loss': 0.5})
  monkeypatch.undo()
  assert (tmp_path / 'metrics.jsonl').read_text() == before
  assert e.value.errno == errno.ENOSPC and e.value.filename == writer.path


def _records(workdir):
  """The records of ``metrics.jsonl``, every line parsed (one that does not parse fails), without
  the wall-clock ones."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in ('images_per_sec', 'time')}
            for line in f]


def test_a_cut_last_line_of_metrics_jsonl_is_dropped_on_resume(tmp_path, digits_config, caplog):
  """A run stopped (killed, a full disk) while it wrote a record leaves a partial last line; the
  resumed run's first record was appended to it, and both were lost to every reader."""
  c = digits_config
  c.num_train_steps, c.checkpoint_every_steps, c.eval_every_steps = 40, 10, 20
  c.keep_checkpoints = 10
  reference = str(tmp_path / 'reference')
  train.train_and_evaluate(c, reference)
  expected = _records(reference)
  assert [r['step'] for r in expected if r['split'] == 'train'] == [10, 20, 30, 40]
  # The run as it was when stopped writing the record of step 30: checkpoints up to 20.
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(reference, resumed)
  for step in (30, 40):
    shutil.rmtree(os.path.join(resumed, 'checkpoints', str(step)))
  with open(os.path.join(reference, 'metrics.jsonl')) as f:
    lines = f.readlines()
  cut = next(i for i, line in enumerate(lines) if json.loads(line)['step'] > 20)
  with open(os.path.join(resumed, 'metrics.jsonl'), 'w') as f:
    f.writelines(lines[:cut] + [lines[cut][:-40]])
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(c, resumed)
  got = _records(resumed)
  assert [(r['step'], r['split']) for r in got] == [(r['step'], r['split']) for r in expected]
  for a, b in zip(got, expected):   # (a resumed run continues exactly: test_fault_tolerance)
    assert a.keys() == b.keys()
    for k, v in a.items():
      assert v == (pytest.approx(b[k], rel=1e-4, abs=1e-5) if isinstance(v, float) else b[k]), k
  assert any('did not parse' in r.getMessage() for r in caplog.records
             if r.levelno >= logging.WARNING), caplog.text[-2000:]


def test_report_files_are_whole_and_a_failed_report_leaves_none(tmp_path, monkeypatch):
  """evaluate on a full disk: a partial report.md, and label_issues.csv.tmp, were left, and the
  files written before the failure stopped the same command from running again."""
  from imgcls_jax import plots, report_files
  from tests.test_report import _eval_sums, _predictions
  logits, labels = _predictions(60, 3, seed=2)
  rep = report.summarize(_eval_sums(jnp.asarray(logits), jnp.asarray(labels), jnp.ones(60, bool)),
                         ['a', 'b', 'c'])
  errors = report_files.Errors(rows=[{'rank': 1, 'position': 0, 'id': '0', 'label': 'a',
                                      'predicted': 'b', 'p_predicted': 0.9, 'p_label': 0.1}],
                               images=[(np.zeros((8, 8, 1), np.uint8), 'x')])
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'label_issues.csv.tmp').write_text('rank,id\n1,')   # label_issues.write_csv's, cut

  def full(images, captions, path, title):
    with open(path, 'wb') as f:
      f.write(b'\x89PNG partial')
    raise OSError(errno.ENOSPC, ENOSPC)
  monkeypatch.setattr(plots, 'image_grid', full)
  with pytest.raises(OSError) as e:
    report_files.write(rep, str(out), 'T', None, errors=errors)
  assert os.listdir(out) == []   # no report.md without its errors table, no temporary file
  assert e.value.errno == errno.ENOSPC and e.value.filename == str(out / 'errors.png')
  # Space again: the same report is written, whole.
  monkeypatch.undo()
  report_files.check_output(str(out), None, set(report_files.REPORT_FILES)
                            | set(report_files.ERROR_FILES))
  written = report_files.write(rep, str(out), 'T', None, errors=errors)
  assert sorted(os.listdir(out)) == sorted(written)
  assert '## The most confident errors (1 in all: errors.csv)' in (out / 'report.md').read_text()


def test_a_sweep_trial_record_and_a_fold_list_are_replaced_whole(tmp_path, monkeypatch):
  """A sweep trial's record (read by the other shards while it is rewritten) and a fold's id list
  were written through their own temporary files, left behind on a full disk and never named in
  the error. Now each is replaced whole (the trial's temporary file named by the process, which
  shards share the folder with), and the error names the file."""
  from imgcls_jax.data import folds
  from imgcls_jax.sweep import store
  trial = tmp_path / 'trial'
  store.write(str(trial), {'status': 'done', 'value': 0.5})
  record = (trial / checkpoint.SWEEP_TRIAL_FILE).read_text()
  ids = tmp_path / 'folds' / 'fold_0_train_ids.txt'
  with monkeypatch.context() as m:
    m.setattr(builtins, 'open', _full_after(5))
    with pytest.raises(OSError) as e_trial:
      store.write(str(trial), {'status': 'running', 'value': None, 'pad': 'x' * 100})
    with pytest.raises(OSError) as e_ids:
      folds.write_ids(str(ids), [str(i) for i in range(100)])
  assert (trial / checkpoint.SWEEP_TRIAL_FILE).read_text() == record
  assert os.listdir(trial) == [checkpoint.SWEEP_TRIAL_FILE] and os.listdir(ids.parent) == []
  assert e_trial.value.filename == str(trial / checkpoint.SWEEP_TRIAL_FILE)
  assert e_ids.value.filename == str(ids) and e_ids.value.errno == errno.ENOSPC
  folds.write_ids(str(ids), ['a', 'b'])
  assert ids.read_text() == 'a\nb\n' and os.listdir(ids.parent) == [ids.name]
