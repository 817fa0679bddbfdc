"""The Fashion-MNIST collage (data/prepare_collage.py): every cell is a real source image of the
right split, the labels are the set of garments shown, seeded, idempotent, clear argument errors."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imgcls_jax.data import prepare_collage, prepare_fashion_mnist
from tests.conftest import REPO, subprocess_env

HAVE_DEBIAN_FILES = all(os.path.isfile(os.path.join(prepare_fashion_mnist.DEBIAN_DIR, f))
                        for f in prepare_fashion_mnist.FILES)
pytestmark = pytest.mark.skipif(not HAVE_DEBIAN_FILES,
                                reason='apt-get install -y dataset-fashion-mnist (.ci/run does)')
COUNTS = {'train': 64, 'validation': 16, 'test': 32}


@pytest.fixture(scope='module')
def fmnist(fmnist_dir):
  """(tfds data_dir, the oracle: Fashion-MNIST read straight through tfds). The data_dir is the
  session's, prepared once by the documented command (tests/conftest.py)."""
  import tensorflow_datasets as tfds
  data_dir = fmnist_dir
  oracle = {}
  for split in ('train', 'test'):
    ds, info = tfds.load('fashion_mnist', split=split, batch_size=-1, data_dir=data_dir,
                         with_info=True)
    d = tfds.as_numpy(ds)
    oracle[split] = (d['image'][..., 0], d['label'])
  oracle['names'] = info.features['label'].names
  return data_dir, oracle


@pytest.fixture(scope='module')
def built(fmnist, tmp_path_factory):
  data_dir, _ = fmnist
  out = str(tmp_path_factory.mktemp('collage') / 'c')
  source = prepare_collage.load_fashion_mnist(data_dir)
  assert prepare_collage.build(out, COUNTS, seed=3, source=source)
  return out, source


def _lookup(images, labels):
  """image bytes -> set of the labels of the source images with exactly those pixels."""
  table = {}
  for img, label in zip(images, labels):
    table.setdefault(img.tobytes(), set()).add(int(label))
  return table


def _manifest(out):
  with open(os.path.join(out, 'manifest.csv'), newline='') as f:
    rows = list(csv.reader(f))
  return rows[0], rows[1:]


def test_cells_are_source_images_of_the_right_split_and_labels_are_their_set(fmnist, built):
  _, oracle = fmnist
  out, _ = built
  (train_x, train_y), (test_x, test_y) = oracle['train'], oracle['test']
  held = len(train_x) - 5000
  pools = {'train': _lookup(train_x[:held], train_y[:held]),
           'validation': _lookup(train_x[held:], train_y[held:]),
           'test': _lookup(test_x, test_y)}
  header, rows = _manifest(out)
  assert header == ['path', 'labels', 'split']
  assert [r[2] for r in rows] == ['train'] * 64 + ['validation'] * 16 + ['test'] * 32
  garments_per_image = {s: [] for s in COUNTS}
  for path, labels, split in rows:
    assert path.startswith(f'images/{split}/') and path.endswith('.png')
    img = Image.open(os.path.join(out, path))
    assert img.mode == 'L' and img.size == (56, 56)
    a = np.asarray(img)
    shown = []
    for r in range(2):
      for c in range(2):
        cell = a[28 * r:28 * r + 28, 28 * c:28 * c + 28]
        if not cell.any():
          continue
        assert cell.tobytes() in pools[split], f'{path}: a cell is no {split} source image'
        shown.append(pools[split][cell.tobytes()])
    garments_per_image[split].append(len(shown))
    names = labels.split(';')
    assert len(names) == len(set(names))
    # Each shown garment's class is listed (a source duplicated under two labels: either one).
    label_ids = {oracle['names'].index(n) for n in names}
    assert all(ids & label_ids for ids in shown), path
    assert label_ids <= set().union(*shown), path
    if all(len(ids) == 1 for ids in shown):
      assert label_ids == set().union(*shown), path
  for split, counts in garments_per_image.items():
    assert min(counts) >= 1 and max(counts) <= 4
  assert set(garments_per_image['train']) == {1, 2, 3, 4}
  readme = open(os.path.join(out, 'README.txt')).read()
  assert 'seed 3' in readme or '--seed=3' in readme


def test_seeded(fmnist, built, tmp_path):
  out, source = built
  same, other = str(tmp_path / 'same'), str(tmp_path / 'other')
  assert prepare_collage.build(same, COUNTS, seed=3, source=source)
  assert prepare_collage.build(other, COUNTS, seed=4, source=source)
  files = sorted(os.path.relpath(os.path.join(d, f), out)
                 for d, _, fs in os.walk(out) for f in fs)
  assert len(files) == 64 + 16 + 32 + 3
  for rel in files:
    with open(os.path.join(out, rel), 'rb') as a, open(os.path.join(same, rel), 'rb') as b:
      assert a.read() == b.read(), rel
  differ = sum(open(os.path.join(out, f'images/test/{i:06d}.png'), 'rb').read() !=
               open(os.path.join(other, f'images/test/{i:06d}.png'), 'rb').read()
               for i in range(32))
  assert differ >= 30
  # One split's count leaves the other splits' collages as they were.
  fewer = str(tmp_path / 'fewer')
  assert prepare_collage.build(fewer, {**COUNTS, 'test': 5}, seed=3, source=source)
  for rel in files:
    if rel.startswith('images/train/'):
      with open(os.path.join(out, rel), 'rb') as a, open(os.path.join(fewer, rel), 'rb') as b:
        assert a.read() == b.read(), rel


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'imgcls_jax.data.prepare_collage', *args],
                        capture_output=True, text=True, env=subprocess_env(), cwd=REPO,
                        timeout=600)


def test_command_is_idempotent_and_rejects_bad_arguments(fmnist, tmp_path):
  data_dir, _ = fmnist
  out = str(tmp_path / 'c')
  args = [f'--out={out}', '--train=8', '--validation=0', '--test=4', f'--data_dir={data_dir}']
  first = _cli(*args)
  assert first.returncode == 0, first.stderr[-2000:]
  assert 'wrote 12 collages' in first.stdout
  stamp = os.stat(os.path.join(out, 'manifest.csv')).st_mtime_ns
  again = _cli(*args)
  assert again.returncode == 0 and 'nothing to do' in again.stdout
  assert os.stat(os.path.join(out, 'manifest.csv')).st_mtime_ns == stamp
  for bad, message in (([f'--out={out}', '--train=8', '--validation=0', '--test=4', '--seed=1'],
                        'other parameters'),
                       ([f'--out={tmp_path / "d"}', '--train=0'], 'train >= 1'),
                       (['--train=5'], 'pass --out'),
                       ([f'--out={tmp_path / "d"}', '--seed=-1'], 'non-negative'),
                       ([f'--out={tmp_path / "d"}', '--colour=red'], 'Unknown command line flag')):
    r = _cli(*bad)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().startswith('error:') and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
  with open(os.path.join(tmp_path, 'stray.txt'), 'w') as f:
    f.write('x')
  r = _cli(f'--out={tmp_path}', '--train=4')
  assert r.returncode == 2 and 'does not hold a collage' in r.stderr


def test_a_missing_collage_manifest_is_named_with_the_command_that_writes_it(tmp_path):
  from configs import fashion_mnist_collage
  from imgcls_jax.data import folder_layout
  from imgcls_jax.errors import UserError
  c = fashion_mnist_collage.get_config()
  c.data.manifest = str(tmp_path / 'fashion_mnist_collage' / 'manifest.csv')
  with pytest.raises(UserError, match=(
      r'does not exist; write it with python -m imgcls_jax.data.prepare_collage '
      f'--out={tmp_path}/fashion_mnist_collage, or point it at another CSV file')):
    folder_layout.source_of(c.data)
  c.data.manifest = str(tmp_path / 'mine.csv')   # any other manifest: no such command
  with pytest.raises(UserError, match='does not exist; point it at a CSV file of path,label'):
    folder_layout.source_of(c.data)
