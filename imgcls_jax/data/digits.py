"""The embedded default dataset: scikit-learn's UCI digits (1797 8x8 grey images) as a tfds builder.

No download, ever: the data ships inside the scikit-learn wheel. Importing this module registers
the builder as ``sklearn_digits``. The ``test`` split is the 450-image stratified hold-out of
``train_test_split(test_size=0.25, stratify=y, random_state=0)`` (sklearn's ``SVC(gamma=0.001)``
scores 99.1% on it); ``train`` is the other 1347 images.
"""
from __future__ import annotations

import numpy as np
from imgcls_jax.data import tf_import  # noqa: F401  (before tensorflow_datasets: no Keras)
import tensorflow_datasets as tfds


def load_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images_Nx8x8x1 uint8, labels_N int64) for 'train' or 'test'; pixel values 0..16 -> 0..255."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  x_tr, x_te, y_tr, y_te = train_test_split(images, digits.target, test_size=0.25,
                                            stratify=digits.target, random_state=0)
  return (x_tr, y_tr) if split == 'train' else (x_te, y_te)


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's digits: 1347 train / 450 test images, 8x8x1, 10 classes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Stratified 75/25 split of sklearn.datasets.load_digits, random_state=0.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='UCI optical recognition of handwritten digits, as shipped by scikit-learn.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples('train'), 'test': self._generate_examples('test')}

  def _generate_examples(self, split):
    images, labels = load_arrays(split)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image, 'label': int(label)}
