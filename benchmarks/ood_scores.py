"""Out-of-distribution scores of a trained run on images it has never seen the like of
(``--mode=evaluate --config.evaluate.ood_inputs``): writes two sets made from what ships with
scikit-learn, then evaluates the run's split against each and prints every score's ROC-AUC and
FPR95 (imgcls_jax/ood.py).

* ``digits``: scikit-learn's 8x8 handwritten digits, scaled up to 28x28 PNGs (the run reads
  them at its own input size);
* ``photos``: square crops (28-199 px; the run's own reading resizes them and turns them grey
  for a grey model) of scikit-learn's two sample photographs.

  python -m benchmarks.ood_scores --workdir=/tmp/fmnist_quick [--count=500] [--tta=]

A run with an unknown-input gate or an abstention threshold also gets the share of each set (and
of the Fashion-MNIST test images) that predict marks unknown / abstained.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile

import numpy as np
from PIL import Image


def write_sets(root: str, count: int, seed: int = 0) -> dict[str, str]:
  """Two folders of ``count`` PNG images each under ``root``: {'digits': path, 'photos': path}."""
  from sklearn.datasets import load_digits, load_sample_images
  rng = np.random.default_rng(seed)
  out = {k: os.path.join(root, k) for k in ('digits', 'photos')}
  for path in out.values():
    os.makedirs(path, exist_ok=True)
  digits = load_digits().images
  for i, j in enumerate(rng.choice(len(digits), count, replace=count > len(digits))):
    img = Image.fromarray((digits[j] * (255 / 16)).astype(np.uint8)).resize((28, 28),
                                                                             Image.BILINEAR)
    img.save(os.path.join(out['digits'], f'd{i:04d}.png'))
  photos = load_sample_images().images
  for i in range(count):
    p = photos[i % len(photos)]
    size = int(rng.integers(28, 200))
    y, x = rng.integers(0, p.shape[0] - size), rng.integers(0, p.shape[1] - size)
    Image.fromarray(p[y:y + size, x:x + size]).save(os.path.join(out['photos'], f'p{i:04d}.png'))
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--workdir', required=True, help='a trained single-label run')
  ap.add_argument('--count', type=int, default=500, help='images per set')
  ap.add_argument('--tta', default=None, help="test-time views ('', 'flip', ...; default: the "
                  "run's config.evaluate.tta)")
  args = ap.parse_args()
  logging.basicConfig(level=logging.WARNING)
  from imgcls_jax import evaluate
  with tempfile.TemporaryDirectory() as tmp:
    sets = write_sets(tmp, args.count)
    print('| images | score | ROC-AUC | FPR95 |\n|---|---|---|---|')
    for name, path in sets.items():
      overrides = {'evaluate.ood_inputs': path, 'evaluate.errors': 0,
                   'evaluate.label_issues': False,
                   'evaluate.output_dir': os.path.join(tmp, 'report_' + name)}
      if args.tta is not None:
        overrides['evaluate.tta'] = args.tta
      o = evaluate.evaluate(None, args.workdir, overrides)['out_of_distribution']
      for d in o.get('detectors', ()):
        best = ' (best)' if d['score'] == o.get('best') else ''
        print(f"| {name} ({o['examples']}) | {d['name']}{best} | {d['auroc']:.4f} | "
              f"{100 * d['at_95']['answered_ood']:.2f}% |", flush=True)
    gates(args.workdir, sets)


def gates(workdir: str, sets: dict[str, str]) -> None:
  """Where the run has an unknown-input gate and / or an abstention threshold
  (config.evaluate.unknown_keep / abstain_accuracy): the share of each set predict marks, with
  the Fashion-MNIST test images (Debian's idx file) as the in-distribution set."""
  from imgcls_jax import answers, inference, predict
  from imgcls_jax.data import images
  trained = inference.load(workdir)
  if trained.unknown_below is None and not trained.min_confidence:
    return
  clf = inference.classifier(trained, max_batch=256)
  gate = ('no unknown-input gate' if trained.unknown_below is None else
          f'unknown below a log-sum-exp of {trained.unknown_below:.4f}')
  print(f'\ngates: {gate}; abstaining below a top-1 probability of {trained.min_confidence:.3f} '
        '(0: never)')
  print('| images | unknown | abstained | either |\n|---|---|---|---|')
  rows = []
  idx = '/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz'
  if (os.path.exists(idx) and tuple(trained.image_shape) == (28, 28, 1)
      and not trained.run.data.get('eval_preprocess')):   # the arrays as the run reads them
    from benchmarks.label_noise import read_idx
    x = read_idx(os.path.basename(idx))[..., None]
    out = clf.predict_arrays(x)
    rows.append(('Fashion-MNIST test (10000)', [answers.answer_gates(trained, p, lg) for p, lg
                                                in zip(out['probabilities'], out['logits'])]))
  for name, path in sets.items():
    results, _ = predict.predict_files(clf, images.list_inputs(path), top=1)
    rows.append((f'{name} ({len(results)})', results))
  for name, rs in rows:
    u = np.mean([r.get('unknown', False) for r in rs])
    a = np.mean([r.get('abstained', False) for r in rs])
    e = np.mean([r.get('unknown', False) or r.get('abstained', False) for r in rs])
    print(f'| {name} | {100 * u:.2f}% | {100 * a:.2f}% | {100 * e:.2f}% |', flush=True)


if __name__ == '__main__':
  main()
