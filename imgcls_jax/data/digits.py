"""The embedded default dataset (scikit-learn's digits, data/sklearn_digits.py) as a tfds builder.

Importing this module registers the builder as ``sklearn_digits``: the same 1347 / 450 split that
``'arrays:sklearn_digits'`` reads, through tf.data (host preprocessing ops, ``train+test``, k-fold
ids).
"""
from __future__ import annotations

from imgcls_jax.data import tf_import  # noqa: F401  (before tensorflow_datasets: no Keras)
from imgcls_jax.data.sklearn_digits import CLASS_NAMES, load_arrays  # the one owner of the split
import tensorflow_datasets as tfds


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's digits: 1347 train / 450 test images, 8x8x1, 10 classes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Stratified 75/25 split of sklearn.datasets.load_digits, random_state=0.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='UCI optical recognition of handwritten digits, as shipped by scikit-learn.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(names=list(CLASS_NAMES)),
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
