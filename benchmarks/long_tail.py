"""Long-tailed Fashion-MNIST: does class balancing raise balanced accuracy?

  python -m benchmarks.long_tail [--epochs=20] [--seed=0] [--variants=plain,balanced,sampling]

The training split is subsampled so that class k keeps ``6000 * 0.5**k`` images (seeded; 6000,
3000, ..., 11: 1:512 from the largest to the smallest class, 11,985 images), written as an id list
and trained through ``data.train_split='train@<ids>'``; evaluation is the full, balanced 10k test
split. Each variant trains ``configs/fashion_mnist_quick.py`` for the same number of epochs (the
same steps) with only the loss changed, then prints top-1, balanced accuracy and the recall of
the three rarest classes. Runs one after the other on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    'plain': [],
    'balanced': ['--config.loss.class_weights=balanced'],
    'focal': ['--config.loss.focal_gamma=2.0'],
    'balanced_focal': ['--config.loss.class_weights=balanced', '--config.loss.focal_gamma=2.0'],
    'logit_adjusted': ['--config.loss.logit_adjustment=1.0', '--config.label_smoothing=0'],
    'sampling': ['--config.data.balanced_sampling=True'],
    'plain_ls0': ['--config.label_smoothing=0'],          # the baselines of logit_adjusted
    'balanced_ls0': ['--config.loss.class_weights=balanced', '--config.label_smoothing=0'],
}


def long_tail_ids(path: str, seed: int) -> list[int]:
  """Writes the subsampled training ids to ``path``; returns the per-class counts."""
  sys.path.insert(0, REPO)
  from configs import fashion_mnist_quick
  from imgcls_jax.data import folds
  ids, labels = folds.read_ids_and_labels(fashion_mnist_quick.base_config().data, 'train')
  rng = np.random.default_rng(seed)
  keep = []
  for k in range(10):
    members = np.flatnonzero(labels == k)
    keep += list(rng.choice(members, int(6000 * 0.5**k), replace=False))
  keep = sorted(keep)
  folds.write_ids(path, [ids[i] for i in keep])
  return np.bincount(labels[keep], minlength=10).tolist()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--epochs', type=float, default=20.0)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--cpu_devices', type=int, default=1,
                 help='CPU devices (1: immune to the 2-device collective hang seen under load)')
  p.add_argument('--variants', default='plain,balanced,sampling,logit_adjusted,focal')
  p.add_argument('--out', default=os.path.join(tempfile.gettempdir(), 'long_tail'))
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  ids_file = os.path.join(args.out, f'train_ids_seed{args.seed}.txt')
  if os.path.exists(ids_file):
    os.remove(ids_file)
  counts = long_tail_ids(ids_file, args.seed)
  print(f'training images per class: {counts} (total {sum(counts)})', flush=True)
  rows = []
  for name in args.variants.split(','):
    workdir = os.path.join(args.out, f'{name}_seed{args.seed}')
    cmd = [sys.executable, '-m', 'imgcls_jax.main', '--config=configs/fashion_mnist_quick.py',
           f'--workdir={workdir}', f'--config.data.train_split=train@{ids_file}',
           # id-listed splits and balanced sampling are tf.data's: the tfds dataset, not arrays
           '--config.data.name=fashion_mnist',
           f'--config.num_epochs={args.epochs}', f'--config.seed={args.seed}',
           '--config.eval_every_epochs=100', f'--config.mesh.cpu_devices={args.cpu_devices}',
           *VARIANTS[name]]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
      raise SystemExit(f'{name} failed (exit {proc.returncode}); rerun resumes it:\n'
                       f'{proc.stderr[-3000:]}')
    train_s = time.perf_counter() - t
    subprocess.run([sys.executable, '-m', 'imgcls_jax.main', '--mode=evaluate',
                    f'--workdir={workdir}', '--config.evaluate.checkpoint=latest'], cwd=REPO,
                   check=True, capture_output=True)
    with open(os.path.join(workdir, 'report.json')) as f:
      rep = json.load(f)
    rare = [round(100 * r['recall'], 1) for r in rep['per_class'][-3:]]
    rows.append((name, rep['accuracy'], rep['balanced_accuracy'], rep.get('roc_auc_macro'), rare,
                 train_s))
    print(f'{name:>15}: top-1 {100 * rep["accuracy"]:.2f}%  balanced accuracy '
          f'{100 * rep["balanced_accuracy"]:.2f}%  ROC-AUC {rep.get("roc_auc_macro", 0):.4f}  '
          f'recall of the 3 rarest classes {rare}  ({train_s:.0f} s)', flush=True)


if __name__ == '__main__':
  main()
