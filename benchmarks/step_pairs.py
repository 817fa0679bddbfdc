"""Train-step time of config variants, measured side by side in one process (alternating rounds).

  python benchmarks/step_pairs.py --config=configs/fashion_mnist_quick.py \
      --variant='' --variant='optim.freeze=norms.0' \
      --variant='model.stem=s2d; model.widths=((16, 64), (128,), (256,))' --rounds=6

Each ``--variant`` is a ``;``-separated list of ``key=value`` overrides of the config (values as
Python literals, else strings; '' = the config as it is). Every variant's step is built exactly as
``benchmarks/throughput.py`` builds it (``run.setup``, the jitted state-donating train step,
synthetic device-resident batches), compiled once, then timed in ``--rounds`` rounds, each round
running every variant's ``--steps`` steps in turn (the order rotates between rounds). On a noisy
machine (a shared VM whose speed moves within minutes) only such interleaved figures compare: the
report gives each variant's median over rounds, its spread, and its ratio to the first variant
round by round. Never imports TensorFlow.
"""
from __future__ import annotations

import ast
import os
import statistics
import sys
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import measure, throughput  # noqa: E402
from imgcls_jax import sharding  # noqa: E402
from imgcls_jax import state as state_lib  # noqa: E402
from imgcls_jax.errors import UserError  # noqa: E402

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', flag_values=FLAGS,
                                lock_config=False)
flags.DEFINE_multi_string('variant', [], "';'-separated key=value overrides ('' = the config).",
                          flag_values=FLAGS)
flags.DEFINE_integer('rounds', 6, 'Interleaved rounds.', flag_values=FLAGS)
measure.define_flags(FLAGS)   # --steps (per variant per round), --window, --warmup


def parse_overrides(spec: str) -> list[tuple[str, Any]]:
  """``'a.b=1; c=((16,), (32,))'`` -> [('a.b', 1), ('c', ((16,), (32,)))] (literals, else str)."""
  out = []
  for part in (p.strip() for p in spec.split(';')):
    if not part:
      continue
    if '=' not in part:
      raise UserError(f"variant part '{part}' is not key=value; e.g. "
                      "--variant='optim.freeze=norms.0'.")
    key, value = (s.strip() for s in part.split('=', 1))
    try:
      parsed: Any = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value
    out.append((key, parsed))
  return out


def apply(config: ml_collections.ConfigDict, overrides: list[tuple[str, Any]]
          ) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the overrides set; UserError for a key the config lacks."""
  c = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides:
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      if p not in node:
        raise UserError(f"variant key '{key}' is not in the config; see configs/default.py.")
      node = node[p]
    if leaf not in node:
      raise UserError(f"variant key '{key}' is not in the config; see configs/default.py.")
    node[leaf] = value
  return c


def main(argv: list[str]) -> None:
  measure.parse_flags(FLAGS, argv)
  config = FLAGS.config
  if config is None or not FLAGS.variant:
    measure.fail("pass --config=configs/<name>.py and at least one --variant ('' = the config)")
  try:
    sharding.request_cpu_devices(int(config.mesh.get('cpu_devices', 0)))
    runs = []
    for spec in FLAGS.variant:
      c = apply(config, parse_overrides(spec))
      bench = throughput.build(c, throughput.synthetic_shape(c))
      state, _ = state_lib.create(bench.model_fn, bench.tx, bench.seed, bench.mesh,
                                  bench.placement, ema=bench.ema)
      batch = throughput.synthetic_batch(bench)
      compiled, _ = measure.compile_step(bench.jitted, state, batch)
      state, _, _ = measure.time_steps(compiled, state, batch, warmup=FLAGS.warmup,
                                       steps=FLAGS.window, window=FLAGS.window)
      runs.append({'name': spec or '(config)', 'step': compiled, 'state': state, 'batch': batch,
                   'batch_size': c.batch_size, 'ms': []})
  except (UserError, ValueError) as e:
    measure.fail(str(e))
  n = len(runs)
  for r in range(FLAGS.rounds):
    for i in range(n):
      run = runs[(i + r) % n]
      run['state'], times, _ = measure.time_steps(run['step'], run['state'], run['batch'],
                                                  warmup=0, steps=FLAGS.steps,
                                                  window=FLAGS.window)
      run['ms'].append(1e3 * statistics.median(times))
  base = runs[0]['ms']
  print(f'{jax.devices()[0].device_kind}, {len(jax.devices())} devices; ms per step, median over '
        f'{FLAGS.rounds} rounds of {FLAGS.steps} steps (min-max), images/s at that median; ratio '
        'of the step time to the first variant\'s, median of the per-round ratios:')
  for run in runs:
    ms = run['ms']
    ratio = statistics.median(m / b for m, b in zip(ms, base))
    med = statistics.median(ms)
    print(f'  {med:7.2f} ms ({min(ms):.2f}-{max(ms):.2f})  {1e3 * run["batch_size"] / med:7.1f} '
          f'images/s  x{ratio:.3f}  {run["name"]}')


if __name__ == '__main__':
  main(sys.argv)
