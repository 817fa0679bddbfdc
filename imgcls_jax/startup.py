"""Start-up: when the process started, and JAX's persistent compilation cache
(``config.compilation_cache_dir``).

A rerun of the same config loads its compiled programs (the train step, evaluation, the state's
initialisation) from the cache instead of compiling them again: seconds of start-up on a CPU. The
cache is JAX's own (keyed by the program, the JAX / XLA version, the devices and the compiler
options), so a changed model or setting simply compiles anew.
"""
from __future__ import annotations

import logging
import os
import time

_IMPORTED_AT = time.time()


def process_start_time() -> float:
  """When this process started (``time.time()`` units): from /proc on Linux (includes the
  interpreter's start and every import), else when this module was imported."""
  try:
    with open('/proc/self/stat') as f:
      start_ticks = float(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/uptime') as f:
      uptime = float(f.read().split()[0])
    age = uptime - start_ticks / os.sysconf('SC_CLK_TCK')
    if 0 <= age < 1e7:
      return time.time() - age
  except (OSError, ValueError, IndexError):
    pass
  return _IMPORTED_AT


def seconds_since_start() -> float:
  return time.time() - process_start_time()


_FIRST_RUN_DONE = []


def first_step_line(run_started: float) -> str:
  """The log line for a run's first training step: from the process's start for its first run,
  from the run's own start for later ones (sweep trials, k-fold folds)."""
  if not _FIRST_RUN_DONE:
    _FIRST_RUN_DONE.append(True)
    return f'First training step done {seconds_since_start():.1f} s after the process started.'
  return f'First training step done {time.time() - run_started:.1f} s after this run began.'


def default_cache_dir() -> str:
  """``$IMGCLS_JAX_CACHE_DIR/jax_cache`` (default ``~/.cache/imgcls_jax/jax_cache``)."""
  base = os.environ.get('IMGCLS_JAX_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'imgcls_jax')
  return os.path.join(base, 'jax_cache')


def enable_compilation_cache(spec: str) -> str | None:
  """Points JAX's persistent compilation cache at ``spec`` ('' = off, 'default' =
  ``default_cache_dir()``, else a directory) and caches every program, however quick to compile
  (the small CPU programs are the point). Call before anything is compiled. Returns the directory
  or None."""
  spec = (spec or '').strip()
  if not spec:
    return None
  import jax
  path = default_cache_dir() if spec == 'default' else os.path.abspath(os.path.expanduser(spec))
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  logging.info('Persistent compilation cache: %s.', path)
  return path
