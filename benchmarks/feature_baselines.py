"""Classical features vs the CNN, side by side: accuracy, macro F1 and training time.

  python benchmarks/feature_baselines.py --root=/tmp/feature_baselines \
      [--only=digits_holdout_classical,digits_holdout_cnn]

Runs each command of ``RUNS`` (``python -m imgcls_jax.main ...``) in ``<root>/<name>``, timing its
wall clock (start-up included), unless ``<root>/<name>/wall_s.json`` says it already ran (delete it
to measure again); evaluates each CNN run (``--mode=evaluate``) for its macro F1; then prints the
markdown table (also written to ``<root>/table.md``). Then the k-NN evaluation of embeddings
(``--mode=embed``) on the Fashion-MNIST test split, for the CNN run's penultimate features and for
the classical features. Compare times only between runs made on one machine, side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (task, features, command arguments after `-m imgcls_jax.main`)
RUNS: dict[str, tuple[str, str, list[str]]] = {
    'digits_holdout_classical': ('digits hold-out (450)', 'classical', [
        '--mode=classical', '--config=configs/digits_classical.py']),
    'digits_holdout_cnn': ('digits hold-out (450)', 'CNN', [
        '--config=configs/default.py', '--config.progress_bar=False']),
    'digits_cv_classical': ('digits 5-fold CV (1797)', 'classical', [
        '--mode=classical', '--config=configs/digits_classical.py',
        '--config.cross_validation.folds=5', '--config.data.train_split=train+test']),
    'digits_cv_cnn': ('digits 5-fold CV (1797)', 'CNN', [
        '--config=configs/digits_cv.py', '--config.progress_bar=False']),
    'fmnist_classical': ('Fashion-MNIST test (10k)', 'classical', [
        '--mode=classical', '--config=configs/fashion_mnist_classical.py']),
    'fmnist_cnn': ('Fashion-MNIST test (10k)', 'CNN', [
        '--config=configs/fashion_mnist_quick.py']),
}
EMBEDS = {  # name -> (run whose workdir holds the model / the config, extra arguments)
    'embed_fmnist_cnn': ('fmnist_cnn', ['--mode=embed', '--config.embed.split=test']),
    'embed_fmnist_classical': ('fmnist_classical', [
        '--mode=embed', '--config=configs/fashion_mnist_classical.py',
        '--config.embed.extractor=classical', '--config.embed.split=test']),
}


def _run(args: list[str], workdir: str, log: str) -> float:
  t0 = time.perf_counter()
  with open(log, 'w') as f:
    proc = subprocess.run([sys.executable, '-m', 'imgcls_jax.main', *args, f'--workdir={workdir}'],
                          cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise SystemExit(f'{" ".join(args)} failed; see {log}')
  return time.perf_counter() - t0


def measure(root: str, name: str, args: list[str], workdir: str = '') -> float:
  """Wall seconds of the run ``name`` in ``workdir`` (default ``<root>/<name>``), run now unless
  ``<root>/<name>/wall_s.json`` records it."""
  workdir = workdir or os.path.join(root, name)
  stamp = os.path.join(root, name, 'wall_s.json')
  if os.path.exists(stamp):
    with open(stamp) as f:
      return float(json.load(f)['wall_s'])
  os.makedirs(os.path.join(root, name), exist_ok=True)
  wall = _run(args, workdir, os.path.join(root, f'{name}.log'))
  with open(stamp, 'w') as f:
    json.dump({'wall_s': wall, 'args': args, 'cpu': cpu_model()}, f)
  return wall


def scores(root: str, name: str, features: str) -> tuple[float, float, str]:
  """(accuracy, macro F1, how) from the run's report (evaluating a CNN run first)."""
  workdir = os.path.join(root, name)
  cv = os.path.join(workdir, 'cv_report.json')
  if os.path.exists(cv):
    with open(cv) as f:
      s = json.load(f)
    return (s['mean']['accuracy'], s['mean']['f1_macro'],
            f"+- {100 * s['std']['accuracy']:.2f} over folds; pooled "
            f"{100 * s['pooled_out_of_fold']['accuracy']:.2f}%")
  path = os.path.join(workdir, 'report.json')
  if features == 'CNN' and not os.path.exists(path):
    _run(['--mode=evaluate', '--config.evaluate.checkpoint=latest'], workdir,
         os.path.join(root, f'{name}_evaluate.log'))
  with open(path) as f:
    rep = json.load(f)
  return rep['accuracy'], rep['macro_avg']['f1'], ''


def cpu_model() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
    return next(line.split(':', 1)[1].strip() for line in out.splitlines()
                if line.startswith('Model name'))
  except (OSError, StopIteration):
    return platform.processor() or 'unknown CPU'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--root', default='/tmp/feature_baselines')
  parser.add_argument('--only', default='', help='comma-separated run names (default: all)')
  opts = parser.parse_args()
  only = [n for n in opts.only.split(',') if n]
  unknown = [n for n in only if n not in RUNS and n not in EMBEDS]
  if unknown:
    parser.error(f"--only names no run {', '.join(unknown)}; the runs are: "
                 f"{', '.join([*RUNS, *EMBEDS])}.")
  rows = ['| task | features | top-1 | macro F1 | training wall time | notes |',
          '|---|---|---|---|---|---|']
  for name, (task, feats, args) in RUNS.items():
    if only and name not in only:
      continue
    wall = measure(opts.root, name, args)
    acc, f1, note = scores(opts.root, name, feats)
    rows.append(f'| {task} | {feats} | {100 * acc:.2f}% | {f1:.4f} | {wall:.0f} s | {note} |')
    print(rows[-1], flush=True)
  for name, (source, args) in EMBEDS.items():
    if only and name not in only:
      continue
    out = os.path.join(opts.root, name)
    measure(opts.root, name, args + [f'--config.embed.output_dir={out}'],
            workdir=os.path.join(opts.root, source))
    with open(os.path.join(out, 'embed_report.json')) as f:
      knn = json.load(f)['knn']
    rows.append(f"| Fashion-MNIST test, {knn['k']}-NN ({knn['metric']}) | {name.split('_')[-1]} "
                f"embedding | {100 * knn['accuracy']:.2f}% | {knn['f1_macro']:.4f} | - | "
                f"reference: {knn['reference_examples']} training images |")
    print(rows[-1], flush=True)
  table = '\n'.join(rows) + f'\n\nMachine: {cpu_model()}, {os.cpu_count()} cores.\n'
  os.makedirs(opts.root, exist_ok=True)
  with open(os.path.join(opts.root, 'table.md'), 'w') as f:
    f.write(table)
  print(table)


if __name__ == '__main__':
  main()
