"""One 3x3 convolution's forward and backward: XLA's convolution vs im2col patches + matmul.

  python benchmarks/conv_paths.py [--batch=64] [--rounds=5] [--layers=14:16:64,7:64:128,3:128:256]

For each layer (``size:in:out``, stride 1, SAME padding, NHWC, float32) it times, alternating
between the two forms within each round: the forward, the weight gradient alone, and the whole
``jax.vjp`` (forward + input and weight gradients), through ``jax.lax.conv_general_dilated``
and through ``imgcls_jax.models.layers.conv_general_dilated(..., im2col=True)`` (what
``fast_cnn``'s ``model.conv='im2col'`` uses), and checks that both give the same gradients. The
defaults are ``fashion_mnist_quick``'s second to fourth layers at its global batch. Prints the
median milliseconds over rounds. Never imports TensorFlow.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import measure  # noqa: E402
from imgcls_jax.models import layers  # noqa: E402

_PAD = ((1, 1), (1, 1))
_DN = ('NHWC', 'HWIO', 'NHWC')


def _xla(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), _PAD, dimension_numbers=_DN)


def _im2col(x, w):
  return layers.conv_general_dilated(x, w, (1, 1), _PAD, dimension_numbers=_DN, im2col=True)


def _programs(conv):
  """(forward, weight gradient, whole vjp) of ``conv`` as jitted functions of (x, w, dy)."""
  fwd = jax.jit(lambda x, w, dy: conv(x, w))
  wgrad = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
  vjp = jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy))
  return {'forward': fwd, 'weight grad': wgrad, 'fwd + both grads': vjp}


def _time(fn, args, steps: int) -> float:
  """Milliseconds per call of ``fn(*args)``: one window of ``steps`` calls after one warm-up call,
  timed as every benchmark here times a step (``measure.time_steps``)."""
  _, per_step, _ = measure.time_steps(lambda state, batch: (state, fn(*batch)), None, args,
                                      warmup=1, steps=steps, window=steps)
  return per_step[0] * 1e3


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--steps', type=int, default=30, help='calls per timing')
  p.add_argument('--layers', default='14:16:64,7:64:128,3:128:256')
  a = p.parse_args()
  rng = np.random.default_rng(0)
  print(f'{jax.devices()[0].platform}, batch {a.batch}; median ms over {a.rounds} rounds '
        f'(XLA conv | im2col + matmul | ratio)')
  totals = {'xla': 0.0, 'im2col': 0.0}
  for spec in a.layers.split(','):
    size, cin, cout = (int(v) for v in spec.split(':'))
    x = jnp.asarray(rng.normal(size=(a.batch, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(a.batch, size, size, cout)), jnp.float32)
    progs = {'xla': _programs(_xla), 'im2col': _programs(_im2col)}
    grads = [progs[k]['fwd + both grads'](x, w, dy) for k in ('xla', 'im2col')]
    for r, s in zip(*grads):  # same maths: only the summation order differs
      np.testing.assert_allclose(np.asarray(s), np.asarray(r), rtol=1e-3, atol=1e-3)
    times = {(k, what): [] for k in progs for what in progs[k]}
    for i in range(a.rounds):
      order = list(progs) if i % 2 == 0 else list(progs)[::-1]
      for what in progs['xla']:
        for k in order:
          times[k, what].append(_time(progs[k][what], (x, w, dy), a.steps))
    gflop = 2 * a.batch * size * size * 9 * cin * cout / 1e9
    print(f'{size}x{size}, {cin} -> {cout} ({gflop:.3f} GFLOP per forward):')
    for what in progs['xla']:
      mx = statistics.median(times['xla', what])
      mi = statistics.median(times['im2col', what])
      print(f'  {what:<17} {mx:8.3f} | {mi:8.3f} | x{mi / mx:.2f}')
    totals['xla'] += statistics.median(times['xla', 'fwd + both grads'])
    totals['im2col'] += statistics.median(times['im2col', 'fwd + both grads'])
  print(f"all layers, fwd + both grads: {totals['xla']:.2f} | {totals['im2col']:.2f} ms | "
        f"x{totals['im2col'] / totals['xla']:.2f}")


if __name__ == '__main__':
  main()
