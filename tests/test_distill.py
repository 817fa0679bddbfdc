"""Knowledge distillation (``config.distill``): the loss term against PyTorch's, the teacher's view
of the student's pixels, a distilled student that moves towards its teacher, and one-line errors.
Exact resume and 1 device = 2 devices with a teacher: tests/test_speed_features.py (its reference
run distils from a teacher of another width and normalisation)."""
import logging
import os
import shutil

import numpy as np
import pytest
import scipy.special

from imgcls_jax import distill, inference, steps, train
from imgcls_jax.data import pipeline
from imgcls_jax.errors import UserError


@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_divergence_is_pytorchs_kl_div_times_t_squared(temperature):
  torch = pytest.importorskip('torch')
  f = torch.nn.functional
  rng = np.random.default_rng(0)
  s, t = (rng.normal(0, 3, (32, 10)).astype(np.float32) for _ in range(2))
  st, tt = torch.from_numpy(s) / temperature, torch.from_numpy(t) / temperature
  # Hinton et al.'s term as PyTorch users write it, per example.
  want = f.kl_div(f.log_softmax(st, -1), f.softmax(tt, -1), reduction='none').sum(-1)
  want = (want * temperature ** 2).numpy()
  got = np.asarray(distill.divergence(s, distill.soften(t, temperature), temperature))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Tags: binary cross-entropy towards the teacher's sigmoids less the teacher's own entropy.
  p = torch.sigmoid(tt)
  ce = f.binary_cross_entropy_with_logits(st, p, reduction='none')
  entropy = f.binary_cross_entropy_with_logits(tt, p, reduction='none')
  want = ((ce - entropy).mean(-1) * temperature ** 2).numpy()
  got = np.asarray(distill.divergence(s, distill.soften(t, temperature, True), temperature,
                                      multilabel=True))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # No pull at the teacher.
  assert np.allclose(distill.divergence(t, distill.soften(t, temperature), temperature), 0,
                     atol=1e-5)


def test_the_teacher_sees_the_pixels_in_its_own_normalisation():
  rng = np.random.default_rng(1)
  u = rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
  student = steps.StepConfig(num_classes=2, mean=(0.5,), std=(0.25,))
  x = np.asarray(steps.normalize(u, student))
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  scale, shift = distill.renormalization(student.mean, student.std, mean, std)
  np.testing.assert_allclose(x * np.asarray(scale) + np.asarray(shift),
                             (u / 255.0 - np.asarray(mean)) / np.asarray(std), atol=1e-5)
  assert distill.renormalization((0.5,), (0.5,), (0.5,), (0.5,)) == ((), ())


def _split(config, split):
  ev = pipeline.EvalData(config.data, split, local_batch_size=128)
  batches = list(ev.batches())
  return (np.concatenate([b['image'][b['mask']] for b in batches]),
          np.concatenate([b['label'][b['mask']] for b in batches]))


def test_a_distilled_student_learns_what_its_teacher_says_not_the_labels(digits_config, tmp_path):
  """The teacher learned the digits with every label shifted by one (a photo folder of the same
  images, class '3' holding the 2s); the student trains on the true labels from tfds, at 12x12
  pixels to the teacher's 8x8, but with weight 1 on the teacher's term only. It must answer as
  its teacher does (the shifted class), which no label it read says: the student's loss reads
  the teacher's outputs on its own images, resized for the teacher."""
  from PIL import Image
  c = digits_config
  c.model.widths = (8, 16)
  for split in ('train', 'test'):
    images, labels = _split(c, split)
    for k, (x, y) in enumerate(zip(images, labels)):
      path = tmp_path / 'shifted' / split / str((y + 1) % 10)
      path.mkdir(parents=True, exist_ok=True)
      Image.fromarray(x[..., 0]).save(path / f'{k}.png')
  t = c.copy_and_resolve_references()
  t.data.name, t.data.folder = 'image_folder', str(tmp_path / 'shifted')
  t.data.train_preprocess = ''
  t.num_train_steps = 80
  shifted = train.train_and_evaluate(t, str(tmp_path / 'teacher'))['accuracy']
  images, labels = _split(c, 'test')
  teacher = inference.classifier(inference.load(str(tmp_path / 'teacher'))).predict_arrays(
      images)['probabilities'].argmax(1)
  # The student sees 12x12 digits: each batch is resized back to 8x8 for the teacher.
  c.data.train_preprocess = c.data.eval_preprocess = 'resize(size=12)'
  c.num_train_steps = 120
  c.distill.teacher, c.distill.weight, c.distill.temperature = str(tmp_path / 'teacher'), 1.0, 1.0
  train.train_and_evaluate(c, str(tmp_path / 'student'))
  big, big_labels = _split(c, 'test')
  assert big.shape[1:] == (12, 12, 1) and np.array_equal(big_labels, labels)
  student = inference.classifier(inference.load(str(tmp_path / 'student'))).predict_arrays(
      big)['probabilities'].argmax(1)
  agreement = float(np.mean(student == teacher))
  true_labels, shifted_labels = (float(np.mean(student == y)) for y in (labels, (labels + 1) % 10))
  print(f'teacher on its shifted test split {shifted:.3f}; the student agrees with it on '
        f'{agreement:.3f}, is right by the true labels on {true_labels:.3f}, by the shifted ones on '
        f'{shifted_labels:.3f}')
  # A student of the labels would agree with this teacher on ~0% of the digits.
  assert shifted > 0.8
  assert agreement > 0.5 and shifted_labels > 0.5 and true_labels < 0.1
  import json
  with open(tmp_path / 'student' / 'metrics.jsonl') as f:
    logged = [json.loads(line) for line in f if '"train"' in line]
  assert logged and logged[-1]['teacher_agreement'] > 0.5 and logged[-1]['accuracy'] < 0.1


def test_an_ensemble_teaches_its_mean_probabilities_as_served(digits_config, tmp_path, caplog):
  """Two teachers (another seed and normalisation each): the step's teacher probabilities of a
  batch, from the student's normalised pixels, equal the mean of each teacher's served
  probabilities at temperature T (the Classifier's forward pass on the uint8 images)."""
  import jax
  from imgcls_jax import run, teacher as teacher_lib
  c = digits_config
  c.model.widths = (8, 16)
  c.num_train_steps = 5
  train.train_and_evaluate(c, str(tmp_path / 'a'))
  other = c.copy_and_resolve_references()
  other.seed, other.data.mean, other.data.std = 1, (0.3,), (0.4,)
  train.train_and_evaluate(other, str(tmp_path / 'b'))
  c.distill.teacher = f"{tmp_path / 'a'}, {tmp_path / 'b'}"
  c.distill.temperature = 3.0
  s = run.setup(c)
  with caplog.at_level(logging.INFO):
    teachers = teacher_lib.load(c, s.info, s.mesh, s.placement, str(tmp_path / 'student'))
  assert '8x8 images: the size this run feeds it' in caplog.text   # (said 'resized' always)
  assert len(teachers.variables) == 2 and teachers.cfg.views[0].scale == ()
  assert teachers.cfg.views[0].input_hw == (8, 8)
  images = _split(c, 'test')[0][:64]
  got = np.asarray(jax.jit(lambda v, x: distill.teacher_probabilities(
      teachers.model_defs, v, x, teachers.cfg))(teachers.variables,
                                                 steps.normalize(images, s.step_cfg)))
  served = [inference.classifier(inference.load(str(tmp_path / n))).predict_arrays(images)
            for n in ('a', 'b')]
  soft = [scipy.special.softmax(r['logits'].astype(np.float64) / 3.0, axis=1) for r in served]
  assert np.abs(soft[0] - soft[1]).max() > 1e-3   # two teachers that disagree (100x the atol)
  np.testing.assert_allclose(got, (soft[0] + soft[1]) / 2, atol=1e-5)
  c.distill.teacher = f"{tmp_path / 'a'},{tmp_path / 'a'}"
  with pytest.raises(UserError, match='names a run twice'):
    teacher_lib.load(c, s.info, s.mesh, s.placement, str(tmp_path / 'student'))


def test_a_folder_teacher_drawn_with_another_seed_is_said_to_leak(digits_config, tmp_path,
                                                                  caplog):
  """Image folders draw their held-out images by seed: a teacher drawn with another seed than
  the student trained on part of the student's eval images, found by the files each lists."""
  from PIL import Image
  from imgcls_jax import teacher as teacher_lib
  from imgcls_jax.data import folder_index, folder_layout
  c = digits_config
  images, labels = _split(c, 'test')
  for k, (x, y) in enumerate(zip(images[:200], labels[:200])):
    (tmp_path / 'photos' / str(y)).mkdir(parents=True, exist_ok=True)
    Image.fromarray(x[..., 0]).save(tmp_path / 'photos' / str(y) / f'{k}.png')
  c.model.widths, c.num_train_steps, c.batch_size = (8, 16), 2, 32
  c.data.name, c.data.folder, c.data.holdout_fraction = 'image_folder', str(tmp_path / 'photos'), 0.25
  c.data.train_preprocess = ''
  train.train_and_evaluate(c, str(tmp_path / 'teacher'))
  trained = inference.load(str(tmp_path / 'teacher'))
  with caplog.at_level(logging.WARNING):
    teacher_lib._check_unseen(trained, 'the teacher', c, trained.info)        # the same draw
  assert 'optimistic' not in caplog.text
  c.data.holdout_seed = 1
  src = folder_layout.source_of(c.data)
  names = trained.info.class_names
  # The images each run reads (the index of readable files, as training and evaluation use it).
  held = set(folder_index.index(src, 'test', names).ids)
  taught = set(folder_index.index(folder_layout.source_of(trained.run.data), 'train', names).ids)
  assert held & taught
  with caplog.at_level(logging.WARNING):
    teacher_lib._check_unseen(trained, 'the teacher', c, trained.info)
  assert f"trained on {len(held & taught)} examples of this run's eval split 'test'" in caplog.text
  # Another folder of files with the same names (other pictures): nothing shared, as the real
  # paths differ (compared by their relative names, it was said to leak).
  shutil.copytree(tmp_path / 'photos', tmp_path / 'other')
  c.data.folder = str(tmp_path / 'other')
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    teacher_lib._check_unseen(trained, 'the teacher', c, trained.info)
  assert 'optimistic' not in caplog.text


def test_distillation_errors_are_one_line(digits_config, tmp_path, caplog):
  from imgcls_jax import teacher as teacher_lib
  c = digits_config
  c.model.widths = (8, 16)
  c.num_train_steps = 2
  train.train_and_evaluate(c, str(tmp_path / 'teacher'))
  # A teacher that trained on the student's eval examples: refused for a cross-validation fold,
  # warned about otherwise.
  trained = inference.load(str(tmp_path / 'teacher'))
  fold = c.copy_and_resolve_references()
  fold.data.eval_split = 'train@/runs/cv/fold_0.ids'
  with pytest.raises(UserError, match="holds this cross-validation fold's held-out examples"):
    teacher_lib._check_unseen(trained, 'the teacher', fold, trained.info)
  leak = c.copy_and_resolve_references()
  leak.data.train_split, leak.data.eval_split = 'train[100:]', 'train[:100]'
  with caplog.at_level(logging.WARNING):
    teacher_lib._check_unseen(trained, 'the teacher', leak, trained.info)
  assert "trained on 100 examples of this run's eval split 'train[:100]'" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    teacher_lib._check_unseen(trained, 'the teacher', c, trained.info)    # train vs test
  assert 'optimistic' not in caplog.text
  # The same dataset read as an arrays file by the teacher: its whole 'train' holds every fold
  # (this passed unchecked, the names differing).
  import dataclasses
  as_arrays = trained.run.copy_and_resolve_references()
  as_arrays.data.name = 'arrays:sklearn_digits'
  arrays_info = dataclasses.replace(trained.info, name='arrays:sklearn_digits')
  with pytest.raises(UserError, match="holds this cross-validation fold's held-out examples"):
    teacher_lib._check_unseen(dataclasses.replace(trained, run=as_arrays, info=arrays_info),
                              'the teacher', fold, trained.info)
  # ... but a slice of it cannot be matched to tfds's order: refused for a fold, as unknown.
  as_arrays.data.train_split = 'train[:50%]'
  with pytest.raises(UserError, match=r"may hold this cross-validation fold's held-out examples "
                                      r"\(it cannot be told here\)"):
    teacher_lib._check_unseen(dataclasses.replace(trained, run=as_arrays, info=arrays_info),
                              'the teacher', fold, trained.info)
  # A fold of another cross-validation as the teacher: its training ids against this fold's
  # held-out ids (the error was swallowed: the two id lists were never compared).
  from imgcls_jax.data import reader
  ids = reader.example_ids(c.data, 'train')
  (tmp_path / 'teacher_fold.ids').write_text('\n'.join(ids[:30]))
  (tmp_path / 'fold_overlaps.ids').write_text('\n'.join(ids[29:40]))
  (tmp_path / 'fold_apart.ids').write_text('\n'.join(ids[30:40]))
  other_cv = trained.run.copy_and_resolve_references()
  other_cv.data.train_split = f"train@{tmp_path / 'teacher_fold.ids'}"
  fold_teacher = dataclasses.replace(trained, run=other_cv)
  fold.data.eval_split = f"train@{tmp_path / 'fold_overlaps.ids'}"
  with pytest.raises(UserError, match="holds this cross-validation fold's held-out examples"):
    teacher_lib._check_unseen(fold_teacher, 'the teacher', fold, trained.info)
  fold.data.eval_split = f"train@{tmp_path / 'fold_apart.ids'}"
  teacher_lib._check_unseen(fold_teacher, 'the teacher', fold, trained.info)   # disjoint: fine
  # A resumed student whose teacher trained on since: said once.
  teachers = teacher_lib.Teachers(model_defs=(), variables=(), shardings=(), cfg=None,
                                  origins=('/runs/t',), steps=(200,))
  with caplog.at_level(logging.WARNING):
    teacher_lib.check_resumed(teachers, {'distill_teachers': [{'path': '/runs/t', 'step': 60}]},
                              20)
    teacher_lib.check_resumed(teachers, {'distill_teachers': teachers.record()}, 40)
  assert caplog.text.count('other teachers than it was trained with') == 1
  assert '/runs/t (step 60); now: /runs/t (step 200)' in caplog.text
  cases = [
      ({'distill.teacher': str(tmp_path / 'none')},
       r'distill.teacher=.*none holds no checkpoint; name the --workdir of a trained run'),
      ({'distill.teacher': str(tmp_path / 'teacher'), 'distill.weight': 0.0},
       r'distill.weight=0.0 must be in \(0, 1\]'),
      ({'distill.teacher': str(tmp_path / 'teacher'), 'distill.temperature': -1.0},
       'distill.temperature=-1.0 must be finite and > 0'),
      ({'distill.teacher': str(tmp_path / 'teacher'), 'distill.temperature': float('inf')},
       'distill.temperature=inf must be finite'),
      ({'distill.teacher': str(tmp_path / 'student')}, 'is this run itself'),
      ({'distill.teacher': str(tmp_path / 'teacher'), 'data.name': 'image_folder',
        'data.folder': str(tmp_path / 'rgb'), 'data.mean': (0.5, 0.5, 0.5),
        'data.std': (0.5, 0.5, 0.5), 'data.train_preprocess': ''},
       'takes 1-channel images and this run feeds 3-channel ones'),
  ]
  from PIL import Image
  for split in ('train', 'test'):
    for k in range(10):
      (tmp_path / 'rgb' / split / str(k)).mkdir(parents=True)
      Image.new('RGB', (8, 8), (k * 20, 0, 0)).save(tmp_path / 'rgb' / split / str(k) / 'a.png')
  for overrides, message in cases:
    bad = c.copy_and_resolve_references()
    bad.update_from_flattened_dict(overrides)
    with pytest.raises(UserError, match=message):
      train.train_and_evaluate(bad, str(tmp_path / 'student'))
    # refused before the run made its directories (an empty checkpoints/ was left behind)
    assert not os.path.exists(tmp_path / 'student'), message


def test_a_teacher_folder_with_a_comma_in_its_name_is_one_teacher(tmp_path):
  """config.distill.teacher separates teachers by commas; a run directory named 'base,c' was split
  into 'base' and 'c' ('.../c holds no checkpoint')."""
  import ml_collections
  from imgcls_jax import teacher as teacher_lib
  (tmp_path / 'base,c').mkdir()
  (tmp_path / 'other').mkdir()
  c = ml_collections.ConfigDict({'distill': {'teacher': f"{tmp_path / 'base,c'}"}})
  assert teacher_lib.directories(c) == (str(tmp_path / 'base,c'),)
  c.distill.teacher = f"{tmp_path / 'base,c'}, {tmp_path / 'other'}"
  assert teacher_lib.directories(c) == (str(tmp_path / 'base,c'), str(tmp_path / 'other'))


def test_a_bad_teacher_is_refused_before_the_run_makes_its_directories(digits_config, tmp_path):
  """A missing teacher or a bad weight left an empty checkpoints/ folder behind (a run directory
  that 'holds no checkpoint' to every other mode)."""
  digits_config.distill.teacher = str(tmp_path / 'nowhere')
  with pytest.raises(UserError, match='holds no checkpoint'):
    train.train_and_evaluate(digits_config, str(tmp_path / 'student'))
  digits_config.distill.teacher = str(tmp_path)
  digits_config.distill.weight = 2.0
  with pytest.raises(UserError, match=r'config.distill.weight=2.0 must be in \(0, 1\]'):
    train.train_and_evaluate(digits_config, str(tmp_path / 'student'))
  assert not os.path.exists(tmp_path / 'student')
