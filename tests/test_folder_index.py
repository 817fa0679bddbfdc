"""The image index: <class>/* with a stratified, seeded hold-out; per-class counts; another folder
read with a trained run's classes; k-fold ids from a folder. CSV manifests are
``test_manifest_index.py``, the on-disk cache ``test_index_cache.py``, what is read of each file
(and a file that fails later) ``test_file_probe.py``."""
import collections
import logging
import os
import re

import numpy as np
import pytest
from PIL import Image

from imgcls_jax.data import (folder_index, folder_layout, folds, holdout, image_folder,
                             info as info_lib, pipeline, sources)
from imgcls_jax.errors import UserError


def _png(path, seed, size=(8, 8), mode='RGB'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.RandomState(seed)
  w, h = size
  pixels = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
  Image.fromarray(pixels).convert(mode).save(path)
  return path


def _flat(root, counts):
  """root/<class>/<k>.png with counts[class] images each."""
  for c, n in counts.items():
    for k in range(n):
      _png(f'{root}/{c}/{k:03d}.png', hash((c, k)) % 1000)
  return root


@pytest.fixture(autouse=True)
def _fresh():
  folder_index.clear_memo()
  yield
  folder_index.clear_memo()


def _data(digits_config, **kw):
  d = digits_config.data
  d.name = 'image_folder'
  d.train_preprocess = ''
  d.eval_preprocess = 'resize(size=8)'
  d.mean, d.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  for k, v in kw.items():
    setattr(d, k, v)
  return d


def _split(data, split):
  src = folder_layout.source_of(data)
  return folder_index.index(src, split, folder_layout.class_names(src))


def test_holdout_is_stratified_seeded_and_disjoint(tmp_path, digits_config):
  counts = {'ant': 10, 'bee': 21, 'cat': 3}
  data = _data(digits_config, folder=_flat(str(tmp_path / 'flat'), counts), holdout_fraction=0.2)
  train, test, every = (_split(data, s) for s in ('train', 'test', 'all'))
  assert set(train.ids).isdisjoint(test.ids)
  assert sorted(train.ids + test.ids) == sorted(every.ids) and len(every) == 34
  # Per class round(0.2 n), at least one of a class with 2+ images: 2 of 10, 4 of 21, 1 of 3.
  assert test.counts == (2, 4, 1) and train.counts == (8, 17, 2)
  for ids, labels in ((test.ids, test.labels), (train.ids, train.labels)):
    assert all(i.split('/')[0] == ('ant', 'bee', 'cat')[y] for i, y in zip(ids, labels))
  assert sources.describe(data).num_examples == {'train': 27, 'test': 7}

  folder_index.clear_memo()
  assert _split(data, 'test').ids == test.ids           # same seed: same images
  data.holdout_seed = 1
  folder_index.clear_memo()
  assert set(_split(data, 'test').ids) != set(test.ids)  # another seed: others

  # The training stream reads exactly the kept images: none of the held-out ones ever trains.
  data.holdout_seed = 0
  folder_index.clear_memo()
  ds = image_folder.dataset(_split(data, 'train'), 3)
  assert {x['tfds_id'].decode() for x in ds.as_numpy_iterator()} == set(train.ids)
  ds, n = pipeline.train_dataset(data, seed=0, local_batch_size=27)
  assert n == 27


def test_validation_fraction_carves_a_stratified_split_out_of_train_only(tmp_path, digits_config):
  counts = {'ant': 10, 'bee': 21, 'cat': 3}
  data = _data(digits_config, folder=_flat(str(tmp_path / 'flat'), counts), holdout_fraction=0.2)
  train0, test0 = _split(data, 'train'), _split(data, 'test')
  with pytest.raises(UserError, match="validation_fraction > 0 makes a split 'validation'"):
    _split(data, 'validation')
  folder_index.clear_memo()
  data.validation_fraction = 0.25
  train, val, test = (_split(data, s) for s in ('train', 'validation', 'test'))
  assert test.ids == test0.ids                      # the eval split is left exactly as it was
  assert set(train.ids).isdisjoint(val.ids)
  assert sorted(train.ids + val.ids) == sorted(train0.ids)
  # Per class of the train split (8, 17, 2): round(0.25 n), at least one of 2+: 2, 4, 1.
  assert val.counts == (2, 4, 1) and train.counts == (6, 13, 1)
  assert sources.describe(data).num_examples == {'train': 20, 'test': 7}
  assert sources.split_size(data, 'validation') == 7
  folder_index.clear_memo()
  assert _split(data, 'validation').ids == val.ids   # seeded: the same images every time
  # The training stream reads exactly the kept images: no validation image ever trains.
  ds, n = pipeline.train_dataset(data, seed=0, local_batch_size=4)
  assert n == 20

  data.validation_fraction = 1.0
  with pytest.raises(UserError, match='validation_fraction=1.0 must be in'):
    folder_layout.source_of(data)
  splits = str(tmp_path / 'splits')   # a layout that names its own validation split
  for split in ('train', 'test', 'validation'):
    _flat(f'{splits}/{split}', {'ant': 2, 'bee': 2})
  data = _data(digits_config, folder=splits, holdout_fraction=0.0, validation_fraction=0.5)
  with pytest.raises(UserError, match="already has a split 'validation'"):
    _split(data, 'train')


def test_a_kfold_of_a_flat_folder_reads_the_train_part(tmp_path, digits_config):
  """Cross-validation folds name both splits 'train@IDS_FILE': both read the train part of a flat
  folder (the held-out eval images stay out), as the plain train split does."""
  data = _data(digits_config, folder=_flat(str(tmp_path / 'flat'), {'ant': 10, 'bee': 6}),
               holdout_fraction=0.25)
  plain = _split(data, 'train')
  folder_index.clear_memo()
  data.train_split, data.eval_split = 'train@/x/train_ids.txt', 'train@/x/eval_ids.txt'
  assert _split(data, 'train').ids == plain.ids and len(plain) == 12


def test_class_counts_are_logged_and_imbalance_warned(tmp_path, digits_config, caplog):
  data = _data(digits_config, folder=_flat(str(tmp_path / 'f'), {'many': 23, 'few': 2}),
               holdout_fraction=0.05)
  with caplog.at_level(logging.INFO):
    sources.describe(data)
  assert "split 'train': 23 images in 2 classes: few 1, many 22." in caplog.text
  assert 'is imbalanced: class many has 22 images, 22x the 1 of class few' in caplog.text


def test_another_folder_is_read_with_the_runs_classes(tmp_path, digits_config):
  data = _data(digits_config, folder=_flat(str(tmp_path / 'other'), {'b': 2, 'd': 3}))
  run_info = info_lib.DatasetInfo(name='image_folder:/gone', num_classes=4,
                                  class_names=('a', 'b', 'c', 'd'), image_shape=(None, None, 1),
                                  num_examples={})
  assert sources.default_eval_split(data) == 'all'
  assert sources.split_size(data, 'all', run_info) == 5
  ev = pipeline.EvalData(data, 'all', local_batch_size=8, info=run_info)
  batch, = list(ev.batches())
  assert sorted(batch['label'][batch['mask']]) == [1, 1, 3, 3, 3]   # indices of the run's classes
  assert batch['image'].shape[-1] == 1                              # the run's channel count
  unknown = _data(digits_config, folder=_flat(str(tmp_path / 'unknown'), {'b': 1, 'zebra': 1}))
  folder_index.clear_memo()
  with pytest.raises(UserError, match=r'classes the model does not know \(zebra\)'):
    sources.split_size(unknown, 'all', run_info)


def test_kfold_ids_of_a_folder_are_its_relative_paths(tmp_path, digits_config):
  data = _data(digits_config, folder=_flat(str(tmp_path / 'f'), {'a': 5, 'b': 5}))
  ids, labels = folds.read_ids_and_labels(data, 'all')
  assert ids == sorted(ids) and len(ids) == 10
  assert collections.Counter(labels.tolist()) == {0: 5, 1: 5}
  assert all(i.startswith('ab'[y] + '/') for i, y in zip(ids, labels))
  assignment = folds.assign(data, 'all', 5, seed=0)
  assert sorted(collections.Counter(assignment.fold.tolist()).values()) == [2] * 5


def test_one_class_is_refused_but_one_tag_is_not(tmp_path, digits_config):
  flat = _flat(str(tmp_path / 'flat'), {'cat': 4})
  data = _data(digits_config, folder=flat, holdout_fraction=0.25)
  with pytest.raises(UserError, match=f'The image folder {flat} has only one class, cat; a '
                                      'classifier needs at least 2 classes'):
    sources.describe(data)
  for split in ('train', 'test'):
    _flat(str(tmp_path / 'splits' / split), {'cat': 2})
  data = _data(digits_config, folder=str(tmp_path / 'splits'), holdout_fraction=0.0)
  with pytest.raises(UserError, match='splits/train has only one class, cat; a classifier'):
    sources.describe(data)
  # A manifest's training rows with one label, though another split has two.
  manifest = tmp_path / 'one.csv'
  manifest.write_text('flat/cat/000.png,cat,train\nflat/cat/001.png,cat,train\n'
                      'flat/cat/002.png,dog,test\n')
  data = _data(digits_config, folder=None, manifest=str(manifest), holdout_fraction=0.0)
  with pytest.raises(UserError, match=f"The manifest {manifest} labels every training image "
                                      "'cat'; a classifier needs at least 2 classes"):
    sources.describe(data)
  # Tagging is one yes/no decision per tag: one tag is a valid multi-label dataset.
  tags = tmp_path / 'tags.csv'
  tags.write_text('path,labels\n' + ''.join(f'flat/cat/{k:03d}.png,{"cat" if k % 2 else ""}\n'
                                            for k in range(4)))
  data = _data(digits_config, manifest=str(tags), multilabel=True, holdout_fraction=0.5)
  folder_index.clear_memo()
  info = sources.describe(data)
  assert info.multilabel and info.class_names == ('cat',) and info.num_examples == {
      'train': 2, 'test': 2}


def test_a_held_out_fraction_never_takes_a_class_s_last_image():
  """A class left with one training image (after the eval hold-out) keeps it whatever the
  validation fraction; classes of 2+ still give at least one."""
  ids = ['rare/0.png', 'a/0.png', 'a/1.png', 'b/0.png', 'b/1.png', 'b/2.png']
  labels = [0, 1, 1, 2, 2, 2]
  for fraction in (0.1, 0.6, 0.99):
    held = holdout.draw(ids, labels, ('rare', 'a', 'b'), fraction, seed=0)
    assert 0 not in held                                   # rare's only image stays
    assert len(held & {1, 2}) == 1 and 1 <= len(held & {3, 4, 5}) <= 2


def test_validation_fraction_of_train_split_all_says_all_is_every_image(tmp_path, digits_config):
  for c in ('a', 'b'):
    os.makedirs(tmp_path / c)
    for i in range(3):
      Image.new('L', (4, 4), i * 40).save(tmp_path / c / f'{i}.png')
  data = _data(digits_config, folder=str(tmp_path), train_split='all', eval_split='all',
               validation_fraction=0.2)
  with pytest.raises(UserError, match="train_split 'all', which is every image"):
    _split(data, 'all')


def test_a_class_named_train_loose_files_and_wrong_kinds_of_path(tmp_path, digits_config, caplog):
  root = _flat(str(tmp_path / 'vehicles'), {'train': 4, 'bus': 4, 'car': 4})
  _png(f'{root}/stray.png', 99)   # in no class folder
  data = _data(digits_config, folder=root, holdout_fraction=0.25)
  with caplog.at_level(logging.WARNING):
    info = sources.describe(data)
  assert info.class_names == ('bus', 'car', 'train')   # a flat folder, 'train' one of its classes
  assert info.num_examples == {'train': 9, 'test': 3}
  assert 'stray.png (outside every class folder)' in caplog.text
  # Split directories holding images but no class folders are still taken as splits (and refused).
  split_root = tmp_path / 'splits'
  for s in ('train', 'test'):
    _png(f'{split_root}/{s}/a.png', 1)
  folder_index.clear_memo()
  with pytest.raises(UserError, match=r'/splits/train has no class sub-directories'):
    sources.describe(_data(digits_config, folder=str(split_root)))
  folder_index.clear_memo()
  with pytest.raises(UserError, match=r'\(config\.data\.folder\) is a file; point it at the '
                     r'directory .* goes in config\.data\.manifest'):
    sources.describe(_data(digits_config, folder=f'{root}/stray.png'))
  with pytest.raises(UserError, match=r'\(config\.data\.manifest\) is a directory; point it at a '
                     r'CSV file'):
    sources.describe(_data(digits_config, folder=None, manifest=root))


def test_classes_that_differ_only_in_unicode_normalisation_are_warned_of(tmp_path, digits_config,
                                                                         caplog):
  """NFC 'zéro' beside NFD 'zéro' (folders merged from macOS and Linux) trained as two classes
  printed alike, without a word; the warning escapes the names so the difference shows."""
  import unicodedata
  nfc, nfd = 'z\u00e9ro', unicodedata.normalize('NFD', 'z\u00e9ro')
  root = _flat(str(tmp_path / 'merged'), {nfc: 2, nfd: 2, 'un': 2})
  data = _data(digits_config, folder=root, holdout_fraction=0.5)
  with caplog.at_level(logging.WARNING):
    names = folder_layout.class_names(folder_layout.source_of(data))
    folder_layout.class_names(folder_layout.source_of(data))       # once per folder
  assert len(names) == 3
  said = [r.getMessage() for r in caplog.records if 'Unicode normalisation' in r.getMessage()]
  assert len(said) == 1 and said[0].startswith(
      f"{root} has classes whose names differ only in Unicode normalisation or case "
      r"('ze\u0301ro' / 'z\xe9ro'; escaped to show the difference")
  assert said[0].endswith('merge the folders of each group into one, or rename one of them.')
  # A manifest's labels go the same way, with the manifest's fix.
  csv = tmp_path / 'm.csv'
  csv.write_text(''.join(f'merged/{n}/{k:03d}.png,{n.upper() if k else n}\n'
                         for n in (nfc, nfd) for k in range(2)))
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    folder_layout.class_names(folder_layout.source_of(_data(digits_config, folder=None,
                                                             manifest=str(csv))))
  said = [r.getMessage() for r in caplog.records if 'Unicode normalisation' in r.getMessage()]
  assert len(said) == 1 and said[0].endswith('write each label one way in the manifest.')


def test_holdout_fraction_beside_named_splits_is_said_to_have_no_effect(tmp_path, digits_config,
                                                                        caplog):
  splits = str(tmp_path / 'splits')
  for split in ('train', 'test'):
    _flat(f'{splits}/{split}', {'ant': 2, 'bee': 2})
  data = _data(digits_config, folder=splits, holdout_fraction=0.2)
  with caplog.at_level(logging.WARNING):
    assert sources.describe(data).num_examples == {'train': 4, 'test': 4}
  said = [r.getMessage() for r in caplog.records if 'has no effect' in r.getMessage()]
  assert said == [f'config.data.holdout_fraction=0.2 has no effect on {splits}: it has split '
                  'folders (test, train), which give the splits; set holdout_fraction=0 '
                  '(config.data.validation_fraction holds images out of the train split).']
  csv = tmp_path / 'm.csv'
  csv.write_text(''.join(f'splits/{s}/{c}/000.png,{c},{s}\n' for s in ('train', 'test')
                         for c in ('ant', 'bee')))
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    sources.describe(_data(digits_config, folder=None, manifest=str(csv), holdout_fraction=0.2))
  assert any('has no effect' in r.getMessage() and 'a split column (test, train)' in r.getMessage()
             for r in caplog.records)
  caplog.clear()
  with caplog.at_level(logging.WARNING):   # without split folders it is what makes the splits
    sources.describe(_data(digits_config, folder=f'{splits}/train', manifest=None,
                           holdout_fraction=0.5))
  assert not any('has no effect' in r.getMessage() for r in caplog.records)


def _warn_unused(digits_config, data, caplog, **evaluate):
  """The training setup's warning of unread splits (held_out.warn_unused_splits), its lines."""
  import ml_collections
  from imgcls_jax import held_out
  folder_index.clear_memo()
  from imgcls_jax.data import manifest
  manifest._WARNED.clear()
  e = ml_collections.ConfigDict(digits_config.evaluate.to_dict())
  e.update(evaluate)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    held_out.warn_unused_splits(ml_collections.ConfigDict({'data': data, 'evaluate': e}))
  return [r.getMessage() for r in caplog.records if 'those images are unused' in r.getMessage()]


def test_manifest_rows_of_a_split_no_split_reads_are_warned_of(tmp_path, digits_config, caplog):
  """Rows of split 'val' beside train / validation / test were silently unused; a split a fit
  key names is read (the warning named it even with --config.evaluate.threshold_split=val)."""
  rows = [(os.path.relpath(_png(f'{tmp_path}/p/{c}/{k}.png', k), tmp_path), c)
          for c in ('cat', 'dog') for k in range(6)]
  csv = tmp_path / 'm.csv'
  csv.write_text('path,label,split\n' + ''.join(
      f'{p},{c},{("train", "train", "test", "validation", "val", "dev")[k % 6]}\n'
      for k, (p, c) in enumerate(rows)))
  data = _data(digits_config, manifest=str(csv), holdout_fraction=0.0)
  assert sources.describe(data).num_examples == {'train': 4, 'test': 2}
  assert _warn_unused(digits_config, data, caplog, temperature_split='') == [
      f"The manifest {csv} has 4 row(s) of split(s) 'dev' (2), 'val' (2), which neither "
      "config.data.train_split 'train' nor eval_split 'test' reads (nor 'validation'): unless a "
      'key names them later (config.evaluate.split, temperature_split or threshold_split), those '
      'images are unused; write their split as one of these, or point a split key at it.']
  said = _warn_unused(digits_config, data, caplog, temperature_split='val')
  assert len(said) == 1 and "split(s) 'dev' (2), which" in said[0] and "(nor 'validation', 'val')"\
      in said[0]


def test_split_folders_no_split_reads_are_warned_of_once(tmp_path, digits_config, caplog):
  """A val/ folder beside train/ and test/ was silently unused."""
  root = str(tmp_path / 'splits')
  for split in ('train', 'test', 'val', 'validation', 'extra'):
    _flat(f'{root}/{split}', {'ant': 2, 'bee': 2})
  data = _data(digits_config, folder=root, holdout_fraction=0.0)
  assert sources.describe(data).num_examples == {'train': 4, 'test': 4}
  assert sources.split_size(data, 'val') == 4   # a key may name it (evaluate.split=val)
  assert _warn_unused(digits_config, data, caplog, temperature_split='') == [
      f"The image folder {root} has split folder(s) 'extra/', 'val/', which neither "
      "config.data.train_split 'train' nor eval_split 'test' reads (nor 'validation'): unless a "
      'key names them later (config.evaluate.split, temperature_split or threshold_split), those '
      'images are unused; rename the folder to a split the run reads, or point a split key at it.']
  said = _warn_unused(digits_config, data, caplog, temperature_split='val', split='extra')
  assert said == []
  for split in ('val', 'extra', 'validation'):
    os.rename(f'{root}/{split}', f'{tmp_path}/{split}')
  assert _warn_unused(digits_config, data, caplog, temperature_split='') == []


def test_a_hold_out_that_rounds_to_no_image_says_so(tmp_path, digits_config):
  """A 2-image manifest with holdout_fraction=0.2 ended in "no readable images; paths are
  relative to its folder": the images were fine, the hold-out took none."""
  csv = tmp_path / 'm.csv'
  csv.write_text(f"{_png(f'{tmp_path}/a.png', 0)},cat\n{_png(f'{tmp_path}/b.png', 1)},dog\n")
  data = _data(digits_config, manifest=str(csv), holdout_fraction=0.2)
  with pytest.raises(UserError, match=re.escape(
      f"config.data.holdout_fraction=0.2 holds out no image of the 2 in {csv} for split 'test': a "
      "class's last image always stays in the rest, and no class has two; add images (at least 2 "
      'per class) or name the splits yourself (split folders, or a split column).')):
    sources.describe(data)
  flat = _flat(str(tmp_path / 'flat'), {'ant': 2, 'bee': 2})
  data = _data(digits_config, folder=flat, manifest=None, holdout_fraction=0.5,
               validation_fraction=0.1)
  with pytest.raises(UserError, match=r"^config\.data\.validation_fraction=0\.1 holds out no "
                     rf"image of the 2 in split 'train' of {re.escape(flat)} for split "
                     "'validation'"):
    sources.split_size(data, 'validation')


def test_an_eval_folder_with_a_class_written_nfd_reads_as_the_models_class(tmp_path,
                                                                           digits_config):
  """An eval folder copied from macOS names the model's NFC 'zéro' as NFD 'zéro': it printed
  alike in a refusal ("has classes the model does not know (zéro)"). The same name once
  normalised is the model's class; a name that differs in case is refused with the reason."""
  import unicodedata
  nfc, nfd = 'z\u00e9ro', unicodedata.normalize('NFD', 'z\u00e9ro')
  names = ('un', nfc)
  root = _flat(str(tmp_path / 'mac'), {nfd: 2, 'un': 3})
  split = folder_index.index(folder_layout.source_of(_data(digits_config, folder=root)), 'all',
                             names)
  assert sorted(zip(split.ids, split.labels)) == sorted(
      [(f'{nfd}/{k:03d}.png', 1) for k in range(2)] + [(f'un/{k:03d}.png', 0) for k in range(3)])
  folder_index.clear_memo()
  cased = _flat(str(tmp_path / 'cased'), {'Un': 2, nfc: 2})
  with pytest.raises(UserError, match=r"has classes the model does not know \(Un\); .*\('Un' "
                                      r"differs from the model's 'un' only in case: rename it\)"):
    folder_index.index(folder_layout.source_of(_data(digits_config, folder=cased)), 'all', names)

