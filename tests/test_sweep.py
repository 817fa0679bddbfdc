"""Hyperparameter sweeps: the grid's checks, trials equal to plain runs, ranking, resume."""
import copy
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from imgcls_jax import configlib, evaluation, metrics, run_directory, train
from imgcls_jax import sweep
from imgcls_jax.sweep import grid as sweep_grid
from imgcls_jax.sweep import rank as sweep_rank
from imgcls_jax.sweep import report as sweep_report
from imgcls_jax.sweep import store as sweep_store
from imgcls_jax.sweep import trial as sweep_trial
from imgcls_jax.errors import UserError
from tests.conftest import REPO, main_run_here, subprocess_env, with_grid


def test_the_grid_becomes_one_checked_config_per_trial(digits_config):
  c = with_grid(digits_config, "{'optim.learning_rate': [1, 0.5], 'model.widths': [[8, 16]], "
                 "'model.dropout': [0.25]}", seeds=2)
  c.seed = 7
  ts = sweep_grid.trials(c)
  assert [t.name for t in ts] == [
      f'optim.learning_rate={lr}+model.widths=8-16+model.dropout=0.25+seed={s}'
      for lr in (1, 0.5) for s in (7, 8)]
  for t in ts:
    assert t.config.sweep.grid == ''            # each trial is a plain run
    assert t.config.seed == t.seed
    assert isinstance(t.config.optim.learning_rate, float)   # an int given to a float key
    assert t.config.model.widths == (8, 16)     # a list given to a tuple key
    assert t.config.model.dropout == 0.25       # a model argument the config did not set
    assert t.config_json['optim']['learning_rate'] == t.overrides['optim.learning_rate']
  assert digits_config.sweep.grid == '' and digits_config.optim.learning_rate == 0.1  # untouched
  assert ts[0].setting == 'optim.learning_rate=1, model.widths=8-16, model.dropout=0.25'
  # 'seed' in the grid replaces the seeds; a value that is no path character is made safe
  ts = sweep_grid.trials(with_grid(digits_config,
                                    "{'seed': [3, 4], 'data.train_split': ['train[:50%]']}"))
  assert [t.seed for t in ts] == [3, 4]
  assert all(t.name.startswith('seed=') and '[' not in t.name and ',' not in t.name for t in ts)
  assert len({t.name for t in ts}) == 2
  # Whole models, to sweep families: the other family's keys do not leak into the trial.
  ts = sweep_grid.trials(with_grid(
      digits_config, "{'model': [{'name': 'cnn', 'widths': [8, 16]}, {'name': 'resnet18'}]}"))
  assert [t.name for t in ts] == ['model=cnn_widths=8-16+seed=0', 'model=resnet18+seed=0']
  assert ts[1].config_json['model'] == {'name': 'resnet18'}
  assert ts[0].config.model.widths == (8, 16)


@pytest.mark.parametrize('grid, seeds, message', [
    ('optim.learning_rate=0.1', 1, 'is not a Python dict literal'),
    ('[0.1, 0.2]', 1, 'must be a non-empty dict'),
    ('{}', 1, 'must be a non-empty dict'),
    ("{'optim.learning_rate': []}", 1, r"\['optim.learning_rate'\] must be a non-empty list"),
    ("{'optim.learning_rate': 0.1}", 1, 'must be a non-empty list'),
    ("{'optim.learning_rate': [0.1, 0.1]}", 1, 'are the same config'),
    ("{'optim.learning_rate': [1, 1.0]}", 1, 'are the same config'),
    ("{'optim.learning_rate': [0.1], 'optim.learning_rate': [0.2]}", 1, 'names '
     "'optim.learning_rate' twice"),
    ("{optim.learning_rate: [0.1]}", 1, 'only Python literals: quoted keys'),
    ("{'optim.learning_rate': [0.1, None]}", 1, 'that key needs a float'),
    ("{'optim.learning_rate': [True]}", 1, 'that key takes a float'),
    ("{'num_train_steps': [10.5]}", 1, 'that key takes an int'),
    ("{'model.widths': [[8, 16.5]]}", 1, r"'model.widths\[1\]' the value 16.5, but that key takes "
     'an int'),
    ("{'model.dropuot': [0.1]}", 1, "config.model.dropuot is not an argument of model 'cnn' "
     "\\(did you mean 'dropout'"),
    ("{'model.name': ['resnet18']}", 1, "config.model sets convs_per_stage, dropout, widths, which "
     "model 'resnet18' does not take"),
    ("{'model': ['resnet18']}", 1, 'each value must be a whole model'),
    ("{'cross_validation.folds': [0, 2]}", 1, 'every setting must be ranked the same way'),
    ("{'data.eval_split': ['test', 'train']}", 1, 'ranked on the same split'),
    ("{'optim.learnig_rate': [0.1]}", 1, "did you mean 'optim.learning_rate'"),
    ("{'optim': [0.1]}", 1, "'optim', a group of keys"),
    ("{'optim.learning_rate': ['fast']}", 1, "takes a float"),
    ("{'sweep.seeds': [2]}", 1, 'cannot sweep its own keys'),
    ("{'seed': [1, 2]}", 2, "sets 'seed' and config.sweep.seeds > 1"),
    ("{'optim.learning_rate': [0.1]}", 0, 'config.sweep.seeds must be an integer >= 1'),
    ("{'batch_size': [32, -1]}", 1, 'The sweep setting batch_size=-1: config.batch_size must be '
     'positive'),
    ("{'model.name': ['cnn', 'cnnn']}", 1, "setting model.name=cnnn: Unknown model 'cnnn'"),
])
def test_a_bad_grid_is_one_sentence_before_anything_runs(digits_config, grid, seeds, message):
  with pytest.raises(UserError, match=message):
    sweep_grid.trials(with_grid(digits_config, grid, seeds))


def test_random_settings_are_distinct_reproducible_and_drawn_from_their_ranges(digits_config):
  grid = ("{'optim.learning_rate': {'log_uniform': [1e-4, 1.0]}, 'label_smoothing': [0.0, 0.1], "
          "'optim.weight_decay': {'uniform': [0.0, 0.5]}, 'batch_size': {'int_uniform': [16, 20]}}")
  c = with_grid(digits_config, grid, samples=400)
  ts = sweep_grid.trials(c)
  assert len(ts) == 400 and len({t.name for t in ts}) == 400
  assert [t.name for t in sweep_grid.trials(c)] == [t.name for t in ts]   # fixed by config.seed
  c.seed = 1
  assert [t.name for t in sweep_grid.trials(c)][:5] != [t.name for t in ts][:5]
  lr = np.array([t.config.optim.learning_rate for t in ts])
  wd = np.array([t.config.optim.weight_decay for t in ts])
  bs = np.array([t.config.batch_size for t in ts])
  assert lr.min() >= 1e-4 and lr.max() <= 1.0 and wd.min() >= 0 and wd.max() <= 0.5
  assert all(float(f'{v:.3g}') == v for v in lr)          # 3 significant digits, as named
  # Log-uniform: each decade of [1e-4, 1] holds a quarter (binomial 400 x 1/4: sd 8.7, 4.6 sd).
  for lo in (1e-4, 1e-3, 1e-2, 1e-1):
    assert abs(np.sum((lr >= lo) & (lr < 10 * lo)) - 100) < 40, lo
  assert abs(np.sum(wd < 0.25) - 200) < 45                 # uniform: half below the middle
  assert set(bs) == {16, 17, 18, 19, 20}                   # both ends included
  assert {t.config.label_smoothing for t in ts} == {0.0, 0.1}
  # A grid of lists only: distinct combinations, without replacement.
  c = with_grid(digits_config, "{'optim.learning_rate': [0.1, 0.2, 0.3], 'seed': [0, 1]}",
                 samples=4)
  picked = [(t.config.optim.learning_rate, t.seed) for t in sweep_grid.trials(c)]
  assert len(set(picked)) == 4 and set(picked) <= {(a, b) for a in (0.1, 0.2, 0.3) for b in (0, 1)}


@pytest.mark.parametrize('grid, samples, message', [
    ("{'optim.learning_rate': {'log_uniform': [1e-4, 1e-1]}}", 0,
     "gives 'optim.learning_rate' a range; draw settings from it with config.sweep.samples=N"),
    ("{'optim.learning_rate': {'log_uniform': [0, 1]}}", 3, 'needs a low end > 0'),
    ("{'optim.learning_rate': {'uniform': [1, 0.5]}}", 3, 'low end must be below'),
    ("{'optim.learning_rate': {'normal': [0, 1]}}", 3, 'a range is one of'),
    ("{'optim.learning_rate': {'uniform': [0, 1, 2]}}", 3, 'a range is one of'),
    ("{'batch_size': {'int_uniform': [16, 32.5]}}", 3, 'takes two integers'),
    ("{'batch_size': {'int_uniform': [16, 17]}}", 3, 'only 2 distinct settings'),
    ("{'optim.learning_rate': [0.1, 0.2]}", 3, 'but the grid has 2 combinations'),
    ("{'optim.learning_rate': [0.1, 0.2]}", -1, 'config.sweep.samples must be an integer >= 0'),
])
def test_a_bad_random_search_is_one_sentence(digits_config, grid, samples, message):
  with pytest.raises(UserError, match=message):
    sweep_grid.trials(with_grid(digits_config, grid, samples=samples))


def test_the_ranking_metric_is_checked_before_anything_trains(digits_config):
  with pytest.raises(UserError, match="config.sweep.metric='acc' is not an evaluation metric of "
                     'a single-label run'):
    sweep_rank.ranking(with_grid(digits_config, '{}', metric='acc'))
  with pytest.raises(UserError, match="'map' is not an evaluation metric of a single-label"):
    sweep_rank.ranking(with_grid(digits_config, '{}', metric='map'))
  with pytest.raises(UserError, match="config.sweep.mode must be 'max', 'min'"):
    sweep_rank.ranking(with_grid(digits_config, '{}', mode='up'))
  assert sweep_rank.ranking(with_grid(digits_config, '{}')) == ('accuracy', 'max')
  assert sweep_rank.ranking(with_grid(digits_config, '{}', metric='loss')) == ('loss', 'min')
  assert sweep_rank.ranking(with_grid(digits_config, '{}', metric='loss', mode='max')) == ('loss',
                                                                                       'max')
  tags = with_grid(digits_config, '{}')
  tags.data.multilabel = True
  assert sweep_rank.ranking(tags) == ('map', 'max')


def _row(setting, seed, status, accuracy=None):
  row = {'trial': f'{setting}+seed={seed}', 'setting': setting, 'overrides': {}, 'seed': seed,
         'workdir': f'/w/{setting}+seed={seed}', 'status': status, 'wall_s': 1.0}
  if status == 'finished':
    row['metrics'] = {'accuracy': accuracy, 'loss': 1 - accuracy}
  return row


def test_a_setting_with_a_diverged_or_non_finite_seed_ranks_below_the_complete_ones():
  rows = [_row('b', 0, 'finished', 0.95), _row('b', 1, 'diverged'), _row('b', 2, 'diverged'),
          _row('a', 0, 'finished', 0.90), _row('a', 1, 'finished', 0.91),
          _row('c', 0, 'finished', float('nan')), _row('c', 1, 'finished', 0.99),
          _row('d', 0, 'error'), _row('e', 0, 'finished', 0.80), _row('e', 1, 'finished', 0.80)]
  s = sweep_rank.summarize(rows, 'accuracy', 'max')
  assert [x['setting'] for x in s['settings']] == ['a', 'e', 'c', 'b', 'd']
  assert s['best']['setting'] == 'a' and s['best']['best_workdir'] == '/w/a+seed=1'
  c = s['settings'][2]
  assert c['values'] == [0.99] and c['no_value'] == 1 and c['mean'] == 0.99
  assert s['settings'][3]['diverged'] == 2 and s['settings'][4]['mean'] is None
  s = sweep_rank.summarize(rows, 'loss', 'min')
  assert [x['setting'] for x in s['settings']] == ['a', 'e', 'c', 'b', 'd']
  assert s['best']['best_workdir'] == '/w/a+seed=1'   # the lowest loss
  lines = sweep_report.table_lines({**s, 'seeds': 3, 'dataset': 'd', 'split': 'val',
                                    'workdir': '/w', 'wall_time_s': 1.0})
  assert any('[2 diverged]' in line and line.rstrip().endswith('b  [2 diverged]')
             for line in lines), lines
  assert any('1 failed' in line for line in lines)
  everything_nan = [_row('x', 0, 'finished', float('nan'))]
  assert sweep_rank.summarize(everything_nan, 'accuracy', 'max')['best'] is None


def _final_eval(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return [r for r in records if r.get('split') == 'eval'][-1]


def test_a_sweep_trains_each_trial_as_a_plain_run_and_ranks_the_settings(
    digits_config, tmp_path, monkeypatch):
  config = with_grid(digits_config, "{'optim.learning_rate': [0.02, 1e9, 0.2]}", seeds=2)
  # 20 steps at 0.2 and 0.02 as the trials of the other sweeps below (their compiled programs)
  config.num_train_steps = 20
  workdir = str(tmp_path / 'sweep')
  summary = sweep.sweep(config, workdir)

  rows = {r['trial']: r for r in summary['trials']}
  assert len(rows) == 6
  diverged = [r for r in rows.values() if r['status'] == 'diverged']
  assert {r['overrides']['optim.learning_rate'] for r in diverged} == {1e9}
  assert all('Training diverged' in r['error'] for r in diverged)
  finished = [r for r in rows.values() if r['status'] == 'finished']
  assert len(finished) == 4
  for r in finished:   # the trainer's own final evaluation of that directory
    ev = _final_eval(r['workdir'])
    assert r['metrics']['accuracy'] == pytest.approx(ev['accuracy'], abs=1e-7)
    assert r['metrics']['loss'] == pytest.approx(ev['loss'], rel=1e-6)

  # A trial is exactly the plain run with those keys: same process, same program, same numbers.
  plain = copy.deepcopy(digits_config)
  plain.num_train_steps = 20
  plain.optim.learning_rate = 0.2
  plain.seed = 1
  expected = train.train_and_evaluate(plain, str(tmp_path / 'plain'))
  got = rows['optim.learning_rate=0.2+seed=1']['metrics']
  assert got['accuracy'] == float(expected['accuracy'])
  assert got['loss'] == float(expected['loss'])

  # Ranking: by the mean over seeds (numpy as the oracle), best first; no result last.
  settings = summary['settings']
  assert [s['setting'] for s in settings][-1] == 'optim.learning_rate=1000000000.0'
  assert settings[-1]['mean'] is None and settings[-1]['diverged'] == 2
  for s in settings[:2]:
    values = [r['metrics']['accuracy'] for r in finished
              if r['setting'] == s['setting']]
    assert s['mean'] == pytest.approx(np.mean(values)) and s['std'] == pytest.approx(np.std(values))
    best = max((r for r in finished if r['setting'] == s['setting']),
               key=lambda r: r['metrics']['accuracy'])
    assert s['best_workdir'] == best['workdir']
  assert settings[0]['mean'] >= settings[1]['mean']
  assert summary['best'] == settings[0] and summary['metric'] == 'accuracy'
  assert summary['mode'] == 'max' and 'biased upward' in summary['note']  # ranked on 'test'

  # The files agree with the summary.
  for name in ('sweep.md', 'sweep.png', 'sweep.json'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  with open(os.path.join(workdir, 'sweep.csv')) as f:
    table = list(csv.DictReader(f))
  assert [t['trial'] for t in table] == [r['trial'] for r in summary['trials']]
  for t in table:
    if t['status'] == 'finished':
      assert float(t['accuracy']) == rows[t['trial']]['metrics']['accuracy']
    assert float(t['optim.learning_rate']) == rows[t['trial']]['overrides']['optim.learning_rate']
  best = summary['best']['best_workdir']   # not the first trial by name, as it used to be
  with pytest.raises(UserError, match=r'This is a sweep: use one of its trials \(sweep.md ranks '
                     rf'them\), e.g. its best, --workdir={re.escape(best)}\.'):
    run_directory.require_checkpoint(workdir)    # what --mode=evaluate says given the sweep's root
  md = open(os.path.join(workdir, 'sweep.md')).read()
  assert f"| 1 | `{settings[0]['setting']}` | {100 * settings[0]['mean']:.2f}% |" in md

  # Ranked by loss instead (lower is better), with nothing trained again.
  def no_training(*args, **kwargs):
    raise AssertionError('a finished or diverged trial was trained again')
  monkeypatch.setattr(sweep_trial, '_train', no_training)
  by_loss = sweep.sweep(with_grid(config, config.sweep.grid, 2, metric='loss'), workdir)
  assert by_loss['mode'] == 'min'
  means = [s['mean'] for s in by_loss['settings'] if s['mean'] is not None]
  assert means == sorted(means) and len(means) == 2
  quiet = copy.deepcopy(config)   # keys that cannot change a trial: still skipped
  quiet.log_every_steps, quiet.progress_bar, quiet.serve.port = 7, True, 9999
  assert sweep.sweep(quiet, workdir)['settings'] == summary['settings']

  # A changed config is refused before anything trains: the trials are not resumed with it.
  longer = copy.deepcopy(config)
  longer.num_train_steps = 40
  with pytest.raises(UserError, match=r'6 trial directories of this sweep cannot be resumed: .*'
                     r'was trained with another config \(num_train_steps: 20 before, 40 now\); '
                     r'delete such a directory to train its trial again, or use a new '
                     r'--workdir\.$'):
    sweep.sweep(longer, workdir)
  # A new setting in the same workdir trains; a SIGTERM in it stops the sweep there.
  calls = []
  def interrupted(c, d, pause_at=None):
    calls.append(d)
    return {'interrupted_at_step': 3}
  monkeypatch.setattr(sweep_trial, '_train', interrupted)
  more = with_grid(config, "{'optim.learning_rate': [0.02, 1e9, 0.2, 0.1]}", seeds=2)
  out = sweep.sweep(more, workdir)
  assert out == {'interrupted_in_trial': 'optim.learning_rate=0.1+seed=0',
                 'interrupted_at_step': 3}
  assert calls == [os.path.join(workdir, 'optim.learning_rate=0.1+seed=0')]
  # A moved sweep names its trials where they are now.
  moved = str(tmp_path / 'moved')
  os.rename(workdir, moved)
  monkeypatch.setattr(sweep_trial, '_train', no_training)
  again = sweep.sweep(config, moved)
  assert again['best']['best_workdir'].startswith(moved + os.sep)


def test_a_trial_is_scored_at_the_checkpoint_its_directory_serves(digits_config, tmp_path,
                                                                   monkeypatch):
  config = with_grid(digits_config, "{'optim.learning_rate': [0.2]}")
  config.num_train_steps = 20
  config.eval_every_steps = config.checkpoint_every_steps = 10
  config.evaluate.checkpoint = '10'    # what evaluate / predict / export take from the trial
  (row,) = sweep.sweep(config, str(tmp_path))['trials']
  records = {r['step']: r for r in metrics.read_jsonl(os.path.join(row['workdir'],
                                                                    'metrics.jsonl'))
             if r.get('split') == 'eval'}
  assert row['checkpoint_step'] == 10 and row['checkpoint'] == 'step 10'
  assert row['metrics']['accuracy'] == records[10]['accuracy']
  assert row['final_metrics']['accuracy'] == pytest.approx(records[20]['accuracy'], abs=1e-7)
  # The evaluate mode's report on that directory (checked against sklearn elsewhere) agrees.
  ev = evaluation.evaluate_checkpoint(row['workdir'], None, split=config.data.eval_split,
                                      checkpoint_spec='10', tta='', num_bins=15)
  assert ev.report(0)['accuracy'] == pytest.approx(row['metrics']['accuracy'], abs=1e-7)
  # Scored at another checkpoint now: the trial is scored again, not trained again.
  monkeypatch.setattr(sweep_trial, '_train', lambda c, d, pause_at=None: pytest.fail('trained again'))
  config.evaluate.checkpoint = 'latest'
  (row,) = sweep.sweep(config, str(tmp_path))['trials']
  assert row['checkpoint_step'] == 20 and row['checkpoint'] == 'latest'
  assert row['metrics']['accuracy'] == pytest.approx(records[20]['accuracy'], abs=1e-7)
  assert 'step' not in row['metrics']
  config.evaluate.checkpoint = 'bestt'
  with pytest.raises(UserError, match="config.evaluate.checkpoint='bestt' must be 'best'"):
    sweep.sweep(config, str(tmp_path / 'new'))
  assert not os.path.exists(tmp_path / 'new')


def test_shards_train_their_own_trials_and_read_the_others_when_finished(
    digits_config, tmp_path, monkeypatch):
  config = with_grid(digits_config, "{'optim.learning_rate': [0.2, 0.02, 0.05]}")
  config.num_train_steps = 20   # (0.2 and 0.02: the first sweep's programs)
  workdir = str(tmp_path)
  trained, real = [], sweep_trial._train
  def spy(c, d, pause_at=None):
    trained.append(os.path.basename(d))
    return real(c, d, pause_at)
  monkeypatch.setattr(sweep_trial, '_train', spy)
  second = copy.deepcopy(config)
  second.sweep.shard = '1/2'
  out = sweep.sweep(second, workdir)
  assert trained == ['optim.learning_rate=0.02+seed=0']
  assert [r['status'] for r in out['trials']] == ['pending', 'finished', 'pending']
  assert [s['pending'] for s in out['settings']] == [0, 1, 1]
  assert out['best']['setting'] == 'optim.learning_rate=0.02'
  first = copy.deepcopy(config)
  first.sweep.shard = '0/2'
  out = sweep.sweep(first, workdir)
  assert trained[1:] == ['optim.learning_rate=0.2+seed=0', 'optim.learning_rate=0.05+seed=0']
  assert [r['status'] for r in out['trials']] == ['finished'] * 3   # shard 1's read back
  monkeypatch.setattr(sweep_trial, '_train', lambda c, d, pause_at=None: pytest.fail(f'{d} trained again'))
  whole = sweep.sweep(config, workdir)
  assert whole['settings'] == out['settings']
  with open(os.path.join(workdir, 'sweep.json')) as f:
    assert json.load(f)['settings'] == whole['settings']
  assert not [n for n in os.listdir(workdir)    # no temporary file left
              if n.startswith('.') and n != sweep_store.LOCK_FILE]
  for bad in ('2/2', '1', 'a/b', '-1/2'):
    config.sweep.shard = bad
    with pytest.raises(UserError, match="config.sweep.shard must be 'i/n' with 0 <= i < n"):
      sweep.sweep(config, workdir)


def test_a_sweep_of_cross_validated_trials_ranks_by_the_fold_mean(digits_config, tmp_path):
  config = with_grid(digits_config, "{'optim.learning_rate': [0.2]}")
  config.num_train_steps = 20
  config.optim.warmup_steps = 20   # (capped at 19 as in the 20-step runs above: their programs)
  config.data.train_split = 'train[:50%]'
  config.cross_validation.folds = 2
  config.cross_validation.label_issues = False
  summary = sweep.sweep(config, str(tmp_path))
  (row,) = summary['trials']
  with open(os.path.join(row['workdir'], 'cv_report.json')) as f:
    cv = json.load(f)
  assert row['metrics'] == pytest.approx(cv['mean'])
  assert summary['settings'][0]['mean'] == pytest.approx(cv['mean']['accuracy'])
  assert 'note' in summary and summary['note'] is None   # folds of the training split: no 'test'


def test_the_train_command_runs_the_sweep_and_refuses_a_bad_grid_in_one_line(tmp_path, capsys,
                                                                             monkeypatch):
  proc = subprocess.run(
      [sys.executable, '-m', 'imgcls_jax.main', '--config=configs/default.py',
       f'--workdir={tmp_path}/w', "--config.sweep.grid={'optim.learnig_rate': [0.1]}"],
      cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "error: config.sweep.grid sets 'optim.learnig_rate', which is not a config key (did you "
      "mean 'optim.learning_rate'?); see configs/default.py for the documented schema."]
  assert not os.path.exists(tmp_path / 'w')
  run = tmp_path / 'run'   # a plain run's directory (the config it trained with)
  run.mkdir()
  run_directory.write_config(str(run), _sweep_config())
  # The same command line in-process (the child above ran one).
  proc = main_run_here(monkeypatch, capsys, f'--config={REPO}/configs/default.py',
                       f'--workdir={run}', "--config.sweep.grid={'optim.learning_rate': [0.1]}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      f'error: --workdir={run} holds a training run, not a sweep; give the sweep another '
      "--workdir (a new or empty folder, or this sweep's own)."]
  assert os.listdir(run) == ['config.json']
  with pytest.raises(UserError, match='a sweep is its own entry point'):
    train.train_and_evaluate(_sweep_config(), str(tmp_path / 'x'))


def _sweep_config():
  sys.path.insert(0, REPO)
  from configs import default
  c = default.get_config()
  c.sweep.grid = "{'seed': [0]}"
  return c


def test_a_signal_between_two_trials_stops_the_sweep_before_the_next(digits_config, tmp_path,
                                                                     monkeypatch, capsys):
  import signal
  config = with_grid(digits_config, "{'optim.learning_rate': [0.2, 0.1]}")
  calls = []
  def finished_then_signalled(c, d, pause_at=None):   # the trial ends, then SIGTERM arrives
    calls.append(os.path.basename(d))
    os.kill(os.getpid(), signal.SIGTERM)
    return {'accuracy': 0.5}
  monkeypatch.setattr(sweep_trial, '_train', finished_then_signalled)
  before = signal.getsignal(signal.SIGTERM)
  out = sweep.sweep(config, str(tmp_path))
  assert out == {'interrupted_in_trial': 'optim.learning_rate=0.1+seed=0'}
  assert calls == ['optim.learning_rate=0.2+seed=0']
  assert 'Stopped by SIGTERM before trial optim.learning_rate=0.1+seed=0' in capsys.readouterr().out
  assert signal.getsignal(signal.SIGTERM) == before   # the handler before the sweep is back


def test_a_failing_trial_is_recorded_and_the_others_run_in_every_shard(digits_config, tmp_path,
                                                                       monkeypatch):
  config = with_grid(digits_config, "{'batch_size': [4096, 32, 64]}")
  def fake(c, d, pause_at=None):   # the largest batch runs out of memory; the others finish
    if c.batch_size == 4096:
      raise RuntimeError('RESOURCE_EXHAUSTED: out of memory allocating 12 GiB')
    return {'accuracy': 0.5 + c.batch_size / 1000, 'loss': 1.0}
  monkeypatch.setattr(sweep_trial, '_train', fake)
  first = copy.deepcopy(config)
  first.sweep.shard = '0/2'    # trials 0 and 2: 4096 fails, 64 finishes
  out = sweep.sweep(first, str(tmp_path))
  assert [r['status'] for r in out['trials']] == ['error', 'pending', 'finished']
  assert out['trials'][0]['error'] == ('RuntimeError: RESOURCE_EXHAUSTED: out of memory '
                                       'allocating 12 GiB')
  second = copy.deepcopy(config)
  second.sweep.shard = '1/2'
  out = sweep.sweep(second, str(tmp_path))   # the other shard's failure is shown, not pending
  assert [r['status'] for r in out['trials']] == ['error', 'finished', 'finished']
  assert [s['setting'] for s in out['settings']] == ['batch_size=64', 'batch_size=32',
                                                     'batch_size=4096']
  # A trial another process holds is left to it, shown as running.
  trained = []
  monkeypatch.setattr(sweep_trial, '_train', lambda c, d, pause_at=None: trained.append(d) or {'accuracy': 0.1})
  held = tmp_path / 'batch_size=4096+seed=0'
  with sweep_store.claim(str(held)) as mine:
    assert mine
    out = sweep.sweep(config, str(tmp_path))
  assert trained == [] and out['trials'][0]['status'] == 'running'
  sweep.sweep(config, str(tmp_path))   # released: the failed trial is tried again
  assert trained == [str(held)]


def test_random_draws_stay_in_narrow_ranges_and_grow_without_changing(digits_config):
  r = sweep_grid.Range('uniform', 0.999, 0.9999)
  rng = np.random.default_rng(0)
  draws = [r.draw(rng) for _ in range(500)]
  assert 0.999 <= min(draws) and max(draws) <= 0.9999 and len(set(draws)) > 100
  grid = "{'optim.learning_rate': [0.1, 0.2, 0.3, 0.4], 'label_smoothing': [0.0, 0.1]}"
  three = [t.name for t in sweep_grid.trials(with_grid(digits_config, grid, samples=3))]
  four = [t.name for t in sweep_grid.trials(with_grid(digits_config, grid, samples=4))]
  assert four[:3] == three
  # A whole model applies first, its arguments given beside it after.
  (t,) = sweep_grid.trials(with_grid(digits_config,
                                      "{'model.widths': [[8, 16]], 'model': [{'name': 'cnn'}]}"))
  assert t.config.model.widths == (8, 16) and t.config.model.name == 'cnn'


def test_a_missing_dataset_or_bad_fold_count_is_one_sentence_before_anything(digits_config,
                                                                              tmp_path):
  config = with_grid(digits_config, "{'optim.learning_rate': [0.1, 0.2]}")
  config.data.name = 'no_such_dataset'
  with pytest.raises(UserError, match='The sweep setting optim.learning_rate=0.1: '):
    sweep.sweep(config, str(tmp_path / 'a'))
  config = with_grid(digits_config, "{'optim.learning_rate': [0.1, 0.2]}")
  config.cross_validation.folds = 1
  with pytest.raises(UserError, match='folds=1: use 0 \\(off\\) or at least 2 folds'):
    sweep.sweep(config, str(tmp_path / 'b'))
  assert not os.path.exists(tmp_path / 'a') and not os.path.exists(tmp_path / 'b')


def test_a_filesystem_without_locks_trains_unguarded_rather_than_nothing(tmp_path, monkeypatch):
  import errno
  import fcntl
  with sweep_store.claim(str(tmp_path)) as first, sweep_store.claim(str(tmp_path)) as second:
    assert first and not second and sweep_store.busy(str(tmp_path))
  assert not sweep_store.busy(str(tmp_path))
  def unsupported(f, op):
    raise OSError(errno.ENOSYS, 'Function not implemented')
  monkeypatch.setattr(fcntl, 'flock', unsupported)
  with sweep_store.claim(str(tmp_path)) as mine:
    assert mine
  assert not sweep_store.busy(str(tmp_path))
  with sweep_store.summary_lock(str(tmp_path)):
    pass


def test_the_first_step_line_counts_later_runs_from_their_own_start(monkeypatch):
  import time
  from imgcls_jax import startup
  monkeypatch.setattr(startup, '_FIRST_RUN_DONE', [])
  monkeypatch.setattr(startup, 'seconds_since_start', lambda: 42.0)
  assert startup.first_step_line(time.time()) == ('First training step done 42.0 s after the '
                                                 'process started.')
  line = startup.first_step_line(time.time() - 5.0)   # a sweep's second trial, begun 5 s ago
  assert line.startswith('First training step done 5.') and line.endswith('after this run began.')


def test_a_served_step_never_evaluated_has_no_score_rather_than_the_last_ones(digits_config,
                                                                             tmp_path):
  config = with_grid(digits_config, "{'optim.learning_rate': [0.2]}")
  config.num_train_steps = 20
  config.checkpoint_every_steps = 10     # step 10 is saved, but only step 20 is evaluated
  config.evaluate.checkpoint = '10'
  out = sweep.sweep(config, str(tmp_path))
  (row,) = out['trials']
  assert row['checkpoint_step'] == 10 and row['checkpoint'] == 'step 10, not evaluated'
  assert row['metrics'] == {} and row['final_metrics']['accuracy'] > 0
  assert out['best'] is None and out['settings'][0]['no_value'] == 1


def _marking_training(trained):
  """A stand-in for training that leaves what a run leaves for the sweep to see (config.json)."""
  def fake(c, d, pause_at=None):
    trained.append(os.path.basename(d))
    os.makedirs(d, exist_ok=True)
    run_directory.write_config(d, c)
    return {'accuracy': 0.5 + c.optim.learning_rate, 'loss': 1.0}
  return fake


def test_evaluate_keys_training_reads_count_and_are_checked_on_a_rerun(digits_config, tmp_path,
                                                                       monkeypatch):
  trained = []
  monkeypatch.setattr(sweep_trial, '_train', _marking_training(trained))
  config = with_grid(digits_config, "{'optim.learning_rate': [0.2, 0.1]}")
  config.data.train_split = 'train[:80%]'    # (train[80%:] is held out: a temperature split)
  workdir = str(tmp_path)
  first = copy.deepcopy(config)
  first.sweep.shard = '0/2'                  # one trial trained, the other left to shard 1
  sweep.sweep(first, workdir)
  assert trained == ['optim.learning_rate=0.2+seed=0']

  def rerun(**evaluate):
    c = copy.deepcopy(config)
    for k, v in evaluate.items():
      c.evaluate[k] = v
    return sweep.sweep(c, workdir)
  # A bad value is named as a plain run names it, before a finished trial is skipped.
  setting = r'The sweep setting optim.learning_rate=0.2: '
  for evaluate, message in [
      ({'tta': 'bogus'}, r"config.evaluate.tta='bogus' must be '' \(none\), 'flip' or "
       r"'flip_translate'\."),
      ({'tta': 'flip'}, r"Horizontal flips change the meaning of 'sklearn_digits' images; leave "
       r'config.evaluate.tta empty'),
      ({'temperature_split': 'test'}, r"config.evaluate.temperature_split='test' shares \d+ "
       r"examples with config.data.eval_split='test'"),
      ({'abstain_accuracy': 0.99}, r'config.evaluate.abstain_accuracy is fitted with the '
       r'temperature of a single-label run'),
      ({'unknown_keep': 1.5}, r'config.evaluate.unknown_keep=1.5 must be')]:
    with pytest.raises(UserError, match='^' + setting + message):
      rerun(**evaluate)
  # A good value that changes what a trial trains is refused, not mixed into one ranking with
  # trials trained without it (here shard 1's trial would train with it).
  with pytest.raises(UserError, match=r'^1 trial directory of this sweep cannot be resumed: .*'
                     r'optim.learning_rate=0.2\+seed=0 was trained with another config '
                     r'\(evaluate.temperature_split: "" before, "train\[80%:\]" now\); delete '
                     r'such a directory'):
    rerun(temperature_split='train[80%:]')
  assert trained == ['optim.learning_rate=0.2+seed=0']
  # Keys only the modes after training read still do not count: nothing is trained again.
  out = rerun(split='train', errors=0, bootstrap_resamples=0, output_dir='/elsewhere',
              calibration_bins=5, top_confused=3, confidence_level=0.9)
  assert trained == ['optim.learning_rate=0.2+seed=0', 'optim.learning_rate=0.1+seed=0']
  assert [r['status'] for r in out['trials']] == ['finished', 'finished']


def test_which_evaluate_keys_count_depends_on_what_the_trial_reads(digits_config):
  c = sweep_grid.trials(with_grid(digits_config, "{'optim.learning_rate': [0.2]}"))[0].config
  def changed(**keys):   # the keys a rerun with these values would refuse
    now = copy.deepcopy(c)
    for k, v in keys.items():
      group, key = k.split('__')
      now[group][key] = v
    saved, current = configlib.config_dict(c), configlib.config_dict(now)
    return [d.split(':')[0] for d in sweep_store.differences(saved, current)]
  assert changed(evaluate__tta='flip') == ['evaluate.tta']
  assert changed(evaluate__temperature_split='x', evaluate__unknown_keep=0.9) == [
      'evaluate.temperature_split', 'evaluate.unknown_keep']
  assert changed(evaluate__checkpoint='latest', evaluate__split='x', evaluate__errors=0,
                 evaluate__label_issues=False, evaluate__ood_inputs='x',
                 evaluate__bootstrap_resamples=0, evaluate__output_dir='x',
                 evaluate__confidence_level=0.9, evaluate__calibration_bins=5,
                 evaluate__top_confused=1, evaluate__threshold_split='x') == []
  # ... but a k-fold trial evaluates its folds itself (ECE, reports), the abstention threshold
  # fitted at the end of training is at confidence_level, and a tagging run fits thresholds.
  assert changed(cross_validation__folds=2, evaluate__calibration_bins=5,
                 evaluate__top_confused=1) == ['cross_validation.folds',
                                               'evaluate.calibration_bins',
                                               'evaluate.top_confused']
  assert changed(evaluate__abstain_accuracy=0.9, evaluate__confidence_level=0.9) == [
      'evaluate.abstain_accuracy', 'evaluate.confidence_level']
  assert changed(data__multilabel=True, evaluate__threshold_split='x') == [
      'data.multilabel', 'evaluate.threshold_split']


def test_a_damaged_trial_record_is_named_with_its_fix(digits_config, tmp_path, monkeypatch):
  trained = []
  monkeypatch.setattr(sweep_trial, '_train', _marking_training(trained))
  config = with_grid(digits_config, "{'optim.learning_rate': [0.2, 0.1]}")
  sweep.sweep(config, str(tmp_path))
  record = tmp_path / 'optim.learning_rate=0.1+seed=0' / 'sweep_trial.json'
  for damage, why in (('{"config": {', r'JSONDecodeError: Expecting'),
                      ('[1, 2]', 'a JSON list, not a trial record')):
    record.write_text(damage)
    with pytest.raises(UserError, match=(
        r"^1 trial directory of this sweep cannot be resumed: .*optim.learning_rate=0.1\+seed=0/"
        rf"sweep_trial.json, the trial's record, is unreadable or damaged \({why}.*\); restore "
        r'that file from a copy, or move its directory aside to train the trial again\.$')):
      sweep.sweep(config, str(tmp_path))
  assert len(trained) == 2
  # Moved aside, the trial trains again.
  os.rename(record.parent, tmp_path / 'aside')
  assert sweep.sweep(config, str(tmp_path))['best']['setting'] == 'optim.learning_rate=0.2'
  assert trained[2:] == ['optim.learning_rate=0.1+seed=0']


def test_a_sweep_into_a_run_directory_is_refused(digits_config, tmp_path, monkeypatch):
  trained = []
  monkeypatch.setattr(sweep_trial, '_train', _marking_training(trained))
  config = with_grid(digits_config, "{'optim.learning_rate': [0.2]}")
  run = tmp_path / 'run'
  run.mkdir()
  run_directory.write_config(str(run), digits_config)   # what a plain run writes first
  (tmp_path / 'folds' / 'fold_0').mkdir(parents=True)     # a k-fold run
  sweep.sweep(config, str(tmp_path / 'sweep'))            # a trial of a sweep
  trial_dir = tmp_path / 'sweep' / 'optim.learning_rate=0.2+seed=0'
  for workdir in (run, tmp_path / 'folds', trial_dir):
    with pytest.raises(UserError, match=rf'^--workdir={re.escape(str(workdir))} holds a training '
                       r'run, not a sweep; give the sweep another --workdir \(a new or empty '
                       r"folder, or this sweep's own\)\.$"):
      sweep.sweep(config, str(workdir))
  assert sorted(os.listdir(run)) == ['config.json'] and trained == [os.path.basename(trial_dir)]
  for name, held, what in (('export.json', 'an export', 'export.json'),
                           ('classical.json', 'a classical baseline', 'classical.json')):
    other = tmp_path / name.split('.')[0]   # another mode's output: mixed with, before
    other.mkdir()
    (other / name).write_text('{}')
    with pytest.raises(UserError, match=rf'^--workdir={re.escape(str(other))} holds {held} '
                       rf'\({what}\), which this sweep would mix with or overwrite; give a new '
                       r'--workdir\.$'):
      sweep.sweep(config, str(other))
    assert os.listdir(other) == [name]
  (tmp_path / 'real' / 'checkpoints' / '5').mkdir(parents=True)   # a run with a saved step
  inside = tmp_path / 'real' / 'sweeps'
  with pytest.raises(UserError, match='is inside the run directory'):
    sweep.sweep(config, str(inside))
  assert not inside.exists()
  empty = tmp_path / 'empty'
  empty.mkdir()
  sweep.sweep(config, str(empty))                         # an empty folder, and the sweep's own
  sweep.sweep(config, str(tmp_path / 'sweep'))
  assert len(trained) == 2
