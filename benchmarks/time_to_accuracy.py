r"""Wall-clock time to a test accuracy, start-up included: runs one training command and times it.

  python benchmarks/time_to_accuracy.py --target=0.93 -- \
      --config=configs/fashion_mnist_quick.py --workdir=/tmp/fmnist_quick

Everything after ``--`` goes to ``python -m imgcls_jax.main`` (run as a child process, so Python,
JAX and TensorFlow start-up, dataset loading and compilation all count). Each evaluation line the
run prints is stamped with the seconds since the child started; at the end it prints the time of
the first evaluation at or above ``--target`` (top-1; for a multi-label run, mAP), the best
accuracy within ``--budget`` seconds, and the whole run's wall time and CPU time. Use a fresh
``--workdir`` (an existing one resumes). ``--help`` (without ``--``, or before it) lists this
script's own flags.
Only evaluations of the whole split count: those on fewer examples than the run's largest one
(``config.eval_subset``'s cheaper intermediate ones; the last evaluation always reads the whole
split) are listed in ``--json``'s record but never reach the target.
"""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time

from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EVAL = re.compile(r'step (\d+): eval loss [\d.]+, top-1 ([\d.]+)%')
_EVAL_MAP = re.compile(r'step (\d+): eval loss [\d.]+, mAP ([\d.]+)')   # multi-label runs
_COUNT = re.compile(r' on (\d+) examples')


def _flags() -> flags.FlagValues:
  """This script's own flags (those before ``--``)."""
  fv = flags.FlagValues()
  flags.DEFINE_float('target', 0.93, 'The test accuracy to time: top-1 (a multi-label run: mAP), '
                     'as a fraction.', flag_values=fv)
  flags.DEFINE_float('budget', 300.0, 'Seconds after the start within which the best accuracy is '
                     'reported.', flag_values=fv)
  flags.DEFINE_bool('json', False, 'Print one JSON record at the end instead of the summary line.',
                    flag_values=fv)
  return fv


def main(argv: list[str]) -> int:
  rest = argv[1:]
  if '--' in rest:
    own, args = rest[:rest.index('--')], rest[rest.index('--') + 1:]
  else:
    own, args = [], rest
  fv = _flags()
  if any(a in ('--help', '-h', '--helpfull') for a in (own if '--' in rest else rest)):
    print(f"{(__doc__ or '').strip()}\n\nFlags:\n{fv.get_help(prefix='  ')}")
    return 0
  prog, own_flags = os.path.basename(argv[0]), ', '.join(f'--{f}' for f in sorted(fv))
  try:
    unparsed = fv([argv[0], *own])
  except flags.UnrecognizedFlagError as e:
    print(f'error: {prog} has no flag --{e.flagname}; its own are {own_flags} (the training '
          "command's go after --).", file=sys.stderr)
    return 2
  except flags.Error as e:
    print(f'error: {str(e).splitlines()[0]}; see {prog} --help.', file=sys.stderr)
    return 2
  if len(unparsed) > 1:
    print(f'error: {prog} takes no argument {unparsed[1]!r}; put the training command after --.',
          file=sys.stderr)
    return 2
  target, budget, as_json = fv.target, fv.budget, fv.json
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env['PYTHONPATH'] = _REPO + os.pathsep + env.get('PYTHONPATH', '')
  t0 = time.perf_counter()
  proc = subprocess.Popen([sys.executable, '-m', 'imgcls_jax.main', *args], cwd=_REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seen: list[tuple[float, int, float, int]] = []     # seconds, step, accuracy, examples
  for line in proc.stdout:
    elapsed = time.perf_counter() - t0
    match = _EVAL.search(line)
    count = _COUNT.search(line)
    count = int(count.group(1)) if count else 0
    if match:
      seen.append((elapsed, int(match.group(1)), float(match.group(2)) / 100.0, count))
    elif _EVAL_MAP.search(line):  # the target is then a mAP
      match = _EVAL_MAP.search(line)
      seen.append((elapsed, int(match.group(1)), float(match.group(2)), count))
    sys.stdout.write(f'[{elapsed:7.1f}s] {line}')
    sys.stdout.flush()
  rc = proc.wait()
  wall = time.perf_counter() - t0
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  full = max((n for *_, n in seen), default=0)      # the whole evaluation split
  evals = [(t, s, a) for t, s, a, n in seen if n == full]
  reached = next(((t, s, a) for t, s, a in evals if a >= target), None)
  within = [a for t, s, a in evals if t <= budget]
  record = {'exit_status': rc, 'wall_seconds': wall, 'cpu_seconds': usage.ru_utime + usage.ru_stime,
            'target': target, 'seconds_to_target': reached[0] if reached else None,
            'step_at_target': reached[1] if reached else None, 'budget_seconds': budget,
            'best_accuracy_within_budget': max(within) if within else None,
            'final_accuracy': evals[-1][2] if evals else None,
            'evals': [{'seconds': t, 'step': s, 'accuracy': a, 'examples': n}
                      for t, s, a, n in seen]}
  if as_json:
    print(json.dumps(record))
  else:
    to_target = (f'{reached[0]:.1f} s (step {reached[1]})' if reached else 'not reached')
    best = f'{max(within):.2%}' if within else 'no evaluation'
    print(f'time to {target:.1%}: {to_target}; best within {budget:.0f} s: {best}; '
          f'whole run: {wall:.1f} s wall, {record["cpu_seconds"]:.1f} s CPU; exit status {rc}.')
  return rc


if __name__ == '__main__':
  sys.exit(main(sys.argv))
