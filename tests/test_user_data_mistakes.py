"""The user's own images: mistakes that trained a wrong model without a word, or named the wrong
fix (found by a sweep of ~40 folder and manifest layouts). Each case is one line naming the fix,
or a warning where the data may be meant."""
from __future__ import annotations

import logging
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from imgcls_jax.data import folder_index, folder_layout, manifest
from imgcls_jax.data.info import DatasetInfo
from imgcls_jax.errors import UserError


def _png(path, seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.RandomState(seed).randint(0, 256, (8, 8, 3)).astype(np.uint8)
  Image.fromarray(pixels).save(path)


def _data(**kw):
  d = dict(name='image_folder', folder='', manifest='', train_split='train', eval_split='test',
           holdout_fraction=0.0, validation_fraction=0.0, index_cache='off', multilabel=False)
  d.update(kw)
  return ml_collections.ConfigDict(d)


@pytest.fixture(autouse=True)
def _fresh():
  folder_index.clear_memo()
  manifest._WARNED.clear()


def test_split_folders_under_other_names_are_not_taken_for_classes(tmp_path):
  """Training/<class>/ and Testing/<class>/ (a common download layout) trained a two-class
  'Training' vs 'Testing' model once holdout_fraction was set, as the first error advised."""
  for split in ('Training', 'Testing'):
    for k, cls in enumerate(('cat', 'dog', 'fox')):
      _png(tmp_path / split / cls / f'{k}.png', k)
  src = folder_layout.source_of(_data(folder=str(tmp_path), holdout_fraction=0.2))
  with pytest.raises(UserError, match=r"split folders Testing, Training .*set "
                                      r"config.data.train_split='Training' and "
                                      r"config.data.eval_split='Testing'\."):
    folder_layout.class_names(src)
  ok = folder_layout.source_of(_data(folder=str(tmp_path), train_split='Training',
                                    eval_split='Testing'))
  assert ok.kind == 'splits' and folder_layout.class_names(ok) == ('cat', 'dog', 'fox')


def test_a_wrapper_folder_names_the_folder_to_point_at(tmp_path):
  for cls in ('cat', 'dog'):
    _png(tmp_path / 'photos' / cls / '0.png')
  src = folder_layout.source_of(_data(folder=str(tmp_path), holdout_fraction=0.2))
  with pytest.raises(UserError, match=rf"holds one folder, photos, whose sub-folders \(cat, dog\) "
                                      rf"look like the classes; set config.data.folder="
                                      rf"{tmp_path / 'photos'}\."):
    folder_layout.class_names(src)
  _png(tmp_path / 'only' / 'cat' / '0.png')         # a real single class: the old advice
  with pytest.raises(UserError, match='has only one class, cat; .*add .*<another class>'):
    folder_layout.class_names(folder_layout.source_of(
        _data(folder=str(tmp_path / 'only'), holdout_fraction=0.2)))


def test_a_manifest_whose_paths_all_miss_says_why_and_where_paths_start(tmp_path):
  (tmp_path / 'labels.csv').write_text('img\\a.png,cat\nimg\\b.png,dog\n')   # Windows paths
  src = folder_layout.source_of(_data(manifest=str(tmp_path / 'labels.csv'), holdout_fraction=0.5))
  names = folder_layout.class_names(src)
  with pytest.raises(UserError, match=(r"has no readable images \(skipped: img\\a\.png "
                                       r"\(file not found\); img\\b"
                                       rf".*relative to its folder {tmp_path}\.")):
    folder_index.index(src, 'train', names)


@pytest.mark.parametrize('text, message', [
    # an unquoted comma in a label after a header: the extra cell was dropped, two classes merged
    ('path,label\na.png,felid, cat\nb.png,canid, dog\nc.png,canid, fox\n',
     r"Line 2 .* has 3 cells where its header names 2 columns .*quote a label that holds a comma"),
    # one odd row without a header: it, not line 1, is named
    ('a.png,cat\nb.png,dog\nc.png,dog,train\n', r"Line 3 .* has 3 cells where 2 other rows have 2"),
    # Excel's list separator in many locales
    ('path;label\na.png;cat\nb.png;dog\n', r"has one column \(its cells are separated by ';'\); "
                                          r"write path,label rows separated by commas"),
    ('a.png\tcat\nb.png\tdog\n', r"separated by '\\t'"),
    # a tag list without config.data.multilabel
    ('path,labels\na.png,cat;dog\nb.png,dog\n', r"the label 'cat;dog', which holds ';', the tag "
                                               r"separator: .*set config.data.multilabel=True"),
    ('a.png,cat,train\nb.png,,train\nc.png,dog,test\n',
     r"Line 2 .* has no label .*or, for tags .*set config.data.multilabel=True"),
])
def test_manifest_rows_that_would_be_read_wrong_are_one_line(tmp_path, text, message):
  path = tmp_path / 'labels.csv'
  path.write_text(text)
  with pytest.raises(UserError, match=message):
    manifest.read_rows(str(path))


def test_a_file_listed_again_is_named_with_the_held_out_part_that_holds_it(tmp_path):
  """A manifest without a split column, every file listed twice (once as ./NAME), part of
  every class held out: each part names the rows that list its own files again, not every
  row (was: the test split's report counted the training files' repeated rows too)."""
  rows = []
  for k in range(12):
    _png(tmp_path / f'{k}.png', seed=k)
    rows.append(f'{k}.png,{"cat" if k % 2 else "dog"}')
  path = tmp_path / 'labels.csv'
  path.write_text('\n'.join(rows + [f'./{r}' for r in rows]) + '\n')
  src = folder_layout.source_of(_data(manifest=str(path), holdout_fraction=0.25,
                                      validation_fraction=0.25))
  names = folder_layout.class_names(src)
  parts = {s: folder_index.index(src, s, names) for s in ('train', 'validation', 'test')}
  for s, part in parts.items():
    again = sorted(os.path.normpath(rel) for rel, why in part.skipped if why == 'listed twice')
    assert again == sorted(os.path.relpath(p, tmp_path) for p in part.paths), s
  assert sum(len(p.paths) for p in parts.values()) == 12
  assert all(p.paths for p in parts.values())   # each part holds some files


def test_a_file_listed_with_two_labels_is_refused(tmp_path):
  """Was: 'skipped ... (listed twice)', the first label silently kept."""
  for name in ('a', 'b', 'c'):
    _png(tmp_path / f'{name}.png')
  path = tmp_path / 'labels.csv'
  path.write_text('a.png,cat\nb.png,dog\nc.png,dog\na.png,zebra\n')
  src = folder_layout.source_of(_data(manifest=str(path), train_split='all'))
  with pytest.raises(UserError, match=r"a.png is listed twice .* with different labels \('cat' "
                                      r"and 'zebra'\)"):
    folder_index.index(src, 'all', folder_layout.class_names(src))
  path.write_text('a.png,cat\nb.png,dog\nc.png,dog\na.png,cat\n')   # the same row twice: skipped
  folder_index.clear_memo()
  split = folder_index.index(src, 'all', folder_layout.class_names(src))
  assert len(split.paths) == 3 and split.skipped == (('a.png', 'listed twice'),)
  # tags: the same set in another order is the same label; another set is refused
  path.write_text('path,labels\na.png,cat;dog\nb.png,dog\nc.png,cat\na.png,dog;cat\n')
  tagged = folder_layout.source_of(_data(manifest=str(path), train_split='all', multilabel=True))
  folder_index.clear_memo()
  split = folder_index.index(tagged, 'all', folder_layout.class_names(tagged))
  assert len(split.paths) == 3 and split.skipped == (('a.png', 'listed twice'),)
  path.write_text('path,labels\na.png,cat;dog\nb.png,dog\nc.png,cat\na.png,cat\n')
  folder_index.clear_memo()
  with pytest.raises(UserError, match=r"a.png is listed twice .* \('cat;dog' and 'cat'\)"):
    folder_index.index(tagged, 'all', folder_layout.class_names(tagged))


def test_a_split_typo_and_comma_separated_tags_are_warned_of(tmp_path, caplog):
  path = tmp_path / 'labels.csv'
  path.write_text('a.png,cat,train\nb.png,dog,train\nc.png,dog,tset\nd.png,cat,test\n')
  with caplog.at_level(logging.WARNING):
    manifest.warn_near_splits(manifest.read_rows(str(path)), str(path), 'test')
    manifest.warn_near_splits(manifest.read_rows(str(path)), str(path), 'train')
  warned = [r.getMessage() for r in caplog.records]
  assert len(warned) == 1 and "1 row(s) of split 'tset', which is not split 'test'" in warned[0]
  caplog.clear()
  path.write_text('path,labels\na.png,"cat, dog"\nb.png,dog;fox\n')
  with caplog.at_level(logging.WARNING):
    rows = manifest.read_rows(str(path), multilabel=True)
  assert manifest.tags(rows[0][1]) == ('cat, dog',)       # read as written ...
  assert any("tags holding ','" in r.getMessage() and "'cat, dog'" in r.getMessage()
             for r in caplog.records)                      # ... and said


def test_a_non_image_in_a_folder_without_split_folders_is_warned_of_once(tmp_path, caplog):
  """Both splits of a held-out draw list the folder's non-images: one warning, not one a split."""
  for k, cls in enumerate(('cat', 'dog')):
    for i in range(5):
      _png(tmp_path / cls / f'{i}.png', 10 * k + i)
  (tmp_path / 'cat' / 'notes.txt').write_text('not an image')
  src = folder_layout.source_of(_data(folder=str(tmp_path), holdout_fraction=0.4))
  names = folder_layout.class_names(src)
  with caplog.at_level(logging.WARNING):
    train = folder_index.index(src, 'train', names)
    test = folder_index.index(src, 'test', names)
  assert len(train.ids) + len(test.ids) == 10 and not set(train.ids) & set(test.ids)
  named = [r.getMessage() for r in caplog.records if 'notes.txt' in r.getMessage()]
  assert len(named) == 1 and "split 'train': skipped 1 file(s): cat/notes.txt" in named[0]


def test_no_split_folders_names_the_split_key_and_not_a_leaking_fix(tmp_path):
  """Without split folders or a hold-out, the error names the key whose split is missing; it no
  longer advises split 'all' (which, for training, evaluates on trained images)."""
  for cls in ('cat', 'dog'):
    _png(tmp_path / cls / '0.png')
  src = folder_layout.source_of(_data(folder=str(tmp_path), train_split='all'))
  names = folder_layout.class_names(src)
  assert len(folder_index.index(src, 'all', names).ids) == 2
  with pytest.raises(UserError, match=rf"no {tmp_path}/test/ for config.data.eval_split\); set "
                                      r"config.data.holdout_fraction \(e\.g\. 0\.2\) to hold out"):
    folder_index.index(src, 'test', names)
  # A manifest has no split directories: it lacks a split column.
  (tmp_path / 'm.csv').write_text('cat/0.png,cat\ndog/0.png,dog\n')
  src = folder_layout.source_of(_data(manifest=str(tmp_path / 'm.csv'), train_split='all'))
  with pytest.raises(UserError, match=r"m\.csv has no split column \(path,label,split rows\) "
                                      r"naming split 'test' for config.data.eval_split; set "
                                      r'config.data.holdout_fraction'):
    folder_index.index(src, 'test', folder_layout.class_names(src))


def test_k_fold_of_a_manifest_without_split_column_needs_no_eval_split(tmp_path):
  """Cross-validation splits the train split ('all' here) and never reads the eval split, yet
  the label-issue search described the data with it and failed on the manifest's missing 'test'
  rows (the user had to set eval_split='all' too)."""
  from imgcls_jax import out_of_fold
  rows = []
  for k, cls in enumerate(('cat', 'dog')):
    for i in range(4):
      _png(tmp_path / cls / f'{i}.png', 10 * k + i)
      rows.append(f'{cls}/{i}.png,{cls}')
  (tmp_path / 'm.csv').write_text('\n'.join(rows) + '\n')
  config = ml_collections.ConfigDict({
      'data': _data(manifest=str(tmp_path / 'm.csv'), train_split='all'),
      'cross_validation': {'label_issues': True}})
  assert out_of_fold.OutOfFold(config, 8).wanted


def test_evaluating_on_trained_images_is_warned_of(tmp_path, caplog):
  """train_split 'all' of a manifest with a split column trained on its 'test' rows, and the
  reported accuracy was theirs, without a word; a tfds-style slice inside the train split too."""
  from imgcls_jax import held_out
  from imgcls_jax.data import reader
  rows = ['path,label,split']
  for i in range(12):
    _png(tmp_path / f'{i}.png', i)
    rows.append(f"{i}.png,{('cat', 'dog')[i % 2]},{'test' if i % 4 == 0 else 'train'}")
  (tmp_path / 'm.csv').write_text('\n'.join(rows) + '\n')
  data = _data(manifest=str(tmp_path / 'm.csv'), train_split='all')
  src = folder_layout.source_of(data)
  names = folder_layout.class_names(src)
  info = DatasetInfo(name='image_folder', num_classes=2, class_names=names,
                     image_shape=(8, 8, 3), num_examples={
                         s: len(folder_index.index(src, s, names).ids)
                         for s in ('all', 'test', 'train')})
  config = ml_collections.ConfigDict({'data': data})
  with caplog.at_level(logging.WARNING):
    held_out.warn_eval_on_training(config, info)
    config.data.train_split = 'train'                  # the split column's train rows: disjoint
    held_out.warn_eval_on_training(config, info)
  shares = [r.getMessage() for r in caplog.records if 'shares' in r.getMessage()]
  assert len(shares) == 1 and shares[0].startswith(   # the 3 rows the manifest marks 'test'
      "config.data.eval_split='test' shares 3 examples with train_split='all'")
  caplog.clear()   # the training split evaluated (a tfds split was warned of; a folder's was not)
  with caplog.at_level(logging.WARNING):
    for config.data.eval_split in ('train', 'all'):
      held_out.warn_eval_on_training(config, info)
  shares = [r.getMessage() for r in caplog.records if 'shares' in r.getMessage()]
  assert [m.split(':')[0] for m in shares] == [
      "config.data.eval_split='train' shares 9 examples with train_split='train'",
      "config.data.eval_split='all' shares 9 examples with train_split='train'"]
  assert all("evaluate on a split it does not train on (data.eval_split='test'" in m
             for m in shares)
  config.data.eval_split = 'test'
  # An id list of the whole split (a cross-validation's cv_kept_ids.txt) trains on 'test' too.
  ids = folder_index.index(src, 'all', names).ids
  listed = tmp_path / 'kept.txt'
  listed.write_text('\n'.join(ids) + '\n')
  train_only = tmp_path / 'train_only.txt'
  train_only.write_text('\n'.join(i for k, i in enumerate(ids)
                                   if i not in folder_index.index(src, 'test', names).ids) + '\n')
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    config.data.train_split = f'all@{listed}'
    held_out.warn_eval_on_training(config, info)
    config.data.train_split = f'all@{train_only}'
    held_out.warn_eval_on_training(config, info)
  shares = [r.getMessage() for r in caplog.records if 'shares' in r.getMessage()]
  assert len(shares) == 1 and shares[0].startswith(
      f"config.data.eval_split='test' shares 3 examples with train_split='all@{listed}'")
  assert 'list only training examples in the id file' in shares[0]
  caplog.clear()
  digits = ml_collections.ConfigDict({'data': dict(name='arrays:sklearn_digits', data_dir=str(
      tmp_path / 'tfds'), train_split='train[:500]', eval_split='train[400:]')})
  with caplog.at_level(logging.WARNING):
    held_out.warn_eval_on_training(digits, reader.describe(digits.data))
  assert any("shares 100 examples" in r.getMessage() for r in caplog.records)   # 400..499


@pytest.mark.parametrize('layout', ['splits', 'manifest', 'holdout'])
def test_eval_images_that_are_copies_of_training_images_are_warned_of(tmp_path, caplog, layout):
  """A photo saved into both train/ and test/ (or linked there, or listed twice in a manifest
  under two names) was scored as a new image without a word: split folders are disjoint by
  path, not by content."""
  from imgcls_jax import held_out
  root = tmp_path / 'images'
  for i in range(8):
    _png(root / 'train' / ('cat', 'dog')[i % 2] / f'{i}.png', i)
    _png(root / 'test' / ('cat', 'dog')[i % 2] / f't{i}.png', 100 + i)
  copies = [('train/cat/2.png', 'test/cat/t0.png'), ('train/dog/5.png', 'test/dog/t3.png')]
  for src_rel, dst_rel in copies:
    (root / dst_rel).write_bytes((root / src_rel).read_bytes())
  os.symlink(root / 'train/cat/4.png', root / 'test/cat/linked.png')
  if layout == 'splits':
    data = _data(folder=str(root))
  else:
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                   for f in fs)
    if layout == 'manifest':
      rows = [f"{f},{f.split('/')[1]},{f.split('/')[0]}" for f in files]
      data = _data(manifest=str(root / 'm.csv'))
    else:   # no split column: the held-out draw makes the eval split
      rows = [f"{f},{f.split('/')[1]}" for f in files]
      data = _data(manifest=str(root / 'm.csv'), holdout_fraction=0.5)
    (root / 'm.csv').write_text('\n'.join(rows) + '\n')
  (root / 'train/cat/empty.png').write_bytes(b'')   # two failed downloads: not images, not copies
  (root / 'test/dog/empty.png').write_bytes(b'')
  src = folder_layout.source_of(data)
  names = folder_layout.class_names(src)
  info = DatasetInfo(name='image_folder', num_classes=2, class_names=names, image_shape=(8, 8, 3),
                     num_examples={})
  ev_files = folder_index.files_of(src, 'test', names)
  train_files = folder_index.files_of(src, 'train', names)
  oracle = [(p, next(q for q in train_files if open(q, 'rb').read() == open(p, 'rb').read()))
            for p in ev_files if os.path.getsize(p) and any(
                open(q, 'rb').read() == open(p, 'rb').read() for q in train_files)]
  linked = [(p, q) for p, q in oracle if os.path.realpath(p) == os.path.realpath(q)]
  copied = [pq for pq in oracle if pq not in linked]
  config = ml_collections.ConfigDict({'data': data})
  with caplog.at_level(logging.WARNING):
    held_out.warn_eval_on_training(config, info)
    held_out.warn_eval_on_training(config, info)          # said once
  said = [r.getMessage() for r in caplog.records if 'the accuracy counts them' in r.getMessage()]
  if layout != 'holdout':
    assert (len(linked), len(copied)) == (1, 2)
  shown = lambda pairs: '; '.join(f'{os.path.relpath(p, root)} = {os.path.relpath(q, root)}'
                                  for p, q in pairs)
  assert said == [m for m in (
      linked and f"{len(linked)} image(s) of config.data.eval_split='test' in {src.location} are "
      f"train_split='train' images reached again (a link, or a path spelt another way) "
      f'({shown(linked)}): the accuracy counts them as new images though the model trains on '
      'them; remove those links or manifest rows from the eval split.',
      copied and f"{len(copied)} image(s) of config.data.eval_split='test' in {src.location} are "
      f"copies of train_split='train' images (the same bytes) ({shown(copied)}): the accuracy "
      'counts them as new images though the model trains on them; delete one file of each pair, '
      'or move it to the same split.') if m]
  caplog.clear()
  config.data.eval_split = 'train'   # evaluating on the training split: deliberate, said otherwise
  with caplog.at_level(logging.WARNING):
    held_out.warn_eval_on_training(config, info)
  assert not [r for r in caplog.records if 'the accuracy counts them' in r.getMessage()]


def test_a_fit_on_the_eval_split_points_at_the_layouts_unread_split(tmp_path):
  """calibrate with threshold_split=test on a manifest that has 'val' rows said to train again
  with data.validation_fraction=0.1; the fix is the 'val' split it already has."""
  from imgcls_jax import held_out
  rows = ['path,label,split']
  for i in range(12):
    _png(tmp_path / f'{i}.png', i)
    rows.append(f"{i}.png,{('cat', 'dog')[i % 2]},{('train', 'train', 'test', 'val')[i % 4]}")
  (tmp_path / 'm.csv').write_text('\n'.join(rows) + '\n')
  data = _data(manifest=str(tmp_path / 'm.csv'))
  src = folder_layout.source_of(data)
  names = folder_layout.class_names(src)
  info = DatasetInfo(name='image_folder', num_classes=2, class_names=names, image_shape=(8, 8, 3),
                     num_examples={s: len(folder_index.index(src, s, names).ids)
                                   for s in ('train', 'test', 'val')})
  config = ml_collections.ConfigDict({'data': data, 'evaluate': {
      'temperature_split': 'test', 'threshold_split': '', 'unknown_keep': 0.0}})
  with pytest.raises(UserError) as e:
    held_out.check_fit_splits(config, info, trained=True)
  assert str(e.value).endswith("fit on a split the run did not train on: "
                               "evaluate.temperature_split='val'.")
  config.evaluate.temperature_split = 'val'
  held_out.check_fit_splits(config, info, trained=True)   # and that one is accepted


def test_identical_files_are_found_by_their_bytes_whatever_their_sizes(tmp_path):
  """duplicates.identical against comparing every pair's bytes: same-size files that differ (one
  only after its first 16 KiB), empty files, missing files, a file in both lists."""
  from imgcls_jax.data import duplicates
  rng = np.random.default_rng(0)
  blobs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (5, 5, 5, 9, 0, 3_000_000)]
  a, b = [], []
  for i, blob in enumerate(blobs):
    (tmp_path / f'a{i}').write_bytes(blob)
    a.append(str(tmp_path / f'a{i}'))
  for i in (1, 3, 4, 5):
    (tmp_path / f'b{i}').write_bytes(blobs[i])
    b.append(str(tmp_path / f'b{i}'))
  (tmp_path / 'b_near').write_bytes(blobs[5][:-1] + bytes([blobs[5][-1] ^ 1]))   # one bit off
  b = [str(tmp_path / 'b_near')] + b + [str(tmp_path / 'missing'), a[0]]   # b_near first
  a.append(str(tmp_path / 'gone'))
  oracle = [(p, next(q for q in b if os.path.exists(q) and open(q, 'rb').read() == open(p, 'rb')
                     .read())) for p in a if os.path.exists(p) and os.path.getsize(p) and any(
                         os.path.exists(q) and open(q, 'rb').read() == open(p, 'rb').read()
                         for q in b)]   # (empty files are no images: no copies either)
  assert duplicates.identical(a, b) == oracle
  assert [p for p, _ in oracle] == [a[0], a[1], a[3], a[5]]   # a5: 3 MB, equal in the first
                                                              # 16 KiB to b_near as well


def test_tags_differing_in_case_and_tags_on_no_or_every_image_are_warned_of(tmp_path, caplog):
  """'EVEN;ROUND' beside 'even;round' trained 6 tags without a word; a tag on no training image
  (or on every one) trained and counted in the macro means as 0 (or 1) without one."""
  from imgcls_jax import loss_weights
  from imgcls_jax.data import arrays
  rows = []
  for i in range(6):
    _png(tmp_path / f'{i}.png', i)
    rows.append(f"{i}.png,{'EVEN;ROUND' if i % 2 else 'even;round;big'}")
  (tmp_path / 'm.csv').write_text('\n'.join(rows) + '\n')
  src = folder_layout.source_of(_data(manifest=str(tmp_path / 'm.csv'), multilabel=True,
                                      holdout_fraction=0.5))
  with caplog.at_level(logging.WARNING):
    names = folder_layout.class_names(src)
    folder_layout.class_names(src)                       # once per manifest, not per call
  assert names == ('EVEN', 'ROUND', 'big', 'even', 'round')
  twins = [r.getMessage() for r in caplog.records if 'differ only in case' in r.getMessage()]
  assert len(twins) == 1
  assert 'tags that differ only in case (EVEN / even; ROUND / round)' in twins[0]
  caplog.clear()
  labels = np.zeros((12, 4), bool)
  labels[:, 1] = True                                    # 'always': on every image
  labels[::2, 2] = labels[1::2, 3] = True                # 'half', 'other half'; 'never': column 0
  path = str(tmp_path / 'tags.npz')
  np.savez(path, train_images=np.zeros((12, 4, 4, 1), np.uint8), train_labels=labels,
           class_names=np.asarray(['never', 'always', 'half', 'other half']))
  config = ml_collections.ConfigDict({'data': dict(name=f'arrays:{path}', train_split='train',
                                                   eval_split='train', multilabel=True)})
  with caplog.at_level(logging.WARNING):
    loss_weights.warn_untrainable_tags(config, arrays.describe(config.data))
  said = sorted(r.getMessage() for r in caplog.records)
  assert len(said) == 2 and said[0].startswith("Tag(s) always are on every image of the training "
                                               "split 'train'") and said[1].startswith(
      "Tag(s) never are on no image of the training split 'train'")


def test_training_setup_gives_both_data_warnings(tmp_path, caplog):
  """run.setup (what every training starts with) says it when the eval split shares examples with
  the train split and when a tag cannot be learned; an ordinary setup says neither."""
  from configs import default
  from imgcls_jax import run
  labels = np.zeros((40, 3), bool)
  labels[::2, 1] = labels[1::2, 2] = True
  path = str(tmp_path / 'tags.npz')
  c = default.get_config()
  c.data.name = f'arrays:{path}'
  c.data.multilabel = True
  c.data.device_preprocess = ''
  c.batch_size = 8
  c.mesh.cpu_devices = 0
  for train, ev, said in (('train[:30]', 'train[20:]', 2), ('train[:30]', 'train[30:]', 0)):
    c.data.train_split, c.data.eval_split = train, ev
    labels[:, 0] = True if said else np.arange(40) % 3 == 0   # 'always' in the first case only
    np.savez(path, train_images=np.zeros((40, 8, 8, 1), np.uint8), train_labels=labels,
             class_names=np.asarray(['always', 'even', 'odd']), mirror_safe=np.asarray(False))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      run.setup(c)
    got = [r.getMessage() for r in caplog.records
           if 'shares 10 examples' in r.getMessage() or 'image of the training' in r.getMessage()]
    assert len(got) == said, got
