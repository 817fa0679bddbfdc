"""Successive halving in sweeps (``config.sweep.halving``): pausing a run mid-way and resuming it
is exact; the rungs train what they should; the settings that go on are the best by the trials'
own evaluations; reruns repeat every decision without training; mistakes are one sentence."""
import copy
import json
import os

import numpy as np
import pytest

from imgcls_jax import checkpoint, metrics, run_length, train
from imgcls_jax import sweep
from imgcls_jax.errors import UserError
from imgcls_jax.sweep import halving
from imgcls_jax.sweep import trial as sweep_trial
from tests.conftest import with_grid


def _evals(workdir):
  return [r for r in metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if r.get('split') == 'eval']


def _latest(workdir):
  with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
    return ckpt.latest_step()


def _records(workdir, split):
  return [r for r in metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if r.get('split') == split]


def _best(workdir):
  with checkpoint.Checkpointer(workdir, read_only=True, keep_best=1) as ckpt:
    return ckpt.best_step()


def test_a_run_paused_and_resumed_ends_as_the_same_run_trained_straight(digits_config, tmp_path):
  # A perverse best rule (the lowest accuracy) would pick a paused step, were it ranked.
  digits_config.checkpoint.best_mode = 'min'
  digits_config.optim.learning_rate = 0.05   # (a setting of the real halving sweep below: the
                                             # same compiled programs)
  straight = train.train_and_evaluate(digits_config, str(tmp_path / 'straight'))
  paused_dir = str(tmp_path / 'paused')
  first = train.train_and_evaluate(digits_config, paused_dir, pause_at=0.25)
  assert first['paused_at_step'] == 10 and first['total_steps'] == 40
  assert _latest(paused_dir) == 10
  (at10,) = _records(paused_dir, 'rung')   # evaluated where it paused, its metrics returned
  assert at10['step'] == 10 and at10['accuracy'] == pytest.approx(first['accuracy'], abs=1e-7)
  assert _evals(paused_dir) == [] and _best(paused_dir) is None   # no eval record, no best
  again = train.train_and_evaluate(digits_config, paused_dir, pause_at=0.25)   # already there
  assert again['paused_at_step'] == 10 and _latest(paused_dir) == 10
  assert again['accuracy'] == first['accuracy']
  middle = train.train_and_evaluate(digits_config, paused_dir, pause_at=0.5)
  assert middle['paused_at_step'] == 20
  final = train.train_and_evaluate(digits_config, paused_dir)
  assert 'paused_at_step' not in final
  for k in ('accuracy', 'loss'):
    assert final[k] == straight[k], k   # the same arithmetic: exact
  # What a reader of the run sees is the plain run's: its evaluations, its best checkpoint.
  assert [r['step'] for r in _evals(paused_dir)] == [r['step'] for r in _evals(
      str(tmp_path / 'straight'))] == [40]
  assert [r['step'] for r in _records(paused_dir, 'rung')] == [10, 20]
  assert _best(paused_dir) == _best(str(tmp_path / 'straight')) == 40
  assert run_length.pause_step(40, 0.01) == 1 and run_length.pause_step(40, 1.0) == 40
  # whole groups of steps_per_dispatch: the resumed run groups its steps as the plain one
  assert run_length.pause_step(40, 1 / 3, 4) == 12 and run_length.pause_step(40, 0.01, 4) == 4
  assert run_length.pause_step(10, 0.9, 4) == 8
  with pytest.raises(ValueError, match=r'pause_at=1.5 must be a share of the run in \(0, 1\]'):
    run_length.pause_step(40, 1.5)


def test_the_rungs_follow_eta_and_the_first_rung():
  def rungs(eta, n, first=0.0):
    c = _config_stub(eta, first)
    return halving.fractions(c, n)
  assert rungs(0, 9) == [1.0]
  assert rungs(3, 9) == pytest.approx([1 / 9, 1 / 3, 1.0])
  assert rungs(3, 8) == pytest.approx([1 / 3, 1.0])
  assert rungs(2, 12) == pytest.approx([1 / 8, 1 / 4, 1 / 2, 1.0])
  assert rungs(2, 1) == [1.0]
  assert rungs(2, 12, first=0.1) == pytest.approx([1 / 8, 1 / 4, 1 / 2, 1.0])
  assert rungs(3, 2, first=1 / 9) == pytest.approx([1 / 9, 1 / 3, 1.0])


def _config_stub(eta, first, **extra):
  import ml_collections
  c = ml_collections.ConfigDict({
      'sweep': {'halving': eta, 'first_rung': first, 'shard': ''},
      'cross_validation': {'folds': 0}, 'evaluate': {'checkpoint': 'best'}})
  for k, v in extra.items():
    group, key = k.split('__')
    c[group][key] = v
  return c


@pytest.mark.parametrize('eta, first, extra, message', [
    (1, 0.0, {}, r'config.sweep.halving=1 must be an int >= 2'),
    (2.5, 0.0, {}, r'config.sweep.halving=2.5 must be an int >= 2'),
    (True, 0.0, {}, r'config.sweep.halving=True must be an int >= 2'),
    (2, 1.0, {}, r'config.sweep.first_rung=1.0 must be a share of the run in \(0, 1\)'),
    (2, 0.7, {}, r'config.sweep.first_rung=0.7 is above 1/2: no rung before the end'),
    (0, 0.1, {}, r'config.sweep.first_rung=0.1 needs config.sweep.halving'),
    (3, 0.0, {'sweep__shard': '0/2'}, r'runs in one process: drop config.sweep.shard'),
    (3, 0.0, {'cross_validation__folds': 3}, r'drop config.cross_validation.folds'),
])
def test_what_halving_cannot_run_with_is_one_sentence(eta, first, extra, message):
  with pytest.raises(UserError, match=message):
    halving.fractions(_config_stub(eta, first, **extra), 9)


def _fake_training(log, scores):
  """A stand-in for training: accuracy by learning rate and share of the run (``scores``)."""
  def fake(config, directory, pause_at=None):
    lr = config.optim.learning_rate
    log.append((os.path.basename(directory), pause_at))
    if scores[lr] is None:
      raise train.TrainingDiverged('Training diverged: the loss is nan at step 3.')
    share = 1.0 if pause_at is None else pause_at
    out = {'accuracy': scores[lr](share) + 1e-3 * config.seed, 'loss': 1.0}
    return out if pause_at is None else {**out, 'paused_at_step': round(90 * share),
                                         'total_steps': 90}
  return fake


def test_halving_promotes_the_best_third_and_ranks_the_stopped_below(digits_config, tmp_path,
                                                                     monkeypatch):
  # Six settings, eta 3, the first rung at 1/9: then 1/3 and the whole run (6 -> 2 -> 1).
  scores = {0.1: lambda f: 0.5 + 0.4 * f,     # slow starter, best at the end
            0.2: lambda f: 0.6 + 0.2 * f,     # fast starter
            0.3: lambda f: 0.55,
            0.4: None,                        # diverges at once
            0.5: lambda f: 0.52,
            0.6: lambda f: 0.56 + 0.01 * f}
  log = []
  monkeypatch.setattr(sweep_trial, '_train', _fake_training(log, scores))
  config = with_grid(digits_config, "{'optim.learning_rate': [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}",
                      seeds=2, halving=3, first_rung=1 / 9)
  out = sweep.sweep(config, str(tmp_path))
  name = lambda lr, s: f'optim.learning_rate={lr}+seed={s}'
  # rung 1/9: all 12 trials; 1/3: the 2 best settings at 1/9 (0.2: 0.622, 0.6: 0.561);
  # the whole run: the better of those two at 1/3 (0.2: 0.667 > 0.6: 0.563)
  assert log[:12] == [(name(lr, s), pytest.approx(1 / 9)) for lr in scores for s in (0, 1)]
  assert log[12:16] == [(name(lr, s), pytest.approx(1 / 3)) for lr in (0.2, 0.6) for s in (0, 1)]
  assert log[16:] == [(name(0.2, s), None) for s in (0, 1)]
  order = [s['setting'] for s in out['settings']]
  assert order == [f'optim.learning_rate={lr}' for lr in (0.2, 0.6, 0.3, 0.1, 0.5, 0.4)]
  best, second, third = out['settings'][:3]
  assert best['budget'] == 1.0 and best['mean'] == pytest.approx(0.8005)
  assert second['budget'] == pytest.approx(1 / 3) and second['stopped'] == 2
  assert third['budget'] == pytest.approx(1 / 9)
  assert out['settings'][-1]['diverged'] == 2 and out['settings'][-1]['mean'] is None
  statuses = {r['trial']: r['status'] for r in out['trials']}
  assert statuses[name(0.2, 0)] == 'finished' and statuses[name(0.6, 1)] == 'stopped'
  assert statuses[name(0.4, 0)] == 'diverged'
  with open(tmp_path / 'sweep.md') as f:
    md = f.read()
  assert 'Successive halving by 3: rungs at 1/9, 1/3, 1 of each run' in md
  assert '(stopped at 1/3 of the run)' in md and '| stopped at 1/9 |' in md
  # A rerun repeats every decision from the trials' records, training nothing.
  monkeypatch.setattr(sweep_trial, '_train', lambda *a, **k: pytest.fail(f'{a[1]} trained again'))
  again = sweep.sweep(config, str(tmp_path))
  assert again['settings'] == out['settings']
  # The same sweep without halving resumes the stopped trials to the end (and only those).
  log.clear()
  monkeypatch.setattr(sweep_trial, '_train', _fake_training(log, scores))
  whole = sweep.sweep(with_grid(config, config.sweep.grid, seeds=2, halving=0, first_rung=0.0),
                      str(tmp_path))
  assert sorted(n for n, _ in log) == sorted(name(lr, s) for lr in (0.1, 0.3, 0.5, 0.6)
                                             for s in (0, 1))
  assert [s['setting'] for s in whole['settings']][0] == 'optim.learning_rate=0.1'


def test_a_real_halving_sweep_scores_each_rung_by_the_trials_own_evaluations(
    digits_config, tmp_path):
  config = with_grid(digits_config, "{'optim.learning_rate': [0.003, 0.3, 0.05, 30.0]}",
                      halving=2)   # 4 settings: rungs at 1/4, 1/2, 1 (10, 20, 40 steps)
  workdir = str(tmp_path)
  out = sweep.sweep(config, workdir)
  dirs = {r['setting']: r['workdir'] for r in out['trials']}
  reached = {s: _latest(d) for s, d in dirs.items()}
  assert sorted(reached.values()) == [10, 10, 20, 40]

  def at(d, step):   # the oracle: each trial's own evaluation at that step
    (r,) = [r for r in _records(d, 'rung') + _evals(d) if r['step'] == step]
    return r['accuracy']
  at10 = sorted(dirs, key=lambda s: -at(dirs[s], 10))
  assert {s for s in dirs if reached[s] >= 20} == set(at10[:2])
  going = [s for s in dirs if reached[s] >= 20]
  winner = max(going, key=lambda s: at(dirs[s], 20))
  assert reached[winner] == 40
  assert out['settings'][0]['setting'] == winner
  assert out['settings'][0]['mean'] == at(dirs[winner], 40)
  for s in out['settings'][1:]:
    assert s['mean'] == at(dirs[s['setting']], reached[s['setting']]), s['setting']
  # The winner, paused at two rungs, ends as its plain run trained straight.
  plain = copy.deepcopy(digits_config)
  plain.optim.learning_rate = float(winner.split('=')[1])
  straight = train.train_and_evaluate(plain, str(tmp_path / 'straight'))
  last = _evals(dirs[winner])[-1]
  assert last['step'] == 40 and last['accuracy'] == straight['accuracy']
  assert last['loss'] == straight['loss']
  with open(os.path.join(dirs[winner], checkpoint.SWEEP_TRIAL_FILE)) as f:
    record = json.load(f)
  assert sorted(record['rungs']) == ['0.25', '0.5'] and record['status'] == 'finished'
  assert np.isclose(record['rungs']['0.25']['metrics']['accuracy'], at(dirs[winner], 10))


def test_a_seed_without_a_finite_score_or_held_elsewhere_keeps_its_setting_back(
    digits_config, tmp_path, monkeypatch):
  log = []
  scores = {0.1: lambda f: 0.9, 0.2: lambda f: 0.5, 0.3: lambda f: 0.4, 0.4: lambda f: 0.3}
  fake = _fake_training(log, scores)
  def nan_for_one_seed(config, directory, pause_at=None):
    out = fake(config, directory, pause_at)
    if config.optim.learning_rate == 0.1 and config.seed == 1:
      out['accuracy'] = float('nan')
    return out
  monkeypatch.setattr(sweep_trial, '_train', nan_for_one_seed)
  config = with_grid(digits_config, "{'optim.learning_rate': [0.1, 0.2, 0.3, 0.4]}", seeds=2,
                      halving=2)   # rungs 1/4, 1/2, 1
  out = sweep.sweep(config, str(tmp_path))
  # 0.1 leads on its finite seed but has a NaN one: 0.2 and 0.3 go on, then 0.2 alone
  assert [n for n, p in log if p is None] == [f'optim.learning_rate=0.2+seed={s}' for s in (0, 1)]
  first = out['settings'][0]
  assert first['setting'] == 'optim.learning_rate=0.2' and first['budget'] == 1.0
  nan_setting = next(s for s in out['settings'] if s['setting'] == 'optim.learning_rate=0.1')
  assert nan_setting['no_value'] == 1 and out['settings'][-1] is nan_setting
  # Every setting with a diverged seed at the first rung: none goes on, and the error says why.
  scores = {0.1: lambda f: 0.9, 0.2: None}
  monkeypatch.setattr(sweep_trial, '_train', _fake_training([], scores))
  with pytest.raises(UserError, match=r'^No trial of the sweep finished; the first diverged: '
                     'Training diverged'):
    sweep.sweep(with_grid(config, "{'optim.learning_rate': [0.2]}", seeds=1, halving=2),
                str(tmp_path / 'all_diverge'))
  # Another copy of the same halving sweep holding a trial: refused, not ranked without it.
  monkeypatch.setattr(sweep_trial, '_train', _fake_training([], {0.1: lambda f: 0.9,
                                                                 0.2: lambda f: 0.8}))
  grid = with_grid(config, "{'optim.learning_rate': [0.1, 0.2]}", seeds=1, halving=2)
  from imgcls_jax.sweep import store
  with store.claim(str(tmp_path / 'held' / 'optim.learning_rate=0.2+seed=0')) as mine:
    assert mine
    with pytest.raises(UserError, match=r'is being trained by another process; successive '
                       'halving ranks every trial of a rung'):
      sweep.sweep(grid, str(tmp_path / 'held'))


def test_a_halving_rerun_ranks_what_each_trial_directory_holds(digits_config, tmp_path,
                                                               monkeypatch, capsys):
  # Four settings, eta 2: rungs 1/4, 1/2, 1. 0.1 starts slowest and ends best.
  scores = {0.1: lambda f: 0.3 + 0.6 * f, 0.2: lambda f: 0.7 + 0.1 * f, 0.3: lambda f: 0.6,
            0.4: lambda f: 0.5}
  log = []
  monkeypatch.setattr(sweep_trial, '_train', _fake_training(log, scores))
  config = with_grid(digits_config, "{'optim.learning_rate': [0.1, 0.2, 0.3, 0.4]}", halving=2)
  halved = sweep.sweep(config, str(tmp_path))
  stopped = {r['overrides']['optim.learning_rate']: r['budget'] for r in halved['trials']
             if r['status'] == 'stopped'}
  quarter = round(90 * 0.25) / 90   # (the stand-in's run: 90 steps)
  assert stopped == pytest.approx({0.1: quarter, 0.3: 0.5, 0.4: quarter})
  # The same grid without halving trains the stopped trials to the end: 0.1 is best now.
  whole = sweep.sweep(with_grid(config, config.sweep.grid, halving=0), str(tmp_path))
  assert [s['setting'] for s in whole['settings']][0] == 'optim.learning_rate=0.1'
  # The halving command again: the same decisions, nothing trained, and every trial ranked as
  # its directory holds it (trained to the end), not as where this halving stopped it.
  capsys.readouterr()
  monkeypatch.setattr(sweep_trial, '_train', lambda *a, **k: pytest.fail(f'{a[1]} trained again'))
  again = sweep.sweep(config, str(tmp_path))
  assert [r['status'] for r in again['trials']] == ['finished'] * 4
  assert [(s['setting'], s['mean'], s['budget']) for s in again['settings']] == [
      (f'optim.learning_rate={lr}', scores[lr](1.0), 1.0) for lr in (0.1, 0.2, 0.3, 0.4)]
  assert again['settings'] == whole['settings']
  out = capsys.readouterr().out
  assert 'Best: optim.learning_rate=0.1;' in out and 'stopped' not in out
  with open(tmp_path / 'sweep.md') as f:
    md = f.read()
  assert '| 1 | `optim.learning_rate=0.1` | 90.00% |' in md
  assert '(stopped at' not in md and '| stopped' not in md


def test_a_stopped_trial_trained_to_a_later_rung_before_is_ranked_there(digits_config, tmp_path):
  from imgcls_jax.sweep import grid, store
  (t,) = grid.trials(with_grid(digits_config, "{'optim.learning_rate': [0.1]}"))
  d = str(tmp_path / t.name)
  base = {'trial': t.name, 'setting': t.setting, 'overrides': t.overrides, 'seed': 0,
          'workdir': d, 'wall_s': 1.0}
  here = {**base, 'status': 'stopped', 'budget': 0.25, 'metrics': {'accuracy': 0.4}}
  later = {**base, 'status': 'paused', 'budget': 0.5, 'metrics': {'accuracy': 0.7}}
  store.write(d, {'config': t.config_json, 'status': 'paused', 'row': later,
                  'rungs': {'0.25': {**here, 'status': 'paused'}, '0.5': later}})
  assert sweep_trial.as_held(t, d, here) == {**later, 'status': 'stopped'}
  store.write(d, {'config': t.config_json, 'status': 'paused', 'row': {**here, 'status': 'paused'},
                  'rungs': {}})   # held where it stops: as it is
  assert sweep_trial.as_held(t, d, here) == here
  other = copy.deepcopy(t.config_json)
  other['optim']['learning_rate'] = 0.2   # another config's run: not this trial's
  store.write(d, {'config': other, 'status': 'finished', 'row': {**later, 'status': 'finished'}})
  assert sweep_trial.as_held(t, d, here) == here
