"""Inference latency per runtime, and a bounded load test of the HTTP server, on this machine.

  python benchmarks/latency.py [--models=digits_cnn,fast_cnn,resnet18_224]
      [--runtimes=jax,saved_model,tflite,tflite_int8,tflite_any,tflite_int8_any,onnx]
      [--batches=1,32] [--seconds=2]
      [--clients=1,8,32 --load_requests=600] [--json]

For each model (random weights: timing does not depend on the values; say so with the figures)
the script exports what ``--mode=export`` writes (SavedModel via jax2tf, TFLite float and int8 of
batch 1 (``tflite``, ``tflite_int8``: a batch of 32 is 32 calls), the same of any batch
(``tflite_any``, ``tflite_int8_any``: ``config.export.tflite_batch=0``), int8 calibrated on random
images, ONNX from the any-batch float TFLite) and times one call on a fixed batch:
one or two untimed calls, then calls until ``--seconds`` have passed (at least ``--min_iters``,
at most ``--max_iters``; with few calls p99 is close to the slowest call); p50 / p99 of the per-call latency and images/s = images / total time.
Models: the digits CNN of configs/default.py (8x8x1), fast_cnn of configs/fashion_mnist_quick.py
(28x28x1), ResNet-18 with the ImageNet stem at 224x224x3 (1000 classes).

The load test serves the digits CNN with ``--mode=serve``'s server (``make_server``) in a child
process and sends ``--load_requests`` PNG uploads (POST /v1/classify) from 1, 8 and 32 concurrent
keep-alive clients; it prints p50 / p99 request latency and requests/s.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import io
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from typing import Any, Callable

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, _REPO)

import numpy as np  # noqa: E402

MODELS = ('digits_cnn', 'fast_cnn', 'resnet18_224')
RUNTIMES = ('jax', 'saved_model', 'tflite', 'tflite_int8', 'tflite_any', 'tflite_int8_any', 'onnx')


def cpu_model() -> str:
  """The CPU's model name (``lscpu``'s 'Model name'), or the platform's processor string."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def model_config(name: str) -> Any:
  """(config, HxWxC, classes) of one benchmarked model."""
  from configs import default, fashion_mnist_quick
  if name == 'digits_cnn':
    return default.get_config(), (8, 8, 1), 10
  if name == 'fast_cnn':
    return fashion_mnist_quick.get_config(), (28, 28, 1), 10
  if name == 'resnet18_224':
    c = default.get_config()
    c.model = {'name': 'resnet18', 'small_inputs': False}
    c.data.mean, c.data.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return c, (224, 224, 3), 1000
  raise SystemExit(f'Unknown model {name!r}; choose from {", ".join(MODELS)}.')


def random_classifier(name: str, max_batch: int = 32) -> Any:
  """An ``inference.Classifier`` of model ``name`` with random (seed 0) weights."""
  import ml_collections
  from flax import nnx

  from imgcls_jax import inference, models
  from imgcls_jax import state as state_lib
  from imgcls_jax.data.info import DatasetInfo
  config, shape, classes = model_config(name)
  config = ml_collections.ConfigDict(config.to_dict())
  model = models.from_config(config, classes, shape[2])(rngs=nnx.Rngs(0))
  _, params, stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  info = DatasetInfo(name=name, num_classes=classes, class_names=tuple(map(str, range(classes))),
                     image_shape=shape, num_examples={})
  trained = inference.Trained(
      run=config, info=info, image_shape=shape, native_hw=shape[:2],
      variables=state_lib.InferenceState(nnx.to_pure_dict(params), nnx.to_pure_dict(stats)),
      step=0, origin='random weights')
  return inference.classifier(trained, max_batch=max_batch)


def runners(clf: Any, runtimes: list[str], workdir: str, threads: int
            ) -> dict[str, Callable[[np.ndarray], Any]]:
  """runtime -> a function of one uint8 batch, for the formats ``--mode=export`` writes."""
  from imgcls_jax.export import formats
  out: dict[str, Callable[[np.ndarray], Any]] = {}
  if 'jax' in runtimes:
    out['jax'] = clf.predict_arrays
  if set(runtimes) == {'jax'}:
    return out
  try:
    import tensorflow  # noqa: F401  (the exporter writes every other format through it)
  except ImportError:
    others = ','.join(r for r in runtimes if r != 'jax')
    raise SystemExit(f'latency.py: --runtimes {others} need TensorFlow (the exporter writes them '
                     'through it), which is not installed here; pass --runtimes=jax, or install '
                     'the project with pip install -e . where TensorFlow installs.')
  saved = os.path.join(workdir, 'saved_model')
  formats.save_saved_model(clf, saved)                 # any batch: TF Serving's model
  if 'saved_model' in runtimes:
    from imgcls_jax.data.tf_import import tf
    fn = tf.saved_model.load(saved).signatures['serving_default']
    out['saved_model'] = lambda x: {k: v.numpy() for k, v in fn(images=tf.constant(x)).items()}
  fixed = os.path.join(workdir, 'saved_model_1')        # batch 1: the exported TFLite models'
  if {'tflite', 'tflite_int8'} & set(runtimes):
    formats.save_saved_model(clf, fixed, batch=1)
  calibration = np.random.default_rng(1).integers(0, 256, (16, *clf.image_shape), np.uint8)
  any_path = os.path.join(workdir, 'model_any.tflite')
  if {'tflite_any', 'onnx'} & set(runtimes):
    formats.save_tflite(saved, any_path)
  for runtime, source, batch, quantize in (('tflite', fixed, 1, ''),
                                           ('tflite_int8', fixed, 1, 'int8'),
                                           ('tflite_any', saved, 0, ''),
                                           ('tflite_int8_any', saved, 0, 'int8')):
    if runtime not in runtimes:
      continue
    path = any_path if runtime == 'tflite_any' else os.path.join(workdir, f'{runtime}.tflite')
    if path != any_path:
      formats.save_tflite(source, path, quantize=quantize, batch=batch,
                          calibration_NxHxWxC=calibration if quantize else None)
    failure = formats.probe_tflite(path, clf.image_shape) if quantize else ''  # an abort would
    out[runtime] = _failed(failure) if failure else _tflite(path, threads)     # end the script
  if 'onnx' in runtimes:  # from the any-batch float TFLite model, as --mode=export does
    onnx_path = os.path.join(workdir, 'model.onnx')
    formats.save_onnx(any_path, onnx_path)
    out['onnx'] = formats.onnx_runner(onnx_path, threads=threads)
  return out


def _failed(reason: str) -> Callable[[np.ndarray], Any]:
  def fail(_: np.ndarray) -> Any:
    raise RuntimeError(reason)
  return fail


def _tflite(path: str, threads: int) -> Callable[[np.ndarray], Any]:
  """Invokes the LiteRT interpreter on a batch, resizing (and allocating) only on a new shape; a
  model of fixed batch size (the exported ones: 1) is invoked once per group of that size."""
  from ai_edge_litert.interpreter import Interpreter

  from imgcls_jax.export import formats
  interp = Interpreter(model_path=path, num_threads=threads or None)
  runner = interp.get_signature_runner('serving_default')
  fixed = formats.fixed_batch(runner)
  if not fixed:
    return lambda x: runner(images=x)
  return lambda x: [runner(images=x[i:i + fixed]) for i in range(0, len(x), fixed)]


def time_calls(fn: Callable[[np.ndarray], Any], batch: np.ndarray, *, seconds: float,
               min_iters: int, max_iters: int) -> dict[str, float]:
  """p50 / p99 latency (ms) of ``fn(batch)`` and images/s over the timed calls (after one
  untimed call, two when a call is short: compilation, allocation, caches)."""
  t = time.perf_counter()
  fn(batch)
  if time.perf_counter() - t < 0.1 * max(seconds, 1e-3):
    fn(batch)
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < max_iters and (len(times) < min_iters or
                                    time.perf_counter() - start < seconds):
    t = time.perf_counter()
    fn(batch)
    times.append(time.perf_counter() - t)
  total = sum(times)
  return {'p50_ms': 1e3 * float(np.percentile(times, 50)),
          'p99_ms': 1e3 * float(np.percentile(times, 99)), 'calls': len(times),
          'images_per_s': len(batch) * len(times) / total}


# ---- the server load test ----

def _serve_child(conn: Any, model: str, max_batch: int) -> None:
  """Child process: serve ``model`` (random weights) on a free loopback port until terminated."""
  from configs import default
  from imgcls_jax import serve
  cfg = default.get_config().serve
  cfg.port, cfg.max_batch_size = 0, max_batch
  server = serve.make_server(random_classifier(model, max_batch), cfg)
  conn.send(server.url)
  server.serve_forever()


def load_test(model: str, clients: list[int], requests: int, max_batch: int) -> list[dict]:
  """p50 / p99 latency and requests/s of POST /v1/classify from each number of clients."""
  from PIL import Image
  _, shape, _ = model_config(model)
  rng = np.random.default_rng(0)
  bodies = []
  for _ in range(16):
    buf = io.BytesIO()
    pixels = rng.integers(0, 256, shape, np.uint8)
    Image.fromarray(pixels[..., 0] if shape[2] == 1 else pixels).save(buf, 'PNG')
    bodies.append(buf.getvalue())
  ctx = multiprocessing.get_context('spawn')
  parent, child = ctx.Pipe()
  proc = ctx.Process(target=_serve_child, args=(child, model, max_batch), daemon=True)
  proc.start()
  try:
    if not parent.poll(300):
      raise SystemExit('The server did not start within 300 s.')
    host, port = parent.recv().split('//')[1].rsplit(':', 1)

    def client(n: int, offset: int) -> tuple[list[float], int]:
      conn = http.client.HTTPConnection(host, int(port), timeout=60)
      times, errors = [], 0
      for i in range(n):
        t = time.perf_counter()
        conn.request('POST', '/v1/classify?top_k=1', body=bodies[(i + offset) % len(bodies)])
        resp = conn.getresponse()
        resp.read()
        times.append(time.perf_counter() - t)
        errors += resp.status != 200
      conn.close()
      return times, errors

    client(20, 0)  # warm-up
    results = []
    for c in clients:
      start = time.perf_counter()
      with concurrent.futures.ThreadPoolExecutor(c) as pool:
        done = [f.result() for f in [pool.submit(client, requests // c, i) for i in range(c)]]
      wall = time.perf_counter() - start
      times = [t for ts, _ in done for t in ts]
      results.append({'clients': c, 'requests': len(times), 'errors': sum(e for _, e in done),
                      'p50_ms': 1e3 * float(np.percentile(times, 50)),
                      'p99_ms': 1e3 * float(np.percentile(times, 99)),
                      'requests_per_s': len(times) / wall})
    return results
  finally:
    proc.terminate()
    proc.join(30)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--models', default=','.join(MODELS))
  p.add_argument('--runtimes', default=','.join(RUNTIMES))
  p.add_argument('--batches', default='1,32')
  p.add_argument('--seconds', type=float, default=2.0, help='timed seconds per cell (at least)')
  p.add_argument('--min_iters', type=int, default=3)
  p.add_argument('--max_iters', type=int, default=300)
  p.add_argument('--threads', type=int, default=os.cpu_count() or 1,
                 help='threads for LiteRT and onnxruntime (JAX and TF use all cores)')
  p.add_argument('--clients', default='1,8,32', help="concurrent clients; '' = no load test")
  p.add_argument('--load_requests', type=int, default=600, help='requests per client count')
  p.add_argument('--load_model', default='digits_cnn')
  p.add_argument('--load_max_batch', type=int, default=32, help='config.serve.max_batch_size')
  p.add_argument('--json', action='store_true', help='print one JSON record at the end')
  args = p.parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import jax
  models = [m for m in args.models.split(',') if m]
  runtimes = [r for r in args.runtimes.split(',') if r]
  if bad := [r for r in runtimes if r not in RUNTIMES]:
    raise SystemExit(f'Unknown runtime {bad[0]!r}; choose from {", ".join(RUNTIMES)}.')
  batches = [int(b) for b in args.batches.split(',') if b]
  record: dict[str, Any] = {
      'cpu': cpu_model(), 'cores': os.cpu_count(), 'jax': jax.__version__,
      'threads_litert_onnxruntime': args.threads, 'weights': 'random (seed 0)', 'latency': [],
      'load_test': []}
  print(f"CPU: {record['cpu']} ({record['cores']} cores); jax {jax.__version__}; random weights",
        flush=True)
  print(f"{'model':<13} {'runtime':<12} {'batch':>5} {'p50 ms':>9} {'p99 ms':>9} "
        f"{'images/s':>9} {'calls':>6}", flush=True)
  for name in models:
    clf = random_classifier(name, max(batches))
    with tempfile.TemporaryDirectory() as tmp:
      t = time.perf_counter()
      fns = runners(clf, runtimes, tmp, args.threads)
      record.setdefault('export_s', {})[name] = time.perf_counter() - t
      rng = np.random.default_rng(0)
      for runtime in runtimes:
        for b in batches:
          batch = rng.integers(0, 256, (b, *clf.image_shape), np.uint8)
          try:
            r = time_calls(fns[runtime], batch, seconds=args.seconds, min_iters=args.min_iters,
                           max_iters=args.max_iters)
          except Exception as e:  # e.g. a format its runtime cannot run: report, go on
            error = (str(e).strip().splitlines() or [type(e).__name__])[-1][:160]
            record['latency'].append({'model': name, 'runtime': runtime, 'batch': b,
                                      'error': error})
            print(f'{name:<13} {runtime:<12} {b:>5} failed: {error}', flush=True)
            continue
          record['latency'].append({'model': name, 'runtime': runtime, 'batch': b, **r})
          print(f"{name:<13} {runtime:<12} {b:>5} {r['p50_ms']:>9.3f} {r['p99_ms']:>9.3f} "
                f"{r['images_per_s']:>9.1f} {r['calls']:>6}", flush=True)
  clients = [int(c) for c in args.clients.split(',') if c]
  if clients:
    print(f'Server load test: {args.load_model} (random weights), {args.load_requests} '
          'PNG uploads per row, keep-alive clients', flush=True)
    print(f"{'clients':>7} {'p50 ms':>9} {'p99 ms':>9} {'requests/s':>11} {'errors':>6}")
    for r in load_test(args.load_model, clients, args.load_requests, args.load_max_batch):
      record['load_test'].append(r)
      print(f"{r['clients']:>7} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} "
            f"{r['requests_per_s']:>11.1f} {r['errors']:>6}", flush=True)
  if args.json:
    print(json.dumps(record))
  return record


if __name__ == '__main__':
  main()
