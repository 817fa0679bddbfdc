"""Start-up: seconds from ``python -m imgcls_jax.main`` to the end of the first training step.

  python benchmarks/startup.py --repeat=3 --before=/tmp/old_checkout \\
      configs/default.py configs/fashion_mnist_quick.py
  python benchmarks/startup.py --also='--config.data.name=arrays:/tmp/fmnist.npz' \\
      configs/fashion_mnist_quick.py

For each config it runs a one-step training (``--config.num_train_steps=1``) as a child process in
a fresh working directory and records when that step's metrics reach ``metrics.jsonl`` (the
trainer writes them right after the step, before the final evaluation): interpreter start, imports,
dataset load and compilation all count, and every version of the code writes that file the same
way, so an old checkout (``--before``, e.g. a ``git worktree``) is timed by the same clock. Runs
alternate between the checkouts (paired, so the machine's drift hits both) and, for this checkout,
between no compilation cache (``--config.compilation_cache_dir=``, also for ``--before``: a
config's own cache would otherwise be warm from earlier runs; ``JAX_COMPILATION_CACHE_DIR`` is
dropped from the children's environment) and a warm one (a fresh ``--config.compilation_cache_dir``,
warmed by one untimed run first). ``--also=FLAGS`` adds the same two runs of this checkout with
FLAGS (e.g. the data as an arrays file), in the same alternation. Prints each figure's runs and
median.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_step_seconds(repo: str, config: str, extra: list[str]) -> tuple[float, float]:
  """(seconds to the first step's metrics record, whole run's wall seconds) of one child run."""
  workdir = tempfile.mkdtemp(prefix='startup_')
  record = os.path.join(workdir, 'metrics.jsonl')
  env = dict(os.environ, PYTHONPATH=repo)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)   # only the config's flag picks a cache
  cmd = [sys.executable, '-m', 'imgcls_jax.main', f'--config={os.path.join(repo, config)}',
         f'--workdir={workdir}', '--config.num_train_steps=1', '--config.progress_bar=False', *extra]
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  first = None
  while proc.poll() is None:
    if first is None and os.path.exists(record):
      first = time.perf_counter() - t0
    time.sleep(0.02)
  wall = time.perf_counter() - t0
  err = proc.stderr.read()
  shutil.rmtree(workdir, ignore_errors=True)
  if proc.returncode != 0 or first is None:
    raise SystemExit(f'{" ".join(cmd)} failed (exit {proc.returncode}):\n{err[-2000:]}')
  return first, wall


def main(argv: list[str]) -> int:
  repeat, before, also, configs = 3, None, None, []
  for a in argv[1:]:
    if a.startswith('--repeat='):
      repeat = int(a.split('=', 1)[1])
    elif a.startswith('--before='):
      before = os.path.abspath(a.split('=', 1)[1])
    elif a.startswith('--also='):
      also = a.split('=', 1)[1].split()
    elif a.startswith('--'):
      print(f'unknown option {a}; usage: {__doc__}', file=sys.stderr)
      return 2
    else:
      configs.append(a)
  configs = configs or ['configs/default.py', 'configs/fashion_mnist_quick.py']
  cache = tempfile.mkdtemp(prefix='startup_cache_')
  for config in configs:
    variants = {}
    # A config's own cache (fashion_mnist_quick's 'default': ~/.cache/imgcls_jax/jax_cache) is
    # switched off for the cold runs: warm from earlier runs, it would time a warm cache.
    cold = ['--config.compilation_cache_dir=']
    if before:
      variants['before'] = (before, cold)
    variants['now, no cache'] = (_REPO, cold)
    warm = [f'--config.compilation_cache_dir={cache}']
    variants['now, warm cache'] = (_REPO, warm)
    first_step_seconds(_REPO, config, warm)      # fills the cache (untimed)
    if also:
      variants['also, no cache'] = (_REPO, also + cold)
      variants['also, warm cache'] = (_REPO, also + warm)
      first_step_seconds(_REPO, config, also + warm)
    results = {name: [] for name in variants}
    for _ in range(repeat):
      for name, (repo, extra) in variants.items():
        results[name].append(first_step_seconds(repo, config, extra))
    print(f'{config} (first step / whole 1-step run, s; {repeat} runs each, alternating):')
    for name, runs in results.items():
      firsts = ', '.join(f'{f:.1f}' for f, _ in runs)
      print(f'  {name:16s} first step {firsts} (median {statistics.median(f for f, _ in runs):.1f})'
            f'; whole run median {statistics.median(w for _, w in runs):.1f}')
    sys.stdout.flush()
  shutil.rmtree(cache, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
