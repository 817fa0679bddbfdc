"""Input pipelines: dataset sources -> one complete DatasetInfo -> tf.data streams.

The modules of this package and the exporter are the only TensorFlow users in imgcls_jax; here,
``info.py`` (``DatasetInfo``, the flip policy) and ``images.py`` (image file extensions) are
TensorFlow-free, so checkpoints, prediction and serving can use them without it.

``sources.py``: where examples come from (tfds builders, image folders via ``image_folder.py``,
the embedded ``digits.py``, Fashion-MNIST from Debian's files via ``prepare_fashion_mnist.py``)
and ``describe(config.data) -> DatasetInfo``; ``pipeline.py``: the training and exact-once
evaluation streams; ``pp/``: the preprocessing-op registry and its ops; ``folds.py``: k-fold
membership for cross-validation.
"""
