"""Stop notices that land where no step checks for them: after a run's last step (its final
evaluation or save) inside a cross-validation or sweep, and SIGHUP (a dropped terminal) unless
nohup ignores it. Real signals, sent to this process."""
import os
import signal

import pytest

from imgcls_jax import cross_validation, preemption, train
from tests.test_cross_validation import _cv_config


def test_a_notice_inside_a_run_reaches_the_watchers_around_it():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.StopWatcher() as sweep, preemption.StopWatcher() as folds:
    with preemption.StopWatcher() as run:
      assert not run.requested(5)              # the run's last check ...
      os.kill(os.getpid(), signal.SIGTERM)     # ... then the notice, during its final save
    assert run.signal_name == 'SIGTERM'
    assert folds.requested(0) and sweep.requested(0)   # the next fold / trial does not start
  assert signal.getsignal(signal.SIGTERM) == previous


def test_a_notice_before_a_run_began_stops_it_at_its_first_step():
  """A signal during a fold's set-up (before its run's watcher exists) was the outer watcher's
  only: the fold then trained to its end."""
  with preemption.StopWatcher() as folds:
    os.kill(os.getpid(), signal.SIGTERM)          # the fold is still being set up
    with preemption.StopWatcher() as run:
      assert run.requested(0) and run.signal_name == 'SIGTERM'
    assert folds.requested(0)
  with preemption.StopWatcher() as folds:
    os.kill(os.getpid(), signal.SIGINT)           # a first Ctrl-C in the set-up ...
    with preemption.StopWatcher() as run:
      assert run.requested(0)
      with pytest.raises(KeyboardInterrupt):      # ... so a second one stops at once
        os.kill(os.getpid(), signal.SIGINT)


def test_sighup_stops_the_run_unless_nohup_ignores_it():
  previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)   # as at a terminal (the suite may
  try:                                                      # itself run under nohup)
    with preemption.StopWatcher() as stop:
      os.kill(os.getpid(), signal.SIGHUP)
      assert stop.requested(1) and stop.signal_name == 'SIGHUP'
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    signal.signal(signal.SIGHUP, signal.SIG_IGN)   # as under nohup
    with preemption.StopWatcher() as stop:
      os.kill(os.getpid(), signal.SIGHUP)
      assert not stop.requested(1)
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
  finally:
    signal.signal(signal.SIGHUP, previous)


@pytest.mark.slow
def test_a_sigterm_during_a_folds_final_evaluation_stops_the_cross_validation(
    digits_config, tmp_path, monkeypatch, capsys):
  """The notice lands after fold 0's last step: fold 0 finishes and is saved, fold 1 is not
  started (it was: the whole of fold 1 trained, and the job was killed 300 s later)."""
  config = _cv_config(digits_config, 3)
  real, trained = train.train_and_evaluate, []

  def notice_at_the_end(cfg, wd):
    trained.append(os.path.basename(wd))
    result = real(cfg, wd)
    os.kill(os.getpid(), signal.SIGTERM)   # after the run's last check, before it returned
    return result

  monkeypatch.setattr(train, 'train_and_evaluate', notice_at_the_end)
  result = cross_validation.cross_validate(config, str(tmp_path / 'cv'))
  assert trained == ['fold_0'] and result['interrupted_in_fold'] == 1
  assert 'Stopped by SIGTERM before fold 1 (1 of 3 folds done). To resume, ' in (
      capsys.readouterr().out)
  assert os.path.exists(tmp_path / 'cv' / 'fold_0' / 'report.json')
  assert not os.path.exists(tmp_path / 'cv' / 'fold_1' / 'checkpoints')
