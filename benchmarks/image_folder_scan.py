"""Time to the first training step on a large image folder: first start and restart.

  python -m benchmarks.image_folder_scan --sizes=1000,20000,100000 [--code=/path/to/other/checkout]

Generates N JPEGs at ImageNet-like sizes (300-500 x 250-500 px, 10 classes, in train/<class>/; a
fixed 200-image test/ split) once per N under --root, then runs the real command
(``python -m imgcls_jax.main``, one training step of a small CNN on 64 px crops, one evaluation of
the 200 test images; uncached stream, shuffle buffer 10,000) twice per N: with an empty index cache (first start) and again with a fresh
workdir (restart: a new process; the index cache, where the code has one, is warm). Prints the wall
time of each command; ``--code`` runs another checkout's code (e.g. the commit before the cached
index) on the same folders for a side-by-side "before". The page cache is warm after generation
in both cases (files were just written), which favours the old full-decode scan if anything.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 10
TEST_IMAGES = 200


def _write(args: tuple[str, int]) -> None:
  from PIL import Image
  path, seed = args
  rng = np.random.default_rng(seed)
  w, h = int(rng.integers(300, 501)), int(rng.integers(250, 501))
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([(xx * rng.uniform(0.2, 0.6) + yy * rng.uniform(0.1, 0.5) + c * 40) % 256
                   for c in range(3)], -1)
  noise = rng.integers(0, 24, (h, w, 3))
  Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(path, quality=85)


def make_folder(root: str, n: int) -> str:
  """``root/n<N>/{train,test}/c<k>/*.jpg`` (written once; reused when complete)."""
  folder = os.path.join(root, f'n{n}')
  done = os.path.join(folder, '.complete')
  if os.path.exists(done):
    return folder
  shutil.rmtree(folder, ignore_errors=True)
  jobs = []
  for split, count, offset in (('train', n, 0), ('test', TEST_IMAGES, 10**9)):
    for k in range(CLASSES):
      os.makedirs(os.path.join(folder, split, f'c{k}'), exist_ok=True)
    jobs += [(os.path.join(folder, split, f'c{i % CLASSES}', f'{i:07d}.jpg'), offset + i)
             for i in range(count)]
  t = time.perf_counter()
  with multiprocessing.Pool() as pool:
    for _ in pool.imap_unordered(_write, jobs, chunksize=256):
      pass
  open(done, 'w').close()
  print(f'  wrote {len(jobs):,} JPEGs in {time.perf_counter() - t:.0f} s', flush=True)
  return folder


def time_first_step(code: str, folder: str, cache_dir: str) -> float:
  """Wall seconds of one training step + a 200-image evaluation, from process start."""
  workdir = tempfile.mkdtemp(prefix='scan_bench_run_')
  env = dict(os.environ, IMGCLS_JAX_CACHE_DIR=cache_dir, PYTHONPATH=code,
             TF_CPP_MIN_LOG_LEVEL='2')
  cmd = [sys.executable, '-m', 'imgcls_jax.main', f'--config={code}/configs/default.py',
         f'--workdir={workdir}', '--config.data.name=image_folder',
         f'--config.data.folder={folder}',
         '--config.data.train_preprocess=random_resized_crop(size=64)',
         '--config.data.device_preprocess=',
         '--config.data.eval_preprocess=resize(size=64)', '--config.data.mean=(0.5,0.5,0.5)',
         '--config.data.std=(0.5,0.5,0.5)', '--config.model.widths=(16,32)',
         '--config.batch_size=32', '--config.eval_batch_size=200', '--config.num_train_steps=1',
         # A large folder is streamed, not cached in memory; a 10k-example shuffle buffer.
         '--config.data.cache=False', '--config.data.shuffle_buffer=10000',
         '--config.progress_bar=False', '--config.tensorboard=False']
  t = time.perf_counter()
  proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
  elapsed = time.perf_counter() - t
  shutil.rmtree(workdir, ignore_errors=True)
  if proc.returncode:
    raise SystemExit(f'the run failed:\n{proc.stderr[-2000:]}')
  return elapsed


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--sizes', default='1000,20000,100000', help='comma-separated image counts')
  p.add_argument('--root', default=os.path.join(tempfile.gettempdir(), 'image_folder_scan'),
                 help='where the generated folders are kept (reused between runs)')
  p.add_argument('--code', default=REPO, help='checkout whose code runs (default: this one)')
  args = p.parse_args()
  code = os.path.abspath(args.code)
  print(f'code: {code}; CPU cores: {os.cpu_count()}', flush=True)
  for n in (int(s) for s in args.sizes.split(',')):
    print(f'N = {n:,} training images (+{TEST_IMAGES} test):', flush=True)
    folder = make_folder(args.root, n)
    cache_dir = tempfile.mkdtemp(prefix='scan_bench_cache_')
    first = time_first_step(code, folder, cache_dir)
    restart = time_first_step(code, folder, cache_dir)
    shutil.rmtree(cache_dir, ignore_errors=True)
    print(f'  first start {first:6.1f} s   restart {restart:6.1f} s', flush=True)


if __name__ == '__main__':
  main()
