"""The teacher of a distilled run (``config.distill``): a trained run directory, loaded as
inference loads it (its latest checkpoint, EMA weights where the run evaluates with them), checked
against the student's data and placed on the student's mesh. The loss term: ``distill.py``.

  python -m imgcls_jax.main --config=configs/fashion_mnist_quick.py --workdir=runs/student \\
      --config.distill.teacher=runs/wrn --config.distill.weight=0.5 --config.distill.temperature=4

A resumed run loads the teacher again: keep its directory as it was until the student is done.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections

from imgcls_jax import checkpoint, distill, inference, models, sharding
from imgcls_jax import state as state_lib
from imgcls_jax.data.info import DatasetInfo
from imgcls_jax.errors import UserError


@dataclasses.dataclass
class Teacher:
  """A teacher on the student's mesh: its graph, its placed variables and their shardings."""
  model_def: state_lib.ModelDef
  variables: state_lib.InferenceState
  shardings: Any
  cfg: distill.DistillConfig
  origin: str
  step: int


def directory(config: ml_collections.ConfigDict) -> str:
  """``config.distill.teacher`` ('' = no distillation; configs without the section: '')."""
  d = config.get('distill')
  return str(d.get('teacher', '') or '') if d else ''


def _check_numbers(d: ml_collections.ConfigDict) -> tuple[float, float]:
  weight, temperature = float(d.get('weight', 0.5)), float(d.get('temperature', 4.0))
  if not 0.0 < weight <= 1.0:
    raise UserError(f'config.distill.weight={weight} must be in (0, 1] (the share of the '
                    "teacher's term in the loss; e.g. 0.5), or unset config.distill.teacher.")
  if not temperature > 0.0:
    raise UserError(f'config.distill.temperature={temperature} must be > 0 (e.g. 4; 1 = the '
                    "teacher's own probabilities).")
  return weight, temperature


def load(config: ml_collections.ConfigDict, info: DatasetInfo, mesh: jax.sharding.Mesh,
         placement: sharding.ParamSharding, workdir: str) -> Teacher | None:
  """The teacher of ``config.distill.teacher`` for a student training in ``workdir`` on the
  data ``info`` describes, or None when the config names none."""
  path = directory(config)
  if not path:
    return None
  weight, temperature = _check_numbers(config.distill)
  path = os.path.abspath(os.path.expanduser(path))
  if path == os.path.abspath(workdir):
    raise UserError(f'config.distill.teacher={path} is this run itself; name another trained '
                    'run directory.')
  try:
    checkpoint.require_checkpoint(path)
  except UserError:
    raise UserError(f'config.distill.teacher={path} holds no checkpoint; name the --workdir of a '
                    'trained run (of a cross-validation run: one of its fold_<k> directories).'
                    ) from None
  try:
    trained = inference.load(path)
  except UserError as e:
    raise UserError(f'config.distill.teacher={path}: {e}') from None
  where = f'the teacher {path} (step {trained.step})'
  if trained.info.multilabel != info.multilabel:
    kinds = ('multi-label', 'single-label')
    raise UserError(f'{where} is {kinds[not trained.info.multilabel]} and this run is '
                    f'{kinds[not info.multilabel]}; distil from a run of the same kind.')
  if tuple(trained.info.class_names) != tuple(info.class_names):
    raise UserError(f"{where} knows {trained.info.num_classes} classes "
                    f"({', '.join(trained.info.class_names[:5])}, ...) and this run "
                    f"{info.num_classes} ({', '.join(info.class_names[:5])}, ...) in another "
                    'order or set; distil from a run trained on the same classes.')
  shape = inference.input_spec(config.data, info)[1]
  if trained.image_shape[2] != shape[2]:
    raise UserError(f'{where} takes {trained.image_shape[2]}-channel images and this run feeds '
                    f'{shape[2]}-channel ones; distil from a run of the same channel count.')
  resize = tuple(trained.image_shape[:2]) if tuple(trained.image_shape[:2]) != shape[:2] else ()
  if resize:
    logging.info('The teacher takes %dx%d images: each %dx%d training batch is resized for it.',
                 *resize, *shape[:2])
  model_fn = models.from_config(trained.run, trained.info.num_classes, trained.image_shape[2])
  variables, shardings = state_lib.place_variables(model_fn, trained.variables, mesh, placement)
  scale, shift = distill.renormalization(config.data.mean, config.data.std,
                                         trained.run.data.mean, trained.run.data.std)
  cfg = distill.DistillConfig(weight=weight, temperature=temperature, scale=scale, shift=shift,
                              compute_dtype=str(trained.run.dtype), resize_hw=resize)
  logging.info('Distilling from %s (%s), weight %g, temperature %g.', where,
               trained.run.model.name, weight, temperature)
  return Teacher(model_def=state_lib.model_def(model_fn), variables=variables,
                 shardings=shardings, cfg=cfg, origin=path, step=trained.step)
