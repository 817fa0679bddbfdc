"""Builds "Fashion-MNIST collage", a multi-label benchmark made of real Fashion-MNIST garments.

Each image is 56 x 56 grayscale, a 2 x 2 grid of 28 x 28 cells holding 1 to 4 garments (the count
uniform in 1..4, the cells and the garments drawn at random with a seed; empty cells are black).
Its labels are the set of classes present (a class shown twice is listed once). Train collages use
the Fashion-MNIST train images except the last ``HOLDOUT`` (5,000); the validation collages (for
choosing per-class thresholds) use those held-out ones only; test collages use the test split.

Command (defaults: 60,000 train, 5,000 validation, 10,000 test collages: 30 s on 2
cores, 10 s of it loading TensorFlow and Fashion-MNIST; 300 MB on disk):
  python -m imgcls_jax.data.prepare_collage --out=DIR [--train=N] [--validation=N] [--test=N]
      [--seed=S] [--data_dir=TFDS_DIR]
writes ``DIR/images/<split>/<index>.png``, ``DIR/manifest.csv`` (``path,labels,split``; labels are
class names joined by ';'; paths relative to the CSV), ``DIR/README.txt`` and ``DIR/collage.json``
(the parameters). Run again with the same parameters, it does nothing. Train on it with
``--config.data.manifest=DIR/manifest.csv --config.data.multilabel=True``.

The source is the standard tfds ``fashion_mnist`` builder, prepared offline from Debian's files by
``prepare_fashion_mnist.prepare``.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from typing import Mapping

import numpy as np

from imgcls_jax import atomic
from imgcls_jax.errors import UserError

CELL = 28
GRID = 2
SIZE = CELL * GRID
HOLDOUT = 5000                      # the last train images, kept for the validation collages
SPLITS = ('train', 'validation', 'test')
DEFAULT_COUNTS = {'train': 60000, 'validation': 5000, 'test': 10000}
FORMAT = 1                          # bump when the same parameters would give other images


def pools(num_train: int, num_test: int) -> dict[str, tuple[str, int, int]]:
  """Per collage split, the source images it draws from: (tfds split, first index, end index)."""
  if num_train <= HOLDOUT:
    raise UserError(f'The Fashion-MNIST train split has {num_train} images, not more than the '
                    f'{HOLDOUT} held out for validation; re-prepare it with prepare_fashion_mnist.')
  return {'train': ('train', 0, num_train - HOLDOUT),
          'validation': ('train', num_train - HOLDOUT, num_train),
          'test': ('test', 0, num_test)}


def plan(split: str, count: int, seed: int, lo: int, hi: int) -> np.ndarray:
  """The placement plan of one split: ``count x 4`` source indices (into the tfds split, within
  [lo, hi)) by cell (row-major: top-left, top-right, bottom-left, bottom-right), -1 where empty.

  The garments of one collage are distinct images; each split has its own random stream (seed,
  split), so changing one split's count leaves the others unchanged.
  """
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  n_M = rng.integers(1, GRID * GRID + 1, count)
  cell_Mx4 = np.argsort(rng.random((count, GRID * GRID)), axis=1)   # a random order of the cells
  src_Mx4 = rng.integers(lo, hi, (count, GRID * GRID))
  used_Mx4 = np.arange(GRID * GRID)[None, :] < n_M[:, None]
  while True:  # redraw the (rare) collages that would show one image twice
    s = np.sort(np.where(used_Mx4, src_Mx4, -1 - np.arange(GRID * GRID)), axis=1)
    dup = np.any(s[:, 1:] == s[:, :-1], axis=1)
    if not dup.any():
      break
    src_Mx4[dup] = rng.integers(lo, hi, (int(dup.sum()), GRID * GRID))
  out = np.full((count, GRID * GRID), -1, np.int64)
  rows = np.repeat(np.arange(count)[:, None], GRID * GRID, axis=1)
  out[rows[used_Mx4], cell_Mx4[used_Mx4]] = src_Mx4[used_Mx4]
  return out


def compose(cells_4: np.ndarray, images_Nx28x28: np.ndarray) -> np.ndarray:
  """The 56 x 56 uint8 collage of one plan row (empty cells black)."""
  img = np.zeros((SIZE, SIZE), np.uint8)
  for c, src in enumerate(cells_4):
    if src >= 0:
      r, q = divmod(c, GRID)
      img[r * CELL:(r + 1) * CELL, q * CELL:(q + 1) * CELL] = images_Nx28x28[src]
  return img


def load_fashion_mnist(data_dir: str | None = None) -> dict[str, object]:
  """Fashion-MNIST through tfds: ``{'train': (images Nx28x28, labels N), 'test': ...,
  'class_names': [...]}`` (prepared from Debian's files first if needed)."""
  from imgcls_jax.data import tf_import  # noqa: F401  (before tensorflow_datasets: no Keras)
  import tensorflow_datasets as tfds

  from imgcls_jax.data import prepare_fashion_mnist
  prepare_fashion_mnist.prepare(data_dir)
  out: dict[str, object] = {}
  for split in ('train', 'test'):
    ds, info = tfds.load('fashion_mnist', split=split, batch_size=-1, data_dir=data_dir,
                         with_info=True)
    d = tfds.as_numpy(ds)
    out[split] = (d['image'][..., 0], d['label'].astype(np.int64))
  out['class_names'] = list(info.features['label'].names)
  return out


def _params(counts: Mapping[str, int], seed: int) -> dict[str, int]:
  return {**{s: int(counts[s]) for s in SPLITS}, 'seed': int(seed), 'holdout': HOLDOUT,
          'format': FORMAT}


def check_args(out: str, counts: Mapping[str, int], seed: int) -> bool:
  """Validates the arguments against ``out``; True when ``out`` already holds this collage."""
  if not out:
    raise UserError('No output directory was given; pass --out=DIR.')
  if counts['train'] < 1 or counts['validation'] < 0 or counts['test'] < 0:
    raise UserError(f'Collage counts must be train >= 1, validation >= 0, test >= 0 (got '
                    f"{counts['train']}, {counts['validation']}, {counts['test']}); fix them.")
  if seed < 0:
    raise UserError(f'--seed must be a non-negative integer (got {seed}); fix it.')
  marker = os.path.join(out, 'collage.json')
  if os.path.isfile(marker):
    with open(marker) as f:
      old = json.load(f)
    if old == _params(counts, seed):
      return os.path.isfile(os.path.join(out, 'manifest.csv'))
    if os.path.isfile(os.path.join(out, 'manifest.csv')):
      raise UserError(f'{out} already holds a collage built with other parameters ({old}); pass '
                      'another --out or delete that directory.')
  elif os.path.isdir(out) and os.listdir(out):
    raise UserError(f'{out} exists and does not hold a collage; pass an empty or new --out.')
  return False


def build(out: str, counts: Mapping[str, int] | None = None, seed: int = 0,
          data_dir: str | None = None, source: Mapping[str, object] | None = None) -> bool:
  """Writes the collage into ``out``; False (nothing done) when it already holds the same one.

  ``source``: ``load_fashion_mnist``'s result, to reuse one already loaded.
  """
  counts = {**DEFAULT_COUNTS, **(counts or {})}
  if check_args(out, counts, seed):
    return False
  source = source or load_fashion_mnist(data_dir)
  names = list(source['class_names'])
  (train_x, train_y), (test_x, test_y) = source['train'], source['test']
  data = {'train': (train_x, train_y), 'test': (test_x, test_y)}
  split_pools = pools(len(train_x), len(test_x))
  shutil.rmtree(os.path.join(out, 'images'), ignore_errors=True)   # a build of ours cut short
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'collage.json'), 'w') as f:
    json.dump(_params(counts, seed), f, indent=1)
  from PIL import Image
  rows, garments = [], np.zeros(GRID * GRID + 1, np.int64)
  for split in SPLITS:
    tfds_split, lo, hi = split_pools[split]
    x, y = data[tfds_split]
    cells = plan(split, counts[split], seed, lo, hi)
    os.makedirs(os.path.join(out, 'images', split), exist_ok=True)
    for i, row in enumerate(cells):
      rel = f'images/{split}/{i:06d}.png'
      Image.fromarray(compose(row, x), 'L').save(os.path.join(out, rel), compress_level=1)
      present = sorted({int(y[s]) for s in row if s >= 0})
      rows.append((rel, ';'.join(names[c] for c in present), split))
      garments[int((row >= 0).sum())] += 1
  _write_readme(out, counts, seed, names, split_pools, garments)
  def write(path: str) -> None:
    with open(path, 'w', newline='') as f:
      w = csv.writer(f)
      w.writerow(('path', 'labels', 'split'))
      w.writerows(rows)
  atomic.write_atomic(os.path.join(out, 'manifest.csv'), write)   # last: it marks the set whole
  return True


def _write_readme(out: str, counts: Mapping[str, int], seed: int, names: list[str],
                  split_pools: Mapping[str, tuple[str, int, int]], garments: np.ndarray) -> None:
  src = '\n'.join(f'  {s}: {counts[s]} collages from Fashion-MNIST {t} images [{lo}, {hi})'
                  for s, (t, lo, hi) in split_pools.items())
  text = f"""Fashion-MNIST collage: a multi-label image classification benchmark.

Built by `python -m imgcls_jax.data.prepare_collage --out=DIR --train={counts['train']} \
--validation={counts['validation']} --test={counts['test']} --seed={seed}`.

Each image is 56 x 56 grayscale (PNG), a 2 x 2 grid of 28 x 28 cells holding 1 to 4 real
Fashion-MNIST garments (the number uniform in 1..4, cells and images drawn at random with seed
{seed}; the garments of one image are distinct images; empty cells are black). The labels of an
image are the set of classes shown (a class shown twice is listed once).

Splits (the validation collages use only the last {HOLDOUT} train images, which no train collage
uses; the test collages use only the test split):
{src}

Images with 1 / 2 / 3 / 4 garments: {' / '.join(str(int(g)) for g in garments[1:])}
Classes ({len(names)}): {'; '.join(names)}

manifest.csv: path,labels,split; paths relative to it; labels are class names joined by ';'.
Train with --config.data.manifest=DIR/manifest.csv --config.data.multilabel=True (DIR: here).
"""
  with open(os.path.join(out, 'README.txt'), 'w') as f:
    f.write(text)


def main(argv: list[str]) -> int:
  from absl import flags
  fv = flags.FlagValues()
  out = flags.DEFINE_string('out', None, 'Output directory.', flag_values=fv)
  counts = {s: flags.DEFINE_integer(s, DEFAULT_COUNTS[s], f'Number of {s} collages.',
                                    flag_values=fv) for s in SPLITS}
  seed = flags.DEFINE_integer('seed', 0, 'Random seed of the placement.', flag_values=fv)
  data_dir = flags.DEFINE_string('data_dir', None, 'tfds data_dir (default: tfds default).',
                                 flag_values=fv)
  if any(a in ('--help', '-h', '--helpfull') for a in argv[1:]):
    print(f"{(__doc__ or '').strip()}\n\nFlags:\n{fv.get_help(prefix='  ')}")
    return 0
  start = time.time()
  try:
    fv(argv)
    n = {s: c.value for s, c in counts.items()}
    if not build(out.value or '', n, seed.value, data_dir.value):
      print(f'{out.value} already holds this collage ({n}, seed {seed.value}); nothing to do.')
      return 0
  except (UserError, flags.Error) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {sum(n.values())} collages and {os.path.join(out.value, "manifest.csv")} in '
        f'{time.time() - start:.0f} s')
  return 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.exit(main(sys.argv))
