"""What the rest of the program knows about a dataset, the horizontal-flip policy, and how many
slices the training stream reads the split as (``read_shards``).

TensorFlow-free: checkpoints, prediction and serving read a ``DatasetInfo`` back from JSON without
importing the input pipeline. ``sources.describe`` builds one from ``config.data``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

from imgcls_jax.errors import UserError

if TYPE_CHECKING:
  import ml_collections

# config.data.name of a dataset held as numpy arrays in a .npz file (data/arrays.py).
ARRAYS_PREFIX = 'arrays:'

# Datasets whose classes are not mirror-symmetric: a horizontal flip changes the label's meaning.
NO_FLIP_DATASETS = frozenset({'sklearn_digits', 'mnist', 'emnist', 'kmnist', 'svhn_cropped'})


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """One complete description of a dataset: classes, decoded image shape, split sizes."""
  name: str                                         # 'sklearn_digits', or 'image_folder:/abs/root'
  num_classes: int
  class_names: tuple[str, ...]
  image_shape: tuple[int | None, int | None, int]   # H, W, C of decoded images; None where sizes vary
  num_examples: dict[str, int | None]               # per split; None where unknown (mock_data)
  mirror_safe: bool = True                          # False when a horizontal flip changes the label
  multilabel: bool = False                          # labels are sets of classes (tags), multi-hot
  # Image folders: per split, a fingerprint of its files and labels (folder_index.Split.digest),
  # by which a run tells whether the folder it drew its held-out splits from has changed.
  split_digests: dict[str, str] = dataclasses.field(default_factory=dict)
  # Arrays files: the eval preprocessing that made the stored pixels from the decoded image files
  # ('' none; None not recorded: another dataset, or a file written before write_arrays said).
  stored_preprocess: str | None = None

  @property
  def channels(self) -> int:
    """Channels of the decoded images."""
    return self.image_shape[-1]

  def to_json(self) -> dict[str, Any]:
    """This description as plain JSON types (lists for tuples)."""
    return {'name': self.name, 'num_classes': self.num_classes,
            'class_names': list(self.class_names), 'image_shape': list(self.image_shape),
            'num_examples': dict(self.num_examples), 'mirror_safe': self.mirror_safe,
            'multilabel': self.multilabel, 'split_digests': dict(self.split_digests),
            **({} if self.stored_preprocess is None
               else {'stored_preprocess': self.stored_preprocess})}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> DatasetInfo:
    """The description ``to_json`` wrote."""
    def opt_int(v: Any) -> int | None:
      return None if v is None else int(v)
    h, w, c = d['image_shape']
    return cls(name=str(d['name']), num_classes=int(d['num_classes']),
               class_names=tuple(str(n) for n in d['class_names']),
               image_shape=(opt_int(h), opt_int(w), int(c)),
               num_examples={str(k): opt_int(v) for k, v in d['num_examples'].items()},
               mirror_safe=bool(d.get('mirror_safe', True)),
               multilabel=bool(d.get('multilabel', False)),
               split_digests={str(k): str(v) for k, v in d.get('split_digests', {}).items()},
               stored_preprocess=(None if d.get('stored_preprocess') is None
                                  else str(d['stored_preprocess'])))


_UNRECORDED_WARNED: set[str] = set()   # arrays files warned about by warn_unrecorded_pixels


def warn_unrecorded_pixels(info: DatasetInfo, hw: tuple[int, int], data: bytes | str) -> None:
  """Warns once per arrays file that does not say how its pixels were made from image files
  (``stored_preprocess`` None), at the first image ``data`` of another size than its ``hw``
  images (which prediction resizes to ``hw`` as for any dataset)."""
  if not info.name.startswith(ARRAYS_PREFIX) or info.name in _UNRECORDED_WARNED:
    return
  from imgcls_jax.data import images
  with images._open(data) as img:   # the header only
    if sorted(img.size) == sorted(hw):
      return
  _UNRECORDED_WARNED.add(info.name)
  logging.warning("%s does not say how its images were made from image files (written before "
                  'write_arrays recorded it, or by other code): images of another size are '
                  "resized to %s with PIL's area filter, which may differ from the training "
                  "images' resizing; rewrite the file with python -m imgcls_jax.data.write_arrays "
                  'to record it.', info.name[len(ARRAYS_PREFIX):], 'x'.join(map(str, hw)))


def arrays_tfds_name(name: str) -> str | None:
  """The tfds dataset that the data name ``'arrays:NAME'`` holds (a bare name: no '/', no '.npz');
  None for an explicit file or a name that is not an arrays one."""
  spec = name[len(ARRAYS_PREFIX):]
  if (not name.startswith(ARRAYS_PREFIX) or not spec or spec.endswith('.npz') or '/' in spec
      or os.sep in spec or spec.startswith('~')):
    return None
  return spec


def flips_allowed(data: ml_collections.ConfigDict) -> bool:
  """Whether ``config.data`` allows horizontal flips: not a dataset named in ``NO_FLIP_DATASETS``,
  also held as arrays (``arrays:mnist``) or named with a version or builder config
  (``mnist:3.0.1``, ``emnist/letters``), and not marked ``data.mirror_safe=False`` (the user's
  images: text, digits, arrows, ...)."""
  name = str(data.name)
  if name.startswith(ARRAYS_PREFIX):   # a tfds name, or a file of one's own (its path says nothing)
    name = arrays_tfds_name(name) or ''
  name = name.split(':')[0].split('/')[0]   # less a tfds version or builder config
  return name not in NO_FLIP_DATASETS and data.get('mirror_safe', True) is not False


def check_flips(data: ml_collections.ConfigDict, tta: str = '', mirror_safe: bool = True) -> None:
  """``config.data.device_preprocess`` and ``tta`` are known modes, and no flip (in training,
  on the device or at test time) touches a dataset whose meaning a flip changes (named in
  ``NO_FLIP_DATASETS``, marked ``data.mirror_safe=False``, or ``mirror_safe=False``: its
  ``DatasetInfo`` says so)."""
  no_flip = not flips_allowed(data) or not mirror_safe
  marked = ' (config.data.mirror_safe=False)' if data.get('mirror_safe', True) is False else ''
  from imgcls_jax import device_augment  # TensorFlow-free: parses specs only
  from imgcls_jax.data import op_traits
  device = data.get('device_preprocess', '') or ''
  device_flip = device_augment.mirroring(device_augment.parse(device))
  train_flip = op_traits.mirroring(data.train_preprocess or '')
  for key, flip in (('train_preprocess', train_flip), ('device_preprocess', device_flip)):
    if no_flip and flip:
      raise UserError(f"Horizontal flips change the meaning of '{data.name}' images{marked}; remove "
                      f'{flip} from config.data.{key}.')
  if tta not in device_augment.TTA_MODES:
    raise UserError(f"config.evaluate.tta='{tta}' must be '' (none), 'flip' or 'flip_translate'.")
  if tta and no_flip:
    raise UserError(f"Horizontal flips change the meaning of '{data.name}' images{marked}; leave "
                    'config.evaluate.tta empty for this dataset.')
  if tta == 'flip_translate' and data.get('multilabel', False):
    raise UserError("config.evaluate.tta='flip_translate' is for single-label runs; use 'flip' "
                    'or none with config.data.multilabel=True.')


def read_shards(data: ml_collections.ConfigDict) -> int:
  """``data.read_shards`` (absent = 1): slices of the split that the training stream reads."""
  shards = data.get('read_shards', 1)
  shards = 1 if shards is None else int(shards)
  if shards < 1:
    raise UserError(f'config.data.read_shards={shards} must be >= 1.')
  return shards
