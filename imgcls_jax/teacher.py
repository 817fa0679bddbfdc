"""The teachers of a distilled run (``config.distill``): trained run directories (one, or an
ensemble given comma-separated), each loaded as inference loads it (its latest checkpoint, EMA
weights where the run evaluates with them), checked against the student's data and placed on the
student's mesh. The loss term: ``distill.py``.

  python -m imgcls_jax.main --config=configs/fashion_mnist_quick.py --workdir=runs/student \\
      --config.distill.teacher=runs/wrn --config.distill.weight=0.5 --config.distill.temperature=4
  ... --config.distill.teacher=runs/seed0,runs/seed1,runs/seed2     # an ensemble's mean

A resumed run loads the teachers again: keep their directories as they were until the student is
done.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import jax
import ml_collections

from imgcls_jax import distill, inference, models, run_directory, sharding
from imgcls_jax import state as state_lib
from imgcls_jax.data import arrays, folder_index, folder_layout, images, reader
from imgcls_jax.data.info import DatasetInfo
from imgcls_jax.errors import UserError


@dataclasses.dataclass
class Teachers:
  """The teachers on the student's mesh: their graphs, placed variables and shardings (tuples,
  one entry per teacher), and the distillation term's numbers."""
  model_defs: tuple[state_lib.ModelDef, ...]
  variables: tuple[state_lib.InferenceState, ...]
  shardings: tuple[Any, ...]
  cfg: distill.DistillConfig
  origins: tuple[str, ...]
  steps: tuple[int, ...]

  def record(self) -> list[dict[str, Any]]:
    """What the student's checkpoints keep of its teachers (``check_resumed`` compares it)."""
    return [{'path': p, 'step': s} for p, s in zip(self.origins, self.steps)]


def absolute_paths(config: ml_collections.ConfigDict) -> None:
  """``config.distill.teacher`` with each directory made absolute (in place): the run saves, and
  a resume compares, the teachers it means, whatever the working directory."""
  named = directories(config)
  if named:
    config.distill.teacher = ','.join(os.path.abspath(os.path.expanduser(p)) for p in named)


def check_resumed(teachers: Teachers, meta: dict[str, Any], step: int) -> None:
  """Warns when a resumed student's teachers are not those its checkpoint ``step`` was trained
  with (a teacher trained on, or another run at that path): it will not match an uninterrupted
  run."""
  then = meta.get('distill_teachers')
  if then is not None and then != teachers.record():
    was = ', '.join(f"{t['path']} (step {t['step']})" for t in then)
    now = ', '.join(f'{p} (step {s})' for p, s in zip(teachers.origins, teachers.steps))
    logging.warning('Resuming step %d with other teachers than it was trained with (then: %s; '
                    'now: %s): the run will not match an uninterrupted one.', step, was, now)


def directories(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The run directories ``config.distill.teacher`` names, comma-separated (none: no
  distillation; configs without the section: none)."""
  d = config.get('distill')
  named = str(d.get('teacher', '') or '') if d else ''
  return tuple(images.comma_paths(named))   # a comma inside an existing folder's name stays


def _check_numbers(d: ml_collections.ConfigDict) -> tuple[float, float]:
  weight, temperature = float(d.get('weight', 0.5)), float(d.get('temperature', 4.0))
  if not 0.0 < weight <= 1.0:   # NaN fails too
    raise UserError(f'config.distill.weight={weight} must be in (0, 1] (the share of the '
                    "teacher's term in the loss; e.g. 0.5), or unset config.distill.teacher.")
  if not 0.0 < temperature < math.inf:
    raise UserError(f'config.distill.temperature={temperature} must be finite and > 0 (e.g. 4; '
                    "1 = the teacher's own probabilities).")
  return weight, temperature


def check_sources(config: ml_collections.ConfigDict, workdir: str) -> None:
  """What can be checked of ``config.distill`` before a run makes its directories: its numbers,
  and that each teacher is another run directory holding a checkpoint."""
  paths = [os.path.abspath(os.path.expanduser(p)) for p in directories(config)]
  if paths:
    _check_numbers(config.distill)
  for path in paths:
    _check_directory(path, workdir)


def _check_directory(path: str, workdir: str) -> None:
  if path == os.path.abspath(workdir):
    raise UserError(f'config.distill.teacher={path} is this run itself; name another trained '
                    'run directory.')
  try:
    run_directory.require_checkpoint(path)
  except UserError:
    raise UserError(f'config.distill.teacher={path} holds no checkpoint; name the --workdir of a '
                    'trained run (of a cross-validation run: one of its fold_<k> directories).'
                    ) from None


def _load_one(path: str, config: ml_collections.ConfigDict, info: DatasetInfo,
              workdir: str) -> tuple[inference.Trained, distill.View]:
  """One teacher's run, checked against the student's data, and how it sees the student's
  batches."""
  _check_directory(path, workdir)
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
  _check_unseen(trained, where, config, info)
  shape = inference.input_spec(config.data, info)[1]
  if trained.image_shape[2] != shape[2]:
    raise UserError(f'{where} takes {trained.image_shape[2]}-channel images and this run feeds '
                    f'{shape[2]}-channel ones; distil from a run of the same channel count.')
  hw = tuple(int(d) for d in trained.image_shape[:2])
  scale, shift = distill.renormalization(config.data.mean, config.data.std,
                                         trained.run.data.mean, trained.run.data.std)
  resized = (f'this run\'s {shape[0]}x{shape[1]} batches are resized to them'
             if tuple(shape[:2]) != hw else 'the size this run feeds it')
  logging.info('Distilling from %s (%s, %dx%d images: %s).', where, trained.run.model.name, *hw,
               resized)
  return trained, distill.View(scale=scale, shift=shift, compute_dtype=str(trained.run.dtype),
                               input_hw=hw)


def _check_unseen(trained: inference.Trained, where: str, config: ml_collections.ConfigDict,
                  info: DatasetInfo) -> None:
  """A teacher that trained on the student's eval examples teaches their labels: the student's
  score on them says nothing of new images. Refused for a cross-validation fold (its score is
  the method's estimate), warned about otherwise. Checked by split slices of the same dataset
  (``reader.shared_examples``), by whole split names when the two read it differently (an arrays
  file and tfds), by the example ids of id-listed splits (another cross-validation's folds), or
  for an image folder by the files each split lists (the teacher's drawn with its own holdout
  keys). A fold whose overlap cannot be told is refused too."""
  if _dataset(trained.run.data) != _dataset(config.data):
    return
  taught = str(trained.run.data.train_split)
  base, _, fold = str(config.data.eval_split).partition('@')
  shared = _shared(trained, taught, config, info, base)
  if shared == 0 or (shared is None and not fold):
    return
  if fold:
    why = ('holds this cross-validation fold\'s held-out examples' if shared else
           "may hold this cross-validation fold's held-out examples (it cannot be told here)")
    raise UserError(f"{where} trained on '{taught}', which {why} (of '{base}'), so its teaching "
                    "would leak them into the fold's score; distil from a teacher that never saw "
                    f"'{base}' (e.g. one trained on another split), or cross-validate without "
                    'config.distill.')
  logging.warning("%s trained on %d examples of this run's eval split '%s': the student learns "
                  'their labels from it, so its evaluation there is optimistic; evaluate on '
                  'examples the teacher never saw.', where, shared, base)


def _dataset(data: ml_collections.ConfigDict) -> str:
  """The dataset a config reads: an arrays file of a tfds dataset counts as that dataset; any
  image folder or manifest as one (their files are compared by real path)."""
  if folder_layout.is_folder(data):
    return 'image_folder'
  return arrays.tfds_name(data) or str(data.name)


def _whole_splits(spec: str) -> set[str] | None:
  """The split names of a spec made only of whole splits ('train', 'train+test', 'all'), else
  None (a slice or an id list)."""
  parts = str(spec).replace(' ', '').split('+')
  return set(parts) if all(arrays.SLICE.match(p) and '[' not in p for p in parts) else None


def _shared(trained: inference.Trained, taught: str, config: ml_collections.ConfigDict,
            info: DatasetInfo, base: str) -> int | None:
  """How many of the student's eval examples the teacher trained on; None when it cannot be
  told."""
  try:
    if folder_layout.is_folder(config.data):   # the same files, by real path (folds: by ids)
      return len(folder_index.real_files(folder_layout.source_of(trained.run.data), taught,
                                         trained.info.class_names)
                 & folder_index.real_files(folder_layout.source_of(config.data),
                                           str(config.data.eval_split), info.class_names))
    whole, wanted = _whole_splits(taught), _whole_splits(base)
    if whole is not None and wanted is not None:   # read alike or not: whole splits are whole
      if 'all' in whole or wanted <= whole:
        return max(1, sum(int(info.num_examples.get(n, 0)) for n in wanted))
      if not whole & wanted and 'all' not in wanted:
        return 0
    if arrays.is_arrays(trained.run.data) == arrays.is_arrays(config.data):   # read alike
      # slices by position; id-listed folds (this one, another cross-validation's) by their ids
      return reader.shared_examples(config.data, taught, str(config.data.eval_split), info)
  except UserError:
    return None
  return None


def load(config: ml_collections.ConfigDict, info: DatasetInfo, mesh: jax.sharding.Mesh,
         placement: sharding.ParamSharding, workdir: str) -> Teachers | None:
  """The teachers ``config.distill.teacher`` names for a student training in ``workdir`` on the
  data ``info`` describes, or None when it names none."""
  paths = [os.path.abspath(os.path.expanduser(p)) for p in directories(config)]
  if not paths:
    return None
  weight, temperature = _check_numbers(config.distill)
  if len(set(paths)) != len(paths):
    raise UserError(f"config.distill.teacher names a run twice ({', '.join(paths)}); name each "
                    'teacher once.')
  defs, placed, shardings, views, steps = [], [], [], [], []
  for path in paths:
    trained, view = _load_one(path, config, info, workdir)
    steps.append(trained.step)
    model_fn = models.from_config(trained.run, trained.info.num_classes, trained.image_shape[2])
    variables, sh = state_lib.place_variables(model_fn, trained.variables, mesh, placement)
    defs.append(state_lib.model_def(model_fn))
    placed.append(variables)
    shardings.append(sh)
    views.append(view)
  logging.info('Distillation: %d teacher(s), weight %g, temperature %g.', len(paths), weight,
               temperature)
  return Teachers(model_defs=tuple(defs), variables=tuple(placed), shardings=tuple(shardings),
                  cfg=distill.DistillConfig(weight=weight, temperature=temperature,
                                            views=tuple(views)), origins=tuple(paths),
                  steps=tuple(steps))
