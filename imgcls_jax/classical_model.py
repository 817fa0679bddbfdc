"""A classical baseline's fitted model as a library (the ``classical`` mode fits it; predict,
evaluate and compare use it): its files, its class scores, and how raw files become its pixels.
The fit records, in ``classical.json``, what a network's checkpoint records for inference
(``inference.inference_meta``), so ``inference.prepare`` makes a raw file's pixels as the fit's
were. The model is a joblib pickle: use only folders you trust."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

import ml_collections
import numpy as np

from imgcls_jax import configlib, features, inference, report, run_directory
from imgcls_jax.data.info import DatasetInfo
from imgcls_jax.errors import UserError

MODEL_FILE = 'classical_model.joblib'
META_FILE = run_directory.CLASSICAL_FILE
RECORD_KEY = 'inference'   # classical.json's record of how the fit's pixels were made


def class_scores(fitted: Any, features_NxD: np.ndarray, num_classes: int) -> np.ndarray:
  """``N x K`` log-probabilities (or an uncalibrated SVM's margins) for all K classes; classes
  absent from the training data get a very low score."""
  if hasattr(fitted, 'predict_log_proba'):
    scores = fitted.predict_log_proba(features_NxD)
  elif hasattr(fitted, 'predict_proba'):   # a calibrated SVM
    scores = np.log(np.maximum(fitted.predict_proba(features_NxD), np.finfo(np.float64).tiny))
  else:
    scores = fitted.decision_function(features_NxD)
  scores = np.asarray(scores, np.float32)
  if scores.ndim == 1:  # binary SVM: one margin for classes_[1]
    scores = np.stack([-scores, scores], axis=1) / 2
  out = np.full((len(features_NxD), num_classes), -1e9, np.float32)
  out[:, np.asarray(fitted.classes_, np.int64)] = scores
  return out


@dataclasses.dataclass
class Pixels:
  """What ``inference.prepare`` reads of a trained run, for a classical fit."""
  info: DatasetInfo
  run: ml_collections.ConfigDict
  native_hw: tuple[int, int] | None
  image_shape: tuple[int, int, int]


def read_meta(workdir: str) -> dict[str, Any]:
  """A classical fit's ``classical.json`` (a UserError, one line, when it cannot be read)."""
  path = os.path.join(workdir, META_FILE)
  try:
    with open(path) as f:
      meta = json.load(f)
    if not isinstance(meta.get('config'), dict):
      raise ValueError('no config in it')
    return meta
  except (OSError, ValueError) as e:
    raise UserError(f'Cannot read {path} ({type(e).__name__}: {e}); fit the baseline again with '
                    '--mode=classical.') from None


def unaugmented(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.data`` as classical features read it: ``train_preprocess`` '' (a copy when it was
  set). The features are of the images as evaluation prepares them, never augmented ones, and an
  arrays dataset refuses a host augmentation it would never apply."""
  if not data.get('train_preprocess'):
    return data
  data = copy.deepcopy(data)
  data.train_preprocess = ''
  return data


def softmax(scores_NxK: np.ndarray) -> np.ndarray:
  """Class probabilities of ``class_scores`` (a class absent from the training data: 0)."""
  shifted = np.exp(scores_NxK - scores_NxK.max(axis=1, keepdims=True))
  return shifted / shifted.sum(axis=1, keepdims=True)


def load(workdir: str) -> tuple[dict[str, Any], Pixels, Any]:
  """(classical.json, how raw files become the fit's pixels, the fitted scikit-learn model) of
  a classical fit's folder. The model is a joblib pickle: load only folders you trust."""
  meta = read_meta(workdir)
  record = meta.get(RECORD_KEY)
  if not record:
    raise UserError(f'--workdir={workdir} is a classical baseline fitted before classical fits '
                    'recorded how their images were made; fit it again with --mode=classical '
                    'to predict with it.')
  import joblib
  fitted = joblib.load(os.path.join(workdir, MODEL_FILE))
  native = record.get('native_hw')
  pixels = Pixels(info=DatasetInfo.from_json(record['dataset_info']),
                   run=ml_collections.ConfigDict(meta['config']),
                   native_hw=tuple(native) if native else None,
                   image_shape=tuple(record['input_shape']))
  return meta, pixels, fitted


def probabilities(fitted: Any, spec: features.FeatureSpec, images_NxHxWxC: np.ndarray,
                  num_classes: int) -> np.ndarray:
  """The fit's class probabilities of images (N x K; a class absent from its training data: 0)."""
  return softmax(class_scores(fitted, features.extract(images_NxHxWxC, spec), num_classes))


def describe(run: ml_collections.ConfigDict, num_features: int | None = None) -> str:
  """The model as reports name it: 'classical: hog+lbp features (385) -> logistic'."""
  size = f' ({num_features})' if num_features else ''
  return (f"classical: {'+'.join(spec_of(run).blocks)} features{size} -> "
          f'{run.classical.classifier}')


def report_of(scores_NxK: np.ndarray, labels_N: np.ndarray, class_names: list[str], *,
              num_bins: int, top_confused: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(the evaluation report, its summed statistics) of class scores, by ``report.eval_sums``
  (``report.sums_of_scores``)."""
  stats = report.sums_of_scores(scores_NxK, labels_N, num_bins)
  return report.summarize(stats, class_names, top_confused=top_confused), stats


def spec_of(run: ml_collections.ConfigDict) -> features.FeatureSpec:
  """The feature blocks a fit's config asked for (``config.classical``)."""
  return features.spec_from_config(run.classical)


@dataclasses.dataclass
class Scored:
  """A fit's model on every readable example of a split (``score_split``)."""
  meta: dict[str, Any]            # classical.json
  run: ml_collections.ConfigDict   # the fit's config, with the command line's data locations
  info: DatasetInfo
  split: str
  new_images: bool                 # another labelled folder or manifest (``data.folder``, ...)
  scores: np.ndarray               # float32 N x K: ``class_scores``
  labels: np.ndarray               # int64 N
  position: np.ndarray             # int64 N: in the split's read order

  def probabilities(self) -> np.ndarray:
    return softmax(self.scores)

  def model(self) -> str:
    return describe(self.run, sum((self.meta.get('feature_blocks') or {}).values()) or None)

  def seen(self) -> int | None:
    """How many of the examples the fit trained on (None: not known, e.g. other images)."""
    from imgcls_jax.data import reader
    if self.new_images:
      return None
    try:
      return reader.shared_examples(self.run.data, self.split, self.run.data.train_split,
                                    self.info)
    except UserError:
      return None


def run_config(meta: dict[str, Any], overrides: dict[str, Any] | None,
               workdir: str) -> ml_collections.ConfigDict:
  """The fit's config (``classical.json``'s, of the fit in ``workdir``) with the data locations
  of the command line's keys (``overrides``) applied, as a network run's
  (``inference.effective_config``; a moved fold's id lists: ``configlib.relocate_id_lists``)."""
  return inference.effective_config(
      configlib.relocate_id_lists(meta['config'], os.path.abspath(workdir)), None,
      {k: v for k, v in (overrides or {}).items() if not k.startswith(inference.MODE_SECTIONS)})


def score_split(workdir: str, split: str, overrides: dict[str, Any] | None) -> Scored:
  """The fit's model on ``split`` ('' = the split its fit evaluated; with ``--config.data.folder``
  or ``manifest`` on the command line, that folder's evaluation split), its images read as its
  fit read them, the data locations of ``overrides`` (the command line's keys) applied as for a
  network (``inference.effective_config``)."""
  from imgcls_jax.data import reader
  meta, pixels, fitted = load(workdir)
  overrides = overrides or {}
  run = run_config(meta, overrides, workdir)
  new_images = any(overrides.get(k) for k in ('data.folder', 'data.manifest'))
  split = split or (reader.default_eval_split(run.data) if new_images else run.data.eval_split)
  images, labels, position = features.split_arrays(run.data, split, info=pixels.info)
  scores = class_scores(fitted, features.extract(images, spec_of(run),
                                                 workers=int(run.classical.get('workers', 0))),
                        pixels.info.num_classes)
  return Scored(meta=meta, run=run, info=pixels.info, split=split, new_images=new_images,
                scores=scores, labels=labels, position=np.asarray(position, np.int64))
