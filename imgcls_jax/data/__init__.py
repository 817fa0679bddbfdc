"""Input pipelines: dataset sources -> one complete DatasetInfo -> tf.data streams.

The modules of this package and the exporter are the only TensorFlow users in imgcls_jax; here,
``info.py`` (``DatasetInfo``, the flip policy), ``images.py`` (image file extensions),
``arrays.py`` (a dataset held as numpy arrays in one .npz), ``resident.py``'s order bookkeeping and
``reader.py`` (the run layer's one door to a dataset: arrays files without TensorFlow, the rest
through ``sources`` / ``pipeline``) are TensorFlow-free, so checkpoints, prediction, serving, and
training on an arrays file can use them without it.

``sources.py``: where examples come from (tfds builders, image folders via ``image_folder.py``,
the embedded ``digits.py``, Fashion-MNIST from Debian's files via ``prepare_fashion_mnist.py``)
and ``describe(config.data) -> DatasetInfo``; ``pipeline.py``: the training and exact-once
evaluation streams; ``pp/``: the preprocessing-op registry and its ops; ``folds.py``: k-fold
membership for cross-validation; ``write_arrays.py``: any tfds dataset -> an arrays file.
"""
