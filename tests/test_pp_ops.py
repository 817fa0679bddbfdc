"""Preprocessing-op arguments that cannot work are one-sentence user errors when the spec is
parsed, not TensorFlow errors in the input pipeline."""
import re

import pytest

from imgcls_jax.data import pp
from imgcls_jax.errors import UserError


def test_bad_pad_crop_arguments_are_user_errors():
  for spec, why in (('pad_crop(pad=-3)', 'pad must be a whole number of pixels >= 0, got -3'),
                    ('pad_crop(pad=2.5)', 'pad must be a whole number of pixels >= 0, got 2.5'),
                    ("pad_crop(mode='wrap')",
                     "mode must be one of constant, reflect, symmetric, got 'wrap'")):
    with pytest.raises(UserError, match=re.escape(f"Bad arguments for preprocessing op '{spec}': "
                                                  f'{why}.')):
      pp.parse(spec)
  # What works still parses: no padding, and tf.pad's other modes in either case.
  assert len(pp.parse("pad_crop(pad=0)|pad_crop(pad=2, mode='reflect')|"
                      "pad_crop(mode='SYMMETRIC')")) == 3


@pytest.mark.parametrize('key, spec, why', [
    ('train_preprocess', 'pad_crop(pad=-3)', "Bad arguments for preprocessing op 'pad_crop"),
    ('eval_preprocess', 'center_crop(size=32', "Cannot parse preprocessing op 'center_crop"),
    ('eval_preprocess', 'sharpen', "Unknown preprocessing op 'sharpen'"),
])
def test_run_setup_checks_the_specs_before_any_work(digits_config, key, spec, why):
  """Found by run.setup (before the model summary, the state and the streams), naming the key."""
  from imgcls_jax import run
  digits_config.data[key] = spec
  with pytest.raises(UserError, match=re.escape(f'config.data.{key}: {why}')):
    run.setup(digits_config)
