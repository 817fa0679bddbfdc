"""``--mode=export``: a TF SavedModel taking uint8 images and a TFLite model, checked against JAX.

  python -m imgcls_jax.main --mode=export --workdir=RUN

Writes ``<workdir>/export`` (or ``config.export.output_dir``):
  * ``saved_model/``: signature ``serving_default``: ``images`` uint8 ``[batch, H, W, C]`` (the
    model's input size, already eval-preprocessed, e.g. center-cropped) -> ``probabilities`` and
    ``logits`` float32 ``[batch, num_classes]``. Normalisation is inside. The JAX function is
    converted with ``jax.experimental.jax2tf`` (native serialization: StableHLO inside an
    ``XlaCallModule`` op; weights are ``tf.Variable``s), batch size polymorphic.
  * ``model.tflite``: the SavedModel converted by ``tf.lite.TFLiteConverter`` (same signature).
  * ``labels.txt`` (one class name per line, index order) and ``export.json`` (input spec, class
    names, checkpoint step, and the verification numbers).

The export verifies itself: SavedModel and TFLite outputs on ``config.export.verify_examples`` real
eval-split images must match the JAX model within ``config.export.tolerance`` (max absolute
probability difference) and agree on every top-1 class, or nothing is written and the mode fails.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from typing import Any

import jax
import ml_collections
import numpy as np

from imgcls_jax import inference
from imgcls_jax.errors import UserError


class ExportMismatch(UserError):
  """An exported model's outputs differ from the JAX model's beyond the tolerance."""


def _tf():
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], 'GPU')  # TF must not take accelerator memory from JAX
  except RuntimeError:
    pass
  return tf


def save_saved_model(clf: inference.Classifier, directory: str) -> None:
  """Writes ``clf`` as a SavedModel with a uint8 ``serving_default`` signature."""
  tf = _tf()
  from jax.experimental import jax2tf

  leaves, treedef = jax.tree.flatten(clf.variables)
  h, w, c = clf.image_shape

  def fn(weights, images):
    return clf.apply(jax.tree.unflatten(treedef, weights), images)

  converted = jax2tf.convert(fn, polymorphic_shapes=[None, f'(b, {h}, {w}, {c})'],
                             with_gradient=False)
  module = tf.Module()
  module.weights = [tf.Variable(np.asarray(x), trainable=False) for x in leaves]

  @tf.function(input_signature=[tf.TensorSpec([None, h, w, c], tf.uint8, name='images')],
               autograph=False)
  def serve(images):
    out = converted(module.weights, images)
    return {'probabilities': out['probabilities'], 'logits': out['logits']}

  module.serve = serve
  tf.saved_model.save(module, directory, signatures={'serving_default': serve})


def save_tflite(saved_model_dir: str, path: str) -> None:
  """Converts the SavedModel to a TFLite flatbuffer at ``path``."""
  tf = _tf()
  try:
    model = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir).convert()
  except Exception as e:  # the converter raises ConverterError and friends
    first = (str(e).splitlines() or [''])[0][:300]
    raise UserError(f'TFLite conversion failed ({type(e).__name__}: {first}); export with '
                    '--config.export.tflite=False for the SavedModel only, or with '
                    '--config.export.dtype=float32.') from None
  with open(path, 'wb') as f:
    f.write(model)


def _tflite_interpreter(path: str) -> Any:
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:
    Interpreter = _tf().lite.Interpreter
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # tf.lite.Interpreter's deprecation notice
    return Interpreter(model_path=path)


def run_saved_model(directory: str, images: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
  """Outputs of the SavedModel's ``serving_default`` signature (loaded from disk)."""
  tf = _tf()
  fn = tf.saved_model.load(directory).signatures['serving_default']
  outs = [fn(images=tf.constant(images[i:i + batch])) for i in range(0, len(images), batch)]
  return {k: np.concatenate([o[k].numpy() for o in outs]) for k in ('probabilities', 'logits')}


def run_tflite(path: str, images: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
  """Outputs of the TFLite model's ``serving_default`` signature (batch size is dynamic)."""
  runner = _tflite_interpreter(path).get_signature_runner('serving_default')
  outs = [runner(images=images[i:i + batch]) for i in range(0, len(images), batch)]
  return {k: np.concatenate([o[k] for o in outs]) for k in ('probabilities', 'logits')}


def eval_images(data: ml_collections.ConfigDict, n: int) -> np.ndarray:
  """The first ``n`` eval-split images, eval-preprocessed, as uint8 NxHxWxC."""
  from imgcls_jax.data import pipeline
  got, total = [], 0
  for batch in pipeline.EvalData(data, data.eval_split, local_batch_size=min(n, 256)).batches():
    real = batch['image'][batch['mask']]
    got.append(real)
    total += len(real)
    if total >= n:
      break
  if not total:
    raise UserError(f"The eval split '{data.eval_split}' of '{data.name}' is empty; the export "
                    'cannot be verified.')
  return np.concatenate(got)[:n]


def compare(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, float]:
  """Max |difference| of probabilities and logits, and the top-1 agreement."""
  return {'max_abs_prob_diff': float(np.abs(reference['probabilities'] -
                                            other['probabilities']).max()),
          'max_abs_logit_diff': float(np.abs(reference['logits'] - other['logits']).max()),
          'top1_agreement': float(np.mean(reference['probabilities'].argmax(-1) ==
                                          other['probabilities'].argmax(-1)))}


def export(config: ml_collections.ConfigDict | None, workdir: str,
           overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """The ``export`` mode; returns what it wrote into ``export.json``."""
  step = int(overrides.get('export.step', -1)) if overrides is not None else config.export.step
  trained = inference.load(workdir, config, step=step, overrides=overrides)
  cfg = trained.run.export
  if cfg.verify_examples < 1:
    raise UserError('config.export.verify_examples must be >= 1: the export is always verified.')
  out_dir = os.path.abspath(cfg.output_dir or os.path.join(workdir, 'export'))
  clf = inference.classifier(trained, dtype=cfg.dtype)
  images = eval_images(clf.run.data, cfg.verify_examples)
  reference = clf.predict_arrays(images)

  staging = out_dir + '.incomplete'
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  saved_model_dir = os.path.join(staging, 'saved_model')
  save_saved_model(clf, saved_model_dir)
  checks = {'saved_model': compare(reference, run_saved_model(saved_model_dir, images))}
  if cfg.tflite:
    tflite_path = os.path.join(staging, 'model.tflite')
    save_tflite(saved_model_dir, tflite_path)
    checks['tflite'] = compare(reference, run_tflite(tflite_path, images))
  for fmt, c in checks.items():
    logging.info('%s vs JAX on %d eval images: max |dprob| %.2e, max |dlogit| %.2e, top-1 '
                 'agreement %.2f%%.', fmt, len(images), c['max_abs_prob_diff'],
                 c['max_abs_logit_diff'], 100 * c['top1_agreement'])
    if c['max_abs_prob_diff'] > cfg.tolerance or c['top1_agreement'] < 1.0:
      shutil.rmtree(staging, ignore_errors=True)
      raise ExportMismatch(
          f"The exported {fmt} disagrees with the JAX model on {len(images)} eval images (max "
          f"|probability difference| {c['max_abs_prob_diff']:.2e} > tolerance {cfg.tolerance:g}, "
          f"or top-1 agreement {c['top1_agreement']:.2%} < 100%); nothing was written.")
  record = {'checkpoint_step': clf.step, 'input': {'name': 'images', 'dtype': 'uint8',
                                                   'shape': [None, *clf.image_shape]},
            'outputs': ['probabilities', 'logits'], 'class_names': list(clf.class_names),
            'compute_dtype': clf.step_cfg.compute_dtype,
            'preprocessing_before_input': clf.run.data.eval_preprocess or 'none',
            'verification': {'examples': len(images), 'tolerance': cfg.tolerance, **checks}}
  with open(os.path.join(staging, 'labels.txt'), 'w') as f:
    f.write('\n'.join(clf.class_names) + '\n')
  with open(os.path.join(staging, 'export.json'), 'w') as f:
    json.dump(record, f, indent=2)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(staging, out_dir)
  print(f'Exported checkpoint {clf.step} to {out_dir} (saved_model/'
        f"{', model.tflite' if cfg.tflite else ''}); verified on {len(images)} eval images: " +
        '; '.join(f"{k} max |dprob| {v['max_abs_prob_diff']:.1e}" for k, v in checks.items()),
        flush=True)
  return record
