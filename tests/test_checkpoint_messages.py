"""Messages about a damaged checkpoint (its meta JSON garbled, its arrays truncated, its folder
emptied): resuming says in one sentence which step, why, where it was moved and the step it goes on
from; a reader (evaluate, predict, export) that cannot use a step says so in the same words, naming
its config key and the other steps."""
import glob
import logging
import os
import re
import shutil

import pytest

from imgcls_jax import evaluate, export, predict, train
from imgcls_jax.errors import UserError
from tests.conftest import checkpointed_digits_run, copy_of_run

JSON_ERROR = 'meta/metadata: JSONDecodeError: Expecting value: line 1 column 1 (char 0)'


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory, tfds_dir):
  """A digits run: 30 steps, checkpoints at 10, 20 and 30."""
  return checkpointed_digits_run(tmp_path_factory, tfds_dir, 30)


@pytest.fixture
def run_copy(digits_run, tmp_path):
  return copy_of_run(digits_run, tmp_path)


def _garble_meta(step_dir):
  with open(os.path.join(step_dir, 'meta', 'metadata'), 'w') as f:
    f.write('garbage')


def _truncate_arrays(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
           if os.path.isfile(f)]
  assert files, step_dir
  for f in files:
    os.truncate(f, os.path.getsize(f) // 2)


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


DAMAGE = {'meta': _garble_meta, 'arrays': _truncate_arrays, 'empty': _empty}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_resuming_past_a_damaged_checkpoint_says_so_in_one_sentence(run_copy, caplog, damage):
  """It nested the meta reader's whole UserError (with advice for readers: 'use another step')
  in the warning, and said the step it went on from in a second line."""
  c, workdir = run_copy
  DAMAGE[damage](os.path.join(workdir, 'checkpoints', '30'))
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(c, workdir)
  assert 'is unreadable (UserError' not in caplog.text
  said = [r.getMessage() for r in caplog.records if 'unreadable' in r.getMessage()]
  assert len(said) == 1, said   # not a second line for the step it goes on from
  head = f"Checkpoint 30 in {os.path.join(workdir, 'checkpoints')} is unreadable ("
  tail = (f"); moved it to {os.path.join(workdir, 'corrupt_checkpoints', '30')} and resuming from "
          'the previous good checkpoint, step 20.')
  assert said[0].startswith(head) and said[0].endswith(tail), said[0]
  cause = said[0][len(head):-len(tail)]
  assert 'UserError' not in cause and 'unreadable' not in cause and 'another' not in cause
  if damage == 'meta':
    assert cause == JSON_ERROR
  elif damage == 'empty':
    assert cause == 'its folder is empty'
  else:
    assert cause.startswith('ValueError: '), cause
  assert os.path.isdir(os.path.join(workdir, 'corrupt_checkpoints', '30'))
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '30', 'state'))   # trained again


def _errors(workdir, tmp_path):
  """{config key that picks the step: the UserError of the mode reading checkpoint 20}."""
  got = {}
  with pytest.raises(UserError) as e:
    evaluate.evaluate(None, workdir, overrides={'evaluate.checkpoint': '20',
                                                'evaluate.output_dir': str(tmp_path / 'ev')})
  got['evaluate.checkpoint'] = str(e.value)
  with pytest.raises(UserError) as e:
    predict.predict(None, workdir, overrides={'predict.step': 20})
  got['predict.step'] = str(e.value)
  with pytest.raises(UserError) as e:
    export.export(None, workdir, overrides={'export.step': 20,
                                            'export.output_dir': str(tmp_path / 'ex')})
  got['export.step'] = str(e.value)
  return got


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_a_damaged_step_is_named_alike_by_every_reader_with_its_key_and_the_other_steps(
    run_copy, tmp_path, damage):
  """Evaluate said '... is unreadable (...); use another step, or resume training there to set it
  aside' (neither its key nor the steps) for a garbled meta or an emptied folder, where predict and
  export named both; they said 'step 20 is not in' of an emptied folder."""
  _, workdir = run_copy
  DAMAGE[damage](os.path.join(workdir, 'checkpoints', '20'))
  causes = set()
  for key, message in _errors(workdir, tmp_path).items():
    m = re.fullmatch(rf"Cannot read checkpoint 20 of {re.escape(workdir)}/checkpoints \((.+)\); "
                     r'it is damaged, incomplete or not a checkpoint of this project; pick '
                     rf'another step \(10, 30\) with --config\.{re.escape(key)}\.', message)
    assert m, message
    causes.add(m[1])
  if damage == 'meta':
    assert causes == {JSON_ERROR}
  elif damage == 'empty':
    assert causes == {'its folder is empty'}
  else:   # tensorstore's error of the array read first (which one may vary)
    assert all(c.startswith('ValueError: ') for c in causes), causes


def test_calibrate_on_a_damaged_latest_checkpoint_says_to_resume_training_first(run_copy):
  """Calibrate fits the latest checkpoint only: 'pick another step' was no fix there."""
  from imgcls_jax import calibrate
  _, workdir = run_copy
  _garble_meta(os.path.join(workdir, 'checkpoints', '30'))
  with pytest.raises(UserError) as e:
    calibrate.calibrate(None, workdir, overrides={'evaluate.temperature_split': 'train[:100]'})
  message = str(e.value)
  assert message.startswith(f'Cannot read checkpoint 30 of {workdir}/checkpoints ({JSON_ERROR})')
  assert message.endswith('--mode=calibrate fits the latest checkpoint: rerun the training '
                          'command first (it moves the damaged one aside and resumes from the '
                          'step before it), then calibrate.')
  assert 'pick another step' not in message
