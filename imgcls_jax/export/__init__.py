"""``--mode=export``: SavedModel, TFLite (float, and int8 / float16), ONNX, checked against JAX.

  python -m imgcls_jax.main --mode=export --workdir=RUN \
      [--config.export.quantize=int8] [--config.export.onnx=True]

Writes ``<workdir>/export`` (or ``config.export.output_dir``):
  * ``saved_model/``: signature ``serving_default``: ``images`` uint8 ``[batch, H, W, C]`` (the
    model's input size, already eval-preprocessed, e.g. center-cropped) -> ``probabilities`` and
    ``logits`` float32 ``[batch, num_classes]``. Normalisation is inside. The JAX function is
    converted with ``jax.experimental.jax2tf`` (native serialization: StableHLO inside an
    ``XlaCallModule`` op; weights are ``tf.Variable``s), batch size polymorphic.
  * ``model.tflite``: the same function traced at a fixed batch of ``config.export.tflite_batch``
    images (1; 0 = any batch) and converted by ``tf.lite.TFLiteConverter`` (same names): with
    static shapes the converter folds each BatchNorm into its convolution.
  * ``model_int8.tflite`` / ``model_float16.tflite`` (``config.export.quantize``): post-training
    quantisation of that; int8 is calibrated on ``calibration_examples`` training images.
  * ``model.onnx`` (``config.export.onnx``): an any-batch float TFLite model converted by tf2onnx;
    input ``images`` uint8, outputs ``probabilities``, ``logits``.
  * ``web/`` (``config.export.web``): a static page that classifies images in the browser with
    onnxruntime-web, on a batch-1 ONNX model verified like the rest (``web.py``).
  * ``labels.txt`` (one class name per line, index order) and ``export.json`` (input spec, class
    names, checkpoint step, file sizes and the verification numbers).

The export verifies itself on eval images (the eval split; without the dataset, the samples the
run directory stores, else seeded synthetic images; it prints which): SavedModel, TFLite and ONNX
outputs must match the JAX model within ``config.export.tolerance`` (max absolute probability
difference) and agree on every top-1 class; a quantised model's top-1 accuracy may fall at most
``config.export.max_accuracy_drop`` below the float model's. Otherwise nothing is written and the
mode fails. TFLite models are run under the standalone LiteRT runtime (``ai-edge-litert``) when it
is installed, ONNX under onnxruntime.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np

from imgcls_jax import configlib, inference
from imgcls_jax.errors import UserError
from imgcls_jax.export import output_dir, web
from imgcls_jax.export.formats import (probe_tflite, require_onnx, run_onnx, run_saved_model,
                                       run_tflite, save_onnx, save_saved_model, save_tflite,
                                       tflite_runtime)
from imgcls_jax.export.samples import Samples, calibration_images, eval_samples

__all__ = ['ExportMismatch', 'QuantizationTooLossy', 'Samples', 'calibration_images', 'compare',
           'eval_samples', 'export', 'probe_tflite', 'run_onnx', 'run_saved_model', 'run_tflite',
           'save_onnx', 'save_saved_model', 'save_tflite']


class ExportMismatch(UserError):
  """An exported model's outputs differ from the JAX model's beyond the tolerance."""


class QuantizationTooLossy(UserError):
  """A quantised model loses more top-1 accuracy than ``config.export.max_accuracy_drop``."""


def compare(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, float]:
  """Max |difference| of probabilities and logits, and the top-1 agreement."""
  return {'max_abs_prob_diff': float(np.abs(reference['probabilities'] -
                                            other['probabilities']).max()),
          'max_abs_logit_diff': float(np.abs(reference['logits'] - other['logits']).max()),
          'top1_agreement': float(np.mean(reference['probabilities'].argmax(-1) ==
                                          other['probabilities'].argmax(-1)))}


def quantization_report(reference: dict[str, np.ndarray], quantized: dict[str, np.ndarray],
                        labels: np.ndarray | None,
                        thresholds: np.ndarray | None = None) -> dict[str, Any]:
  """Agreement of a quantised model with the float one, and the accuracy drop when labels exist
  (multi-label, ``thresholds`` given: tag-decision agreement, and accuracy = exact match of the
  tag sets)."""
  ref, got = reference['probabilities'].argmax(-1), quantized['probabilities'].argmax(-1)
  out: dict[str, Any] = {'examples': int(len(ref)), 'top1_agreement': float(np.mean(ref == got)),
                         'max_abs_prob_diff': float(np.abs(reference['probabilities'] -
                                                           quantized['probabilities']).max())}
  if thresholds is not None:
    t = np.asarray(thresholds, np.float32)
    ref_tags = reference['probabilities'] >= t
    got_tags = quantized['probabilities'] >= t
    out['tag_agreement'] = float(np.mean(ref_tags == got_tags))
    if labels is not None:
      out['float_accuracy'] = float(np.mean(np.all(ref_tags == (labels > 0), -1)))
      out['quantized_accuracy'] = float(np.mean(np.all(got_tags == (labels > 0), -1)))
      out['accuracy_drop'] = out['float_accuracy'] - out['quantized_accuracy']
    return out
  if labels is not None:
    out['float_accuracy'] = float(np.mean(ref == labels))
    out['quantized_accuracy'] = float(np.mean(got == labels))
    out['accuracy_drop'] = out['float_accuracy'] - out['quantized_accuracy']
  return out


def _agreement(q: dict[str, Any]) -> str:
  """How often a quantised model decides as the float one: each tag (multi-label), else top-1."""
  if 'tag_agreement' in q:
    return f"tag agreement {q['tag_agreement']:.2%}"
  return f"top-1 agreement {q['top1_agreement']:.2%}"


def _accuracy_name(q: dict[str, Any]) -> str:
  """What ``quantization_report``'s accuracy is: exact match of the tag sets, or top-1."""
  return 'exact match' if 'tag_agreement' in q else 'top-1 accuracy'


def _validate(cfg: ml_collections.ConfigDict) -> None:
  if cfg.verify_examples < 1:
    raise UserError('config.export.verify_examples must be >= 1: the export is always verified.')
  if cfg.get('quantize', '') not in ('', 'int8', 'float16'):
    raise UserError(f"config.export.quantize must be '', 'int8' or 'float16', not "
                    f'{cfg.quantize!r}.')
  if cfg.get('quantize', '') == 'int8' and cfg.get('calibration_examples', 256) < 1:
    raise UserError('config.export.calibration_examples must be >= 1 for int8 quantisation.')
  batch = cfg.get('tflite_batch', 1)
  if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
    raise UserError(f'config.export.tflite_batch must be an integer >= 0 (1: one image per call, '
                    f'as on a phone; 0: any batch), not {batch!r}.')
  if cfg.get('dtype', '') not in ('',) + configlib.DTYPES:
    raise UserError(f"config.export.dtype must be '' (the run's) or one of "
                    f"{', '.join(configlib.DTYPES)}, not {cfg.dtype!r}; for an integer model use "
                    "config.export.quantize='int8'.")
  if float(cfg.get('tolerance', 1e-4)) <= 0:
    raise UserError(f'config.export.tolerance={cfg.tolerance} must be > 0 (the largest |probability '
                    'difference| allowed between JAX and an exported model; default 1e-4).')


def export(config: ml_collections.ConfigDict | None, workdir: str,
           overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """The ``export`` mode; returns what it wrote into ``export.json``."""
  if jax.process_count() > 1:   # every process would write and replace the same folder
    raise UserError('--mode=export runs in one process; run it without config.distributed, on any '
                    'one host that sees the run directory.')
  step = int(overrides.get('export.step', -1)) if overrides is not None else config.export.step
  trained = inference.load(workdir, config, step=step, overrides=overrides,
                           step_key='export.step')
  cfg = trained.run.export
  _validate(cfg)
  quantize = cfg.get('quantize', '')
  out_dir = os.path.abspath(cfg.output_dir or os.path.join(workdir, 'export'))
  output_dir.check(out_dir, workdir)
  output_dir.check_staging_free(out_dir)
  web_runtime = web.find_runtime(cfg.get('web_runtime', '')) if cfg.get('web', False) else ''
  for key in ('onnx', 'web'):   # before any work, not after the SavedModel and TFLite
    if cfg.get(key, False):
      require_onnx(f'{key}=False')
  clf = inference.classifier(trained, dtype=cfg.dtype)
  data, shape = clf.run.data, clf.image_shape
  q_examples = int(cfg.get('quantize_examples', -1))
  n = -1 if quantize and q_examples < 0 else max(cfg.verify_examples,
                                                  q_examples if quantize else 0)
  samples = eval_samples(data, workdir, shape, n, seed=int(trained.run.seed))
  images = samples.images[:cfg.verify_examples]
  reference = clf.predict_arrays(images)
  calibration = (calibration_images(data, workdir, shape, int(cfg.calibration_examples))
                 if quantize == 'int8' else None)

  staging = output_dir.staging(out_dir)
  try:
    record = _write_and_verify(clf, cfg, staging, samples, images, reference, calibration,
                               web_runtime)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  output_dir.swap_in(staging, out_dir)
  os.remove(os.path.join(out_dir, output_dir.STAGING_MARK))
  checks = record['verification']
  q = checks.get('quantized')
  print(f'Exported checkpoint {clf.step} to {out_dir} ({", ".join(record["files"])}); verified '
        f'on {len(images)} of {samples.source}: ' +
        '; '.join(f"{k} max |dprob| {checks[k]['max_abs_prob_diff']:.1e}"
                  for k in ('saved_model', 'tflite', 'onnx', 'web') if k in checks) +
        (f"; {quantize} {_agreement(q)} on {q['examples']}" +
         (f", {_accuracy_name(q)} drop {100 * q['accuracy_drop']:.2f} points"
          if 'accuracy_drop' in q else '') if q else ''), flush=True)
  return record


def _write_and_verify(clf: inference.Classifier, cfg: ml_collections.ConfigDict, staging: str,
                      samples: Samples, images: np.ndarray, reference: dict[str, np.ndarray],
                      calibration: Samples | None, web_runtime: str = '') -> dict[str, Any]:
  """Writes every format into ``staging`` and checks it; raises when one is off. With
  ``web_runtime`` (onnxruntime-web's files) the verified ONNX model also goes into a web page."""
  quantize, want_onnx = cfg.get('quantize', ''), bool(cfg.get('onnx', False))
  tflite_batch = int(cfg.get('tflite_batch', 1))
  saved_model_dir = os.path.join(staging, 'saved_model')
  save_saved_model(clf, saved_model_dir)
  checks: dict[str, Any] = {
      'saved_model': _check(run_saved_model, saved_model_dir, images, reference, 'saved_model')}
  # The TFLite models take a fixed batch (config.export.tflite_batch) unless it is 0: they are
  # converted from a SavedModel traced at that batch, which lets the converter fold BatchNorm.
  tflite_source = saved_model_dir
  if (cfg.tflite or quantize) and tflite_batch:
    tflite_source = os.path.join(staging, 'tflite_source')
    save_saved_model(clf, tflite_source, batch=tflite_batch)
  tflite_path = os.path.join(staging, 'model.tflite')
  if cfg.tflite:
    save_tflite(tflite_source, tflite_path, batch=tflite_batch)
    checks['tflite'] = _check(run_tflite, tflite_path, images, reference, 'tflite')
  if want_onnx:  # from a TFLite model of any batch (tf2onnx needs TFLite's builtin ops)
    onnx_source = (tflite_path if cfg.tflite and not tflite_batch
                   else os.path.join(staging, 'onnx_source.tflite'))
    if onnx_source != tflite_path:
      save_tflite(saved_model_dir, onnx_source)
    onnx_path = os.path.join(staging, 'model.onnx')
    save_onnx(onnx_source, onnx_path)
    checks['onnx'] = _check(run_onnx, onnx_path, images, reference, 'onnx')
    if onnx_source != tflite_path:
      os.remove(onnx_source)
  web_onnx = os.path.join(staging, 'web_model.onnx')
  if web_runtime:
    checks['web'] = _web_onnx(clf, staging, web_onnx, images, reference,
                              tflite_path if cfg.tflite and tflite_batch == 1 else '')
  for fmt, c in checks.items():
    logging.info('%s vs JAX on %d images: max |dprob| %.2e, max |dlogit| %.2e, top-1 '
                 'agreement %.2f%%.', fmt, len(images), c['max_abs_prob_diff'],
                 c['max_abs_logit_diff'], 100 * c['top1_agreement'])
    if c['max_abs_prob_diff'] > cfg.tolerance or c['top1_agreement'] < 1.0:
      raise ExportMismatch(
          f"The exported {fmt} disagrees with the JAX model on {len(images)} images (max "
          f"|probability difference| {c['max_abs_prob_diff']:.2e} > tolerance {cfg.tolerance:g}, "
          f"or top-1 agreement {c['top1_agreement']:.2%} < 100%); nothing was written.")
  quant: dict[str, Any] = {}
  if quantize:
    quant = _quantize_and_verify(clf, cfg, staging, tflite_source, samples, reference,
                                 calibration)
    checks['quantized'] = quant['verification']
  if tflite_source != saved_model_dir:
    shutil.rmtree(tflite_source)
  page = None
  ops = inference.pixel_ops(clf.trained)
  if web_runtime:
    if ops:   # the page decodes and resizes as images.decode does; it runs no TensorFlow op
      logging.warning("The web page resizes images with Pillow's filter to %s, but this run's "
                      "images are made by the ops '%s' (TensorFlow): the page's probabilities can "
                      "differ from --mode=predict's; train with no eval ops for equal pixels.",
                      'x'.join(map(str, clf.image_shape[:2])), ops)
    page = web.write(os.path.join(staging, 'web'), web_onnx, web_runtime, web.model_json(clf))
    os.remove(web_onnx)
  files = sorted(f for f in os.listdir(staging) if f != output_dir.STAGING_MARK)
  record = {'checkpoint_step': clf.step, 'input': {'name': 'images', 'dtype': 'uint8',
                                                   'shape': [None, *clf.image_shape]},
            'tflite_input_shape': ([tflite_batch or None, *clf.image_shape]
                                   if cfg.tflite or quantize else None),
            'outputs': ['probabilities', 'logits'], 'class_names': list(clf.class_names),
            # Multi-label: 'probabilities' are per-class sigmoids; a tag applies when its
            # probability reaches its threshold (chosen on the run's validation split).
            'task': 'multilabel' if clf.trained.info.multilabel else 'single_label',
            'thresholds': (list(clf.trained.decision_thresholds)
                           if clf.trained.info.multilabel else None),
            # Single-label: the fitted temperature the logits are already divided by (1.0: none).
            'temperature': clf.trained.temperature,
            # Single-label: abstain ("not sure") when the top-1 probability is below this (0: never).
            'min_confidence': (None if clf.trained.info.multilabel
                               else clf.trained.min_confidence),
            # Single-label: an image whose 'logits' have a log-sum-exp below this is of none of
            # the classes ("unknown"; None: no gate; imgcls_jax/ood.py).
            'unknown_below': (None if clf.trained.info.multilabel
                              else clf.trained.unknown_below),
            'compute_dtype': clf.step_cfg.compute_dtype,
            # What --mode=predict does to an image file before the model (inference.prepare):
            # feed an exported model the same pixels for the same answers.
            'preprocessing_before_input': inference.pixel_recipe(clf.trained),
            'files': files, 'bytes': {f: _size(os.path.join(staging, f)) for f in files},
            'tflite_runtime': tflite_runtime() if cfg.tflite or quantize else None,
            'quantization': {k: v for k, v in quant.items() if k != 'verification'} or None,
            'web': page,
            'verification': {'examples': len(images), 'source': samples.source,
                             'tolerance': cfg.tolerance, **checks}}
  with open(os.path.join(staging, 'labels.txt'), 'w') as f:
    f.write('\n'.join(clf.class_names) + '\n')
  with open(os.path.join(staging, 'export.json'), 'w') as f:
    json.dump(record, f, indent=2)
  return record


def _web_onnx(clf: inference.Classifier, staging: str, path: str, images: np.ndarray,
              reference: dict[str, np.ndarray], tflite_1: str) -> dict[str, float]:
  """The web page's model: ONNX of a batch-1 TFLite model (``tflite_1`` when the export wrote
  one), as the page classifies one image per call. Fixed shapes let the TFLite converter fold
  BatchNorm and leave tf2onnx no shape computation to convert. Checked under onnxruntime's CPU
  provider, one image per call; the same graph runs under onnxruntime-web's WebAssembly build."""
  own = not tflite_1   # traced here, and removed once converted
  if own:
    source = os.path.join(staging, 'web_source')
    save_saved_model(clf, source, batch=1)
    tflite_1 = os.path.join(staging, 'web_source.tflite')
    save_tflite(source, tflite_1, batch=1)
    shutil.rmtree(source)
  save_onnx(tflite_1, path, flag='web=False')
  if own:
    os.remove(tflite_1)
  return _check(lambda p, x, batch=1: run_onnx(p, x, batch=1), path, images, reference, 'web')


def _check(run: Any, path: str, images: np.ndarray, reference: dict[str, np.ndarray],
           fmt: str) -> dict[str, float]:
  """``compare`` of the format's outputs in batches of 64 and, as batch size is dynamic, of 7
  and 1; a format its runtime cannot run is an ExportMismatch."""
  try:
    full, small = run(path, images), run(path, images[:8], 7)
  except Exception as e:  # e.g. onnxruntime refusing a mis-converted shape computation
    flag = {'saved_model': 'dtype=float32', 'tflite': 'tflite=False', 'onnx': 'onnx=False',
            'web': 'web=False'}[fmt]
    raise ExportMismatch(f"The exported {fmt} fails under its runtime ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[-1][:200]}); nothing was "
                         f'written: export with --config.export.{flag}.') from None
  n = len(small['probabilities'])
  c, c_small = compare(reference, full), compare({k: v[:n] for k, v in reference.items()}, small)
  return {k: max(c[k], c_small[k]) if k.startswith('max') else min(c[k], c_small[k]) for k in c}


def _quantize_and_verify(clf: inference.Classifier, cfg: ml_collections.ConfigDict, staging: str,
                         saved_model_dir: str, samples: Samples, reference: dict[str, np.ndarray],
                         calibration: Samples | None) -> dict[str, Any]:
  quantize = cfg.quantize
  path = os.path.join(staging, f'model_{quantize}.tflite')
  info = save_tflite(saved_model_dir, path, quantize=quantize,
                     batch=int(cfg.get('tflite_batch', 1)),
                     calibration_NxHxWxC=None if calibration is None else calibration.images)
  if calibration is not None:
    info['calibration_source'] = calibration.source
  failure = probe_tflite(path, clf.image_shape)
  if failure:
    raise ExportMismatch(f'The {quantize} TFLite model does not run under '
                         f'{tflite_runtime()} ({failure}); nothing was written: export with '
                         "--config.export.quantize=float16 or ''.")
  n = len(samples.images) if cfg.get('quantize_examples', -1) < 0 else cfg.quantize_examples
  images = samples.images[:n]
  labels = None if samples.labels is None else samples.labels[:n]
  float_out = (reference if len(images) == len(reference['probabilities'])
               else clf.predict_arrays(images))
  thresholds = (np.asarray(clf.trained.decision_thresholds) if clf.trained.info.multilabel
                else None)
  try:
    quantized_out = run_tflite(path, images)
  except RuntimeError as e:  # e.g. an int8 kernel refusing a value on real images
    raise ExportMismatch(f'The {quantize} TFLite model fails under {tflite_runtime()} on the '
                         f"verification images ({(str(e).strip().splitlines() or [''])[0][:200]});"
                         " nothing was written: export with --config.export.quantize=float16 or "
                         "''.") from None
  report = quantization_report(float_out, quantized_out, labels, thresholds)
  report['source'] = samples.source
  logging.info('%s TFLite vs the float model on %d images: %s%s.', quantize, len(images),
               _agreement(report),
               f", {_accuracy_name(report)} {100 * report['float_accuracy']:.2f}% -> "
               f"{100 * report['quantized_accuracy']:.2f}%" if labels is not None else '')
  limit = float(cfg.get('max_accuracy_drop', 0.01))
  if labels is not None and report['accuracy_drop'] > limit:
    raise QuantizationTooLossy(
        f"The {quantize} TFLite model's {_accuracy_name(report)} is "
        f"{100 * report['accuracy_drop']:.2f} "
        f"points below the float model's on {len(images)} images (limit "
        f'{100 * limit:.2f}, config.export.max_accuracy_drop); nothing was written: calibrate on '
        "more images (config.export.calibration_examples) or use quantize='float16'.")
  return {**info, 'verification': report}


def _size(path: str) -> int:
  if os.path.isdir(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
  return os.path.getsize(path)
