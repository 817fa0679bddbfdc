"""Reproducer and guard check for the 2-CPU-device collective hang (``mesh.cpu_devices=2``).

  python benchmarks/cpu_devices_hang.py [--steps=1000] [--guard] [--runs=3] [--program=eval]

Runs ``fashion_mnist_quick``'s real train step (2 XLA CPU devices, host batches put on the mesh
every step, as training does) in a child process per run and prints, per run, whether it finished
and its ms/step. On a loaded 2-core machine the unguarded loop often dies with SIGABRT after
XLA's 40 s wait: one device's partition sits in the gradient all-reduce while the other device's
launch waits on the per-device execution semaphore held by the *next* program's launch, which
waits for this program's outputs (gdb stacks: ``InProcessCommunicator::AllReduce`` /
``CpuPjRtRawLoadedExecutable::Execute -> Semaphore::ScopedAcquire`` / ``... -> BlockUntilReady``).
``--guard`` waits for step n-1 to finish after dispatching step n (at most two steps in flight).
Measured 2026-12-02 on the project's 2-core AMD EPYC under load 2-6 (other jobs running): unguarded
4 of 9 runs aborted (2/5 with async dispatch, 2/4 with ``jax_cpu_enable_async_dispatch=False``),
with ``--xla_cpu_use_xnnpack=false`` 3/3, with ``--xla_cpu_multi_thread_eigen=false`` 4/4;
guarded 0/4 (at 15-20 ms/step under load 6; the guard's cost on a quiet machine is not measured).

``--program=eval``: evaluation's sums instead (``report.eval_sums`` jitted over 8 CPU devices on
padded batches, added up eagerly), the loop ``tests/test_report.py`` ran unguarded until session
33, where an xdist worker died twice. Measured 2026-12-06 on the 2-core Zen 4 EPYC with three busy
loops beside it, 1,500 batches a run: unguarded 3 of 3 runs aborted ("Termination timeout for
`all gather` ... of 40 seconds"), guarded (``sharding.InFlightGuard(strict=True)``, as the
trainer's evaluation) 3 of 3 finished, in 23-26 s.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(steps: int, guard: bool) -> None:
  import jax
  jax.config.update('jax_num_cpu_devices', 2)
  import numpy as np
  sys.path.insert(0, REPO)
  from configs import fashion_mnist_quick
  from imgcls_jax import run, sharding
  from imgcls_jax import state as state_lib
  from imgcls_jax.data.info import DatasetInfo
  c = fashion_mnist_quick.get_config()
  info = DatasetInfo(name='fashion_mnist', num_classes=10,
                     class_names=tuple(map(str, range(10))), image_shape=(28, 28, 1),
                     num_examples={'train': 60000, 'test': 10000})
  s = run.setup(c, info, steps_per_epoch=1875)
  state, sh = state_lib.create(s.model_fn, s.tx, 0, s.mesh, s.placement)
  step = run.jit_train_step(s, sh)
  rng = np.random.default_rng(0)
  host = [{'image': rng.integers(0, 255, (32, 28, 28, 1), dtype=np.uint8),
           'label': rng.integers(0, 10, 32).astype(np.int32)} for _ in range(16)]
  bs = sharding.batch_sharding(s.mesh)

  def go(n: int) -> None:
    nonlocal state
    prev = m = None
    for b in sharding.device_prefetch((host[i % 16] for i in range(n)), bs):
      state, m = step(state, b)
      if guard and prev is not None:
        jax.block_until_ready(prev)
      prev = m
    jax.block_until_ready(m)

  go(50)
  t = time.perf_counter()
  go(steps)
  print(f'RESULT {1000 * (time.perf_counter() - t) / steps:.2f}', flush=True)


def _eval_child(steps: int, guard: bool) -> None:
  import functools
  import jax
  jax.config.update('jax_num_cpu_devices', 8)
  import numpy as np
  sys.path.insert(0, REPO)
  from imgcls_jax import report, sharding
  mesh = sharding.make_mesh(0)
  fn = jax.jit(functools.partial(report.eval_sums, num_bins=15),
               in_shardings=(sharding.batch_sharding(mesh),) * 3,
               out_shardings=sharding.replicated(mesh))
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 10)).astype(np.float32)
  labels, mask = rng.integers(0, 10, 64).astype(np.int32), np.ones(64, bool)
  t = time.perf_counter()
  for _ in range(steps // 5):   # one evaluation: 5 batches, summed
    totals, inflight = None, sharding.InFlightGuard(mesh, strict=True)
    for _ in range(5):
      totals = report.add(totals, fn(logits, labels, mask))
      if guard:
        inflight.after_dispatch(totals)
    report.stats_to_numpy(totals)
  print(f'RESULT {1000 * (time.perf_counter() - t) / steps:.2f}', flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--steps', type=int, default=1000)
  p.add_argument('--runs', type=int, default=3)
  p.add_argument('--guard', action='store_true')
  p.add_argument('--program', choices=('train', 'eval'), default='train')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    (_eval_child if args.program == 'eval' else _child)(args.steps, args.guard)
    return
  for i in range(args.runs):
    cmd = [sys.executable, __file__, '--child', f'--steps={args.steps}',
           f'--program={args.program}'] + (
        ['--guard'] if args.guard else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT')), None)
    status = f'{line.split()[1]} ms/step' if line else f'aborted (exit {proc.returncode})'
    print(f"run {i + 1} ({'guarded' if args.guard else 'unguarded'}): {status}; load "
          f'{os.getloadavg()[0]:.1f}', flush=True)


if __name__ == '__main__':
  main()
