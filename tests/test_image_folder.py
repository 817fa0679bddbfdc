"""The user's image folders: mixed sizes and modes, skipped files reported by count and name,
clear errors for missing splits and empty classes, and a real training run whose checkpoint
carries the class names. (Hold-out, manifests, the index cache and masking: test_folder_index.py.)"""
import glob
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import run
from imgcls_jax.data import folder_index, folder_layout, image_folder, pipeline, sources
from imgcls_jax.errors import UserError


def _save(path, mode, size, seed, fmt=None):
  rng = np.random.RandomState(seed)
  w, h = size
  channels = {'L': 1, 'RGB': 3, 'RGBA': 4}[mode]
  pixels = rng.randint(0, 256, (h, w, channels)).astype(np.uint8)
  image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, format=fmt)


def make_folder(root, *, bad_files=True):
  """train/{cat,dog} and test/{cat,dog}: JPEG, PNG (RGB, RGBA, grey), GIF, BMP of mixed sizes."""
  sizes = [(20, 30), (40, 25), (33, 33), (17, 48)]
  for k in range(4):
    _save(f'{root}/train/cat/rgb_{k}.jpg', 'RGB', sizes[k], k)
    _save(f'{root}/train/dog/rgb_{k}.JPEG', 'RGB', sizes[3 - k], 10 + k, 'JPEG')
  _save(f'{root}/train/cat/alpha.png', 'RGBA', (24, 24), 20)
  _save(f'{root}/train/cat/grey.png', 'L', (31, 29), 21)
  _save(f'{root}/train/dog/sub/deeper.bmp', 'RGB', (16, 16), 22)
  _save(f'{root}/train/dog/anim.gif', 'RGB', (18, 18), 23)
  if bad_files:
    with open(f'{root}/train/cat/rgb_0.jpg', 'rb') as f:
      head = f.read(200)
    with open(f'{root}/train/cat/corrupt.jpg', 'wb') as f:   # a truncated JPEG
      f.write(head)
    with open(f'{root}/train/dog/notes.txt', 'w') as f:
      f.write('not an image\n')
    with open(f'{root}/train/dog/.DS_Store', 'wb') as f:       # hidden files are ignored
      f.write(b'\0\1')
  for k in range(3):
    _save(f'{root}/test/cat/t{k}.png', 'RGB', (25 + k, 22), 30 + k)
    _save(f'{root}/test/dog/t{k}.jpg', 'L', (21, 26 + k), 40 + k)


@pytest.fixture
def folder(tmp_path):
  root = str(tmp_path / 'images')
  make_folder(root)
  return root


@pytest.fixture
def folder_config(digits_config, folder):
  c = digits_config
  c.data.name = 'image_folder'
  c.data.folder = folder
  c.data.train_preprocess = 'random_resized_crop(size=16, area_min=0.5)|flip_lr'
  c.data.eval_preprocess = 'resize(size=16)'
  c.data.mean = (0.5, 0.5, 0.5)
  c.data.std = (0.25, 0.25, 0.25)
  c.batch_size = 8
  c.eval_batch_size = 8
  return c


def _index(root, split, names=None):
  src = folder_layout.Source(kind='splits', location=root, root=root, train_split='train',
                            eval_split='test', holdout_fraction=0.0, holdout_seed=0, cache_dir='')
  folder_index.clear_memo()
  return folder_index.index(src, split, names or folder_layout.class_names(src))


def test_scan_skips_and_reports_unreadable_and_non_image_files(folder, caplog):
  with caplog.at_level(logging.WARNING):
    train = _index(folder, 'train')
  assert sorted(train.skipped) == [('train/cat/corrupt.jpg', 'cannot be decoded'),
                                   ('train/dog/notes.txt', 'not an image file')]
  # An empty file and one beyond PIL's decompression-bomb limit say so (both were "cannot be
  # decoded"; the second a valid image, only huge).
  from PIL import Image
  open(os.path.join(folder, 'train', 'cat', 'empty.png'), 'wb').close()
  Image.new('L', (100, 100)).save(os.path.join(folder, 'train', 'cat', 'huge.png'))
  limit = Image.MAX_IMAGE_PIXELS
  try:
    Image.MAX_IMAGE_PIXELS = 2000            # 10,000 pixels > 2 x the limit: PIL's bomb error
    again = dict(_index(folder, 'train').skipped)
  finally:
    Image.MAX_IMAGE_PIXELS = limit
    for name in ('empty.png', 'huge.png'):
      os.remove(os.path.join(folder, 'train', 'cat', name))
  assert again['train/cat/empty.png'] == 'empty file (0 bytes)'
  assert again['train/cat/huge.png'].startswith("more pixels than PIL's decompression-bomb limit")
  message = ' '.join(r.getMessage() for r in caplog.records)
  assert 'skipped 2 file(s)' in message
  assert 'train/cat/corrupt.jpg' in message and 'train/dog/notes.txt' in message
  assert len(train) == 12 and sorted(np.bincount(train.labels)) == [6, 6]
  assert train.counts == (6, 6)
  assert train.channels_found == {1, 3, 4}
  # (height, width) of every readable image as saved above (PIL sizes are (width, height)).
  assert train.sizes_found == {(30, 20), (25, 40), (33, 33), (48, 17), (24, 24), (29, 31),
                               (16, 16), (18, 18)}
  assert image_folder.channels(train) == 3
  assert 'train/dog/sub/deeper.bmp' in train.ids and 'train/cat/grey.png' in train.ids
  assert sorted(os.path.relpath(p, folder) for p in train.paths) == sorted(train.ids)


def test_info_and_exact_once_evaluation(folder_config):
  info = sources.describe(folder_config.data)
  assert info.class_names == ('cat', 'dog') and info.num_classes == 2 and info.channels == 3
  assert info.num_examples == {'train': 12, 'test': 6}
  assert info.name == f'image_folder:{folder_config.data.folder}'
  assert info.image_shape == (None, None, 3) and info.mirror_safe  # mixed sizes
  ev = pipeline.EvalData(folder_config.data, 'test', local_batch_size=4, split_size=6)
  batches = list(ev.batches())
  assert len(batches) == 2
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
  assert sorted(labels) == [0, 0, 0, 1, 1, 1]
  grey = images[labels == 1]  # the test dogs are grey JPEGs: replicated to 3 equal channels
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_split_digest_changes_with_the_files_and_labels_a_split_holds(folder_config, folder):
  folder_index.clear_memo()
  then = sources.describe(folder_config.data).split_digests
  assert set(then) == {'train', 'test'} and then['train'] != then['test']
  # Other pixels under the same names and a re-probe: the same images and labels.
  _save(f'{folder}/train/cat/rgb_1.jpg', 'RGB', (22, 22), 99)
  folder_index.clear_memo()
  assert sources.describe(folder_config.data).split_digests == then
  # A file renamed (the count stays), or moved to the other class: another split.
  os.rename(f'{folder}/train/cat/rgb_1.jpg', f'{folder}/train/cat/rgb_9.jpg')
  folder_index.clear_memo()
  renamed = sources.describe(folder_config.data)
  assert renamed.num_examples['train'] == 12 and renamed.split_digests['train'] != then['train']
  assert renamed.split_digests['test'] == then['test']
  os.rename(f'{folder}/train/cat/rgb_9.jpg', f'{folder}/train/cat/rgb_1.jpg')
  folder_index.clear_memo()
  assert sources.describe(folder_config.data).split_digests == then
  # A file that became unreadable is skipped, but the split lists the same files: the draws of
  # held-out images, made on the listing, are unchanged, and so is the digest.
  with open(f'{folder}/train/dog/rgb_2.JPEG', 'wb') as f:
    f.write(b'\xff\xd8\xff' + b'\0' * 20)
  folder_index.clear_memo()
  damaged = sources.describe(folder_config.data)
  assert damaged.num_examples['train'] == 11 and damaged.split_digests == then


def test_mirror_safe_false_refuses_flips_for_the_run(folder_config):
  folder_config.data.mirror_safe = False
  info = sources.describe(folder_config.data)
  assert info.mirror_safe is False     # saved with the run: evaluate / predict / serve refuse too
  with pytest.raises(UserError, match=r"images \(config\.data\.mirror_safe=False\); remove "
                                      r'flip_lr from config\.data\.train_preprocess\.$'):
    run.setup(folder_config)
  folder_config.data.train_preprocess = 'random_resized_crop(size=16, area_min=0.5)'
  run.setup(folder_config)
  from imgcls_jax import configlib
  from imgcls_jax.data import info as info_lib
  saved = configlib.config_dict(folder_config)
  folder_config.data.mirror_safe = True      # a later config cannot lift the run's own mark
  with pytest.raises(UserError, match='leave config.evaluate.tta empty'):
    info_lib.check_flips(folder_config.data, 'flip', mirror_safe=info.mirror_safe)
  with pytest.raises(UserError, match=r'Cannot resume .*data\.mirror_safe: false in the '
                                      'checkpoint, true now'):
    configlib.check_config(saved, folder_config, 'checkpoint 8 in /runs/x')


def test_train_stream_mixes_sizes_and_modes(folder_config):
  ds, n = pipeline.train_dataset(folder_config.data, seed=0, local_batch_size=6)
  assert n == 12
  batch = next(ds.as_numpy_iterator())
  assert batch['image'].shape == (6, 16, 16, 3)


def test_all_grey_folder_gives_one_channel(tmp_path, digits_config):
  root = str(tmp_path / 'grey')
  for split in ('train', 'test'):
    for k in range(2):
      _save(f'{root}/{split}/a/{k}.png', 'L', (12, 12), k)
      _save(f'{root}/{split}/b/{k}.jpg', 'L', (12, 14), 5 + k)
  digits_config.data.name = 'image_folder'
  digits_config.data.folder = root
  info = sources.describe(digits_config.data)
  assert info.channels == 1 and info.image_shape == (None, None, 1)  # 12x12 and 14x12


def test_image_shape_is_known_when_every_image_has_one_size(tmp_path, digits_config):
  root = str(tmp_path / 'same')
  for split in ('train', 'test'):
    for k in range(2):
      _save(f'{root}/{split}/a/{k}.png', 'RGB', (10, 7), k)
      _save(f'{root}/{split}/b/{k}.jpg', 'L', (10, 7), 5 + k)
  digits_config.data.name = 'image_folder'
  digits_config.data.folder = root
  assert sources.describe(digits_config.data).image_shape == (7, 10, 3)
  folder_index.clear_memo()
  _save(f'{root}/test/b/odd.png', 'RGB', (10, 8), 9)    # one test image of another size
  assert sources.describe(digits_config.data).image_shape == (None, None, 3)


def test_every_image_extension_in_any_case_trains_and_non_images_are_reported(tmp_path):
  root = str(tmp_path / 'formats')
  for k in range(2):
    _save(f'{root}/train/a/{k}.png', 'RGB', (9, 9), k)
  _save(f'{root}/train/a/photo.webp', 'RGB', (9, 9), 3, 'WEBP')
  _save(f'{root}/train/a/scan.TIFF', 'RGB', (9, 9), 4, 'TIFF')   # PIL decodes what TF cannot
  deep = (np.arange(81, dtype=np.uint16).reshape(9, 9) * 800)    # 16-bit grey, full range
  Image.fromarray(deep).save(f'{root}/train/a/grey16.tif')
  _save(f'{root}/train/a/frame.PPM', 'RGB', (9, 9), 6, 'PPM')
  with open(f'{root}/train/a/notes.md', 'w') as f:
    f.write('# not an image\n')
  train = _index(root, 'train', ('a',))
  assert sorted(os.path.basename(p) for p in train.paths) == [
      '0.png', '1.png', 'frame.PPM', 'grey16.tif', 'photo.webp', 'scan.TIFF']
  assert train.skipped == (('train/a/notes.md', 'not an image file'),)
  decoded = {os.path.basename(p): ex['image'] for p, ex in zip(
      train.paths, image_folder.dataset(train, 3).as_numpy_iterator())}
  for name in ('scan.TIFF', 'photo.webp', 'frame.PPM'):
    assert decoded[name].shape == (9, 9, 3)
  np.testing.assert_array_equal(decoded['grey16.tif'][..., 0], deep // 257)
  np.testing.assert_array_equal(decoded['scan.TIFF'],
                                np.asarray(Image.open(f'{root}/train/a/scan.TIFF').convert('RGB')))


def test_different_sizes_without_a_resize_op_is_a_user_error(folder_config):
  folder_config.data.eval_preprocess = ''
  with pytest.raises(UserError, match=r"differ in size( \(.*\))? after "
                                      r"config\.data\.eval_preprocess=''"):
    pipeline.EvalData(folder_config.data, 'test', local_batch_size=4)


def test_folder_errors(tmp_path, folder_config, folder):
  c = folder_config
  c.data.eval_split = 'validation'
  with pytest.raises(UserError, match="Split 'validation' does not exist .*found: test, train"):
    sources.describe(c.data)
  c.data.eval_split = 'test'
  c.data.folder = str(tmp_path / 'nowhere')
  with pytest.raises(UserError, match='does not exist; point config.data.folder'):
    sources.describe(c.data)
  c.data.folder = None
  with pytest.raises(UserError, match='neither config.data.folder nor config.data.manifest is set'):
    sources.describe(c.data)

  empty = str(tmp_path / 'empty_class')
  make_folder(empty, bad_files=False)
  os.makedirs(f'{empty}/train/bird')
  with open(f'{empty}/train/bird/readme.txt', 'w') as f:
    f.write('no images yet')
  c.data.folder = empty
  with pytest.raises(UserError, match='bird of split .train. .* have no readable images'):
    sources.describe(c.data)

  extra = str(tmp_path / 'extra_class')
  make_folder(extra, bad_files=False)
  _save(f'{extra}/test/fox/0.png', 'RGB', (9, 9), 0)
  c.data.folder = extra
  with pytest.raises(UserError, match='classes the model does not know \\(fox\\)'):
    sources.describe(c.data)

  no_classes = str(tmp_path / 'flat')
  _save(f'{no_classes}/train/0.png', 'RGB', (9, 9), 0)
  c.data.folder = no_classes
  with pytest.raises(UserError, match='has no class sub-directories'):
    sources.describe(c.data)

  no_splits = str(tmp_path / 'classes_only')   # <class>/* without hold-out: no eval split
  _save(f'{no_splits}/a/0.png', 'RGB', (9, 9), 0)
  _save(f'{no_splits}/b/0.png', 'RGB', (9, 9), 1)
  c.data.folder = no_splits
  with pytest.raises(UserError, match='set config.data.holdout_fraction'):
    sources.describe(c.data)


def test_even_slices_match_tfds_semantics():
  assert [image_folder.even_slice(10, i, 3, True) for i in range(3)] == [(0, 3), (3, 6), (6, 9)]
  assert [image_folder.even_slice(10, i, 3, False) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]


@pytest.mark.slow
def test_training_from_a_folder_with_bad_files_keeps_class_names(folder_config, tmp_path, caplog):
  from imgcls_jax import train
  folder_index.clear_memo()
  c = folder_config
  c.num_train_steps = 6
  workdir = str(tmp_path / 'run')
  with caplog.at_level(logging.WARNING):
    result = train.train_and_evaluate(c, workdir)
  assert result['count'] == 6
  assert any('skipped 2 file(s)' in r.getMessage() for r in caplog.records)
  metas = glob.glob(os.path.join(workdir, 'checkpoints', '*', 'meta', 'metadata'))
  assert metas
  with open(metas[0]) as f:
    meta = json.load(f)
  assert meta['class_names'] == ['cat', 'dog'] and meta['num_classes'] == 2


@pytest.mark.slow
def test_resuming_on_other_training_images_is_warned_of(folder_config, tmp_path, caplog):
  """A run resumed after its training images changed (a relabelled image, a new one) went on
  from the old model without a word, and a finished run trained nothing more while its report
  read like one of the new data."""
  from imgcls_jax import train
  folder_index.clear_memo()
  c = folder_config
  c.num_train_steps = 4
  c.checkpoint_every_steps = 2
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir)
  said = lambda: [r.getMessage() for r in caplog.records if 'lists other images' in r.getMessage()]
  c.num_train_steps = 6
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(c, workdir)             # the same images: no word
  assert said() == []
  root = c.data.folder
  os.rename(f'{root}/train/cat/rgb_1.jpg', f'{root}/train/dog/rgb_1.jpg')   # relabelled
  folder_index.clear_memo()
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(c, workdir)             # finished: nothing more is trained
  assert said() == [
      f"The training split 'train' of {root} lists other images or labels than the run trained "
      'on until step 6: resuming goes on from the old model (a finished run trains no further); '
      'for a model of these images alone, train in a new --workdir.']


def test_uncached_stream_is_deterministic_and_equals_the_cached_one(folder_config):
  folder_config.data.cache = False  # decoding happens in the stream
  def first_batches():
    ds, _ = pipeline.train_dataset(folder_config.data, seed=3, local_batch_size=6)
    return [b for _, b in zip(range(3), ds.as_numpy_iterator())]
  a, b = first_batches(), first_batches()
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    assert x['image'].shape == (6, 16, 16, 3) and x['mask'].all()
  folder_config.data.cache = True
  cached, _ = pipeline.train_dataset(folder_config.data, seed=3, local_batch_size=6)
  first = next(cached.as_numpy_iterator())
  np.testing.assert_array_equal(first['label'], a[0]['label'])
  np.testing.assert_array_equal(first['image'], a[0]['image'])


def test_links_below_class_folders_are_followed_and_each_real_file_read_once(tmp_path, caplog):
  """A linked sub-folder of a class folder was silently skipped (os.walk without followlinks);
  now it is read, and a second link to it, a link to a file read already and a link to a folder
  above (a loop, which would list another class's images) are passed over and named once."""
  root = str(tmp_path / 'images')
  for split in ('train', 'test'):
    for c in ('a', 'b'):
      for k in range(2):
        _save(f'{root}/{split}/{c}/{k}.png', 'RGB', (9, 9), k)
  for k in range(3):
    _save(f'{tmp_path}/more/{k}.png', 'RGB', (9, 9), 10 + k)
  os.symlink(f'{tmp_path}/more', f'{root}/train/b/extra')
  os.symlink(f'{tmp_path}/more', f'{root}/train/b/extra_again')
  os.symlink('0.png', f'{root}/train/b/copy.png')
  os.symlink('..', f'{root}/train/b/loop')              # -> train/, which holds class a too
  with caplog.at_level(logging.WARNING):
    train = _index(root, 'train')
  assert train.counts == (2, 5)
  assert sorted(i for i in train.ids if i.startswith('train/b/')) == [
      'train/b/0.png', 'train/b/1.png', 'train/b/extra/0.png', 'train/b/extra/1.png',
      'train/b/extra/2.png']
  assert sorted(train.skipped) == [
      ('train/b/copy.png', 'the same file as train/b/0.png, read once'),
      ('train/b/extra_again', 'the same folder as train/b/extra, read once'),
      ('train/b/loop', 'a link to a folder above it, a loop; not followed')]
  said = [r.getMessage() for r in caplog.records if 'skipped 3 file(s)' in r.getMessage()]
  assert len(said) == 1 and 'train/b/extra_again (the same folder as train/b/extra' in said[0]


@pytest.mark.parametrize('layout', ['splits', 'flat'])
def test_a_file_two_class_folders_reach_through_links_is_refused(tmp_path, layout):
  """A folder (or file) linked from two class folders was trained on as both classes."""
  root = str(tmp_path / 'images')
  top = f'{root}/train' if layout == 'splits' else root
  for c in ('a', 'b'):
    for k in range(2):
      _save(f'{top}/{c}/{k}.png', 'RGB', (9, 9), k)
      if layout == 'splits':
        _save(f'{root}/test/{c}/{k}.png', 'RGB', (9, 9), k)
  for k in range(3):
    _save(f'{tmp_path}/shared/{k}.png', 'RGB', (9, 9), 10 + k)
  os.symlink(f'{tmp_path}/shared', f'{top}/a/shared')
  os.symlink(f'{tmp_path}/shared/1.png', f'{top}/a/one.png')   # in one class: read once
  os.symlink(f'{tmp_path}/shared', f'{top}/b/also')
  split = 'train' if layout == 'splits' else 'all'
  src = folder_layout.Source(kind=layout, location=root, root=root, train_split='train',
                             eval_split='test', holdout_fraction=0.0, holdout_seed=0, cache_dir='')
  folder_index.clear_memo()
  with pytest.raises(UserError) as e:
    folder_index.index(src, split, ('a', 'b'))
  rel = 'train/' if layout == 'splits' else ''
  assert str(e.value) == (
      f'{root}/{rel}a/shared/0.png and {root}/{rel}b/also/0.png are one file (through a link) in '
      'two class folders (and 2 more): a single-label image has one class; remove the link from '
      'the wrong class folder (images with several labels: a manifest with '
      'config.data.multilabel=True).')
  os.remove(f'{top}/b/also')
  folder_index.clear_memo()
  assert folder_index.index(src, split, ('a', 'b')).counts == (5, 2)   # a/one.png: read once


def test_the_sizes_of_a_folder_are_named_by_an_example_file_each(tmp_path):
  """'Images ... differ in size' named no file and no size: the index keeps an example file of
  each size, commonest first, for that message."""
  root = str(tmp_path / 'sizes')
  for split in ('train', 'test'):
    for k in range(3):
      _save(f'{root}/{split}/a/{k}.png', 'RGB', (20, 10), k)
    _save(f'{root}/{split}/b/wide.png', 'RGB', (40, 10), 5)
    _save(f'{root}/{split}/b/tall.png', 'RGB', (10, 40), 6)
  train = _index(root, 'train')
  assert train.size_examples == (((10, 20), 'train/a/0.png'), ((10, 40), 'train/b/wide.png'),
                                 ((40, 10), 'train/b/tall.png'))
  assert image_folder.size_examples(train) == (
      'train/a/0.png is 20x10 pixels (width x height), train/b/wide.png 40x10, train/b/tall.png '
      '10x40')
  assert image_folder.size_examples(train, shown=1) == (
      'train/a/0.png is 20x10 pixels (width x height) and 2 more sizes')
  same = str(tmp_path / 'same')
  for c in ('a', 'b'):
    _save(f'{same}/train/{c}/0.png', 'RGB', (9, 9), 0)
  assert image_folder.size_examples(_index(same, 'train')) == ''
