"""Where a traced step's device time goes: sums a Perfetto trace's kernel time by kernel and kind.

  python benchmarks/throughput.py --config=... --profile_dir=/tmp/prof --profile_steps=5
  python benchmarks/trace_summary.py /tmp/prof --steps=5 [--top=25] [--json]

Reads the newest ``*.trace.json.gz`` under the folder (what ``jax.profiler.trace`` writes with
``create_perfetto_trace=True``; ``measure.profile_steps`` does that). Device events are those of
the trace's ``/device:...`` processes (a GPU's kernels, per stream); a CPU trace has none, so
there the XLA thread pool's events (thread names holding ``XLA`` but not the client's dispatch
threads) stand in. Kinds come from kernel names (cuDNN / CUTLASS convolution kernels, cuBLAS /
nvjet matmuls, XLA's reduction and loop fusions, copies); the top-kernel list is the ground truth
the kinds summarise. Imports neither JAX nor TensorFlow.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
from typing import Any

# First match wins; order matters (a cuDNN "implicit_gemm" kernel is a convolution, not a matmul).
KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ('convolution', re.compile(r'conv|cudnn|xmma|implicit|dgrad|wgrad|fprop|winograd', re.I)),
    ('matmul', re.compile(r'gemm|cublas|nvjet|dot|matmul', re.I)),
    ('copy / transpose', re.compile(r'copy|memcpy|memset|transpose', re.I)),
    ('reduction fusion', re.compile(r'reduc', re.I)),
    ('other fusion', re.compile(r'fusion|loop_|kernel', re.I)),
)


def kind_of(name: str) -> str:
  """The kind of a kernel by its name (``'other'`` when no pattern matches)."""
  for kind, pattern in KINDS:
    if pattern.search(name):
      return kind
  return 'other'


def newest_trace(path: str) -> str:
  """``path`` itself if it is a trace file, else the newest ``*.trace.json.gz`` under it."""
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, '**', '*.trace.json.gz'), recursive=True)
  if not found:
    raise FileNotFoundError(f'no *.trace.json.gz under {path}; run a benchmark with '
                            f'--profile_dir={path} first.')
  return max(found, key=os.path.getmtime)


def device_events(trace: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
  """(where the events come from, complete events that ran on the device)."""
  events = trace.get('traceEvents', [])
  procs: dict[Any, str] = {}
  threads: dict[tuple[Any, Any], str] = {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      procs[e['pid']] = str(e.get('args', {}).get('name', ''))
    elif e.get('ph') == 'M' and e.get('name') == 'thread_name':
      threads[(e['pid'], e['tid'])] = str(e.get('args', {}).get('name', ''))
  complete = [e for e in events if e.get('ph') == 'X' and 'dur' in e]
  device_pids = {pid for pid, name in procs.items() if name.startswith('/device:')}
  if device_pids:
    names = sorted(procs[p] for p in device_pids)
    return ', '.join(names), [e for e in complete if e['pid'] in device_pids]
  pool = {key for key, name in threads.items() if 'XLA' in name and 'Client' not in name}
  # On the CPU, a ThunkExecutor::Execute event encloses the thunks it runs: count the thunks.
  return 'host XLA threads', [e for e in complete if (e['pid'], e['tid']) in pool
                              and not str(e.get('name', '')).startswith('ThunkExecutor')]


def summarise(trace: dict[str, Any], steps: int, top: int) -> dict[str, Any]:
  """Device microseconds per step, by kernel name (top ``top``) and by kind."""
  source, events = device_events(trace)
  by_name: collections.Counter[str] = collections.Counter()
  calls: collections.Counter[str] = collections.Counter()
  for e in events:
    by_name[e['name']] += float(e['dur'])
    calls[e['name']] += 1
  total = sum(by_name.values())
  by_kind: collections.Counter[str] = collections.Counter()
  for name, us in by_name.items():
    by_kind[kind_of(name)] += us
  share = (lambda us: us / total) if total else (lambda us: 0.0)
  return {
      'source': source, 'steps': steps, 'kernels': len(by_name),
      'device_ms_per_step': total / steps / 1e3,
      'kinds': [{'kind': k, 'ms_per_step': us / steps / 1e3, 'share': share(us)}
                for k, us in by_kind.most_common()],
      'top': [{'name': n, 'ms_per_step': us / steps / 1e3, 'share': share(us),
               'calls_per_step': calls[n] / steps, 'kind': kind_of(n)}
              for n, us in by_name.most_common(top)],
  }


def render(s: dict[str, Any]) -> str:
  """The summary as text."""
  lines = [f"{s['source']}: {s['device_ms_per_step']:.3f} ms of kernel time per step "
           f"({s['kernels']} distinct kernels, {s['steps']} steps traced)"]
  for k in s['kinds']:
    lines.append(f"  {k['kind']:<18} {k['ms_per_step']:9.3f} ms  {k['share']:6.1%}")
  lines.append('top kernels (ms per step, share, calls per step, kind):')
  for t in s['top']:
    lines.append(f"  {t['ms_per_step']:8.3f} {t['share']:6.1%} {t['calls_per_step']:6.1f}  "
                 f"{t['kind']:<16} {t['name'][:110]}")
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('path', help='a --profile_dir folder or a *.trace.json.gz file')
  p.add_argument('--steps', type=int, default=5, help='steps traced (--profile_steps)')
  p.add_argument('--top', type=int, default=25, help='kernels listed')
  p.add_argument('--json', action='store_true', help='print JSON instead of text')
  a = p.parse_args(argv)
  if a.steps < 1:
    p.error('--steps must be >= 1')
  try:
    path = newest_trace(a.path)
    with gzip.open(path, 'rt') as f:
      trace = json.load(f)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  s = summarise(trace, a.steps, a.top)
  print(json.dumps(s, indent=1) if a.json else render(s))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
