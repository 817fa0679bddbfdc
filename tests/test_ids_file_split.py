"""An id-listed split 'SPLIT@IDS_FILE' whose file lists ids that SPLIT lacks: they are left out
with a warning that counts them and names the split the file was written from."""
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from imgcls_jax.data import folds, reader, sources
from tests.conftest import small_digits_config


@pytest.fixture
def kept(tfds_dir, tmp_path):
  """(the digits config, a cross-validation folder): its cv_kept_ids.txt lists 1792 of the 1797
  ids of 'train+test' (5 flagged), and its cv_report.json says it cut 'train+test'."""
  c = small_digits_config(tfds_dir)
  ids = sorted(sources.example_ids(c.data, 'train+test'))
  assert len(ids) == 1797
  rng = np.random.default_rng(0)
  flagged = set(rng.choice(ids, 5, replace=False))
  (tmp_path / 'cv_kept_ids.txt').write_text(''.join(f'{i}\n' for i in ids if i not in flagged))
  (tmp_path / 'cv_report.json').write_text(json.dumps({'folds': 5, 'split': 'train+test'}))
  return c, tmp_path, flagged


def test_kept_ids_of_train_plus_test_read_as_train_are_counted_and_the_split_named(kept, caplog):
  """Was: train@cv_kept_ids.txt after configs/digits_cv.py (which cuts 'train+test') trained on
  the 1343 kept ids of 'train' and left the 449 kept test ids out with no word."""
  c, cv, flagged = kept
  path = str(cv / 'cv_kept_ids.txt')
  test_ids = set(sources.example_ids(c.data, 'test'))
  dropped = 450 - len(flagged & test_ids)
  c.data.train_split = f'train@{path}'
  with caplog.at_level(logging.WARNING):
    reader.describe(c.data)
    reader.describe(c.data)   # once per process
  assert len(sources.example_ids(c.data, c.data.train_split)) == 1792 - dropped   # read
  message = (f"config.data.train_split='train@{path}': {dropped} of the 1792 ids {path} lists "
             f"are not in split 'train' of sklearn_digits and are left out (the other "
             f"{1792 - dropped} are read); the file was written from split 'train+test' "
             f"({cv / 'cv_report.json'}): set config.data.train_split='train+test@{path}' to "
             "read them all, or keep 'train' if leaving them out is meant.")
  assert caplog.text.count(message) == 1, caplog.text
  # The split it was written from: every id is read, nothing to say.
  caplog.clear()
  c.data.train_split = f'train+test@{path}'
  with caplog.at_level(logging.WARNING):
    reader.describe(c.data)
  assert 'are left out' not in caplog.text
  assert folds.check_listed(c.data, c.data.train_split) == 0


def _write(root, split, names):
  for n in names:
    os.makedirs(os.path.join(root, split, n[0]), exist_ok=True)
    Image.new('L', (8, 8), 40 * int(n[0])).save(os.path.join(root, split, n[0], f'{n}.png'))


def test_a_folders_eval_split_listing_other_files_is_warned_of_without_a_report(tmp_path, caplog):
  """An image folder's ids are paths: the eval split's file lists training files too, and no
  cross-validation report says where it came from."""
  root = str(tmp_path / 'images')
  _write(root, 'train', ['0a', '0b', '1a', '1b'])
  _write(root, 'test', ['0c', '1c'])
  ids_file = tmp_path / 'ids.txt'
  ids_file.write_text('test/0/0c.png\ntest/1/1c.png\ntrain/0/0a.png\ntrain/1/1a.png\n'
                      'test/1/gone.png\n')
  c = small_digits_config(str(tmp_path / 'tfds'))
  c.data.name, c.data.folder = 'image_folder', root
  c.data.train_split, c.data.eval_split = 'train', f'test@{ids_file}'
  c.data.train_preprocess = ''
  with caplog.at_level(logging.WARNING):
    info = reader.describe(c.data)
  assert info.num_examples[c.data.eval_split] == 2
  assert (f"config.data.eval_split='test@{ids_file}': 3 of the 5 ids {ids_file} lists are not "
          f"in split 'test' of image_folder:{root} and are left out (the other 2 are read); name "
          "the split the file was written from before its '@' to read them all, or list only "
          "ids of 'test' in it.") in caplog.text
