"""Every model family in the table exports to a SavedModel, a TFLite model and an ONNX model (small
widths) whose outputs match the JAX model's (issues 13 and 14). Families come from the model table
itself, so a newly registered one is covered without editing this file (at its default size unless
``tests/test_families.SMALL_BY_CLASS`` lists small widths for it)."""
from __future__ import annotations

import collections
import importlib.util
import itertools

import ml_collections
import numpy as np
import pytest

from configs import default
from imgcls_jax import export, inference, models
from imgcls_jax import state as state_lib
from imgcls_jax.data.info import DatasetInfo
from imgcls_jax.errors import UserError
from tests.test_families import family_class, host_variables, small

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ('onnx', 'onnxruntime', 'tf2onnx'))
INFO = DatasetInfo(name='synthetic', num_classes=5, class_names=tuple('abcde'),
                   image_shape=(16, 16, 3), num_examples={'train': 8, 'test': 8})


# Where a family's names differ in depth at the test's small widths, the shallowest converts
# fastest (the TFLite converter's time grows with the layer count): MobileNetV3-Small has 11
# blocks to Large's 15, the same layer kinds.
SHALLOWEST = {'MobileNetV3': 'mobilenet_v3_small'}


def _one_name_per_family() -> list[str]:
  """``SHALLOWEST``'s name, else the shortest (then alphabetically first) registered name, of
  each family class."""
  by_class = itertools.groupby(sorted(models.names(), key=family_class), key=family_class)
  return [SHALLOWEST.get(cls) or min(names, key=lambda n: (len(n), n)) for cls, names in by_class]


def _classifier(name: str, info: DatasetInfo = INFO, **model_kw) -> inference.Classifier:
  run = default.get_config()
  run.model = ml_collections.ConfigDict({'name': name, **small(name), **model_kw})
  c = info.image_shape[2]
  run.data.mean, run.data.std = (0.5, 0.4, 0.3)[:c], (0.25, 0.2, 0.3)[:c]
  # Values off their initial ones (zero heads, zero last-BN scales, unit variances), so every logit
  # depends on every part of the model, BatchNorm folding included.
  params, batch_stats = host_variables(models.from_config(run, info.num_classes, c), sd=0.1,
                                       seed=1, random_stats=True)
  variables = state_lib.InferenceState(params=params, batch_stats=batch_stats)
  trained = inference.Trained(run=run, info=info, image_shape=info.image_shape, native_hw=None,
                              variables=variables, step=0, origin=f'test {name}')
  return inference.classifier(trained, max_batch=8)


def test_every_family_of_the_table_is_exported():
  classes = {family_class(n) for n in _one_name_per_family()}
  assert classes >= {'CNN', 'FastCNN', 'ResNet', 'WideResNet', 'ViT', 'ConvNeXt', 'EfficientNet',
                     'MobileNetV3'}


def _assert_same_outputs(name: str, want: dict, got: dict) -> None:
  diff = export.compare(want, got)
  # The same float32 graph run by another runtime: only the summation order differs.
  scale = float(np.abs(want['logits']).max())
  assert diff['max_abs_logit_diff'] <= 1e-4 * max(scale, 1.0), (name, diff)
  assert diff['max_abs_prob_diff'] <= 1e-4, (name, diff)
  assert diff['top1_agreement'] == 1.0


@pytest.mark.parametrize('name', _one_name_per_family())
def test_family_exports_to_saved_model_tflite_and_onnx_with_the_same_outputs(name, tmp_path):
  """Any batch, as the exporter's SavedModel and ONNX source; ONNX (when installed) from that
  TFLite model as the exporter converts it, run on batches of 6 and 1. ViT's and ConvNeXt's
  failed under onnxruntime (Reshapes of their matmuls tf2onnx computed wrongly; for ConvNeXt's 1x1
  last stage, 16 px at stem_patch 2, a Reshape to the wrong layout) or gave NaN (GELU's erfc)."""
  clf = _classifier(name)
  images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  want = clf.predict_arrays(images)
  assert np.ptp(want['logits']) > 1e-2  # the outputs depend on the input: a real comparison
  saved = str(tmp_path / 'saved_model')
  export.save_saved_model(clf, saved)
  export.save_tflite(saved, str(tmp_path / 'model.tflite'))
  tflite = str(tmp_path / 'model.tflite')
  outputs = [export.run_saved_model(saved, images), export.run_tflite(tflite, images)]
  if HAVE_ONNX:
    export.save_onnx(tflite, str(tmp_path / 'model.onnx'))
    outputs += [export.run_onnx(str(tmp_path / 'model.onnx'), images, batch=b) for b in (6, 1)]
  for got in outputs:
    _assert_same_outputs(name, want, got)


@pytest.mark.parametrize('name, model_kw', [('resnet18', {'small_inputs': True}),
                                            ('convnext_tiny', {'stem_patch': 1})])
def test_a_1x1_stage_exports_to_one_image_tflite(name, model_kw, tmp_path):
  """8 px images: the last stage is 1x1 (ResNet's im2col 3x3 convolutions, ConvNeXt's pointwise
  linears on it). At the fixed batch of the exporter's TFLite models their rank-4 matmuls failed
  to convert ('tfl.batch_matmul' op found invalid output rank)."""
  info = DatasetInfo(name='synthetic', num_classes=5, class_names=tuple('abcde'),
                     image_shape=(8, 8, 3), num_examples={'train': 8, 'test': 8})
  clf = _classifier(name, info, **model_kw)
  images = np.random.default_rng(3).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  want = clf.predict_arrays(images)
  saved, path = str(tmp_path / 'saved_model'), str(tmp_path / 'model.tflite')
  export.save_saved_model(clf, saved, batch=1)
  export.save_tflite(saved, path, batch=1)
  _assert_same_outputs(name, want, export.run_tflite(path, images))


def test_a_failed_tflite_conversion_is_one_line_without_the_converters_dump(tmp_path, capfd):
  """The converter prints each error with its MLIR location (a ``loc(callsite(...`` line of
  thousands of characters for a model) on stderr before it raises: the export's one-line error
  says what failed instead. A rank-4 matmul over a 1x1 map at batch 1 fails to convert."""
  import tensorflow as tf
  from jax.experimental import jax2tf
  weights = np.ones((9, 4), np.float32)
  fn = jax2tf.convert(lambda x: x @ weights, with_gradient=False)
  module = tf.Module()
  module.serve = tf.function(lambda images: {'logits': fn(images)}, autograph=False,
                             input_signature=[tf.TensorSpec([1, 1, 1, 9], tf.float32)])
  saved = str(tmp_path / 'saved_model')
  tf.saved_model.save(module, saved, signatures={'serving_default': module.serve})
  capfd.readouterr()
  try:
    export.save_tflite(saved, str(tmp_path / 'model.tflite'))
  except UserError as e:
    message = str(e)
  else:
    pytest.skip('this TFLite converter converts a rank-4 matmul over a 1x1 map')
  err = capfd.readouterr().err
  assert 'loc(' not in err and 'error:' not in err, err[:500]
  assert message.startswith("TFLite conversion failed (ConverterError: 'tfl.batch_matmul' op "
                            'found invalid output rank'), message
  assert '\n' not in message and 'loc(' not in message


def test_resnet_with_its_max_pool_stem_runs_as_int8_tflite(tmp_path):
  """The ResNet stem's 3x3 max-pool pads with zeros, exact after its ReLU: XLA's -inf padding
  became a tensor of int8 scale ~1e36 in the quantised model, and LiteRT aborted the process
  (add.cc, QuantizeMultiplierSmallerThanOneExp; ResNet-18 at 224 px)."""
  clf = _classifier('resnet18', small_inputs=False)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
  saved, path = str(tmp_path / 'saved_model'), str(tmp_path / 'model_int8.tflite')
  export.save_saved_model(clf, saved)
  export.save_tflite(saved, path, quantize='int8', calibration_NxHxWxC=images)
  assert export.probe_tflite(path, (16, 16, 3)) == ''
  diff = export.compare(clf.predict_arrays(images[:8]), export.run_tflite(path, images[:8]))
  assert diff['max_abs_prob_diff'] < 0.2, diff


def test_fast_cnn_pooling_an_odd_map_exports_to_tflite(tmp_path):
  """fashion_mnist_quick's network pools its 7x7 map to 3x3 (the last row and column dropped):
  that crop exported as a dynamic gather, which the TFLite converter rejected, so the quick
  config could not be exported at all. Its pools export as TFLite's MAX_POOL_2D kernel, not the
  training form's RESHAPE + REDUCE_MAX."""
  info = DatasetInfo(name='synthetic', num_classes=5, class_names=tuple('abcde'),
                     image_shape=(28, 28, 1), num_examples={'train': 8, 'test': 8})
  clf = _classifier('fast_cnn', info, widths=((4,), (8,), (8,), (8,)), stem='none',
                    image_size=28, conv='im2col')
  images = np.random.default_rng(2).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
  saved, path = str(tmp_path / 'saved_model'), str(tmp_path / 'model.tflite')
  export.save_saved_model(clf, saved)
  export.save_tflite(saved, path)
  diff = export.compare(clf.predict_arrays(images), export.run_tflite(path, images))
  assert diff['max_abs_prob_diff'] <= 1e-4 and diff['top1_agreement'] == 1.0, diff
  ops = collections.Counter(op['op_name'] for op in
                            export.formats._tflite_interpreter(path)._get_ops_details())
  assert ops['MAX_POOL_2D'] == 3 and ops['REDUCE_MAX'] == 0, ops
