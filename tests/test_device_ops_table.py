"""Device augmentation is one table: an op added to ``device_augment.OPS`` parses, applies, is
listed in the error message and joins the checks its flags name."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgcls_jax import device_augment
from imgcls_jax.device_augment import DeviceOp
from imgcls_jax.errors import UserError
from tests.conftest import REPO


def _brightness_args(delta: str) -> tuple | None:
  return (int(delta),) if delta.lstrip('-').isdigit() and abs(int(delta)) <= 255 else None


BRIGHTNESS = DeviceOp(
    lambda c, x, delta: jnp.clip(x.astype(jnp.int32) + delta, 0, 255).astype(jnp.uint8),
    args={'delta': '8'}, check=_brightness_args, needs='delta (-255..255)', usage='delta=N',
    exclusive='brightness')
FLIP_UD = DeviceOp(lambda c, x: x[:, ::-1], exclusive='flip', mirrors=True)
SHIFT_DOWN = DeviceOp(lambda c, x, rows: jnp.roll(x, rows, axis=1), args={'rows': '1'},
                      check=lambda rows: (int(rows),) if rows.isdigit() else None,
                      needs='rows (pixels)', shift=lambda rows: f'{rows} rows down')


@pytest.fixture
def toy_ops(monkeypatch):
  for name, op in (('brightness', BRIGHTNESS), ('flip_ud', FLIP_UD), ('shift_down', SHIFT_DOWN)):
    monkeypatch.setitem(device_augment.OPS, name, op)


def _apply(spec, images):
  key = jax.random.key(0)
  return np.asarray(device_augment.apply(device_augment.parse(spec), jnp.asarray(images),
                                         step_key=key, run_key=key, step=jnp.int32(0)))


def test_a_new_op_parses_and_applies(toy_ops):
  assert device_augment.parse('flip_lr|brightness(delta=-3)') == (('flip_lr',),
                                                                  ('brightness', -3))
  assert device_augment.parse('brightness') == (('brightness', 8),)   # its default
  images = np.array([[0, 2, 100, 254, 255], [9, 9, 9, 9, 9]], np.uint8).reshape(1, 2, 5, 1)
  np.testing.assert_array_equal(_apply('brightness(delta=3)', images)[0, :, :, 0],
                                [[3, 5, 103, 255, 255], [12, 12, 12, 12, 12]])
  np.testing.assert_array_equal(_apply('flip_ud|brightness(delta=-3)', images)[0, :, :, 0],
                                [[6, 6, 6, 6, 6], [0, 0, 97, 251, 252]])


def test_a_new_op_is_in_the_error_message_of_a_bad_spec(toy_ops):
  listed = (r"use '' or ops among flip_lr, flip_alternate, translate\(pad=N, "
            r'mode=constant\|reflect\), erase\(prob=P, area_min=A, area_max=B, fill=noise\|zero\), '
            r"brightness\(delta=N\), flip_ud, shift_down joined by '\|'")
  with pytest.raises(UserError, match=r"'brighter' is not one of flip_lr, flip_alternate, "
                     r'translate, erase, brightness, flip_ud, shift_down\); ' + listed):
    device_augment.parse('brighter')
  with pytest.raises(UserError, match=r'\(brightness takes delta \(-255\.\.255\)\); ' + listed):
    device_augment.parse('brightness(delta=300)')
  with pytest.raises(UserError, match=r'\(brightness takes delta \(-255\.\.255\)\)'):
    device_augment.parse('brightness(amount=3)')
  with pytest.raises(UserError, match=r'\(flip_ud takes no arguments\)'):
    device_augment.parse('flip_ud(p=1)')
  with pytest.raises(UserError, match=r'\(brightness at most once\)'):
    device_augment.parse('brightness|brightness(delta=2)')


def test_a_new_ops_flags_join_the_checks_that_read_them(toy_ops):
  with pytest.raises(UserError, match=r'\(at most one of flip_lr, flip_alternate and flip_ud\)'):
    device_augment.parse('flip_ud|flip_lr')
  assert device_augment.mirroring(device_augment.parse('translate|flip_ud')) == 'flip_ud'
  assert device_augment.mirroring(device_augment.parse('translate|brightness')) == ''
  warning = device_augment.twice_shifted('pad_crop(pad=4)', device_augment.parse('shift_down'))
  assert 'on the host (pad_crop)' in warning and 'on the device (1 rows down)' in warning


def test_the_built_in_ops_message_lists_exactly_them():
  with pytest.raises(UserError, match=r"use '' or ops among flip_lr, flip_alternate, "
                     r'translate\(pad=N, mode=constant\|reflect\), erase\(prob=P, area_min=A, '
                     r"area_max=B, fill=noise\|zero\) joined by '\|' \(other augmentations go in "
                     r'config\.data\.train_preprocess\)\.$'):
    device_augment.parse('brightness(delta=3)')
  assert device_augment.mirroring(device_augment.parse('erase|flip_alternate')) == 'flip_alternate'


def test_the_readmes_example_adds_a_device_op(monkeypatch):
  monkeypatch.setitem(device_augment.OPS, 'brightness', None)   # removed again after the test
  with open(os.path.join(REPO, 'README.md')) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), re.S)
  exec(next(b for b in blocks if "device_augment.OPS['brightness']" in b), {})
  assert device_augment.parse('flip_lr|brightness(delta=3)') == (('flip_lr',), ('brightness', 3))
  images = np.array([0, 100, 254], np.uint8).reshape(1, 1, 3, 1)
  np.testing.assert_array_equal(_apply('brightness(delta=3)', images).ravel(), [3, 103, 255])
  with pytest.raises(UserError, match=r'\(brightness takes delta \(an integer\)\); .*'
                     r'fill=noise\|zero\), brightness\(delta=N\) joined by'):
    device_augment.parse('brightness(delta=x)')
