"""tfds splits as config values: slices that select nothing or do not parse are one-sentence user
errors naming the config key, before any reading; valid slices still read."""
import pytest

from imgcls_jax.data import sources
from imgcls_jax.errors import UserError


@pytest.mark.parametrize('key, split, match', [
    ('eval_split', 'test[:0]', r"config.data.eval_split='test\[:0\]' selects no examples"),
    ('train_split', 'train[:0]', r"config.data.train_split='train\[:0\]' selects no examples"),
    ('train_split', 'train[10:5]', r"config.data.train_split='train\[10:5\]' selects no examples"),
    ('eval_split', 'test[abc]', r"config.data.eval_split='test\[abc\]' is not a valid split"),
    ('eval_split', 'test+nope', r"config.data.eval_split='test\+nope' is not a valid split"),
    ('eval_split', 'validation', "Split 'validation' does not exist in dataset 'sklearn_digits'; "
                                 'set config.data.eval_split to one of its splits: test, train'),
])
def test_empty_or_malformed_split_slices_name_the_config_key(digits_config, key, split, match):
  setattr(digits_config.data, key, split)
  with pytest.raises(UserError, match=match):
    sources.describe(digits_config.data)
  with pytest.raises(UserError, match=match):
    sources.read(digits_config.data, split, 0, 1, drop_remainder=False)


def test_another_split_that_selects_nothing_is_named_as_given(digits_config):
  # e.g. --config.evaluate.split='test[:0]': neither data split, so the split itself is named.
  with pytest.raises(UserError, match=r"Split 'test\[:0\]' selects no examples of dataset "
                                      r"'sklearn_digits' \(test has 450, train has 1347\)"):
    sources.read(digits_config.data, 'test[:0]', 0, 1, drop_remainder=False)
  digits_config.data.eval_split = 'test[:10%]+train[:0]'
  assert sources.describe(digits_config.data).num_examples['test[:10%]+train[:0]'] == 45
  ds = sources.read(digits_config.data, 'test[:10%]+train[:0]', 0, 1, drop_remainder=False)
  assert sources.count(ds) == 45
