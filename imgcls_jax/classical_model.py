"""A classical baseline's fitted model as a library (the ``classical`` mode fits it, ``predict``
uses it): its files, its class scores, and how raw files become its pixels. The fit records, in
``classical.json``, what a network's checkpoint records for inference
(``inference.inference_meta``), so ``inference.prepare`` makes a raw file's pixels as the fit's
were."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections
import numpy as np

from imgcls_jax import features, run_directory
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


def load(workdir: str) -> tuple[dict[str, Any], Pixels, Any]:
  """(classical.json, how raw files become the fit's pixels, the fitted scikit-learn model) of
  a classical fit's folder. The model is a joblib pickle: load only folders you trust."""
  with open(os.path.join(workdir, META_FILE)) as f:
    meta = json.load(f)
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
  scores = class_scores(fitted, features.extract(images_NxHxWxC, spec), num_classes)
  shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
  return shifted / shifted.sum(axis=1, keepdims=True)


def spec_of(run: ml_collections.ConfigDict) -> features.FeatureSpec:
  """The feature blocks a fit's config asked for (``config.classical``)."""
  return features.spec_from_config(run.classical)
