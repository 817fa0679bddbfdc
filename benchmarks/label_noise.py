"""Finding wrong labels in a user's image folder: Fashion-MNIST with a known share changed.

  python -m benchmarks.label_noise [--examples=20000] [--noise=0.05] [--folds=3] [--epochs=4]

Writes ``--examples`` images of Fashion-MNIST's training split (Debian's dataset-fashion-mnist
files, read directly) as PNG files with a CSV manifest in which ``--noise`` of the labels were
changed to another class (uniformly, seeded), then runs the normal train command with k-fold
cross-validation on that manifest, as a user would (``configs/fashion_mnist_quick.py``'s recipe,
fewer epochs), and scores the label-issue list (``cv_label_issues.csv``) against the changes it
made: recall (changed labels flagged), precision (flags that are changes), and how often the
suggested class is the image's real one. Flags among unchanged images are also counted: some are
Fashion-MNIST's own doubtful labels, some the models' mistakes.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDX = '/usr/share/datasets/fashion-mnist'


def read_idx(name: str) -> np.ndarray:
  with gzip.open(os.path.join(IDX, name)) as f:
    data = f.read()
  dims = data[3]
  shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(dims)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_manifest(root: str, n: int, noise: float, seed: int) -> dict[str, tuple[int, int]]:
  """root/img/<i>.png and root/labels.csv; returns {path: (real, written)} of the changed."""
  from PIL import Image
  x, y = read_idx('train-images-idx3-ubyte.gz'), read_idx('train-labels-idx1-ubyte.gz')
  rng = np.random.default_rng(seed)
  keep = np.sort(rng.choice(len(y), n, replace=False))
  x, y = x[keep], y[keep].astype(np.int64)
  changed = rng.choice(n, int(round(noise * n)), replace=False)
  written = y.copy()
  written[changed] = (y[changed] + rng.integers(1, 10, len(changed))) % 10
  os.makedirs(os.path.join(root, 'img'), exist_ok=True)
  lines, flipped = [], {}
  for i in range(n):
    path = f'img/{keep[i]}.png'
    Image.fromarray(x[i]).save(os.path.join(root, path))
    lines.append(f'{path},{written[i]}\n')
    if written[i] != y[i]:
      flipped[path] = (int(y[i]), int(written[i]))
  with open(os.path.join(root, 'labels.csv'), 'w') as f:
    f.write('path,label\n' + ''.join(lines))
  return flipped


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--examples', type=int, default=20000)
  ap.add_argument('--noise', type=float, default=0.05)
  ap.add_argument('--folds', type=int, default=3)
  ap.add_argument('--epochs', type=float, default=4.0)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--workdir', default='')
  args = ap.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix='label_noise_')
  t0 = time.perf_counter()
  flipped = write_manifest(os.path.join(root, 'data'), args.examples, args.noise, args.seed)
  t_write = time.perf_counter() - t0
  cmd = [sys.executable, '-m', 'imgcls_jax.main', f'--config={REPO}/configs/fashion_mnist_quick.py',
         f'--workdir={root}/cv', '--config.data.name=image_folder',
         f'--config.data.manifest={root}/data/labels.csv', '--config.data.train_split=all',
         '--config.data.eval_split=all', f'--config.cross_validation.folds={args.folds}',
         f'--config.num_epochs={args.epochs}', f'--config.eval_every_epochs={args.epochs}',
         f'--config.seed={args.seed}']
  print(' '.join(cmd), flush=True)
  t1 = time.perf_counter()
  subprocess.run(cmd, check=True, cwd=REPO)
  t_cv = time.perf_counter() - t1
  with open(os.path.join(root, 'cv', 'cv_label_issues.csv')) as f:
    found = list(csv.DictReader(f))
  flagged = {r['id'] for r in found}
  hits = flagged & set(flipped)
  back = sum(int(r['suggested']) == flipped[r['id']][0] for r in found if r['id'] in flipped)
  print(f'\n{args.examples} images, {len(flipped)} labels changed ({args.noise:.0%}), '
        f'{args.folds} folds x {args.epochs:g} epochs')
  print(f'flagged {len(flagged)}: {len(hits)} of the changed (recall {len(hits) / len(flipped):.1%}'
        f'), precision {len(hits) / max(len(flagged), 1):.1%}; suggested = real class for '
        f'{back / max(len(hits), 1):.1%} of those; {len(flagged - hits)} unchanged images flagged')
  for k in (100, 500):
    top = [r['id'] for r in found[:k]]
    if len(top) == k:
      print(f'  first {k} of the list: {sum(i in flipped for i in top) / k:.1%} changed labels')
  print(f'wall: writing the PNGs {t_write:.1f} s, cross-validation {t_cv:.1f} s; in {root}')


if __name__ == '__main__':
  main()
