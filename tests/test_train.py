"""The training loop end to end (in-process, 8 fake devices)."""
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from imgcls_jax import report, train
from imgcls_jax.errors import UserError


def _records(workdir, split):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['split'] == split]


def test_loss_decreases_on_digits_and_outputs_are_written(digits_config, tmp_path):
  digits_config.num_train_steps = 60
  digits_config.eval_every_steps = 30
  result = train.train_and_evaluate(digits_config, str(tmp_path))
  tr = _records(tmp_path, 'train')
  assert tr[0]['loss'] > 1.5 and tr[-1]['loss'] < 0.6 * tr[0]['loss']
  ev = _records(tmp_path, 'eval')
  assert [r['step'] for r in ev] == [30, 60]
  assert ev[-1]['count'] == 450 and result['count'] == 450
  assert result['accuracy'] > 0.8
  assert all(0 < r['learning_rate'] <= 0.1 and r['images_per_sec'] > 0 for r in tr)
  assert os.path.isdir(tmp_path / 'checkpoints' / '60')
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['model']['name'] == 'cnn' and saved['num_train_steps'] == 60
  # What config.checkpoint.best_metric may name is what the evaluations report.
  assert set(result) == set(report.eval_metric_names(multilabel=False))


def test_a_best_metric_no_evaluation_reports_fails_before_the_first_step(digits_config, tmp_path):
  """It used to fail at the first evaluation (epochs in), with no checkpoint saved."""
  digits_config.num_train_steps = 60
  digits_config.checkpoint.keep_best = 1
  digits_config.checkpoint.best_metric = 'f1'
  with pytest.raises(UserError, match=r"best_metric='f1' is not an evaluation metric of this "
                     r'single-label run; use one of: .*f1_macro'):
    train.train_and_evaluate(digits_config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'metrics.jsonl')


def test_a_rerun_with_fewer_steps_than_the_checkpoint_is_refused(digits_config, tmp_path):
  """It reported the longer run's model as the shorter one's, unnamed, and config.json then
  recorded the shorter length."""
  digits_config.num_train_steps = 4
  train.train_and_evaluate(digits_config, str(tmp_path))
  before = (tmp_path / 'config.json').read_text()
  digits_config.num_train_steps = 2
  with pytest.raises(UserError, match=r'^The newest checkpoint in .* is at step 4, past this '
                     r"config's 2 steps .*nothing is left to train; .*in a new --workdir.$"):
    train.train_and_evaluate(digits_config, str(tmp_path))
  assert (tmp_path / 'config.json').read_text() == before


def test_a_longer_rerun_says_how_the_learning_rate_jumps(digits_config, tmp_path, caplog):
  """Extending a finished run stretches its schedule: the rate at the resumed step changes at
  once (linear decay to half the peak: 0.5 x peak at step 10 of 10, 0.75 x peak of 20)."""
  import logging
  import re
  digits_config.optim.schedule = 'linear'
  digits_config.optim.end_lr_factor = 0.5
  digits_config.optim.warmup_steps = 0
  digits_config.optim.warmup_epochs = 0.0
  digits_config.num_train_steps = 10
  train.train_and_evaluate(digits_config, str(tmp_path))
  digits_config.num_train_steps = 20
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(digits_config, str(tmp_path))
  m = re.search(r'Resuming at step 10: the learning rate goes from (\S+) \(the schedule of the '
                r"checkpoint's 10 steps\) to (\S+) \(this config's 20\)", caplog.text)
  assert m, caplog.text
  assert float(m.group(2)) / float(m.group(1)) == pytest.approx(1.5, rel=1e-3)


def test_rerun_resumes_from_the_latest_checkpoint(digits_config, tmp_path):
  digits_config.num_train_steps = 20
  train.train_and_evaluate(digits_config, str(tmp_path))
  first = _records(tmp_path, 'train')
  digits_config.num_train_steps = 40
  train.train_and_evaluate(digits_config, str(tmp_path))
  second = _records(tmp_path, 'train')[len(first):]
  assert first[-1]['step'] <= 20
  assert second and min(r['step'] for r in second) > 20  # continued, did not start over
  assert sorted(os.listdir(tmp_path / 'checkpoints'))[-1] == '40'


def test_one_resnet_step_on_mock_imagenet(tmp_path):
  from configs import imagenet_resnet50
  c = imagenet_resnet50.get_config()
  c.data.data_dir = str(tmp_path / 'tfds')
  c.data.train_preprocess = 'random_resized_crop(size=32)|flip_lr'
  c.data.eval_preprocess = 'center_crop(size=32)'
  c.model.name = 'resnet18'  # the ImageNet recipe with a cheaper-to-compile ResNet (CI time)
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_train_steps = 1
  c.progress_bar = False
  c.tensorboard = False
  with tfds.testing.mock_data(num_examples=16):
    result = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert result['count'] == 16
  assert np.isfinite(result['loss'])
  (rec,) = _records(tmp_path / 'run', 'train')
  assert rec['step'] == 1 and np.isfinite(rec['loss'])


def test_a_record_every_step_when_asked_whatever_the_saves_and_evaluations(digits_config,
                                                                            tmp_path):
  """log_every_steps=1 with a checkpoint every 5 steps and an evaluation every 4: the step before
  each save or evaluation had no record of its own (the saved step's averaged both)."""
  digits_config.num_train_steps = 12
  digits_config.log_every_steps = 1
  digits_config.checkpoint_every_steps = 5
  digits_config.eval_every_steps = 4
  train.train_and_evaluate(digits_config, str(tmp_path))
  tr = _records(tmp_path, 'train')
  assert [r['step'] for r in tr] == list(range(1, 13))
  lr = [r['learning_rate'] for r in tr]
  assert len(set(lr)) == 12   # one step's learning rate each (warmup then decay), no means


@pytest.mark.parametrize('stop', range(1, 12))
def test_train_records_after_a_stop_and_resume_equal_an_uninterrupted_runs(stop):
  """TrainLog, flushed as the loop flushes it (every 3 steps, one dispatch behind), stopped by a
  signal at any step and resumed with what the stop carried in its checkpoint: the same records.
  (A resumed run whose first flush fetched nothing dropped the carried steps' record.)"""
  import types
  import jax.numpy as jnp
  from imgcls_jax import train_log

  class Writer:
    def __init__(self):
      self.records = []

    def write(self, step, split, summary):
      self.records.append((step, round(summary['loss'], 6), round(summary['accuracy'], 6)))

  bar = types.SimpleNamespace(set_postfix=lambda **kw: None)

  def run(log, start, end):
    for step in range(start, end):
      log.add({'loss': jnp.float32(step + 1), 'grad_norm': jnp.float32(1.0),
               'accuracy': jnp.float32((step % 4) / 4)})
      done = step + 1
      if done // 3 > step // 3:
        log.flush(done, keep_last=True)
  whole, stopped = Writer(), Writer()
  run(train_log.TrainLog(whole, bar, 8, RuntimeError), 0, 12)
  first = train_log.TrainLog(stopped, bar, 8, RuntimeError)
  run(first, 0, stop)
  first.flush(stop, keep_last=False, write=False)   # the stop's save
  resumed = train_log.TrainLog(stopped, bar, 8, RuntimeError)
  resumed.carried = list(first.carried)             # from its checkpoint
  run(resumed, stop, 12)
  assert stopped.records == whole.records
