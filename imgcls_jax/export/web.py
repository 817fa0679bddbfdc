"""``config.export.web``: a static web page that classifies images in the browser, offline.

The export's ``model.onnx`` runs under onnxruntime-web (its WebAssembly backend, one thread, so
no cross-origin isolation headers are needed). ``<export>/web/`` is self-contained and can be put
on any static host (or previewed with ``python -m http.server -d <export>/web``; browsers load
WebAssembly and modules only over HTTP, not from ``file://``):

  * ``index.html``, ``classify.js`` (the page) and the ES modules it imports: ``decode.js``,
    ``png.js``, ``orientation.js``, ``pillow.js``, ``bytes.js``. It decodes each chosen image
    (still PNGs itself, as PIL does; JPEG, WebP, GIF through the browser) and turns it upright
    as PIL does (EXIF, else XMP; a damaged EXIF block ignored), converts it to grey (ITU-R 601
    luma) and resizes it with Pillow's arithmetic, so the model gets ``--mode=predict``'s bytes
    (``images.decode``) at any size.
  * ``model.onnx`` (the model traced at one image per call, verified against JAX like every
    other format; not the export's any-batch ``model.onnx``), ``model.json`` (class names, input
    shape, task and the run's decision rules: multi-label thresholds, ``min_confidence``,
    ``unknown_below``).
  * ``ort/``: onnxruntime-web's ES-module bundle and its WebAssembly file, copied from an npm
    install (``npm install onnxruntime-web``); nothing is fetched from another host.
"""
from __future__ import annotations

import importlib.resources
import json
import os
import shutil
from typing import Any

from imgcls_jax import inference
from imgcls_jax.errors import UserError

BUNDLE = 'ort.wasm.bundle.min.mjs'       # the ES module with the WebAssembly glue inside
WASM = 'ort-wasm-simd-threaded.wasm'     # the one file the bundle fetches
PAGE_FILES = ('index.html', 'classify.js', 'decode.js', 'png.js', 'orientation.js', 'pillow.js',
              'bytes.js')


def _candidates(spec: str) -> list[str]:
  if spec:
    spec = os.path.abspath(os.path.expanduser(spec))
    return [spec, os.path.join(spec, 'dist'), os.path.join(spec, 'onnxruntime-web', 'dist'),
            os.path.join(spec, 'node_modules', 'onnxruntime-web', 'dist')]
  return [os.path.abspath(os.path.join('node_modules', 'onnxruntime-web', 'dist'))]


def find_runtime(spec: str) -> str:
  """The onnxruntime-web ``dist`` folder named by ``config.export.web_runtime`` (that folder, the
  package's, or a folder holding ``node_modules``), by default ``./node_modules/...``; a
  UserError naming the fix when it is not there."""
  for folder in _candidates(spec):
    if os.path.isfile(os.path.join(folder, BUNDLE)) and os.path.isfile(
        os.path.join(folder, WASM)):
      return folder
  where = (f'config.export.web_runtime={spec} holds no' if spec else
           'No config.export.web_runtime is set and ./node_modules holds no')
  raise UserError(f'{where} onnxruntime-web files ({BUNDLE}, {WASM}), which config.export.web '
                  'copies into the page; run `npm install onnxruntime-web` (1.20 or later) in '
                  'this folder, or set config.export.web_runtime to its dist folder.')


def runtime_version(folder: str) -> str:
  """onnxruntime-web's version from its package.json ('' when that cannot be read)."""
  try:
    with open(os.path.join(folder, os.pardir, 'package.json')) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return ''
  return str(meta.get('version', '')) if meta.get('name') == 'onnxruntime-web' else ''


def write(web_dir: str, onnx_path: str, runtime: str, model: dict[str, Any]) -> dict[str, Any]:
  """Writes the page into ``web_dir`` (new); returns what export.json records of it."""
  os.makedirs(os.path.join(web_dir, 'ort'))
  static = importlib.resources.files('imgcls_jax.export') / 'static'
  for name in PAGE_FILES:
    with open(os.path.join(web_dir, name), 'w') as f:
      f.write((static / name).read_text())
  shutil.copyfile(onnx_path, os.path.join(web_dir, 'model.onnx'))
  # Served as JavaScript by any static server (some map .mjs to no type, which a module refuses).
  shutil.copyfile(os.path.join(runtime, BUNDLE), os.path.join(web_dir, 'ort', 'ort.bundle.js'))
  shutil.copyfile(os.path.join(runtime, WASM), os.path.join(web_dir, 'ort', WASM))
  with open(os.path.join(web_dir, 'model.json'), 'w') as f:
    json.dump(model, f, indent=2)
  version = runtime_version(runtime)
  return {'runtime': f'onnxruntime-web {version}'.strip(), 'page': 'web/index.html',
          'files': sorted(os.path.relpath(os.path.join(d, n), web_dir)
                          for d, _, names in os.walk(web_dir) for n in names)}


def model_json(clf: inference.Classifier) -> dict[str, Any]:
  """model.json of the web page: what it shows and the run's decision rules."""
  trained, multilabel = clf.trained, clf.trained.info.multilabel
  data = os.path.basename(str(clf.run.data.name).split(':')[-1].rstrip('/\\')) or 'images'
  return {'title': f'{data}: {clf.run.model.name} classifier',
          'checkpoint_step': clf.step, 'class_names': list(clf.class_names),
          'input_shape': list(clf.image_shape), 'top_k': min(5, len(clf.class_names)),
          'task': 'multilabel' if multilabel else 'single_label',
          'thresholds': list(trained.decision_thresholds) if multilabel else None,
          'min_confidence': None if multilabel else trained.min_confidence,
          'unknown_below': None if multilabel else trained.unknown_below}
