"""Resuming with a config that changes the train state's tree names the changed keys (not a tree
path such as ``opt_state/1/0/trace/...``), and a changed trajectory is warned of once, for the
checkpoint resumed from, after the notice about a damaged newer one."""
import glob
import logging
import os
import re

import jax.numpy as jnp
import pytest

from imgcls_jax import checkpoint, configlib, train
from imgcls_jax.errors import UserError
from tests.conftest import checkpointed_digits_run, copy_of_run
from tests.test_checkpoint import _target

FIX = ("resume it with the checkpoint's values (config.json in the workdir) or start the new run "
       'in a new --workdir.')


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory, tfds_dir):
  """A digits run: 20 steps, checkpoints at 10 and 20."""
  return checkpointed_digits_run(tmp_path_factory, tfds_dir, 20)


@pytest.fixture
def run_copy(digits_run, tmp_path):
  return copy_of_run(digits_run, tmp_path)


def _truncate_the_largest_array_file(step_dir):
  """Half of the largest array-data file of a saved state (a torn write): the tree's metadata, in
  the small files, still reads, so the checkpoint passes every check until its arrays are read."""
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
           if os.path.isfile(f)]
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)


@pytest.mark.parametrize('key, value, said', [
    ('optim.grad_clip_norm', 1.0, 'optim.grad_clip_norm: 0.0 in the checkpoint, 1.0 now'),
    ('optim.name', 'adamw', 'optim.name: "sgd" in the checkpoint, "adamw" now'),
])
def test_a_change_that_reshapes_the_optimizer_state_is_named_by_its_key(run_copy, key, value,
                                                                         said):
  """It said 'does not fit this model/config: opt_state/1/0/trace/convs/0/kernel is only in the
  checkpoint (and 41 more differences)'. More steps (num_train_steps) change no structure: not
  named."""
  c, workdir = run_copy
  section, leaf = key.split('.')
  c[section][leaf] = value
  c.num_train_steps = 40
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(c, workdir)
  where = f"checkpoint 20 in {os.path.join(workdir, 'checkpoints')}"
  assert str(e.value) == (f'Cannot resume {where} with this config ({said}): its optimizer state '
                          f'has another structure now; {FIX}')
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10', '20']  # not damage


@pytest.mark.parametrize('part, changed', [
    ('opt_state', {}), ('opt_state', {'num_train_steps': 80, 'seed': 3}),
    ('opt_state', {'optim.learning_rate': 0.2, 'optim.b2': 0.98}),   # values, not the structure
    ('params', {'optim.learning_rate': 0.2}),
])
def test_a_mismatch_no_config_key_explains_still_names_the_first_tree_path(tmp_path, part,
                                                                           changed):
  """The tree detail stays where the saved config and this one agree on every key that shapes the
  differing part (the optimizer state: on all keys, on all but a longer run with another seed, or
  on all but a learning rate and a beta, values that shape no state; the parameters: no key a
  resumed run may change shapes them)."""
  c = configlib.load_config_file(configlib.default_config_path())
  saved = configlib.config_dict(c)
  for key, value in changed.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  state = {part: {'mu': jnp.zeros((4, 3))}, 'step': jnp.asarray(1, jnp.int32)}
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state, meta={'config': saved})
  other = dict(state, **{part: {'mu': jnp.zeros((4, 5))}})
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt, pytest.raises(UserError) as e:
    ckpt.restore_latest(_target(other), config=c)
  assert re.fullmatch(rf'Checkpoint 1 in \S+ does not fit this model/config: {part}/mu is '
                      r'\(4, 3\) float32 in the checkpoint, \(4, 5\) float32 now; resume with the '
                      r'config that wrote it \(config\.json in the workdir\) or use a new '
                      r'--workdir\.', str(e.value)), str(e.value)


def test_a_changed_trajectory_past_a_damaged_checkpoint_is_warned_of_once_after_it(run_copy,
                                                                                    caplog):
  """It was warned of twice (once per checkpoint tried, the damaged one first), both times before
  the notice that the newest checkpoint is damaged."""
  c, workdir = run_copy
  _truncate_the_largest_array_file(os.path.join(workdir, 'checkpoints', '20'))
  c.optim.learning_rate = 0.05
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(c, workdir)
  said = [r.getMessage() for r in caplog.records]
  changed = [i for i, m in enumerate(said) if 'with a changed config' in m]
  damaged = [i for i, m in enumerate(said) if 'is unreadable' in m]
  assert len(changed) == 1 and len(damaged) == 1, said
  assert changed[0] > damaged[0], said
  directory = os.path.join(workdir, 'checkpoints')
  assert said[changed[0]].startswith(
      f'Resuming checkpoint 10 in {directory} with a changed config (optim.learning_rate: 0.1 in '
      'the checkpoint, 0.05 now)'), said[changed[0]]
