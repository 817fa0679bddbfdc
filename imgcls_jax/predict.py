"""``--mode=predict``: top-k class names and probabilities for image files and folders.

  python -m imgcls_jax.main --mode=predict --config=configs/default.py --workdir=RUN \
      --config.predict.inputs=photos/,extra.png [--config.predict.format=csv]

The model, its dataset (class names, input size, eval preprocessing) and its dtype come from the
run in ``--workdir`` (the config saved with its checkpoint); ``config.predict`` says what to do.
Images of any size and mode are decoded with PIL, converted to the model's channels, resized to the
dataset's image size, then put through the run's ``data.eval_preprocess``, exactly as evaluation
sees them. Unreadable files are reported and skipped. ``Classifier`` is also what ``export`` and
``serve`` run.
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import io
import json
import logging
import os
import re
import sys
from typing import Any, Iterable, Iterator, Sequence, TextIO

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from imgcls_jax import models, steps, transfer
from imgcls_jax import state as state_lib
from imgcls_jax.errors import UserError

IMAGE_EXTENSIONS = frozenset({'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff',
                              '.ppm', '.pgm', '.pbm', '.pnm'})
FORMATS = ('jsonl', 'csv')


class UnreadableImage(Exception):
  """A file or upload that is not a decodable image (reported and skipped, never fatal)."""


class ImageTooLarge(UnreadableImage):
  """An image with more pixels than allowed."""


def run_config(config: ml_collections.ConfigDict, workdir: str,
               meta: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The config the run in ``workdir`` was trained with: from the checkpoint's ``meta`` if it holds
  one, else the run's config.json, else ``config``."""
  if meta and isinstance(meta.get('config'), dict):
    return ml_collections.ConfigDict(meta['config'])
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    logging.warning('%s has no config.json; assuming the run used the given --config.', workdir)
    return config
  try:
    with open(path) as f:
      saved = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise UserError(f'Cannot read {path} ({e}); restore it or delete it to use --config.') from None
  return saved


def _input_spec(data: ml_collections.ConfigDict) -> tuple[tuple[int, int] | None,
                                                          tuple[int, int, int]]:
  """(the dataset's fixed image size or None, the HxWxC the model gets after eval preprocess)."""
  from imgcls_jax.data import ops, pipeline

  shape = tuple(pipeline.builder(data).info.features['image'].shape)
  channels = int(shape[-1] or 3)
  native = (int(shape[0]), int(shape[1])) if shape[0] and shape[1] else None
  sizes = {ops.output_shape(data.eval_preprocess, hw, channels)
           for hw in ([native] if native else [(240, 320), (333, 250)])}
  if len(sizes) != 1:
    raise UserError(f"Images of '{data.name}' vary in size and config.data.eval_preprocess "
                    f"('{data.eval_preprocess}') does not give them one size; add e.g. "
                    "'center_crop(size=224)' to it.")
  h, w, c = sizes.pop()
  return native, (int(h), int(w), int(c))


@dataclasses.dataclass
class Classifier:
  """A trained model ready for inference: weights, class names and input preprocessing."""
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]          # H, W, C of the uint8 images the model takes
  native_hw: tuple[int, int] | None          # the dataset's fixed size (inputs resized to it)
  eval_preprocess: str
  params: Any
  batch_stats: Any
  model_def: state_lib.ModelDef
  step_cfg: steps.StepConfig
  step: int
  run: ml_collections.ConfigDict               # the config the checkpoint was trained with
  max_batch: int = 64

  def apply(self, params: Any, batch_stats: Any, images_BxHxWxC: jax.Array) -> dict[str, jax.Array]:
    """Pure inference: uint8 images -> ``{'probabilities', 'logits'}`` (BxK float32)."""
    model = self.model_def.merge(params, batch_stats)
    logits = model(steps.normalize(images_BxHxWxC, self.step_cfg), train=False).astype(jnp.float32)
    return {'probabilities': jax.nn.softmax(logits, -1), 'logits': logits}

  @functools.cached_property
  def _jitted(self) -> Any:
    return jax.jit(self.apply)

  def predict_arrays(self, images_BxHxWxC: np.ndarray) -> dict[str, np.ndarray]:
    """``apply`` on a batch of any size (padded to a power of two, so few shapes compile)."""
    n = len(images_BxHxWxC)
    out: dict[str, list[np.ndarray]] = {'probabilities': [], 'logits': []}
    for start in range(0, n, self.max_batch):
      chunk = np.asarray(images_BxHxWxC[start:start + self.max_batch], np.uint8)
      size = min(self.max_batch, 1 << max(0, len(chunk) - 1).bit_length())
      padded = np.zeros((size,) + self.image_shape, np.uint8)
      padded[:len(chunk)] = chunk
      res = jax.device_get(self._jitted(self.params, self.batch_stats, padded))
      for k in out:
        out[k].append(res[k][:len(chunk)])
    return {k: np.concatenate(v) if v else np.zeros((0, len(self.class_names)), np.float32)
            for k, v in out.items()}

  @functools.cached_property
  def _eval_op(self) -> Any:
    from imgcls_jax.data import ops
    return ops.numpy_op(self.eval_preprocess)

  def prepare(self, data: bytes | str, *, max_pixels: int = 0) -> np.ndarray:
    """Image bytes or a file path -> the uint8 HxWxC array the model takes.

    Raises UnreadableImage when it is not a decodable image (or has more than ``max_pixels``).
    """
    from PIL import Image, ImageOps
    try:
      with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        if max_pixels and img.width * img.height > max_pixels:
          raise ImageTooLarge(f'an image of {img.width}x{img.height} pixels, more than the limit '
                              f'of {max_pixels}')
        img = ImageOps.exif_transpose(img)
        mode = 'L' if self.image_shape[2] == 1 else 'RGB'
        if img.mode in ('P', 'PA', 'LA') and mode == 'RGB':
          img = img.convert('RGBA')
        img = img.convert(mode)
        if self.native_hw and (img.height, img.width) != self.native_hw:
          h, w = self.native_hw  # area-average when shrinking, bilinear when enlarging
          shrink = img.height >= h and img.width >= w
          img = img.resize((w, h), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
        array = np.asarray(img, np.uint8)
    except UnreadableImage:
      raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      detail = re.sub(r'<_io\.BytesIO object at 0x[0-9a-f]+>', 'the upload',
                      (str(e).splitlines() or [''])[0][:160])
      raise UnreadableImage(f'not a readable image ({type(e).__name__}: {detail})') from None
    if array.ndim == 2:
      array = array[..., None]
    if self._eval_op is not None:
      array = self._eval_op(array)
    if array.shape != self.image_shape:
      raise UnreadableImage(f'preprocessed to {array.shape}, not the model input '
                            f'{self.image_shape}')
    return array


def load_classifier(config: ml_collections.ConfigDict, workdir: str, *, step: int = -1,
                    dtype: str = '', max_batch: int = 64) -> Classifier:
  """The run in ``workdir`` at checkpoint ``step`` (-1: latest), computing in ``dtype`` ('' = the
  run's), on the default device."""
  weights = transfer.read_checkpoint(workdir, step)
  run = run_config(config, workdir, weights.meta)
  from imgcls_jax.data import pipeline
  info = pipeline.info(run.data)
  class_names = tuple(weights.meta.get('class_names') or info.class_names)
  native, image_shape = _input_spec(run.data)
  compute_dtype = dtype or run.dtype
  model_run = ml_collections.ConfigDict(run.to_dict())
  model_run.dtype = compute_dtype
  model_fn = models.from_config(model_run, len(class_names), image_shape[2])
  abstract = nnx.eval_shape(lambda: model_fn(rngs=nnx.Rngs(0)))
  keep_all = lambda _: False  # noqa: E731
  params, _ = transfer.merge(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)), weights.params,
                             origin=weights.origin, skip=keep_all)
  stats, _ = transfer.merge(nnx.to_pure_dict(nnx.state(abstract, nnx.BatchStat)),
                            weights.batch_stats, origin=weights.origin, skip=keep_all,
                            kind='Batch statistic')
  step_cfg = steps.StepConfig(num_classes=len(class_names),
                              mean=tuple(float(m) for m in run.data.mean),
                              std=tuple(float(s) for s in run.data.std),
                              compute_dtype=compute_dtype)
  logging.info('Loaded %s: %s on %s (%d classes), input %s.', weights.origin, run.model.name,
               run.data.name, len(class_names), 'x'.join(map(str, image_shape)))
  return Classifier(class_names=class_names, image_shape=image_shape, native_hw=native,
                    eval_preprocess=run.data.eval_preprocess or '',
                    params=jax.device_put(params), batch_stats=jax.device_put(stats),
                    model_def=state_lib.model_def(model_fn), step_cfg=step_cfg,
                    step=int(weights.meta['step']), run=run, max_batch=max_batch)


def top_k(probs_K: np.ndarray, class_names: Sequence[str], k: int) -> list[dict[str, Any]]:
  """The ``k`` most probable classes, best first, as ``{'class', 'index', 'probability'}``."""
  order = np.argsort(-probs_K, kind='stable')[:max(1, min(k, len(probs_K)))]
  return [{'class': class_names[i], 'index': int(i), 'probability': float(probs_K[i])}
          for i in order]


def list_inputs(spec: str) -> list[str]:
  """Files named in the comma-separated ``spec``; folders give their image files, recursively."""
  paths = [p.strip() for p in (spec or '').split(',') if p.strip()]
  if not paths:
    raise UserError('Nothing to predict: set config.predict.inputs to image files and/or folders, '
                    'e.g. --config.predict.inputs=photos/.')
  files = []
  for p in paths:
    if os.path.isdir(p):
      found = sorted(os.path.join(root, f) for root, _, names in os.walk(p) for f in names
                     if not f.startswith('.')
                     and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
      if not found:
        logging.warning('No image files in folder %s.', p)
      files.extend(found)
    elif os.path.exists(p):
      files.append(p)
    else:
      raise UserError(f'Input {p} (from config.predict.inputs) does not exist; check the path.')
  return files


def _batches(files: list[str], clf: Classifier, batch_size: int,
             skipped: list[tuple[str, str]]) -> Iterator[tuple[list[str], np.ndarray]]:
  """(files, uint8 images) batches, decoded by a thread pool one batch ahead; bad files skipped."""
  def load(path):
    try:
      return clf.prepare(path)
    except UnreadableImage as e:
      return e

  with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    pending = [pool.map(load, chunks[0])] if chunks else []
    for i, chunk in enumerate(chunks):
      if i + 1 < len(chunks):
        pending.append(pool.map(load, chunks[i + 1]))
      good, images = [], []
      for path, result in zip(chunk, pending.pop(0)):
        if isinstance(result, UnreadableImage):
          logging.warning('Skipped %s: %s.', path, result)
          skipped.append((path, str(result)))
        else:
          good.append(path)
          images.append(result)
      if good:
        yield good, np.stack(images)


def predict_files(clf: Classifier, files: list[str], *, top: int = 5, batch_size: int = 64
                  ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
  """(one ``{'file', 'predictions'}`` per readable file in order, [(skipped file, reason)])."""
  skipped: list[tuple[str, str]] = []
  results = []
  for paths, images in _batches(files, clf, batch_size, skipped):
    probs = clf.predict_arrays(images)['probabilities']
    results.extend({'file': p, 'predictions': top_k(pr, clf.class_names, top)}
                   for p, pr in zip(paths, probs))
  return results, skipped


def write(results: Iterable[dict[str, Any]], out: TextIO, fmt: str) -> None:
  """JSON lines (one object per image) or CSV (one row per image and rank)."""
  if fmt == 'jsonl':
    for r in results:
      out.write(json.dumps(r) + '\n')
  else:
    w = csv.writer(out)
    w.writerow(['file', 'rank', 'class', 'index', 'probability'])
    for r in results:
      for rank, p in enumerate(r['predictions'], 1):
        w.writerow([r['file'], rank, p['class'], p['index'], f"{p['probability']:.6f}"])


def predict(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """The ``predict`` mode: classifies ``config.predict.inputs`` and writes the top-k of each."""
  cfg = config.predict
  if cfg.format not in FORMATS:
    raise UserError(f"config.predict.format must be one of {', '.join(FORMATS)}, got "
                    f"'{cfg.format}'.")
  if cfg.top_k < 1 or cfg.batch_size < 1:
    raise UserError('config.predict.top_k and config.predict.batch_size must be positive.')
  files = list_inputs(cfg.inputs)
  clf = load_classifier(config, workdir, step=cfg.step, max_batch=cfg.batch_size)
  results, skipped = predict_files(clf, files, top=cfg.top_k, batch_size=cfg.batch_size)
  if cfg.output:
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
    with open(cfg.output, 'w', newline='') as f:
      write(results, f, cfg.format)
  else:
    write(results, sys.stdout, cfg.format)
    sys.stdout.flush()
  logging.info('Predicted %d image(s)%s; skipped %d unreadable file(s)%s.', len(results),
               f' into {cfg.output}' if cfg.output else '', len(skipped),
               ': ' + ', '.join(p for p, _ in skipped[:10]) + (' ...' if len(skipped) > 10 else '')
               if skipped else '')
  return results
