"""imgcls_jax: image classification in JAX / Flax NNX."""
__version__ = '0.1.0'
