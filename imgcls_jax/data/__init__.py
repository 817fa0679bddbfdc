"""Input pipelines. The modules of this package are the only ones in imgcls_jax that import TensorFlow.

``imgcls_jax.data.pipeline`` builds the tf.data pipelines from ``config.data``;
``imgcls_jax.data.ops`` holds the preprocessing-op registry; ``imgcls_jax.data.digits`` is the
embedded default dataset (scikit-learn's digits as a tfds builder).
"""
