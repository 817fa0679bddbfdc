"""Host preprocessing ops registered from one's own code say whether they flip or shift images,
and the flip and double-shift checks read that (they looked for the text 'flip_lr' before)."""
import ml_collections
import pytest

from imgcls_jax import device_augment
from imgcls_jax.data import op_traits, pp
from imgcls_jax.data.info import check_flips
from imgcls_jax.data.pp import registry
from imgcls_jax.errors import UserError


@pytest.fixture
def own_ops(monkeypatch):
  """Three ops registered as a config file would: a mirror, a shift, and one whose name only
  contains 'flip_lr'; the tables are restored afterwards."""
  monkeypatch.setattr(registry, '_OPS', dict(registry._OPS))
  monkeypatch.setattr(registry, '_ORIGINS', dict(registry._ORIGINS))
  monkeypatch.setattr(op_traits, 'MIRRORS', set(op_traits.MIRRORS))
  monkeypatch.setattr(op_traits, 'SHIFTS', set(op_traits.SHIFTS))
  keep = lambda: (lambda image, seed: image)   # noqa: E731
  pp.register('mirror_vertical_axis', mirrors=True)(keep)
  pp.register('jitter_position', shifts=True)(keep)
  pp.register('no_flip_lr_here')(keep)


def _data(train_preprocess: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({'name': 'sklearn_digits', 'train_preprocess': train_preprocess,
                                    'device_preprocess': '', 'mirror_safe': True})


def test_a_registered_mirror_is_refused_where_a_flip_changes_the_images(own_ops):
  with pytest.raises(UserError, match=r"Horizontal flips change the meaning of 'sklearn_digits' "
                     r'images; remove mirror_vertical_axis from config.data.train_preprocess'):
    check_flips(_data('pad_crop(pad=1)|mirror_vertical_axis'))
  check_flips(_data('pad_crop(pad=1)|no_flip_lr_here'))   # its name is no flip
  with pytest.raises(UserError, match='remove flip_lr from'):   # the built-in one still is
    check_flips(_data('flip_lr'))


def test_a_registered_shift_is_warned_of_beside_a_device_translation(own_ops):
  ops = device_augment.parse('translate(pad=2)')
  warning = device_augment.twice_shifted('jitter_position|no_flip_lr_here', ops)
  assert warning and 'shifts the images on the host (jitter_position)' in warning
  assert device_augment.twice_shifted('no_flip_lr_here', ops) is None
  assert op_traits.op_names(' pad_crop(pad=4) | flip_lr ') == ['pad_crop', 'flip_lr']


def test_registering_a_name_again_replaces_its_traits(own_ops):
  pp.register('mirror_vertical_axis')(lambda: (lambda image, seed: image))
  check_flips(_data('mirror_vertical_axis'))   # now declared no mirror
  assert 'mirror_vertical_axis' not in op_traits.MIRRORS and 'flip_lr' in op_traits.MIRRORS
