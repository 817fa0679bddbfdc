"""Finding wrong labels in a user's image folder: Fashion-MNIST with a known share changed.

  python -m benchmarks.label_noise [--examples=20000] [--noise=0.05] [--folds=3] [--epochs=4]
      [--relabel=N] [--tagging]

Writes ``--examples`` images of Fashion-MNIST's training split (Debian's dataset-fashion-mnist
files, read directly) as PNG files with a CSV manifest (split ``train``) in which ``--noise`` of
the labels were changed to another class (uniformly, seeded), plus the 10k test images with their
own labels (split ``test``). Then, as a user would, with ``configs/fashion_mnist_quick.py``'s
recipe (fewer epochs):
1. the normal train command with k-fold cross-validation of ``train``; the label-issue list
   (``cv_label_issues.csv``) is scored against the changes made: recall (changed labels flagged),
   precision (flags that are changes), how often the suggested class is the real one. Flags among
   unchanged images are some of Fashion-MNIST's own doubtful labels and some models' mistakes;
2. two plain runs evaluated on ``test``: on all of ``train``, and on ``train@cv_kept_ids.txt``
   (the flagged images left out), the same epochs;
3. with ``--relabel=N``: ``python -m imgcls_jax.relabel`` applies the first N rows' suggested
   classes to a copy of the manifest, scored against the changes (fixed / broken), and a third
   plain run trains on it.

``--tagging``: the same for a tagging run, on ``--examples`` Fashion-MNIST collages
(``imgcls_jax/data/prepare_collage.py``, 56x56 images of 1-4 garments tagged with their classes;
10k test collages from the test split) in which ``--noise`` of the training images had one tag
changed: a tag drawn uniformly from the 10, dropped when the image has it, added when not. Trained
with ``configs/fashion_mnist_collage.py``; scored as above, plus how often the row names the
changed tag the right way round (``missing`` for a dropped tag, ``extra`` for an added one); the
test figure is mAP.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
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
  """root/img/<i>.png, root/test/<i>.png and root/labels.csv (path,label,split); returns
  {path: (real, written)} of the changed training labels."""
  from PIL import Image
  x, y = read_idx('train-images-idx3-ubyte.gz'), read_idx('train-labels-idx1-ubyte.gz')
  rng = np.random.default_rng(seed)
  keep = np.sort(rng.choice(len(y), n, replace=False))
  x, y = x[keep], y[keep].astype(np.int64)
  changed = rng.choice(n, int(round(noise * n)), replace=False)
  written = y.copy()
  written[changed] = (y[changed] + rng.integers(1, 10, len(changed))) % 10
  os.makedirs(os.path.join(root, 'img'), exist_ok=True)
  os.makedirs(os.path.join(root, 'test'), exist_ok=True)
  lines, flipped = [], {}
  for i in range(n):
    path = f'img/{keep[i]}.png'
    Image.fromarray(x[i]).save(os.path.join(root, path))
    lines.append(f'{path},{written[i]},train\n')
    if written[i] != y[i]:
      flipped[path] = (int(y[i]), int(written[i]))
  xt, yt = read_idx('t10k-images-idx3-ubyte.gz'), read_idx('t10k-labels-idx1-ubyte.gz')
  for i in range(len(yt)):
    path = f'test/{i}.png'
    Image.fromarray(xt[i]).save(os.path.join(root, path))
    lines.append(f'{path},{yt[i]},test\n')
  with open(os.path.join(root, 'labels.csv'), 'w') as f:
    f.write('path,label,split\n' + ''.join(lines))
  return flipped


def write_tag_manifest(root: str, n: int, noise: float, seed: int) -> dict[str, tuple[str, str]]:
  """root/images/..., root/manifest.csv (the collage, ``n`` train / 2,000 validation / 10,000
  test) and root/labels.csv, its copy with one tag changed on ``noise`` of the train rows;
  returns {path: ('missing' | 'extra', tag)} of the changes (a dropped tag is missing)."""
  from imgcls_jax.data import prepare_collage
  prepare_collage.build(root, counts={'train': n, 'validation': 2000, 'test': 10000}, seed=seed)
  with open(os.path.join(root, 'manifest.csv'), newline='') as f:
    rows = list(csv.reader(f))
  names = sorted({t for r in rows[1:] for t in r[1].split(';') if t})
  rng = np.random.default_rng(seed)
  changed = {}
  for i in rng.choice([i for i, r in enumerate(rows) if r[2] == 'train'],
                      int(round(noise * n)), replace=False):
    tags, tag = {t for t in rows[i][1].split(';') if t}, names[rng.integers(len(names))]
    changed[rows[i][0]] = ('missing' if tag in tags else 'extra', tag)
    rows[i][1] = ';'.join(sorted(tags ^ {tag}))
  with open(os.path.join(root, 'labels.csv'), 'w', newline='') as f:
    csv.writer(f).writerows(rows)
  return changed


def train(root: str, workdir: str, epochs: float, seed: int, *extra: str,
          config: str = 'fashion_mnist_quick.py', metric: str = 'accuracy',
          manifest: str = 'labels.csv') -> tuple[float, float]:
  """One run of ``config``'s recipe on the manifest; (its final test ``metric``, wall seconds)."""
  cmd = [sys.executable, '-m', 'imgcls_jax.main', f'--config={REPO}/configs/{config}',
         f'--workdir={workdir}', '--config.data.name=image_folder',
         f'--config.data.manifest={root}/data/{manifest}', '--config.data.train_split=train',
         '--config.data.eval_split=test', f'--config.num_epochs={epochs}',
         f'--config.eval_every_epochs={epochs}', f'--config.seed={seed}', *extra]
  print(' '.join(cmd), flush=True)
  t = time.perf_counter()
  subprocess.run(cmd, check=True, cwd=REPO)
  wall = time.perf_counter() - t
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):   # cross-validation: fold_<i>/metrics.jsonl, cv_report.json
    return float('nan'), wall
  with open(path) as f:
    evals = [r for r in map(json.loads, f) if r.get('split') == 'eval']
  return evals[-1][metric], wall


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--examples', type=int, default=20000)
  ap.add_argument('--noise', type=float, default=0.05)
  ap.add_argument('--folds', type=int, default=3)
  ap.add_argument('--epochs', type=float, default=4.0)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--workdir', default='')
  ap.add_argument('--relabel', type=int, default=0,
                  help='apply the first N suggestions (imgcls_jax.relabel) and train on that')
  ap.add_argument('--tagging', action='store_true',
                  help='Fashion-MNIST collages with one tag changed (see the docstring)')
  args = ap.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix='label_noise_')
  if args.tagging:
    return tagging(args, root)
  t0 = time.perf_counter()
  flipped = write_manifest(os.path.join(root, 'data'), args.examples, args.noise, args.seed)
  t_write = time.perf_counter() - t0
  cv_dir = os.path.join(root, 'cv')
  _, t_cv = train(root, cv_dir, args.epochs, args.seed,
                  f'--config.cross_validation.folds={args.folds}')
  with open(os.path.join(cv_dir, 'cv_label_issues.csv')) as f:
    found = list(csv.DictReader(f))
  flagged = {r['id'] for r in found}
  hits = flagged & set(flipped)
  back = sum(int(r['suggested']) == flipped[r['id']][0] for r in found if r['id'] in flipped)
  noisy, t_noisy = train(root, os.path.join(root, 'all'), args.epochs, args.seed)
  cleaned, t_clean = train(root, os.path.join(root, 'kept'), args.epochs, args.seed,
                           f'--config.data.train_split=train@{cv_dir}/cv_kept_ids.txt')
  print(f'\n{args.examples} training images, {len(flipped)} labels changed ({args.noise:.0%}), '
        f'{args.folds} folds x {args.epochs:g} epochs')
  print(f'flagged {len(flagged)}: {len(hits)} of the changed (recall {len(hits) / len(flipped):.1%}'
        f'), precision {len(hits) / max(len(flagged), 1):.1%}; suggested = real class for '
        f'{back / max(len(hits), 1):.1%} of those; {len(flagged - hits)} unchanged images flagged')
  for k in (100, 500):
    top = [r['id'] for r in found[:k]]
    if len(top) == k:
      print(f'  first {k} of the list: {sum(i in flipped for i in top) / k:.1%} changed labels')
  print(f'test top-1 (10k clean labels), {args.epochs:g} epochs: all {args.examples} training '
        f'images {noisy:.2%} ({t_noisy:.0f} s); the {args.examples - len(flagged)} not flagged '
        f'{cleaned:.2%} ({t_clean:.0f} s)')
  if args.relabel:
    from imgcls_jax import relabel
    done = relabel.relabel(os.path.join(cv_dir, 'cv_label_issues.csv'),
                           os.path.join(root, 'data', 'labels.csv'), f'1-{args.relabel}')
    fixed = sum(i in flipped and int(new) == flipped[i][0] for _, i, _, new in done['relabelled'])
    broken = sum(i not in flipped for _, i, _, _ in done['relabelled'])
    fixed_acc, t_fixed = train(root, os.path.join(root, 'relabelled'), args.epochs, args.seed,
                               manifest='labels.relabelled.csv')
    print(f'relabelled the first {args.relabel}: {fixed} changed labels set back to the real '
          f'class, {broken} unchanged labels changed; test top-1 {fixed_acc:.2%} '
          f'({t_fixed:.0f} s)')
  print(f'wall: writing the PNGs {t_write:.1f} s, cross-validation {t_cv:.1f} s; in {root}')


def tagging(args: argparse.Namespace, root: str) -> None:
  """``--tagging``: the collage with changed tags, cross-validated, scored, retrained."""
  t0 = time.perf_counter()
  changed = write_tag_manifest(os.path.join(root, 'data'), args.examples, args.noise, args.seed)
  t_write = time.perf_counter() - t0
  cv_dir = os.path.join(root, 'cv')
  run = {'config': 'fashion_mnist_collage.py', 'metric': 'map'}
  _, t_cv = train(root, cv_dir, args.epochs, args.seed,
                  f'--config.cross_validation.folds={args.folds}', **run)
  with open(os.path.join(cv_dir, 'cv_label_issues.csv'), newline='') as f:
    found = list(csv.DictReader(f))
  hits = [r for r in found if r['id'] in changed]
  named = sum(changed[r['id']][1] in r[changed[r['id']][0]].split(';') for r in hits)
  noisy, t_noisy = train(root, os.path.join(root, 'all'), args.epochs, args.seed, **run)
  cleaned, t_clean = train(root, os.path.join(root, 'kept'), args.epochs, args.seed,
                           f'--config.data.train_split=train@{cv_dir}/cv_kept_ids.txt', **run)
  print(f'\n{args.examples} training collages, {len(changed)} with one tag changed '
        f'({args.noise:.0%}: {sum(k == "missing" for k, _ in changed.values())} dropped, '
        f'{sum(k == "extra" for k, _ in changed.values())} added), {args.folds} folds x '
        f'{args.epochs:g} epochs')
  print(f'flagged {len(found)}: {len(hits)} of the changed (recall {len(hits) / len(changed):.1%}'
        f'), precision {len(hits) / max(len(found), 1):.1%}; the changed tag named, the right way '
        f'round, for {named / max(len(hits), 1):.1%} of those')
  for k in (100, 500):
    if len(found) >= k:
      print(f'  first {k} of the list: {sum(r["id"] in changed for r in found[:k]) / k:.1%} '
            'changed')
  print(f'test mAP (10k collages, clean tags), {args.epochs:g} epochs: all {args.examples} '
        f'{noisy:.2%} ({t_noisy:.0f} s); the {args.examples - len(found)} not flagged '
        f'{cleaned:.2%} ({t_clean:.0f} s)')
  print(f'wall: writing the PNGs {t_write:.1f} s, cross-validation {t_cv:.1f} s; in {root}')


if __name__ == '__main__':
  main()
