"""A trained model loaded from its run directory alone, ready for inference.

Every checkpoint's meta holds what inference needs: the config the run was trained with (model,
dtype, mean/std, eval preprocessing), the dataset description (``DatasetInfo``: class names, image
shape, where it came from) and the model's input shape. ``load`` reads them with the parameters
and BN statistics, so ``evaluate``, ``predict``, ``export`` and ``serve`` need nothing but
``--workdir`` (checkpoints written before the description was saved fall back to reading the
dataset). ``Classifier`` runs ``eval_steps.probabilities`` (the one inference forward pass) on uint8
images prepared exactly as evaluation prepares them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from imgcls_jax import (checkpoint_files, configlib, eval_steps, model_defaults, models,
                        run_directory, steps)
from imgcls_jax import state as state_lib
from imgcls_jax import weights as weights_lib
from imgcls_jax.data import arrays, folder_layout, images
from imgcls_jax.data.info import DatasetInfo, warn_unrecorded_pixels
from imgcls_jax.errors import UserError

# Sections of the config that each mode owns: set freely on the command line of that mode.
MODE_SECTIONS = ('evaluate', 'predict', 'export', 'serve', 'embed', 'compare')
# Keys that say where the evaluation data lives now (the run's may have moved), or how to lay the
# work out on this machine: they may differ from the run's without changing the model.
LOCATION_KEYS = ('ema.inference', 'data.data_dir', 'data.manual_dir', 'data.folder',
                 'data.eval_split', 'data.holdout_fraction', 'data.holdout_seed', 'data.manifest',
                 'data.index_cache', 'eval_batch_size', 'mesh.', 'distributed.')


def effective_config(saved: dict[str, Any] | None, given: ml_collections.ConfigDict | None,
                     overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The config a mode runs with: the run's own (``saved``), plus the mode sections and data
  locations of ``given``.

  With ``overrides`` (the keys given on the command line, ``{'evaluate.split': 'val', ...}``) only
  those are applied, and one that would change the trained model is a UserError naming it.
  """
  if not saved:
    if given is None:
      raise UserError('This run directory holds no config; pass the --config it was trained with.')
    logging.warning('The checkpoint holds no config; assuming the run used the given --config.')
    return given
  run = ml_collections.ConfigDict(saved)
  if overrides is None:
    for section in MODE_SECTIONS:
      if given is not None and section in given:
        run[section] = given[section]
    for key in LOCATION_KEYS:
      value = _get(given, key) if given is not None and not key.endswith('.') else None
      if value not in (None, ''):
        _set(run, key, value)
    if given is not None:
      run.mesh, run.distributed = given.mesh, given.distributed
    return run
  # The user's labelled images (a folder or manifest) evaluate any run, read as an image folder.
  new_images = any(overrides.get(k) for k in ('data.folder', 'data.manifest'))
  for key, value in sorted(overrides.items()):
    allowed = key.split('.')[0] in MODE_SECTIONS or any(
        key.startswith(p) if p.endswith('.') else key == p for p in LOCATION_KEYS)
    # An arrays file's path is its location: another arrays file (moved, or new images) is allowed.
    allowed = allowed or (key == 'data.name' and all(
        str(v).startswith(arrays.PREFIX) for v in (_get(run, key), value)))
    allowed = allowed or new_images and (key == 'data.eval_preprocess' or (
        key == 'data.name' and value == folder_layout.NAME))
    if not allowed and not _same(_get(run, key), value):
      raise UserError(f'--config.{key}={value} conflicts with the trained run (which has '
                      f'{_get(run, key)!r}); evaluate/predict/export/serve take the model from '
                      f'--workdir: drop that flag, or train a new run with it.')
    _set(run, key, value)
  if new_images:
    _set(run, 'data.name', folder_layout.NAME)
  return run


def mode_settings(workdir: str, config: ml_collections.ConfigDict | None,
                  overrides: dict[str, Any] | None, section: str) -> ml_collections.ConfigDict:
  """A mode's own settings (``config.<section>``): from the command line (``overrides`` given),
  the run's saved section with the flags applied, so ``--config`` can be left out; else the
  given config's."""
  base = ml_collections.ConfigDict(config[section].to_dict()) if (
      config is not None and section in config) else ml_collections.ConfigDict()
  if overrides is None:
    return base
  saved = (run_directory.read_config(workdir) or {}).get(section) or {}
  with base.unlocked():
    for key, value in {**saved, **{k.split('.', 1)[1]: v for k, v in overrides.items()
                                   if k.startswith(section + '.')}}.items():
      base[key] = value
  return base


def _same(a: Any, b: Any) -> bool:
  """Equal as JSON values (a tuple given on the command line equals the list a run saved)."""
  return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _get(config: Any, dotted: str) -> Any:
  node = config
  for part in dotted.split('.'):
    node = node[part] if hasattr(node, 'keys') and part in node else None
  return node


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split('.')
  node = config
  for part in parents:
    if part not in node:
      node[part] = ml_collections.ConfigDict()
    node = node[part]
  with node.unlocked():
    node[leaf] = value


def input_spec(data: ml_collections.ConfigDict, info: DatasetInfo
               ) -> tuple[tuple[int, int] | None, tuple[int, int, int]]:
  """(the dataset's fixed image size or None, the HxWxC the model takes after eval preprocess)."""
  h, w, channels = info.image_shape
  native = (int(h), int(w)) if h and w else None
  if native and not data.eval_preprocess:  # images as stored (no TensorFlow needed to say so)
    return native, (native[0], native[1], int(channels))
  from imgcls_jax.data import pp
  sizes = {pp.output_shape(data.eval_preprocess, hw, channels)
           for hw in ([native] if native else [(240, 320), (333, 250)])}
  if len(sizes) != 1:
    raise UserError(f"Images of '{info.name}' vary in size and config.data.eval_preprocess "
                    f"('{data.eval_preprocess}') does not give them one size; add e.g. "
                    "'center_crop(size=224)' to it.")
  out = sizes.pop()
  return native, (int(out[0]), int(out[1]), int(out[2]))


def inference_meta(data: ml_collections.ConfigDict, info: DatasetInfo,
                   model: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """What a checkpoint's meta carries for inference (saved with every checkpoint): with the
  ``model`` config, the constructor defaults it builds with (``model_defaults.record``); for a
  model family or eval ops registered outside the package, ``registration.code_origin`` of each
  (``model_origin``, ``op_origins``), which ``load`` names when this process lacks them."""
  native, shape = input_spec(data, info)
  where = models.origin(model.name) if model is not None else None
  built = {model_defaults.META_KEY: model_defaults.record(model)} if model is not None else {}
  ops = _ops(data.eval_preprocess).origins(data.eval_preprocess) if data.eval_preprocess else {}
  return {'dataset_info': info.to_json(), 'input_shape': list(shape),
          'native_hw': list(native) if native else None,
          'eval_preprocess': data.eval_preprocess or '', **built,
          **({'model_origin': where} if where else {}), **({'op_origins': ops} if ops else {})}


@dataclasses.dataclass
class Trained:
  """A checkpoint of a run, as inference needs it (weights as numpy, on no device yet)."""
  run: ml_collections.ConfigDict      # the config the run was trained with (+ mode keys)
  info: DatasetInfo
  image_shape: tuple[int, int, int]   # H, W, C of the uint8 images the model takes
  native_hw: tuple[int, int] | None   # the dataset's fixed size (inputs are resized to it)
  variables: state_lib.InferenceState
  step: int
  origin: str
  thresholds: tuple[float, ...] | None = None   # multi-label: per-class decision thresholds
  temperature: float = 1.0            # single-label: logits are divided by it (temperature.py)
  abstain: dict[str, Any] | None = None   # single-label: the abstention record (selective.py)
  abstain_target: float | None = None     # the accuracy it was fitted for (None: never asked)
  unknown: dict[str, Any] | None = None   # single-label: the unknown-input gate's record (ood.py)
  unknown_keep: float | None = None       # the share it was fitted to keep (None: never asked)

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.info.class_names

  @property
  def min_confidence(self) -> float:
    """Single-label: answers below this top-1 probability are abstained on (0: none)."""
    return float((self.abstain or {}).get('min_confidence', 0.0))

  @property
  def unknown_below(self) -> float | None:
    """Single-label: images whose logits' log-sum-exp is below this are unknown (None: no gate)."""
    return None if not self.unknown else float(self.unknown['below'])

  @property
  def decision_thresholds(self) -> tuple[float, ...]:
    """Per-class thresholds of a multi-label model (0.5 where the run chose none)."""
    return self.thresholds or (0.5,) * self.info.num_classes


def load(workdir: str, config: ml_collections.ConfigDict | None = None, *, step: int = -1,
         overrides: dict[str, Any] | None = None, step_key: str = '') -> Trained:
  """The run in ``workdir`` at checkpoint ``step`` (-1: latest), with its effective config;
  ``step_key`` (e.g. 'predict.step') is the key errors name to pick another step."""
  workdir = os.path.abspath(workdir)
  run_directory.require_checkpoint(workdir)
  source = checkpoint_files.read_weights(workdir, step, step_key=step_key)
  meta = source.meta
  saved = meta['config'] if isinstance(meta.get('config'), dict) else run_directory.read_config(
      workdir)
  run = effective_config(configlib.relocate_id_lists(saved, workdir), config, overrides)
  if steps.uses_ema(run):  # the averaged weights
    source = checkpoint_files.ema_weights(source, workdir, step_key)
  if meta.get('dataset_info'):
    info = DatasetInfo.from_json(meta['dataset_info'])
    native = tuple(meta['native_hw']) if meta.get('native_hw') else None
    shape = tuple(int(d) for d in meta['input_shape'])
  else:  # written before the run directory was self-contained: describe the dataset again
    from imgcls_jax.data import reader
    try:
      info = reader.describe(run.data)
    except UserError as e:
      raise UserError(f'{source.origin} predates self-contained checkpoints and its dataset is '
                      f'not readable ({e}); make the dataset available again (config.data.*) '
                      'or retrain.') from None
    if meta.get('class_names'):
      info = dataclasses.replace(info, class_names=tuple(meta['class_names']))
    native, shape = input_spec(run.data, info)
  if run.data.name == folder_layout.NAME and info.stored_preprocess is not None:
    _set(run, 'data.eval_preprocess', run.data.eval_preprocess or info.stored_preprocess)
  given = (overrides or {}).get('data.eval_preprocess')
  if given not in (None, ((saved or {}).get('data') or {}).get('eval_preprocess')):
    _, made = input_spec(run.data, dataclasses.replace(info, image_shape=(None, None, shape[2])))
    if made != shape:   # new images (effective_config): it must make any image the model's input
      raise UserError(f"--config.data.eval_preprocess='{given}' makes {made[0]}x{made[1]} images "
                      f"where the model reads {shape[0]}x{shape[1]}; give one that makes that, "
                      f"e.g. 'resize(size={shape[0]})'.")
  models.ensure_registered(run.model.name, meta.get('model_origin'))
  model_defaults.apply(run, meta)   # a default changed since training: the one trained with
  if meta.get('op_origins'):
    _ops(meta['eval_preprocess']).ensure_registered(meta['op_origins'])
  model_fn = models.from_config(run, info.num_classes, shape[2])
  abstract = state_lib.abstract_variables(model_fn)
  params, _ = weights_lib.merge(abstract.params, source.params, origin=source.origin)
  stats, _ = weights_lib.merge(abstract.batch_stats, source.batch_stats, origin=source.origin,
                               kind='Batch statistic')
  logging.debug('Loaded %s: %s on %s (%d classes), input %s.', source.origin, run.model.name,
               info.name, info.num_classes, 'x'.join(map(str, shape)))
  chosen, cal = (meta.get('thresholds') or {}).get('values'), meta.get('temperature') or {}
  return Trained(run=run, info=info, image_shape=shape, native_hw=native,
                 variables=state_lib.InferenceState(params=params, batch_stats=stats),
                 step=int(meta['step']), origin=source.origin,
                 thresholds=tuple(float(t) for t in chosen) if chosen else None,
                 temperature=float(cal.get('value', 1.0)), abstain=cal.get('abstain'),
                 abstain_target=cal.get('abstain_accuracy'), unknown=cal.get('unknown'),
                 unknown_keep=cal.get('unknown_keep'))


@dataclasses.dataclass
class Classifier:
  """A trained model on the default device: uint8 images (or image files) in, probabilities out."""
  trained: Trained
  model_def: state_lib.ModelDef
  step_cfg: steps.StepConfig
  variables: state_lib.InferenceState   # on the device
  max_batch: int = 64

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.trained.class_names

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.trained.image_shape

  @property
  def step(self) -> int:
    return self.trained.step

  @property
  def run(self) -> ml_collections.ConfigDict:
    return self.trained.run

  def apply(self, variables: state_lib.InferenceState, images_BxHxWxC: jax.Array) -> dict:
    """Pure inference: uint8 images -> ``{'probabilities', 'logits'}`` (BxK float32)."""
    return eval_steps.probabilities(variables, images_BxHxWxC, model_def=self.model_def,
                                    cfg=self.step_cfg)

  @functools.cached_property
  def _jitted(self) -> Any:
    return jax.jit(self.apply)

  def predict_arrays(self, images_BxHxWxC: np.ndarray) -> dict[str, np.ndarray]:
    """``apply`` on a batch of any size (padded to a power of two, so few shapes compile) of
    uint8 images as ``prepare`` makes them (a UserError names any other dtype or shape)."""
    x = np.asarray(images_BxHxWxC)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != tuple(self.image_shape):
      raise UserError(f"Classifier.predict_arrays takes uint8 images of shape [N, "
                      f"{', '.join(map(str, self.image_shape))}] (pixel values 0-255, as "
                      f'Classifier.prepare returns them), got {x.dtype} {list(x.shape)}.')
    n = len(images_BxHxWxC)
    out: dict[str, list[np.ndarray]] = {'probabilities': [], 'logits': []}
    for start in range(0, n, self.max_batch):
      chunk = np.asarray(images_BxHxWxC[start:start + self.max_batch], np.uint8)
      size = min(self.max_batch, 1 << max(0, len(chunk) - 1).bit_length())
      padded = np.zeros((size,) + self.image_shape, np.uint8)
      padded[:len(chunk)] = chunk
      res = jax.device_get(self._jitted(self.variables, padded))
      for k in out:
        out[k].append(res[k][:len(chunk)])
    return {k: np.concatenate(v) if v else np.zeros((0, len(self.class_names)), np.float32)
            for k, v in out.items()}

  def prepare(self, data: bytes | str, *, max_pixels: int | None = None) -> np.ndarray:
    """``prepare`` of this classifier's run."""
    return prepare(self.trained, data, max_pixels=max_pixels)


@functools.lru_cache(maxsize=8)
def _eval_op(spec: str) -> Any:
  """The eval preprocessing as a numpy function; None (and no TensorFlow import, 3-6 s of a
  predict or serve start-up) when the run has none."""
  return _ops(spec).numpy_op(spec) if spec else None


def _ops(spec: str) -> Any:
  """The preprocessing ops package (a UserError naming ``spec`` without TensorFlow)."""
  try:
    from imgcls_jax.data import pp
  except ModuleNotFoundError as e:
    raise e if (e.name or '').split('.')[0] != 'tensorflow' else UserError(
        f"This run's images are made by the ops '{spec}', which run on TensorFlow (not installed "
        'here); install it (pip install tensorflow-cpu) to predict or serve.') from None
  return pp


def pixel_ops(trained: Trained) -> str:
  """The ops that make the model's input of a decoded image: an arrays file's recorded ones (an
  arrays run's own eval_preprocess is '', or the recorded ones: ``load``), else the run's."""
  return trained.info.stored_preprocess or trained.run.data.eval_preprocess or ''


def _decode_size(trained: Trained) -> tuple[int, int] | None:
  """The size ``prepare`` decodes to: the dataset's, unless an arrays file's ops size it."""
  return None if trained.info.stored_preprocess else trained.native_hw


def pixel_recipe(trained: Trained) -> dict[str, Any]:
  """How ``prepare`` makes a model input of an image file, step by step (``export.json``), for
  clients that feed an exported model themselves: the same steps give the same answers."""
  h, w, c = trained.image_shape
  return {**images.decode_recipe(c, _decode_size(trained)), 'ops': pixel_ops(trained) or None,
          'input': f'uint8 [batch, {h}, {w}, {c}], no scaling (the model normalises)'}


def prepare(trained: Trained, data: bytes | str, *, max_pixels: int | None = None) -> np.ndarray:
  """Image bytes or a file path -> the uint8 HxWxC array ``trained``'s model takes, made as its
  training images were: for an arrays file that records its preprocessing (write_arrays'
  ``--eval_preprocess``), decoded and put through those ops; else decoded, resized to the
  dataset's fixed size, then put through the run's eval preprocessing.

  Raises ``images.UnreadableImage`` when it is not a decodable image, ``images.ImageTooLarge``
  when it has more than ``max_pixels`` (0 = no limit; None = PIL's decompression-bomb limit).
  """
  spec = pixel_ops(trained)
  array = images.decode(data, channels=trained.image_shape[2], max_pixels=max_pixels,
                        size_hw=_decode_size(trained))
  if trained.info.stored_preprocess is None and trained.native_hw:
    warn_unrecorded_pixels(trained.info, trained.native_hw, data)
  op = _eval_op(spec)
  if op is not None:
    array = op(array)
  if array.shape != trained.image_shape:
    raise images.UnreadableImage(f'preprocessed to {array.shape}, not the model input '
                                 f'{trained.image_shape}')
  return array


def classifier(trained: Trained, *, dtype: str = '', max_batch: int = 64) -> Classifier:
  """``trained`` on the default device, computing in ``dtype`` ('' = the run's)."""
  run = ml_collections.ConfigDict(trained.run.to_dict())
  run.dtype = dtype or run.dtype
  model_fn = models.from_config(run, trained.info.num_classes, trained.image_shape[2])
  _eval_op(pixel_ops(trained))   # TensorFlow missing for them: one line now, not per request
  return Classifier(trained=trained, model_def=state_lib.model_def(model_fn),
                    step_cfg=steps.step_config(run, trained.info.num_classes,
                                               multilabel=trained.info.multilabel,
                                               temperature=trained.temperature),
                    variables=jax.device_put(trained.variables), max_batch=max_batch)

