"""configlib.validate: every bad value is one sentence naming the key, found before any work."""
import pytest

from configs import default
from imgcls_jax import configlib
from imgcls_jax.errors import UserError


@pytest.mark.parametrize('key, value, match', [
    ('grad_accumulation_steps', 0, r'config.grad_accumulation_steps must be an integer >= 1 '
     r'\(1 = off\), got 0'),
    ('cross_validation.folds', -2, r'config.cross_validation.folds=-2: use 0 \(off\) or at least 2'),
    ('cross_validation.folds', 1, r'config.cross_validation.folds=1: use 0 \(off\) or at least 2'),
    ('evaluate.top_confused', -1, r'config.evaluate.top_confused must be >= 0'),
    ('model.dropout', 2.0, r'config.model.dropout must be in \[0, 1\)'),
])
def test_values_that_used_to_pass_silently_are_refused(key, value, match):
  """Each was accepted: 0 accumulation steps ran as 1, negative folds as a plain run, a negative
  top_confused reported 'no off-diagonal errors', dropout 2.0 zeroed the head's input."""
  c = default.get_config()
  configlib.validate(c)  # the defaults pass
  *parents, leaf = key.split('.')
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(UserError, match=match):
    configlib.validate(c)
