"""Preprocessing ops behind a registry, composed by name in spec strings.

``registry.py`` holds the registry, the spec parser and ``compose``; ``ops_image.py`` the crop,
resize, flip and erasing ops; ``randaugment.py`` RandAugment. Importing this package registers
every op. Callers write ``from imgcls_jax.data import pp`` and ``pp.compose(spec)``.
"""
from imgcls_jax.data.pp import ops_image, randaugment  # noqa: F401  (register the ops)
from imgcls_jax.data.pp.randaugment import RANDAUGMENT_OPS
from imgcls_jax.data.pp.registry import (compose, decode_image, fuses_with_decoding, names,
                                         numpy_op, output_shape, parse, register)

__all__ = ['RANDAUGMENT_OPS', 'compose', 'decode_image', 'fuses_with_decoding', 'names',
           'numpy_op', 'output_shape', 'parse', 'register']
