"""How every benchmark here measures a train step, so that figures are comparable.

Shared by ``throughput.py`` (the project's step) and ``reference_flax.py`` (an independent Flax
step). Imports neither TensorFlow nor ``imgcls_jax``. The method:

* compile: ``jitted.lower(*args)`` then ``.compile()``, both timed; the steps then run through the
  compiled executable (the first timed call pays no compilation).
* FLOPs: XLA's cost analysis of the lowered (pre-optimisation) module, i.e. the maths as written,
  independent of backend rewrites (a GPU's compiled module hides cuDNN convolutions inside
  custom calls); where the accelerator's plugin cannot analyse a lowered module, the host's CPU
  client counts the same HLO. The compiled module's count is recorded next to it.
* time: ``warmup`` untimed steps, then windows of ``window`` steps dispatched back to back (each
  step's state feeds the next; a transfer guard fails any host <-> device transfer inside a window)
  and one block at the window's end; step time = window time / window. The median over windows
  is the reported step time, so a slow first window or a hiccup does not move it.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.extend
from absl import flags


def define_flags(fv: flags.FlagValues) -> None:
  """The timing and reporting flags every benchmark here takes."""
  flags.DEFINE_integer('steps', 50, 'Timed steps (a multiple of --window).', flag_values=fv)
  flags.DEFINE_integer('warmup', 5, 'Untimed steps after compilation.', flag_values=fv)
  flags.DEFINE_integer('window', 10, 'Steps dispatched back to back per timing window.',
                       flag_values=fv)
  flags.DEFINE_float('peak_tflops', 0.0, 'The peak TFLOP/s of the devices used (summed), to '
                     'report the achieved fraction of; 0 = none.', flag_values=fv)
  flags.DEFINE_bool('json', False, 'Print one JSON record on stdout (readable lines on stderr).',
                    flag_values=fv)
  flags.DEFINE_string('xla_flags', '', 'Appended to $XLA_FLAGS before the backend starts '
                      '(GPU flags: see benchmarks/NOTES.md).', flag_values=fv)
  flags.DEFINE_string('profile_dir', '', 'After the timing, run --profile_steps more steps under '
                      'jax.profiler.trace into this folder (a Perfetto trace *.trace.json.gz; '
                      'summarise it with benchmarks/trace_summary.py); empty = no profile.',
                      flag_values=fv)
  flags.DEFINE_integer('profile_steps', 5, 'Steps traced when --profile_dir is set.',
                       flag_values=fv)
  flags.DEFINE_enum('transfer_guard', 'disallow', ['disallow', 'log', 'allow'],
                    'Host <-> device transfers inside the timing windows: fail, log, or allow.',
                    flag_values=fv)


def parse_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  """Parses ``argv`` into ``fv``; a bad flag ends the program with one line (exit status 2)."""
  override = ('a --config.KEY=VALUE override names a key the config does not have ({}); see '
              'configs/default.py for the keys.')
  if any(a in ('--help', '-h', '--helpfull') for a in argv[1:]):
    doc = sys.modules['__main__'].__doc__ or ''
    print(f'{doc.strip()}\n\nFlags:\n{fv.get_help()}')
    raise SystemExit(0)
  try:
    rest = fv(argv)
  except flags.Error as e:
    msg = str(e).splitlines()[0]
    fail(override.format(msg) if "flag 'config." in msg else f'bad flag: {msg}')
  except (AttributeError, KeyError) as e:  # ml_collections: --config.X names no key of the config
    fail(override.format(e))
  if len(rest) > 1:
    fail(f'unexpected arguments: {rest[1:]}')
  if fv.steps < 1 or fv.window < 1 or fv.steps % fv.window or fv.warmup < 0:
    fail(f'--steps ({fv.steps}) must be a positive multiple of --window ({fv.window}), and '
         f'--warmup ({fv.warmup}) >= 0.')
  extend_xla_flags(fv.xla_flags)  # before the first call that starts the backend


def fail(message: str) -> None:
  """Prints ``error: message`` on stderr and exits with status 2."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def extend_xla_flags(extra: str) -> str:
  """Appends ``extra`` to ``$XLA_FLAGS``; call before anything starts a JAX backend."""
  flags = ' '.join(f for f in (os.environ.get('XLA_FLAGS', ''), extra.strip()) if f)
  if extra.strip():
    os.environ['XLA_FLAGS'] = flags
  return flags


def _first_dict(analysis: Any) -> dict[str, float]:
  """Cost analyses are a dict (current JAX) or a one-element list of dicts (older JAX)."""
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return dict(analysis or {})


def _cpu_cost_analysis(lowered: Any) -> dict[str, float]:
  """XLA:CPU's cost analysis of a lowered module built for another backend. A GPU or TPU plugin
  (PJRT C API) does not analyse *lowered* modules (jax raises ``NotImplementedError``; the H200
  run of jax 0.11.2 got no count); the pre-optimisation HLO is backend-independent maths, so the
  host's CPU client counts it. Uses jaxlib's ``hlo_module_cost_analysis``, the function
  ``Lowered.cost_analysis`` itself calls (not public API: any failure means "no count")."""
  from jax._src.lib import _jax  # the same module Lowered.cost_analysis uses
  module = lowered.compiler_ir('hlo').as_hlo_module()
  return _first_dict(_jax.hlo_module_cost_analysis(jax.extend.backend.get_backend('cpu'), module))


def flops(lowered: Any, compiled: Any) -> dict[str, float | None]:
  """FLOPs per call from XLA's cost analysis: of the lowered module (counted by the CPU client
  when the accelerator's cannot), and of the compiled one."""
  out: dict[str, float | None] = {'flops_per_step': None, 'flops_per_step_compiled': None}
  for key, stage in (('flops_per_step', lowered), ('flops_per_step_compiled', compiled)):
    if stage is None:
      continue
    try:
      value = _first_dict(stage.cost_analysis()).get('flops')
    except Exception:  # some backends do not implement cost analysis
      value = None
    if value is None and stage is lowered:
      try:
        value = _cpu_cost_analysis(lowered).get('flops')
      except Exception:  # no CPU client, or jaxlib moved the function: no count
        value = None
    out[key] = float(value) if value is not None and value > 0 else None
  return out


def compile_step(jitted: Callable[..., Any], *args: Any) -> tuple[Any, dict[str, Any]]:
  """(compiled executable, {lower_s, compile_s, flops...}) for ``jitted`` on ``args``."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, {'lower_s': t1 - t0, 'compile_s': t2 - t1, **flops(lowered, compiled)}


def time_steps(step: Callable[[Any, Any], tuple[Any, Any]], state: Any, batch: Any, *,
               warmup: int, steps: int, window: int,
               guard: str = 'disallow') -> tuple[Any, list[float], list[Any]]:
  """Runs ``warmup`` then ``steps`` steps; returns (state, seconds per step per window, metrics).

  ``metrics`` holds each window's last metrics, fetched to the host after the timing. ``guard``
  is the ``jax.transfer_guard`` level inside the windows.
  """
  if steps < 1 or window < 1 or steps % window:
    raise ValueError(f'steps ({steps}) must be a positive multiple of window ({window}).')
  metrics = None
  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  per_step, kept = [], []
  # Inside a window nothing may move between host and device: a step fed host data (or, on an
  # accelerator, one that reads a value back) fails here instead of being timed with a hidden sync.
  with jax.transfer_guard(guard):
    for _ in range(steps // window):
      t0 = time.perf_counter()
      for _ in range(window):
        state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))
      per_step.append((time.perf_counter() - t0) / window)
      kept.append(metrics)
  return state, per_step, jax.device_get(kept)


def profile_steps(step: Callable[[Any, Any], tuple[Any, Any]], state: Any, batch: Any,
                  log_dir: str, steps: int) -> Any:
  """Runs ``steps`` more steps under ``jax.profiler.trace(log_dir)``; returns the state.

  Writes the TensorBoard profile and a Perfetto trace (``*.trace.json.gz``) under ``log_dir``;
  ``benchmarks/trace_summary.py`` sums its device time per kernel. Runs after the timing windows,
  so tracing costs the timed figures nothing.
  """
  jax.block_until_ready(state)
  metrics = None
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    for _ in range(steps):
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
  return state


def device_summary() -> dict[str, Any]:
  """Platform, device kind and count, library versions, XLA flags."""
  import flax
  import optax
  devices = jax.devices()
  return {'platform': devices[0].platform, 'device_kind': devices[0].device_kind,
          'num_devices': len(devices), 'jax': jax.__version__, 'flax': flax.__version__,
          'optax': optax.__version__, 'python': platform.python_version(),
          'xla_flags': os.environ.get('XLA_FLAGS', ''), 'host_cpus': os.cpu_count()}


def peak_memory_bytes() -> int | None:
  """Peak bytes in use on device 0 when the backend reports it (GPUs do; CPUs do not)."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:
    return None
  return stats.get('peak_bytes_in_use')


def result(name: str, *, batch_size: int, step_times: list[float], compile_info: dict[str, Any],
           peak_tflops: float, losses: list[float], extra: dict[str, Any]) -> dict[str, Any]:
  """The record every benchmark prints: settings, compile time, step time, images/s, TFLOP/s."""
  median = statistics.median(step_times)
  flops_step = compile_info.get('flops_per_step')
  tflops = flops_step / median / 1e12 if flops_step else None
  return {
      'name': name, **extra, 'batch_size': batch_size,
      'lower_s': round(compile_info['lower_s'], 3),
      'compile_s': round(compile_info['compile_s'], 3),
      'timed_steps': len(step_times) * extra.get('window', 1),
      'step_time_median_s': median, 'step_time_min_s': min(step_times),
      'step_time_max_s': max(step_times), 'images_per_sec': batch_size / median,
      'flops_per_step': flops_step,
      'flops_per_step_compiled': compile_info.get('flops_per_step_compiled'),
      'gflops_per_image': flops_step / batch_size / 1e9 if flops_step else None,
      'tflops_per_sec': tflops, 'peak_tflops': peak_tflops or None,
      'peak_fraction': tflops / peak_tflops if (tflops and peak_tflops) else None,
      'loss_first': losses[0], 'loss_last': losses[-1],
      'loss_finite': all(math.isfinite(x) for x in losses),
      'peak_memory_bytes': peak_memory_bytes(), **device_summary(),
  }


def _fmt(value: Any, spec: str) -> str:
  return 'n/a' if value is None else format(value, spec)


def human(r: dict[str, Any]) -> str:
  """A few readable lines for one record."""
  lines = [
      f"{r['name']}: {r.get('model', '?')} {r.get('dtype', '')}, batch {r['batch_size']}, "
      f"{r.get('image_size', '?')} px, on {r['num_devices']} x {r['device_kind']} "
      f"({r['platform']})",
      f"  compile {r['compile_s']:.2f} s (+ lower {r['lower_s']:.2f} s); step median "
      f"{r['step_time_median_s'] * 1e3:.2f} ms (min {r['step_time_min_s'] * 1e3:.2f}, max "
      f"{r['step_time_max_s'] * 1e3:.2f}) over {r['timed_steps']} steps",
      f"  {r['images_per_sec']:,.1f} images/s; {_fmt(r['gflops_per_image'], '.3f')} GFLOP/image "
      f"(XLA cost analysis); {_fmt(r['tflops_per_sec'], '.3f')} TFLOP/s"
      + (f"; {r['peak_fraction']:.1%} of {r['peak_tflops']:g} TFLOP/s peak"
         if r['peak_fraction'] is not None else ''),
      f"  loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}; XLA_FLAGS='{r['xla_flags']}'",
  ]
  return '\n'.join(lines)


def emit(r: dict[str, Any], as_json: bool) -> None:
  """JSON on stdout (readable lines on stderr) with ``as_json``; else readable lines on stdout."""
  if as_json:
    print(human(r), file=sys.stderr, flush=True)
    print(json.dumps(r, sort_keys=True), flush=True)
  else:
    print(human(r), flush=True)


def compare(paths: list[str]) -> str:
  """A side-by-side table of JSON records (files that are missing or empty are listed as such)."""
  rows = []
  base = None
  for p in paths:
    try:
      with open(p) as f:
        r = json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
      rows.append(f'{os.path.basename(p):<28} no result (see its .log)')
      continue
    base = base or r['images_per_sec']
    rows.append(f"{os.path.basename(p):<28} {r['images_per_sec']:>10,.1f} img/s  "
                f"{r['step_time_median_s'] * 1e3:>8.2f} ms  "
                f"{_fmt(r['tflops_per_sec'], '>7.1f')} TFLOP/s  "
                f"{_fmt(r['peak_fraction'], '>6.1%')} of peak  x{r['images_per_sec'] / base:.3f}  "
                f"compile {r['compile_s']:.1f} s  {r['device_kind']}")
  return '\n'.join(rows)


if __name__ == '__main__':
  # python benchmarks/measure.py A.json B.json ...: side-by-side table (ratios against the first).
  print(compare(sys.argv[1:]))
