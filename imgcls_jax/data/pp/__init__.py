"""Preprocessing ops behind a registry, composed by name in spec strings.

``registry.py`` holds the registry, the spec parser and ``compose``; ``ops_image.py`` the crop,
resize, flip, rotation and erasing ops; ``randaugment.py`` RandAugment and TrivialAugment-Wide.
Importing this package registers every op. Callers write ``from imgcls_jax.data import pp`` and ``pp.compose(spec)``.
"""
from imgcls_jax.data.pp import ops_image, randaugment  # noqa: F401  (register the ops)
from imgcls_jax.data.pp.ops_image import rotate_image
from imgcls_jax.data.pp.randaugment import RANDAUGMENT_OPS, TRIVIAL_AUGMENT_WIDE_OPS
from imgcls_jax.data.pp.registry import (compose, decode_image, ensure_registered,
                                         fuses_with_decoding, names, numpy_op, origins,
                                         output_shape, parse, register)

__all__ = ['RANDAUGMENT_OPS', 'TRIVIAL_AUGMENT_WIDE_OPS', 'compose', 'decode_image',
           'ensure_registered', 'fuses_with_decoding', 'names', 'numpy_op', 'origins',
           'output_shape', 'parse', 'register', 'rotate_image']
