"""TensorFlow for the data modules and the exporter, imported without Keras.

``import tensorflow`` imports ``keras.src.optimizers`` eagerly (and with it Keras and
scikit-learn) only to register Keras optimizers with the SavedModel loader: about half of its
import time (6.2 -> 3.1 s on 2 CPU cores, benchmarks/NOTES.md, session 34). TensorFlow skips that
import when ``TF_USE_LEGACY_KERAS`` is set and the ``tf_keras`` package is absent. Nothing in
imgcls_jax uses Keras: the pipelines are tf.data, the exports tf.Module, TFLite and ONNX. So the
first import of TensorFlow goes through here with that variable set for the import only; it is
restored right after, so ``tf.keras`` (resolved lazily, on first use) still gives Keras 3 to code
that wants it. Where TensorFlow is already imported, or ``tf_keras`` is installed (then the
variable would select it), this is a plain ``import tensorflow``.

Import TensorFlow as ``from imgcls_jax.data.tf_import import tf``, and import this module before
``tensorflow_datasets`` (which imports TensorFlow itself).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

_VARIABLE = 'TF_USE_LEGACY_KERAS'


def _import() -> ModuleType:
  if 'tensorflow' in sys.modules or importlib.util.find_spec('tf_keras') is not None:
    import tensorflow
    return tensorflow
  before = os.environ.get(_VARIABLE)
  os.environ[_VARIABLE] = '1'
  try:
    import tensorflow
  finally:
    if before is None:
      os.environ.pop(_VARIABLE, None)
    else:
      os.environ[_VARIABLE] = before
  # With the variable set, TensorFlow puts the missing tf_keras package's directory (None) on its
  # __path__; the import system skips it, but keep the package's path plain strings.
  tensorflow.__path__[:] = [p for p in tensorflow.__path__ if p]
  return tensorflow


tf = _import()
