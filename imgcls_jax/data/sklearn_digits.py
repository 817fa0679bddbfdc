"""The embedded default dataset as numpy, TensorFlow-free: scikit-learn's UCI digits (1797 8x8 grey
images) with this project's fixed split.

No download, ever: the data ships inside the scikit-learn wheel. The ``test`` split is the
450-image stratified hold-out of ``train_test_split(test_size=0.25, stratify=y, random_state=0)``
(sklearn's ``SVC(gamma=0.001)`` scores 99.1% on it); ``train`` is the other 1347 images. Two
readers serve the same split: ``config.data.name='arrays:sklearn_digits'`` (the default config;
data/arrays.py writes ``arrays_contents()`` to its file on first use) and the tfds builder
``sklearn_digits`` (data/digits.py, for what only tf.data does: host preprocessing,
``train+test``, k-fold ids).
They hold the same examples in different orders (scikit-learn's here, tfds's shuffled one there),
so a slice such as ``train[80%:]`` selects different images in the two. The arrays file is marked
with ``SOURCE``; one without it (written from tfds by earlier versions) is read as it is, with a
warning (runs trained on it keep their slices; deleting it has scikit-learn's order written).
"""
from __future__ import annotations

import numpy as np

NAME = 'sklearn_digits'
CLASS_NAMES = tuple(str(d) for d in range(10))
# Marks an arrays file written from scikit-learn in its order (arrays.load warns of one without it:
# earlier versions wrote that file from the tfds builder, in tfds's order, so slices differ).
SOURCE = 'scikit-learn load_digits, train_test_split(test_size=0.25, random_state=0)'


def load_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images_Nx8x8x1 uint8, labels_N int64) for 'train' or 'test'; pixel values 0..16 -> 0..255."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  x_tr, x_te, y_tr, y_te = train_test_split(images, digits.target, test_size=0.25,
                                            stratify=digits.target, random_state=0)
  return (x_tr, y_tr) if split == 'train' else (x_te, y_te)


def arrays_contents() -> dict[str, np.ndarray]:
  """Both splits as the contents of an arrays file (data/arrays.py: never flipped, classes
  '0'..'9')."""
  contents: dict[str, np.ndarray] = {'class_names': np.asarray(CLASS_NAMES, dtype=str),
                                     'mirror_safe': np.asarray(False),
                                     'source': np.asarray(SOURCE)}
  for split in ('train', 'test'):
    images, labels = load_arrays(split)
    contents[f'{split}_images'], contents[f'{split}_labels'] = images, labels.astype(np.int32)
  return contents
